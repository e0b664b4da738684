"""GPU benchmarks of issue 12, run by bench/gpu_check.sh on a machine with one CUDA GPU.

    python bench/gpu_check.py --out bench/results/gpu_DATE.json [--pytest-junit FILE] [--lmp LMP]
    python bench/gpu_check.py --device cpu --quick ...     # rehearsal on a CPU machine

Every stage runs in its own subprocess (a stage that runs out of GPU memory or time cannot
take the others down) and the JSON is rewritten after each one, so a run cut short still
leaves what it measured. Stages, in order of what the summary needs first:

- `matmul`: fp32, TF32 and bf16 matmul rates (8192^3 on the GPU; the TF32 one is the
  denominator of `train_base_fraction_of_tf32`).
- `ase`: ASE MD (VelocityVerlet, 1 fs, neighbour list reused within the skin) of `small`
  and `base` (random weights, exported float32 TorchScript through `JanusCalculator`) on
  diamond Si of 1k / 10k / 64k atoms and a dense (Mg,Al)O oxide of 64k: microseconds per
  atom per MD step and peak GPU memory per atom; and what a CPU-built graph costs (one vesin
  neighbour list at 64k atoms, one transfer of its edges), to choose between building
  graphs on the CPU and on the GPU.
- `max_atoms`: the largest Si system of `small` that one force evaluation fits (doubling).
- `lammps`: `pair_style janus device cuda` MD of the same 64k Si on 1 rank and on 2 ranks
  sharing the GPU: microseconds per atom-step and the thermo of both (must agree).
- `train`: one training step (energy, forces, stress losses; the double backward) of
  `small`, `base` and `1b` in TF32; matmul FLOPs counted by torch's profiler; FLOP rate
  over the measured TF32 matmul rate.
- `precision`: `small` ASE at 64k and the `base` training step in float32 / tf32 / bf16,
  and the held-out errors of a trained model (`--heldout-model`, a checkpoint) on the
  validation frames of examples/data in each precision.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- helpers
def synchronize(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def reset_memory(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_bytes(device) -> float:
    import torch

    return float(torch.cuda.max_memory_allocated()) if torch.device(device).type == "cuda" else float("nan")


def build_structure(system: str, n_atoms: int):
    sys.path.insert(0, str(HERE))
    from inference import build_structure as build  # the CPU benchmark's structures

    return build(system, n_atoms)


def exported_calculator(preset: str, device: str, precision: str = "float32", eager: bool = False):
    import tempfile

    import torch

    from janus_potential import JanusPotential
    from janus_potential.ase import JanusCalculator
    from janus_potential.export import export_model

    torch.manual_seed(0)
    model = JanusPotential.from_preset(preset)
    if eager or precision == "bf16":
        return JanusCalculator(model, device=device, precision=precision)
    path = Path(tempfile.mkdtemp()) / "model.pt"
    export_model(model, path, dtype="float32")
    return JanusCalculator(str(path), device=device, precision=precision)


# --------------------------------------------------------------------------- stages
def stage_matmul(args) -> dict:
    import torch

    size = 8192 if args.device == "cuda" else 512
    out = {}
    for name, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                              ("bf16", torch.bfloat16, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(size, size, device=args.device, dtype=dtype)
        b = torch.randn(size, size, device=args.device, dtype=dtype)
        for _ in range(3):
            a @ b
        synchronize(args.device)
        # whole batches of 10 products, synchronised: launches are asynchronous, so a loop
        # that only counts launches would queue far more work than it times
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < 1.0:
            for _ in range(10):
                a @ b
            synchronize(args.device)
            count += 10
        out[f"{name}_tflop_s"] = 2 * size**3 * count / (time.perf_counter() - start) / 1e12
    torch.backends.cuda.matmul.allow_tf32 = False
    out["device_name"] = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    out["torch"] = torch.__version__
    return out


def md_case(preset: str, system: str, n_atoms: int, device: str, steps: int, precision: str = "float32",
            eager: bool = False) -> dict:
    from ase import units
    from ase.md.verlet import VelocityVerlet

    atoms = build_structure(system, n_atoms)
    atoms.calc = exported_calculator(preset, device, precision, eager)
    reset_memory(device)
    atoms.get_forces()  # the first evaluation builds the neighbour list and warms the kernels
    dynamics = VelocityVerlet(atoms, 1.0 * units.fs)
    dynamics.run(2)
    synchronize(device)
    start = time.perf_counter()
    dynamics.run(steps)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"preset": preset, "system": system, "atoms": len(atoms), "precision": precision,
            "eager": eager or precision == "bf16", "md_steps": steps,
            "us_per_atom_step": 1e6 * seconds / steps / len(atoms),
            "gpu_peak_bytes_per_atom": peak_memory_bytes(device) / len(atoms)}


def guarded(case, **row):
    """`case()`, or `row` with the error when the device runs out of memory (the stage goes on)."""
    import gc

    import torch

    try:
        return case()
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        if "out of memory" not in str(exc).lower():
            raise
        gc.collect()
        reset_memory(row.get("device", "cpu"))
        return {**row, "error": "out of memory: " + str(exc).splitlines()[0][:160]}


def stage_ase(args) -> dict:
    sizes = [1000, 10000, 64000] if not args.quick else [64, 512]
    rows = []
    cases = [(preset, "Si", n) for preset in ("small", "base") for n in sizes] + [("small", "oxide", sizes[-1])]
    for preset, system, n in cases:
        rows.append(guarded(lambda: md_case(preset, system, n, args.device, 10 if n >= 10000 else 20),
                            preset=preset, system=system, atoms=n, device=args.device))
        write_partial(args, "ase", rows)
    return {"rows": rows, "graph_on_cpu": graph_cost(sizes[-1], args.device)}


def stage_ase_small(args) -> dict:
    """The `small` 64k Si row of `ase` alone: the baseline of the LAMMPS ratio when the
    LAMMPS stage runs again in a later call (timings compare within one machine's run)."""
    n = 64000 if not args.quick else 512
    return {"rows": [md_case("small", "Si", n, args.device, 10)]}


def graph_cost(n_atoms: int, device: str) -> dict:
    """What building graphs on the CPU costs next to a model step: one vesin neighbour list
    (cutoff + skin) of Si and one transfer of its edges to the device."""
    import torch

    from janus_potential.graph import neighbor_pairs

    atoms = build_structure("Si", n_atoms)
    start = time.perf_counter()
    i, j, shifts, _ = neighbor_pairs(atoms.positions, atoms.cell.array, atoms.pbc, 6.0)
    build = time.perf_counter() - start
    edges = torch.as_tensor(np.stack([i, j]))
    vectors = torch.as_tensor(shifts.astype(np.float64))
    synchronize(device)
    start = time.perf_counter()
    edges.to(device), vectors.to(device)
    synchronize(device)
    return {"atoms": len(atoms), "edges": int(len(i)), "neighbour_list_s": build,
            "transfer_s": time.perf_counter() - start}


def stage_max_atoms(args) -> dict:
    import torch

    n, largest, tried = (256000 if not args.quick else 1000), 0, []
    calculator = exported_calculator("small", args.device)
    while n <= (2_048_000 if not args.quick else 4000):
        atoms = build_structure("Si", n)
        atoms.calc = calculator
        calculator._neighbors = None
        try:
            reset_memory(args.device)
            start = time.perf_counter()
            atoms.get_forces()
            synchronize(args.device)
            tried.append({"atoms": len(atoms), "ok": True, "seconds": time.perf_counter() - start,
                          "gpu_peak_gib": peak_memory_bytes(args.device) / 2**30})
            largest = len(atoms)
            write_partial(args, "max_atoms", tried)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            tried.append({"atoms": len(atoms), "ok": False, "error": str(exc).splitlines()[0][:200]})
            break
        finally:
            atoms.calc = None
        n *= 2
    return {"max_atoms_small_si": largest, "tried": tried}


def stage_lammps(args) -> dict:
    """`pair_style janus device ...` on 1 rank and 2 ranks sharing the device."""
    import tempfile

    import torch

    from janus_potential import JanusPotential
    from janus_potential.export import export_model

    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    from tests.test_lammps import write_data
    from tests.model_suite import lammps_frame

    n = 64000 if not args.quick else 512
    steps = 20 if not args.quick else 5
    work = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    export_model(JanusPotential.from_preset("small"), work / "model.pt", dtype="float32")
    atoms = lammps_frame(build_structure("Si", n))
    write_data(atoms, work / "si.data", elements=["Si"])
    script = f"""units metal
atom_style atomic
boundary p p p
newton on
read_data si.data
pair_style janus device {args.device} threads 1
pair_coeff * * model.pt Si
velocity all create 300.0 4928459 loop geom
timestep 0.001
fix nve all nve
thermo_style custom step pe ke etotal press
thermo_modify format float %.12g
thermo {steps}
run 3
run {steps}
"""
    (work / "in.md").write_text(script)
    out = {"atoms": len(atoms), "steps": steps}
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    (work / "in.host.md").write_text(script.replace("threads 1", "threads 1 reduce host"))
    for ranks in (1, 2, "1_host"):
        name = "in.host.md" if ranks == "1_host" else "in.md"
        command = [args.lmp, "-in", name, "-log", f"log.{ranks}"]
        if ranks == 2:
            command = [args.mpirun, "-np", str(ranks), *command]
        try:
            done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True,
                                  timeout=0.4 * args.stage_timeout)
        except subprocess.TimeoutExpired:
            out[f"ranks_{ranks}"] = {"returncode": None, "error": f"ran past {0.4 * args.stage_timeout:.0f} s"}
            write_partial(args, "lammps", [out])
            continue
        log = (work / f"log.{ranks}").read_text() if (work / f"log.{ranks}").exists() else ""
        entry = {"returncode": done.returncode}
        if done.returncode != 0:
            entry["error"] = (done.stdout + done.stderr)[-1500:]
        else:
            lines = log.splitlines()
            start = max(k for k, line in enumerate(lines) if line.split()[:1] == ["Step"])
            entry["thermo"] = [[float(v) for v in line.split()] for line in lines[start + 1:start + 3]]
            loop = [line for line in lines if line.startswith("Loop time")][-1]  # the run after the warm-up
            seconds = float(loop.split()[3])
            entry["us_per_atom_step"] = 1e6 * seconds / steps / len(atoms)
            entry["device_line"] = next((line for line in lines if "Pair janus: model" in line), "")
        out[f"ranks_{ranks}"] = entry
        write_partial(args, "lammps", [out])
    one, two = out["ranks_1"].get("thermo"), out["ranks_2"].get("thermo")
    if one and two:
        a, b = np.array(one), np.array(two)
        out["thermo_max_relative_difference"] = float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-12)))
    return out


