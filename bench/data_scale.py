"""Data at scale: packing, loader throughput and trainer memory for 10^4 and 10^6 structures.

For each size N:

1. generate: N rattled, strained fcc/bcc cells of 4-64 atoms of the EMT metals (Al, Cu,
   Ag, Au, Ni, Pd, Pt; half of them alloyed with a second metal), streamed into one extended
   XYZ file frame by frame (nothing is held in a list). Labels: `--labels noise` (default;
   energy, forces and stress drawn at random: the point is memory and throughput) or
   `--labels emt` (ASE's EMT calculator, about 2 ms a frame);
2. pack: `pack_files` (what `janus pack` runs): wall time, bytes on disk, peak RSS;
3. loader: the DataLoader alone (2 workers, prefetch 2, `small`'s cutoff, batches of 256
   atoms in the order of epochs 0, 1, ...) for `--loader-seconds`: atoms/s delivered;
4. train: `Trainer` on the pack, `small` preset, float32, `--steps` steps (default 200),
   2 loader workers, a validation split of 200 frames: time to set up (open + checksums +
   statistics), time to train, the step's consumption (atoms/s of the training step, the
   mean of metrics.jsonl's `atoms_per_s` after the first record), the time the step waited
   for data, and peak RSS of the trainer (getrusage RUSAGE_SELF) and of its loader workers
   (RUSAGE_CHILDREN: the largest worker).

Every phase runs in its own process, so each peak RSS is that phase's alone. Targets (issue
10): trainer peak RSS at 10^6 structures within 10 % of the 10^4 run and below 3 GB;
loader atoms/s at least 3x the step's consumption.

    python bench/data_scale.py                        # N = 10,000 and 1,000,000
    python bench/data_scale.py --sizes 10000 --steps 50
Writes bench/results/data_scale.json (machine, command, environment, one row per N);
generated files and packs stay in `--workdir` (default runs/data_scale, ignored by git) and
are reused when present, with the times and memory measured when they were made.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
METALS = ["Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt"]
ATOMS_PER_BATCH = 256
VALIDATION_FRAMES = 200


def peak_rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # kB on Linux


# ----------------------------------------------------------------------------- phases
def generate(path: Path, count: int, labels: str, seed: int = 0) -> None:
    """`count` labelled structures written one at a time (a temporary file renamed at the end)."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.data import atomic_numbers, reference_states
    from ase.io import write

    rng = np.random.default_rng(seed)
    repeats = {lattice: [(x, y, z) for x in range(1, 5) for y in range(1, 5) for z in range(1, 5)
                         if 4 <= per_cell * x * y * z <= 64] for lattice, per_cell in (("fcc", 4), ("bcc", 2))}
    crystals: dict = {}
    calculator = EMT() if labels == "emt" else None
    reference = {symbol: -3.0 - rng.random() for symbol in METALS}
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        for _ in range(count):
            host = METALS[rng.integers(len(METALS))]
            lattice = ("fcc", "bcc")[rng.integers(2)]
            repeat = repeats[lattice][rng.integers(len(repeats[lattice]))]
            key = (host, lattice, repeat)
            if key not in crystals:
                a = reference_states[atomic_numbers[host]]["a"] * (1.0 if lattice == "fcc" else 0.5 ** (1 / 3))
                crystals[key] = bulk(host, lattice, a=a, cubic=True).repeat(repeat)
            atoms = crystals[key].copy()
            if rng.random() < 0.5:
                guest = METALS[rng.integers(len(METALS))]
                sites = rng.random(len(atoms)) < rng.random() * 0.5
                atoms.symbols[sites] = guest
            strain = rng.normal(0.0, 0.02, (3, 3))
            atoms.set_cell(atoms.cell.array @ (np.eye(3) + (strain + strain.T) / 2), scale_atoms=True)
            atoms.positions += rng.normal(0.0, 0.05, atoms.positions.shape)
            if calculator is not None:
                atoms.calc = calculator
                energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
            else:
                energy = sum(reference[s] for s in atoms.get_chemical_symbols()) + rng.normal(0.0, 0.05) * len(atoms)
                forces = rng.normal(0.0, 0.5, (len(atoms), 3))
                stress = rng.normal(0.0, 0.005, 6)
            atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces, stress=stress)
            write(handle, atoms, format="extxyz")
    os.replace(tmp, path)


