"""MD throughput and peak memory of `pair_style janus` (LAMMPS, 1 and 2 ranks) next to ASE.

For every system size and model dtype: NVE in LAMMPS (`lmp` / `mpirun -np N lmp`, no plugin
load line) and `ase.md.verlet.VelocityVerlet` with `JanusCalculator`, both on the same
structure (examples/lammps/make_structure.py) and the same exported model (`small` preset by
default, random weights), exported as a TorchScript file and, with `--formats torchscript aoti`,
as an AOTInductor package (.pt2; its compile time is reported). One OpenMP thread per process
(one core per rank). Warm-up steps are excluded from the timing; peak memory is the maximum
resident set size of each process. The "vs ASE" ratio is against ASE with the TorchScript
file of the same dtype, measured in the same run. `--malloc auto system` runs every case with
freed memory kept in the heap (JANUS_MALLOC=auto, what the front ends do) and with glibc's
default (JANUS_MALLOC=system); the baseline is the first setting.

    python bench/lammps_md.py --quick
    python bench/lammps_md.py --repeats 7 9 11 --steps 10
    python bench/lammps_md.py --repeats 14 --ranks 1 --formats torchscript aoti --malloc auto system

Prints a table and writes JSON (bench/results/lammps_md.json by default).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
ELEMENTS = ("Cu", "Ni", "Al", "Si")

LAMMPS_INPUT = """units metal
atom_style atomic
boundary p p p
newton on
read_data {data}
pair_style janus
pair_coeff * * {model} {elements}
velocity all create 300.0 4928459 mom yes rot yes dist gaussian
timestep 0.001
fix integrate all nve
thermo {steps}
run {warmup}
run {steps}
"""

PEAK_RSS_WRAPPER = (
    "import resource, subprocess, sys\n"
    "code = subprocess.call(sys.argv[1:], close_fds=False)  # keep the MPI PMI descriptor\n"
    "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def environment(malloc: str = "auto") -> dict[str, str]:
    """One thread, passive OpenMP waits, and JANUS_MALLOC=`malloc` ("auto": the front ends keep
    freed memory in the heap, janus_potential.devices.keep_freed_memory; "system": glibc's
    default), without the Makefile's malloc variables (they would turn "auto" off)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", JANUS_MALLOC=malloc)
    return env


def structure(repeat: int):
    sys.path.insert(0, os.path.join(ROOT, "examples", "lammps"))
    from make_structure import alloy

    return alloy(repeat)


def run_lammps(data: str, model: str, ranks: int, steps: int, warmup: int, workdir: str, malloc: str) -> dict:
    script = os.path.join(workdir, "in.bench")
    with open(script, "w") as handle:
        handle.write(LAMMPS_INPUT.format(data=data, model=model, elements=" ".join(ELEMENTS), steps=steps, warmup=warmup))
    command = [sys.executable, "-c", PEAK_RSS_WRAPPER, os.path.join(BIN, "lmp"), "-in", script, "-log", "none"]
    if ranks > 1:
        command = [os.path.join(BIN, "mpirun"), "-np", str(ranks), *command]
    result = subprocess.run(command, cwd=workdir, env=environment(malloc), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"LAMMPS failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    loops = re.findall(r"Loop time of ([0-9.eE+-]+) on (\d+) procs for (\d+) steps with (\d+) atoms", result.stdout)
    seconds, _, nsteps, natoms = loops[-1]
    peaks = [int(v) for v in re.findall(r"PEAK_RSS_KB (\d+)", result.stderr)]
    return {"seconds": float(seconds), "steps": int(nsteps), "atoms": int(natoms),
            "atom_steps_per_s": int(natoms) * int(nsteps) / float(seconds),
            "peak_rss_mb_per_rank": max(peaks) / 1024.0}


def ase_worker(repeat: int, model: str, steps: int, warmup: int) -> None:
    """Runs in its own process (one thread): prints one JSON line."""
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet

    from janus_potential.ase import JanusCalculator

    atoms = structure(repeat)
    atoms.calc = JanusCalculator(model)
    MaxwellBoltzmannDistribution(atoms, temperature_K=300.0)
    dynamics = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    dynamics.run(warmup)
    start = time.perf_counter()
    dynamics.run(steps)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "steps": steps, "atoms": len(atoms),
                      "atom_steps_per_s": len(atoms) * steps / seconds,
                      "peak_rss_mb_per_rank": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}))