def train_case(preset: str, device: str, precision: str, structures: int, steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from janus_potential import JanusPotential
    from janus_potential.precision import apply_precision

    sys.path.insert(0, str(HERE))
    from train_step import one_step, training_batch

    def training_step(model, graph, device):
        one_step(model, graph)

    torch.manual_seed(0)
    model = apply_precision(JanusPotential.from_preset(preset).to(device), precision)
    graph = training_batch(structures, model.cutoff).to(device=device)
    reset_memory(device)
    training_step(model, graph, device)
    # matmul FLOPs of one step as the profiler counts them (bench/train_step.py does the same;
    # torch's FlopCounterMode does not follow autograd.grad(create_graph=True))
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as profiler:
        training_step(model, graph, device)
    flops = sum(event.flops for event in profiler.key_averages() if event.flops)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        training_step(model, graph, device)
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    apply_precision(model, "float32")
    return {"preset": preset, "precision": precision, "atoms": int(graph.num_atoms.sum()),
            "step_s": seconds, "gflop_per_step": flops / 1e9, "tflop_s": flops / seconds / 1e12,
            "gpu_peak_gib": peak_memory_bytes(device) / 2**30}


def stage_train(args) -> dict:
    # base twice: the batch (32 structures, ~1,000 atoms) and 8x that, to see how the
    # rate grows once the GPU is not waiting for kernel launches
    cases = ([("small", 64), ("base", 32), ("base", 256), ("1b", 8)] if not args.quick
             else [("small", 4), ("base", 2), ("base", 4)])
    rows = []
    for preset, count in cases:
        if count:
            rows.append(guarded(lambda: train_case(preset, args.device, "tf32", count, 5 if preset != "1b" else 2),
                                preset=preset, precision="tf32", device=args.device))
            write_partial(args, "train", rows)
    return {"rows": rows}


def stage_train_compiled(args) -> dict:
    """run.compile's step (training/compiled.py: evaluation, loss and parameter gradients traced
    into one graph, compiled by torch.compile/Inductor) on the device: compile time, step time,
    and its gradients against the eager step's on the same batch (float32)."""
    import torch

    from janus_potential import JanusPotential
    from janus_potential.training.compiled import CompiledStep
    from janus_potential.training.config import LossConfig

    sys.path.insert(0, str(HERE))
    from train_step import labelled_batch, trainer_step, training_batch

    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for preset, count in ((("small", 64), ("base", 32)) if not args.quick else (("small", 4),)):
        torch.manual_seed(0)
        model = JanusPotential.from_preset(preset).to(args.device)
        graph = training_batch(count, model.cutoff)
        batch = labelled_batch(graph).to(torch.device(args.device))
        config = LossConfig()
        trainer_step(model, batch, config)  # eager
        eager = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
        synchronize(args.device)
        start = time.perf_counter()
        for _ in range(3):
            trainer_step(model, batch, config)
        synchronize(args.device)
        eager_s = (time.perf_counter() - start) / 3
        # what a stage cut off during the compile still reports
        write_partial(args, "train_compiled", rows + [{"preset": preset, "atoms": int(graph.num_atoms.sum()),
                                                       "eager_step_s": eager_s, "compiling_since": time.time()}])
        compiled = CompiledStep(model, config)
        start = time.perf_counter()
        trainer_step(model, batch, config, compiled)
        synchronize(args.device)
        compile_s = time.perf_counter() - start
        difference = max(float((p.grad - eager[name]).abs().max() / eager[name].abs().max().clamp(min=1e-30))
                         for name, p in model.named_parameters() if name in eager and p.grad is not None)
        start = time.perf_counter()
        for _ in range(5):
            trainer_step(model, batch, config, compiled)
        synchronize(args.device)
        step_s = (time.perf_counter() - start) / 5
        rows.append({"preset": preset, "atoms": int(graph.num_atoms.sum()), "eager_step_s": eager_s,
                     "compiled_step_s": step_s, "speedup": eager_s / step_s, "compile_s": compile_s,
                     "compiles": compiled.compiles, "max_relative_gradient_difference": difference})
        write_partial(args, "train_compiled", rows)
    return {"rows": rows}


def stage_precision(args) -> dict:
    n = 64000 if not args.quick else 512
    out = {"ase_small_eager": [], "train_base": []}
    for precision in ("float32", "tf32", "bf16"):
        out["ase_small_eager"].append(guarded(lambda: md_case("small", "Si", n, args.device, 10, precision, eager=True),
                                              preset="small", precision=precision, device=args.device))
        write_partial(args, "precision", [out])
    if args.heldout_model:
        out["heldout"] = heldout_errors(args)
        write_partial(args, "precision", [out])
    for precision in ("float32", "tf32", "bf16"):
        out["train_base"].append(guarded(lambda: train_case("base", args.device, precision, 32 if not args.quick else 2, 5),
                                         preset="base", precision=precision, device=args.device))
        write_partial(args, "precision", [out])
    return out


def heldout_errors(args) -> dict:
    """Errors of a trained checkpoint on the frames of examples/data in each precision."""
    import ase.io

    from janus_potential.ase import JanusCalculator

    frames = []
    for path in sorted((ROOT / "examples" / "data").glob("*.xyz")):
        frames += ase.io.read(path, ":")[: args.heldout_frames]
    out = {}
    for precision in ("float32", "tf32", "bf16"):
        calculator = JanusCalculator(args.heldout_model, device=args.device, precision=precision)
        energy, forces = [], []
        for atoms in frames:
            reference_e, reference_f = atoms.get_potential_energy(), atoms.get_forces()
            copy = atoms.copy()
            copy.calc = calculator
            energy.append(abs(copy.get_potential_energy() - reference_e) / len(atoms))
            forces.append(np.abs(copy.get_forces() - reference_f).ravel())
        out[precision] = {"energy_mae_mev_per_atom": 1000 * float(np.mean(energy)),
                          "forces_mae": float(np.mean(np.concatenate(forces))), "frames": len(frames)}
    return out


# the most seconds each stage may take (a whole gpu_check.sh run keeps under 8 minutes);
# --deadline cuts them further
STAGE_SECONDS = {"ase_small": 40, "matmul": 25, "ase": 110, "max_atoms": 60, "lammps": 90, "train": 90, "precision": 80,
                 "train_compiled": 120}

STAGES = {"matmul": stage_matmul, "ase": stage_ase, "max_atoms": stage_max_atoms, "lammps": stage_lammps,
          "train": stage_train, "precision": stage_precision, "train_compiled": stage_train_compiled,
          "ase_small": stage_ase_small}


# --------------------------------------------------------------------------- driver
def write_partial(args, stage: str, rows: list) -> None:
    if args.partial:
        Path(args.partial).write_text(json.dumps({"stage": stage, "rows": rows}))


def summary(results: dict, tests: dict) -> dict:
    out = {"gpu_tests_passed": tests.get("passed"), "gpu_tests_failed": tests.get("failed"),
           "gpu_tests_skipped": tests.get("skipped")}
    def rows(stage: str) -> list:  # a stage's rows, or those it wrote before it was cut off
        result = results.get(stage, {})
        return result.get("rows") or result.get("partial", {}).get("rows", [])

    ase_rows = rows("ase")
    si = [r for r in ase_rows if r["preset"] == "small" and r["system"] == "Si" and "us_per_atom_step" in r]
    if si:
        out["ase_small_si64k_us_per_atom_step"] = max(si, key=lambda r: r["atoms"])["us_per_atom_step"]
    fitted = [r["atoms"] for r in results.get("max_atoms", {}).get("tried") or rows("max_atoms") if r.get("ok")]
    out["max_atoms_small_si"] = max(fitted) if fitted else None
    lammps = results.get("lammps", {})
    if "error" in lammps and rows("lammps"):
        lammps = rows("lammps")[0]
    baseline = [r for r in rows("ase_small") if "us_per_atom_step" in r] or si
    if baseline and "us_per_atom_step" in lammps.get("ranks_1", {}):
        # ASE time over LAMMPS time: above 1 when LAMMPS is faster (the ASE time of the same
        # run as the LAMMPS stage when `ase_small` ran with it)
        ase_us = max(baseline, key=lambda r: r["atoms"])["us_per_atom_step"]
        out["lammps_over_ase_small_si64k"] = ase_us / lammps["ranks_1"]["us_per_atom_step"]
        out["lammps_thermo_1_vs_2_ranks_max_relative_difference"] = lammps.get("thermo_max_relative_difference")
    tf32 = results.get("matmul", {}).get("tf32_tflop_s")
    base = [r for r in rows("train") if r["preset"] == "base" and "tflop_s" in r]
    if tf32 and base:
        out["train_base_fraction_of_tf32"] = base[0]["tflop_s"] / tf32  # the batch, 32 structures
        out["train_base_best_fraction_of_tf32"] = max(r["tflop_s"] for r in base) / tf32
    return out


def run_stage(name: str, args) -> dict:
    """One stage in a subprocess (`--stage NAME`), its JSON on stdout's last line; it gets
    STAGE_SECONDS[name] (times --stage-scale), or what is left before --deadline."""
    import tempfile

    seconds = STAGE_SECONDS[name] * args.stage_scale
    if args.deadline:
        seconds = min(seconds, args.deadline - time.time())
    if seconds < 10:
        return {"error": "not run: no time left before the deadline", "stage_seconds": 0.0}
    partial = Path(tempfile.gettempdir()) / f"gpu_check.{name}.partial.json"
    partial.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--stage", name, "--device", args.device, "--lmp", args.lmp,
               "--mpirun", args.mpirun, "--partial", str(partial), "--stage-timeout", str(seconds),
               "--heldout-frames", str(args.heldout_frames)]
    if args.quick:
        command.append("--quick")
    if args.heldout_model:
        command += ["--heldout-model", args.heldout_model]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode == 0 and lines:
            result = json.loads(lines[-1])
        else:
            result = {"error": f"exit {done.returncode}: " + (done.stdout + done.stderr)[-2000:]}
    except subprocess.TimeoutExpired:
        result = {"error": f"stage ran past its {seconds:.0f} s"}
    if "error" in result and partial.exists():
        result["partial"] = json.loads(partial.read_text())
    partial.unlink(missing_ok=True)
    result["stage_seconds"] = time.perf_counter() - start
    return result


