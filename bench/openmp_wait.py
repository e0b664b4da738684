"""How OpenMP's waiting policy changes torch's speed on this machine: idle, and beside a busy process.

One evaluation (energy, forces, stress; float32, eager, `small`, 1,000 Si atoms: the
inference benchmark's structure) timed in a fresh process per setting: one thread, and two
threads with `OMP_WAIT_POLICY=PASSIVE` and `GOMP_SPINCOUNT` from 0 (sleep at once: PASSIVE
alone) to 100,000, and `OMP_WAIT_POLICY=ACTIVE` (spin forever); each on an idle machine and
next to a process that keeps one core busy (a Python busy loop), the case that
`OMP_WAIT_POLICY=PASSIVE` was chosen for. Median of 15 evaluations after 3 warm-up ones.

    python bench/openmp_wait.py [--atoms 1000] [--spins 0 100 1000 10000 100000]
Writes bench/results/openmp_wait.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

WORKER = """
import sys, time, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r})
from inference import build_structure
from janus_potential import JanusPotential
from janus_potential.devices import keep_freed_memory
from janus_potential.graph import build_graph
keep_freed_memory()
torch.set_num_threads({threads})
torch.manual_seed(0)
model = JanusPotential.from_preset("small").float()
graph = build_graph(build_structure("Si", {atoms}), model.cutoff, dtype=torch.float32)
for _ in range(3):
    model.compute(graph, compute_virial=True, create_graph=False)
times = []
for _ in range(15):
    start = time.perf_counter()
    model.compute(graph, compute_virial=True, create_graph=False)
    times.append(time.perf_counter() - start)
print("SECONDS", sorted(times)[len(times) // 2])
"""


def measure(threads: int, policy: str, spin: int | None, atoms: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env["OMP_WAIT_POLICY"] = policy
    if spin is not None:
        env["GOMP_SPINCOUNT"] = str(spin)
    code = WORKER.format(root=str(ROOT), bench=str(ROOT / "bench"), threads=threads, atoms=atoms)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("SECONDS")]
    if done.returncode or not lines:
        raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
    return float(lines[0].split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--atoms", type=int, default=1000)
    parser.add_argument("--spins", type=int, nargs="+", default=[0, 100, 1000, 10000, 100000])
    args = parser.parse_args()
    settings = [(1, "PASSIVE", None)] + [(2, "PASSIVE", spin) for spin in args.spins] + [(2, "ACTIVE", None)]
    rows = []
    for busy in (False, True):
        neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            for threads, policy, spin in settings:
                seconds = measure(threads, policy, spin, args.atoms)
                rows.append({"neighbour": "busy" if busy else "idle", "threads": threads, "OMP_WAIT_POLICY": policy,
                             "GOMP_SPINCOUNT": spin, "seconds": seconds})
                print(f"{rows[-1]['neighbour']:>5} {threads} threads {policy:>7} spin {str(spin):>6}: "
                      f"{1e3 * seconds:7.1f} ms", flush=True)
        finally:
            if neighbour is not None:
                neighbour.kill()
    print(f"\n{'setting':>34} {'idle ms':>8} {'busy ms':>8} {'idle vs PASSIVE':>16} {'busy vs PASSIVE':>16}")
    for threads, policy, spin in settings:
        pick = [r for r in rows if (r["threads"], r["OMP_WAIT_POLICY"], r["GOMP_SPINCOUNT"]) == (threads, policy, spin)]
        passive = {r["neighbour"]: r["seconds"] for r in rows
                   if (r["threads"], r["OMP_WAIT_POLICY"], r["GOMP_SPINCOUNT"]) == (2, "PASSIVE", 0)}
        idle, busy = (next(r["seconds"] for r in pick if r["neighbour"] == n) for n in ("idle", "busy"))
        for r in pick:
            r["speed_vs_passive_2_threads"] = passive[r["neighbour"]] / r["seconds"] if passive else None
        label = f"{threads} thread{'s' if threads > 1 else ''}, {policy}" + (f", spin {spin}" if spin is not None else "")
        print(f"{label:>34} {1e3 * idle:8.1f} {1e3 * busy:8.1f} "
              f"{passive.get('idle', idle) / idle:16.2f} {passive.get('busy', busy) / busy:16.2f}")
    RESULTS.mkdir(exist_ok=True)
    out = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "atoms": args.atoms,
           "case": "small, float32, eager energy+forces+stress, Si", "rows": rows}
    (RESULTS / "openmp_wait.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {RESULTS / 'openmp_wait.json'}")


if __name__ == "__main__":
    main()