def phase_pack(source: Path, pack: Path) -> dict:
    from janus_potential.training.pack import pack_files

    start = time.perf_counter()
    manifest = pack_files([source], pack, progress=True, every_s=60.0)
    seconds = time.perf_counter() - start
    return {"pack_s": seconds, "frames": manifest["frames"], "atoms": manifest["atoms"],
            "pack_bytes": sum(f.stat().st_size for f in pack.iterdir()),
            "pack_peak_rss_mb": peak_rss_mb(resource.RUSAGE_SELF)}


def phase_loader(pack: Path, seconds: float) -> dict:
    import torch

    from janus_potential.config import ModelConfig
    from janus_potential.training.data import FrameSamples, atom_budget_batches
    from janus_potential.training.loader import sample_loader
    from janus_potential.training.pack import PackedFrames

    opened = time.perf_counter()
    frames = PackedFrames([pack])
    samples = FrameSamples(frames, np.arange(len(frames)), ModelConfig.from_preset("small").cutoff, torch.float32)
    open_s = time.perf_counter() - opened
    plan = (batch for epoch in itertools.count()
            for batch in atom_budget_batches(samples.sizes, ATOMS_PER_BATCH, 0, epoch))
    stream = iter(sample_loader(samples, plan, 2, 2))
    started = time.perf_counter()
    next(stream)
    first_batch_s = time.perf_counter() - started
    atoms, delivered, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        atoms += sum(sample.num_atoms for sample in next(stream))
        delivered += 1
    elapsed = time.perf_counter() - start
    del stream  # joins the workers, so that RUSAGE_CHILDREN counts them
    return {"loader_open_s": open_s, "loader_first_batch_s": first_batch_s, "loader_batches": delivered,
            "loader_atoms_per_s": atoms / elapsed, "loader_peak_rss_mb": peak_rss_mb(resource.RUSAGE_SELF),
            "loader_worker_peak_rss_mb": peak_rss_mb(resource.RUSAGE_CHILDREN)}


def phase_train(pack: Path, output: Path, steps: int) -> dict:
    from janus_potential.training.config import TrainConfig
    from janus_potential.training.trainer import Trainer

    frames = json.loads((pack / "manifest.json").read_text())["frames"]
    config = TrainConfig.from_dict({
        "data": {"train": [str(pack)], "cache_dir": "", "validation_fraction": VALIDATION_FRAMES / frames,
                 "max_atoms_per_batch": ATOMS_PER_BATCH, "num_workers": 2, "prefetch_factor": 2},
        "model": {"preset": "small"},
        "optim": {"max_steps": steps, "warmup_steps": 20},
        "run": {"output": str(output), "dtype": "float32", "log_every": 10, "checkpoint_every": 100,
                "progress": False},
    })
    start = time.perf_counter()
    trainer = Trainer(config)
    setup_s = time.perf_counter() - start
    setup_rss = peak_rss_mb(resource.RUSAGE_SELF)
    start = time.perf_counter()
    trainer.fit()
    fit_s = time.perf_counter() - start
    del trainer
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    steps_logged = [r for r in records if "atoms_per_s" in r]
    return {"train_setup_s": setup_s, "train_fit_s": fit_s, "train_steps": steps,
            "step_atoms_per_s": float(np.mean([r["atoms_per_s"] for r in steps_logged[1:]])),
            "data_wait_s": float(sum(r["data_wait_s"] for r in steps_logged)),
            "train_setup_peak_rss_mb": setup_rss, "trainer_peak_rss_mb": peak_rss_mb(resource.RUSAGE_SELF),
            "worker_peak_rss_mb": peak_rss_mb(resource.RUSAGE_CHILDREN)}


