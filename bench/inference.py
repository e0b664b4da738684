"""Inference benchmark: energy + forces + stress per preset, structure and size.

Each case runs in its own process so that peak memory is that case's alone: seconds per
evaluation (float32 exported model through JanusCalculator, neighbour list included), ASE
MD throughput (VelocityVerlet, neighbour list reused within the skin) and peak memory per
atom (peak RSS minus the RSS before the first evaluation, divided by the atom count; the
peak is reset after the model is loaded, so that it is the evaluations' own).
When `chgnet` is importable it is measured in the same run as the baseline. Every Janus case
runs with the TorchScript file and with the AOTInductor package (`janus export --format
aoti`, compiled once per preset before the cases, its compile time reported), side by side,
and the table gives the package's speed as a ratio to the TorchScript file's.

    python bench/inference.py            # full table (64 ... 100,000 atoms)
    python bench/inference.py --quick    # 64 and 1,000 atoms
    python bench/inference.py --presets small --formats torchscript aoti
Writes bench/results/inference.json.
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


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """The process's peak resident memory (VmHWM), in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset the peak (Linux: writing 5 to /proc/self/clear_refs), so that the peak measured
    afterwards is the evaluation's, not the model loading's or export's."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def build_structure(system: str, n_atoms: int):
    from ase.build import bulk

    if system == "Si":
        unit = bulk("Si", "diamond", a=5.43, cubic=True)
    else:  # a multi-element oxide: spinel-like MgAl2O4 cation/anion mix on a rocksalt lattice
        unit = bulk("MgO", "rocksalt", a=4.21, cubic=True)
    reps = max(1, round((n_atoms / len(unit)) ** (1 / 3)))
    atoms = unit.repeat((reps, reps, reps))
    if system == "oxide":
        rng = np.random.default_rng(0)
        numbers = atoms.get_atomic_numbers()
        cations = np.nonzero(numbers == 12)[0]
        numbers[rng.choice(cations, size=2 * len(cations) // 3, replace=False)] = 13
        atoms.set_atomic_numbers(numbers)
    atoms.rattle(0.02, seed=1)
    return atoms


def run_case(preset: str, system: str, n_atoms: int, md_steps: int, evaluations: int, package: str = "") -> dict:
    import torch
    from ase import units
    from ase.md.verlet import VelocityVerlet

    atoms = build_structure(system, n_atoms)
    if preset == "chgnet":
        from chgnet.model.dynamics import CHGNetCalculator

        calculator = CHGNetCalculator()
    else:
        from janus_potential import JanusPotential
        from janus_potential.ase import JanusCalculator
        from janus_potential.export import export_model

        torch.manual_seed(0)
        model = JanusPotential.from_preset(preset)
        if package:  # the AOTInductor package compiled by main()
            calculator = JanusCalculator(package)
        elif preset == "1b":
            calculator = JanusCalculator(model)  # eager: scripting a 1e9-parameter model copies it
        else:
            path = Path(tempfile.mkdtemp()) / "model.pt"
            export_model(model, path, dtype="float32")
            del model
            calculator = JanusCalculator(str(path))
    atoms.calc = calculator
    rss_before = rss_mb()
    peak_reset = reset_peak_rss()
    start = time.perf_counter()
    atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    first = time.perf_counter() - start
    times = []
    for _ in range(evaluations):
        atoms.rattle(1e-3)
        start = time.perf_counter()
        atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        times.append(time.perf_counter() - start)
    result = {
        "preset": preset, "system": system, "atoms": len(atoms), "format": "aoti" if package else ("eager" if preset == "1b" else "torchscript"),
        "first_evaluation_s": first,
        "seconds_per_evaluation": float(np.median(times)) if times else first,
    }
    if md_steps:
        dynamics = VelocityVerlet(atoms, 1.0 * units.fs)
        dynamics.run(2)
        start = time.perf_counter()
        dynamics.run(md_steps)
        result["md_atom_steps_per_s"] = md_steps * len(atoms) / (time.perf_counter() - start)
    peak = peak_rss_mb()
    result["peak_rss_mb"] = peak
    result["peak_reset"] = peak_reset  # False: the peak may be the loading's (the KB/atom then overstates)
    result["peak_kb_per_atom"] = (peak - rss_before) * 1024 / len(atoms)
    return result


def cases(args, packages: dict) -> list[tuple]:
    sizes = [64, 1000] if args.quick else [64, 1000, 10000, 100000]
    out = []
    for preset in args.presets:
        for system in ("Si", "oxide"):
            for n in sizes:
                if preset == "base" and n > 10000:
                    continue
                md = 20 if n <= 1000 else (5 if n <= 10000 else 0)
                for form in args.formats:
                    if form == "aoti" and preset not in packages:
                        continue
                    out.append((preset, system, n, md, 3 if n <= 10000 else 1, packages[preset] if form == "aoti" else ""))
    if not args.quick or "1b" in args.presets:
        out.append(("1b", "Si", 64, 0, 1, ""))
    try:
        import chgnet  # noqa: F401
        out += [("chgnet", "Si", 1000, 5, 1)]
    except ImportError:
        pass
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--presets", nargs="+", default=["tiny", "small", "base"])
    parser.add_argument("--formats", nargs="+", choices=["torchscript", "aoti"], default=["torchscript", "aoti"])
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        preset, system, n, md, evals, package = args.case.split(",")
        print(json.dumps(run_case(preset, system, int(n), int(md), int(evals), package)))
        return
    # the calculator keeps freed memory in the heap (janus_potential.devices.keep_freed_memory);
    # the Makefile's glibc variables would turn that off, so the cases run without them
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    # sleeping idle threads, after a short spin (docs/benchmarks.md, "OpenMP waiting")
    env.update(OMP_WAIT_POLICY="PASSIVE")
    env.setdefault("GOMP_SPINCOUNT", "1000")
    packages, compile_s = {}, {}
    if "aoti" in args.formats:
        import torch

        from janus_potential import JanusPotential
        from janus_potential.aoti import export_aoti

        folder = Path(tempfile.mkdtemp())
        for preset in args.presets:
            if preset == "1b":
                continue
            torch.manual_seed(0)
            start = time.perf_counter()
            export_aoti(JanusPotential.from_preset(preset), folder / f"{preset}.pt2", dtype="float32")
            compile_s[preset] = time.perf_counter() - start
            packages[preset] = str(folder / f"{preset}.pt2")
            print(f"compiled {preset} with AOTInductor in {compile_s[preset]:.0f} s", flush=True)
    rows = []
    for case in cases(args, packages):
        spec = ",".join(map(str, case))
        proc = subprocess.run([sys.executable, __file__, "--case", spec], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            rows.append({"preset": case[0], "system": case[1], "atoms": case[2], "error": proc.stderr.strip()[-300:]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        row.setdefault("format", "aoti" if case[5] else ("eager" if case[0] == "1b" else "torchscript"))
        if row["format"] == "aoti" and "error" not in row:
            twin = next((r for r in rows if r.get("format") == "torchscript" and "error" not in r and
                         (r["preset"], r["system"], r["atoms"]) == (row["preset"], row["system"], row["atoms"])), None)
            if twin is not None:
                row["speed_vs_torchscript"] = twin["seconds_per_evaluation"] / row["seconds_per_evaluation"]
        print(f"{row['preset']:>7} {row['system']:>6} {row['atoms']:>7} {row['format']:>11} "
              + ("ERROR " + row["error"][-120:] if "error" in row else
                 f"{row['seconds_per_evaluation']:9.4f} s/eval  "
                 f"{row.get('md_atom_steps_per_s', float('nan')):10.0f} atom-steps/s  "
                 f"{row['peak_kb_per_atom']:8.1f} KB/atom  peak {row['peak_rss_mb']:8.0f} MB"
                 + (f"  {row['speed_vs_torchscript']:.2f}x TorchScript" if "speed_vs_torchscript" in row else "")),
              flush=True)
    baseline = next((r for r in rows if r.get("preset") == "chgnet" and "md_atom_steps_per_s" in r), None)
    if baseline:
        for r in rows:
            if "md_atom_steps_per_s" in r and r["system"] == "Si" and r["atoms"] == baseline["atoms"]:
                r["speedup_vs_chgnet"] = r["md_atom_steps_per_s"] / baseline["md_atom_steps_per_s"]
    RESULTS.mkdir(exist_ok=True)
    out = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "openmp": {k: env.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}}, "rows": rows,
           "aoti_compile_s": compile_s,
           "baseline": "chgnet" if baseline else "chgnet not installed"}
    (RESULTS / "inference.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {RESULTS / 'inference.json'}")


if __name__ == "__main__":
    main()
