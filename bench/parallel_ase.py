"""Parallel ASE calculator benchmark: one process vs 2 MPI ranks on one large crystal.

Diamond Si supercells of about 20,000, 50,000 and 100,000 atoms, the `small` preset with
random weights exported in float32, one thread per process. Each case runs in its own
process(es), so that peak memory is that case's alone:

- serial: `JanusCalculator(model)` in one process;
- parallel: `mpirun -np 2`, `JanusCalculator(model, parallel=True)` on every rank (each
  rank builds and evaluates its own slab, `ase_interface/parallel.py`).

Per case: neighbour-list build time, the first evaluation (build included), seconds per
VelocityVerlet step (1 fs, 300 K; average over `--steps` steps after one warm-up step, all
within the skin, so no rebuild; the slowest rank for 2 ranks), user and system CPU seconds
per step (less sensitive than wall time to other jobs on a shared machine), and per rank:
peak RSS (`getrusage`), owned / ghost atoms,
halo bytes sent per step and the bytes of the all-gather that hands every rank the full
forces (ASE's every-rank-holds-the-Atoms convention), reported separately.

    python bench/parallel_ase.py                          # 20k, 50k, 100k atoms
    python bench/parallel_ase.py --atoms 20000 --steps 2  # one size
Writes bench/results/parallel_ase.json (machine, command, rows, serial/parallel ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from inference import build_structure, rss_mb  # noqa: E402


def run_case(kind: str, n_atoms: int, steps: int, model_path: str) -> None:
    """One case; prints one JSON line (rank 0) with the per-rank measurements."""
    import torch
    from ase import units
    from ase.md.verlet import VelocityVerlet

    from janus_potential.ase import JanusCalculator

    torch.set_num_threads(1)
    atoms = build_structure("Si", n_atoms)
    kinetic = np.sqrt(atoms.get_masses() * units.kB * 300.0)[:, None]  # Maxwell-Boltzmann at 300 K
    atoms.set_momenta(kinetic * np.random.default_rng(0).normal(size=(len(atoms), 3)))
    calculator = JanusCalculator(model_path, parallel=kind == "parallel")
    atoms.calc = calculator
    rss_before = rss_mb()
    row = {"kind": kind, "atoms": len(atoms)}
    if kind == "serial":
        start = time.perf_counter()
        calculator._neighbor_list(atoms)
        row["build_s"] = time.perf_counter() - start
    start = time.perf_counter()
    atoms.get_forces()
    row["first_evaluation_s"] = time.perf_counter() - start
    dynamics = VelocityVerlet(atoms, 1.0 * units.fs)
    dynamics.run(1)  # warm-up
    parallel = calculator._parallel
    before = parallel.statistics() if parallel else {}
    step_seconds = []
    cpu_start = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
        start = time.perf_counter()
        dynamics.run(1)
        step_seconds.append(time.perf_counter() - start)
    cpu_end = resource.getrusage(resource.RUSAGE_SELF)
    row["s_per_step"] = float(np.mean(step_seconds))
    row["step_seconds"] = step_seconds
    row["user_cpu_s_per_step"] = (cpu_end.ru_utime - cpu_start.ru_utime) / steps
    row["system_cpu_s_per_step"] = (cpu_end.ru_stime - cpu_start.ru_stime) / steps
    row["rss_before_mb"] = rss_before
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if parallel is None:
        print(json.dumps({**row, "ranks": 1, "per_rank": [row]}), flush=True)
        return
    after = parallel.statistics()
    row.update(
        rank=parallel.rank, builds=after["builds"], build_s=after["build_s"] / after["builds"],
        owned=after["owned"], ghosts=after["ghosts"], off_rank_ghosts=after["off_rank_ghosts"],
        skin_edges=after["skin_edges"],
        halo_mb_per_step=(after["halo_bytes"] - before["halo_bytes"]) / steps / 2**20,
        halo_s_per_step=(after["halo_s"] - before["halo_s"]) / steps,
        gather_mb_per_step=(after["gather_bytes"] - before["gather_bytes"]) / steps / 2**20,
        gather_s_per_step=(after["gather_s"] - before["gather_s"]) / steps,
    )
    from mpi4py import MPI

    rows = MPI.COMM_WORLD.gather(row, root=0)
    if parallel.rank == 0:
        summary = {"kind": kind, "ranks": len(rows), "atoms": len(atoms),
                   "s_per_step": max(r["s_per_step"] for r in rows),
                   "user_cpu_s_per_step": max(r["user_cpu_s_per_step"] for r in rows),
                   "first_evaluation_s": max(r["first_evaluation_s"] for r in rows),
                   "build_s": max(r["build_s"] for r in rows),
                   "peak_rss_mb": max(r["peak_rss_mb"] for r in rows), "per_rank": rows}
        print(json.dumps(summary), flush=True)


def launch(kind: str, n_atoms: int, steps: int, model_path: str) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    command = [sys.executable, __file__, "--case", kind, "--atoms", str(n_atoms), "--steps", str(steps),
               "--model", model_path]
    if kind == "parallel":
        command = [str(BIN / "mpirun"), "-np", "2"] + command
    load = os.getloadavg()[0]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    loads = {"load_before": load, "load_after": os.getloadavg()[0]}
    if done.returncode != 0 or not lines:
        return {"kind": kind, "atoms": n_atoms, "error": (done.stderr.strip() or f"exit {done.returncode}")[-400:],
                **loads}
    return {**json.loads(lines[-1]), **loads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--atoms", type=int, nargs="+", default=[20000, 50000, 100000])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--case", choices=["serial", "parallel"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        run_case(args.case, args.atoms[0], args.steps, args.model)
        return

    import torch

    from janus_potential import JanusPotential
    from janus_potential.export import export_model

    torch.manual_seed(0)
    model_path = str(Path(tempfile.mkdtemp()) / "small.pt")
    export_model(JanusPotential.from_preset("small"), model_path, dtype="float32")
    rows, comparisons = [], []
    header = (f"{'atoms':>7} {'ranks':>5} {'s/step':>8} {'speedup':>7} {'cpu s/step':>10} {'first s':>8} "
              f"{'build s':>8} "
              f"{'peak MB/rank':>12} {'mem ratio':>9} {'owned':>7} {'ghosts':>7} {'halo MB/step':>12} "
              f"{'gather MB/step':>14}")
    print(header, flush=True)
    for n_atoms in args.atoms:
        serial = launch("serial", n_atoms, args.steps, model_path)
        parallel = launch("parallel", n_atoms, args.steps, model_path)
        rows += [serial, parallel]
        for row in (serial, parallel):
            if "error" in row:
                print(f"{row['atoms']:>7} {row['kind']:>8} ERROR {row['error'][-200:]}", flush=True)
        if "error" in serial or "error" in parallel:
            continue
        comparison = {"atoms": serial["atoms"], "speedup": serial["s_per_step"] / parallel["s_per_step"],
                      "user_cpu_ratio": parallel["user_cpu_s_per_step"] / serial["user_cpu_s_per_step"],
                      "peak_rss_ratio": parallel["peak_rss_mb"] / serial["peak_rss_mb"]}
        comparisons.append(comparison)
        print(f"{serial['atoms']:>7} {1:>5} {serial['s_per_step']:8.2f} {1.0:7.2f} "
              f"{serial['user_cpu_s_per_step'] + serial['system_cpu_s_per_step']:10.2f} "
              f"{serial['first_evaluation_s']:8.2f} {serial['build_s']:8.3f} {serial['peak_rss_mb']:12.0f} "
              f"{1.0:9.2f} {serial['atoms']:>7} {0:>7} {0.0:12.2f} {0.0:14.2f}", flush=True)
        for rank_row in parallel["per_rank"]:
            print(f"{parallel['atoms']:>7} {'2:' + str(rank_row['rank']):>5} {rank_row['s_per_step']:8.2f} "
                  f"{comparison['speedup']:7.2f} "
                  f"{rank_row['user_cpu_s_per_step'] + rank_row['system_cpu_s_per_step']:10.2f} "
                  f"{rank_row['first_evaluation_s']:8.2f} {rank_row['build_s']:8.3f} "
                  f"{rank_row['peak_rss_mb']:12.0f} {rank_row['peak_rss_mb'] / serial['peak_rss_mb']:9.2f} "
                  f"{rank_row['owned']:>7} {rank_row['ghosts']:>7} {rank_row['halo_mb_per_step']:12.2f} "
                  f"{rank_row['gather_mb_per_step']:14.2f}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    with open("/proc/meminfo") as meminfo:
        memory_gb = int(meminfo.readline().split()[1]) / 2**20
    out = {
        "machine": {"cpus": os.cpu_count(), "memory_gb": round(memory_gb, 1), "platform": platform.platform(),
                    "note": "shared with other jobs: load_before/after are the 1-minute load averages "
                            "around each case (this run's own processes count: 1 or 2)"},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": "small preset, random weights, exported float32; one thread per process",
        "structure": "diamond Si supercell, rattled 0.02 A; VelocityVerlet 1 fs from 300 K",
        "steps": args.steps, "rows": rows, "comparisons": comparisons,
    }
    (RESULTS / "parallel_ase.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {RESULTS / 'parallel_ase.json'}")


if __name__ == "__main__":
    main()