def junit_counts(paths: list) -> dict:
    """Passed / failed / skipped over the junit XML files that exist (names of the failures)."""
    import xml.etree.ElementTree as ElementTree

    paths = [path for path in paths or [] if Path(path).exists()]
    if not paths:
        return {}
    out = {"passed": 0, "failed": 0, "skipped": 0, "failed_tests": [], "files": len(paths)}
    for path in paths:
        suite = ElementTree.parse(path).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        tests, failures, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        out["passed"] += tests - failures - errors - skipped
        out["failed"] += failures + errors
        out["skipped"] += skipped
        out["failed_tests"] += [case.get("classname", "") + "::" + case.get("name", "") for case in suite.iter("testcase")
                                if case.find("failure") is not None or case.find("error") is not None]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / f"gpu_{time.strftime('%Y-%m-%d')}.json"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a rehearsal on the CPU)")
    parser.add_argument("--stages", nargs="+", default=[name for name in STAGES if name not in ("train_compiled", "ase_small")],
                        choices=list(STAGES))
    parser.add_argument("--merge", help="a JSON of an earlier run whose stages this run adds to (or replaces)")
    parser.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--partial", help=argparse.SUPPRESS)
    parser.add_argument("--stage-timeout", type=float, default=120.0, help=argparse.SUPPRESS)  # a stage's own limit
    parser.add_argument("--stage-scale", type=float, default=1.0, help="multiplies every stage's time limit")
    parser.add_argument("--deadline", type=float, default=0.0, help="epoch seconds by which every stage must end")
    parser.add_argument("--lmp", default="lmp")
    parser.add_argument("--mpirun", default="mpirun")
    parser.add_argument("--pytest-junit", nargs="*", default=[], help="junit XML files of the GPU tests")
    parser.add_argument("--heldout-model", default=None, help="a trained checkpoint for the precision errors")
    parser.add_argument("--heldout-frames", type=int, default=40, help="frames per examples/data file")
    args = parser.parse_args()
    if args.stage:
        import torch

        torch.set_num_threads(4 if args.device == "cuda" else 1)
        print(json.dumps(STAGES[args.stage](args)))
        return
    out = {"device": None, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv),
           "tests": junit_counts(args.pytest_junit)}
    if args.merge and Path(args.merge).exists():
        earlier = json.loads(Path(args.merge).read_text())
        # the earlier run's test counts stay the summary's; this run's tests go beside them
        out = {**earlier, "command": earlier.get("command", "") + " ; " + out["command"],
               "date": earlier.get("date", "") + " ; " + out["date"], "tests_rerun": out["tests"]}
    for name in args.stages:
        out[name] = run_stage(name, args)
        if name == "matmul" and out[name].get("device_name"):
            out["device"] = out[name].get("device_name")
        out["summary"] = summary(out, out["tests"])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
        state = "error" if "error" in out[name] else "done"
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {state} in {out[name]['stage_seconds']:.0f} s", flush=True)
    print(json.dumps(out["summary"], indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