# ----------------------------------------------------------------------------- driver
def run_phase(*arguments: str) -> dict:
    """One phase in a fresh process (its own peak RSS); its result is the last output line."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    done = subprocess.run([sys.executable, __file__, "--phase", *arguments], env=env, stdout=subprocess.PIPE,
                          text=True)
    if done.returncode:
        raise SystemExit(f"phase {arguments[0]} failed ({done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(size: int, args: argparse.Namespace) -> dict:
    workdir = Path(args.workdir) / f"n{size}-{args.labels}"
    workdir.mkdir(parents=True, exist_ok=True)
    source, pack = workdir / "data.xyz", workdir / "pack"
    row: dict = {"structures": size, "labels": args.labels}
    for phase, done, arguments in (("generate", source, (str(source), str(size), args.labels)),
                                   ("pack", pack / "manifest.json", (str(source), str(pack)))):
        record = workdir / f"{phase}.json"  # the phase's result, reported again when its output is reused
        if not done.exists():
            print(f"N={size:,}: {phase}", flush=True)
            record.write_text(json.dumps(run_phase(phase, *arguments)))
        row.update(json.loads(record.read_text()))
    row["xyz_bytes"] = source.stat().st_size
    print(f"N={size:,}: loader alone, {args.loader_seconds:.0f} s", flush=True)
    row.update(run_phase("loader", str(pack), str(args.loader_seconds)))
    print(f"N={size:,}: training {args.steps} steps of small", flush=True)
    output = workdir / "run"
    for stale in ("checkpoint.pt", "metrics.jsonl"):
        (output / stale).unlink(missing_ok=True)
    row.update(run_phase("train", str(pack), str(output), str(args.steps)))
    row["loader_over_step"] = row["loader_atoms_per_s"] / row["step_atoms_per_s"]
    return row


def table(rows: list[dict]) -> str:
    columns = [("structures", "N", "{:,}"), ("gen_s", "gen s", "{:.0f}"), ("pack_s", "pack s", "{:.0f}"),
               ("pack_bytes", "pack MB", "{:.0f}"), ("pack_peak_rss_mb", "pack RSS MB", "{:.0f}"),
               ("train_setup_s", "setup s", "{:.1f}"), ("trainer_peak_rss_mb", "trainer RSS MB", "{:.0f}"),
               ("worker_peak_rss_mb", "worker RSS MB", "{:.0f}"), ("loader_atoms_per_s", "loader at/s", "{:.0f}"),
               ("step_atoms_per_s", "step at/s", "{:.0f}"), ("loader_over_step", "ratio", "{:.1f}"),
               ("data_wait_s", "wait s", "{:.2f}")]
    lines = [" ".join(f"{title:>14}" for _, title, _ in columns)]
    for row in rows:
        cells = []
        for key, _, form in columns:
            value = row.get(key)
            if key == "pack_bytes" and value is not None:
                value /= 1e6
            cells.append(f"{form.format(value) if value is not None else '-':>14}")
        lines.append(" ".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--labels", choices=["noise", "emt"], default="noise")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--loader-seconds", type=float, default=20.0)
    parser.add_argument("--workdir", default=str(Path(__file__).resolve().parents[1] / "runs" / "data_scale"))
    parser.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        name, *rest = args.phase
        if name == "generate":
            start = time.perf_counter()
            generate(Path(rest[0]), int(rest[1]), rest[2])
            result = {"gen_s": time.perf_counter() - start}
        elif name == "pack":
            result = phase_pack(Path(rest[0]), Path(rest[1]))
        elif name == "loader":
            result = phase_loader(Path(rest[0]), float(rest[1]))
        else:
            result = phase_train(Path(rest[0]), Path(rest[1]), int(rest[2]))
        print(json.dumps(result))
        return
    rows = []
    for size in args.sizes:
        rows.append(measure(size, args))
        print(table(rows), flush=True)
    with open("/proc/meminfo") as meminfo:
        memory_gb = int(meminfo.readline().split()[1]) / 2**20
    import torch

    out = {
        "machine": {"cpus": os.cpu_count(), "memory_gb": round(memory_gb, 1), "platform": platform.platform(),
                    "torch": torch.__version__, "note": "shared with other jobs"},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "environment": {name: os.environ.get(name) for name in
                        ("OMP_WAIT_POLICY", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")},
        "setup": {"preset": "small", "dtype": "float32", "max_atoms_per_batch": ATOMS_PER_BATCH, "num_workers": 2,
                  "prefetch_factor": 2, "validation_frames": VALIDATION_FRAMES, "steps": args.steps},
        "rows": rows,
    }
    if len(rows) > 1:
        smallest, largest = rows[0], rows[-1]
        out["trainer_rss_growth"] = largest["trainer_peak_rss_mb"] / smallest["trainer_peak_rss_mb"] - 1
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "data_scale.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {RESULTS / 'data_scale.json'}")


if __name__ == "__main__":
    main()