def run_ase(repeat: int, model: str, steps: int, warmup: int, malloc: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--ase-worker", str(repeat), model, str(steps), str(warmup)]
    result = subprocess.run(command, env=environment(malloc), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ASE run failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--ase-worker":
        ase_worker(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one size (1,372 atoms), few steps")
    parser.add_argument("--repeats", type=int, nargs="+", default=[7, 9, 11],
                        help="fcc repeats (atoms = 4 * repeat**3): 7 -> 1372, 9 -> 2916, 11 -> 5324, 14 -> 10976")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--formats", nargs="+", choices=["torchscript", "aoti"], default=["torchscript"])
    parser.add_argument("--malloc", nargs="+", choices=["auto", "system"], default=["auto"],
                        help="JANUS_MALLOC settings to run (auto: freed memory kept in the heap; system: glibc default)")
    parser.add_argument("--output", default=os.path.join(ROOT, "bench", "results", "lammps_md.json"))
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.steps, args.warmup = [7], 5, 2

    import torch

    from janus_potential import JanusPotential
    from janus_potential.export import export_model

    sys.path.insert(0, os.path.join(ROOT, "examples", "lammps"))
    from make_structure import write_data

    rows, compile_seconds = [], {}
    with tempfile.TemporaryDirectory(prefix="janus_bench_") as workdir:
        torch.manual_seed(0)
        model = JanusPotential.from_preset(args.preset)
        models = {}
        for dtype in args.dtypes:
            for fmt in args.formats:
                start = time.perf_counter()
                if fmt == "torchscript":
                    models[dtype, fmt] = os.path.join(workdir, f"{args.preset}_{dtype}.pt")
                    export_model(model, models[dtype, fmt], dtype)
                else:
                    from janus_potential.aoti import export_aoti

                    models[dtype, fmt] = os.path.join(workdir, f"{args.preset}_{dtype}.pt2")
                    export_aoti(model, models[dtype, fmt], dtype)
                    compile_seconds[dtype] = time.perf_counter() - start
                    print(f"compiled the {dtype} package in {compile_seconds[dtype]:.0f} s", flush=True)
        for repeat in args.repeats:
            data = os.path.join(workdir, f"alloy_{repeat}.data")
            write_data(structure(repeat), data, ELEMENTS)
            for dtype in args.dtypes:
                runs = []
                for malloc in args.malloc:
                    for fmt in args.formats:
                        file = models[dtype, fmt]
                        runs += [("ase", fmt, malloc, 1, lambda file=file, malloc=malloc: run_ase(
                            repeat, file, args.steps, args.warmup, malloc))]
                        runs += [("lammps", fmt, malloc, ranks, lambda ranks=ranks, file=file, malloc=malloc: run_lammps(
                            data, file, ranks, args.steps, args.warmup, workdir, malloc)) for ranks in args.ranks]
                for path, fmt, malloc, ranks, measure in runs:
                    row = {"path": path, "format": fmt, "malloc": malloc, "ranks": ranks, "dtype": dtype,
                           "preset": args.preset, **measure()}
                    rows.append(row)
                    print(f"{row['atoms']:>7} {dtype:>8} {malloc:>6} {path:>7} {fmt:>11} x{ranks}  "
                          f"{row['atom_steps_per_s']:10.0f} atom-steps/s  {row['peak_rss_mb_per_rank']:8.0f} MB/rank",
                          flush=True)

    print(f"\n{'atoms':>7} {'dtype':>8} {'malloc':>6} {'path':>10} {'format':>11} {'atom-steps/s':>13} "
          f"{'vs ASE TS':>9} {'peak MB/rank':>13} {'kB/atom':>8}")
    for row in rows:  # the baseline: ASE with the first format and the first malloc setting, same size and dtype
        ase = next(r for r in rows if r["path"] == "ase" and r["atoms"] == row["atoms"] and r["dtype"] == row["dtype"]
                   and r["format"] == args.formats[0] and r["malloc"] == args.malloc[0])
        name = "ase" if row["path"] == "ase" else f"lammps x{row['ranks']}"
        total_kb = row["peak_rss_mb_per_rank"] * 1024 * row["ranks"]
        print(f"{row['atoms']:>7} {row['dtype']:>8} {row['malloc']:>6} {name:>10} {row['format']:>11} "
              f"{row['atom_steps_per_s']:13.0f} "
              f"{row['atom_steps_per_s'] / ase['atom_steps_per_s']:9.2f} {row['peak_rss_mb_per_rank']:13.0f} "
              f"{total_kb / row['atoms']:8.1f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump({"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads_per_rank": 1},
                   "steps": args.steps, "warmup": args.warmup, "baseline": f"ase {args.formats[0]} malloc {args.malloc[0]}",
                   "package_compile_seconds": compile_seconds, "rows": rows}, handle, indent=1)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
