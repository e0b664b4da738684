"""Training-step benchmark: steps/s and atoms/s with an energy + forces + stress loss.

For each preset: the time of the forward pass (energy), the force pass (autograd.grad of
the energy with create_graph=True: forces and virial), and the backward pass (parameter
gradient of the loss, a second-order derivative), the matmul FLOPs of one step counted by
the torch profiler (with_flops: mm/addmm/bmm; FlopCounterMode cannot follow autograd.grad
on leaf tensors), and the achieved FLOP rate against this
machine's fp32 matrix-multiply rate measured in the same run. Each preset runs twice when
the fused operators are built (janus_potential.ops): the message through torch operations
(`fused False`) and through `janus::edge_scatter` (`fused True`), side by side, and the
compiled step of `run.compile` (training/compiled.py: evaluation, the trainer's loss and
the parameter gradient traced into one graph and compiled), all measured in the same run.
The step timed for every row is the trainer's (`loss_terms` on energy, forces and stress,
the load-balancing loss, the parameter gradient); the eager rows also split it into its
forward, force and backward phases (of `one_step`, the same operations).

    python bench/train_step.py [--quick] [--presets tiny small base] [--no-compile]
    python bench/train_step.py --ep 2 --presets small      # expert parallelism, eager and compiled
Writes bench/results/train_step.json (`--ep N`: train_step_ep<N>.json).

`--ep N` runs the same trainer step under `mpirun -np N` (one thread per rank) with the experts
of every layer sharded over the N ranks (parallel/expert.py) and the global batch split over
them by atoms, eager and compiled (the expert exchanges inside the compiled graph), the dense
gradients summed over the ranks as the trainer does; a rank's step time is reported per row
(the slowest rank's median).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from janus_potential import JanusPotential, batch_graphs, build_graph
from janus_potential.model import atom_energies, forces_from_edge_gradient, virial_from_edge_gradient
from janus_potential.nn.moe import balance_loss
from janus_potential.testing import random_structure

RESULTS = Path(__file__).resolve().parent / "results"


def matmul_rate(size: int = 1024, seconds: float = 2.0) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start)


def training_structures(n_structures: int) -> list:
    return [random_structure(["Li", "Mg", "Al", "Si", "O", "O"], 24 + 4 * (k % 5), seed=k, density=0.07)
            for k in range(n_structures)]


def training_batch(n_structures: int, cutoff: float):
    return batch_graphs([build_graph(s, cutoff) for s in training_structures(n_structures)])


def one_step(model, graph, timings: dict | None = None):
    """One training step with its three phases timed separately (on the graph's device;
    bench/gpu_check.py times it on a GPU)."""
    t0 = time.perf_counter()
    edge_vectors = graph.edge_vectors().requires_grad_(True)
    atom_energy, routing = atom_energies(model, graph.species, graph.edge_index, edge_vectors)
    energy = torch.zeros(graph.num_graphs, dtype=torch.float64, device=edge_vectors.device).index_add(0, graph.batch, atom_energy.double())
    t1 = time.perf_counter()
    (edge_gradient,) = torch.autograd.grad(atom_energy.sum(), edge_vectors, create_graph=True)
    forces = forces_from_edge_gradient(edge_gradient, graph.edge_index, graph.species.shape[0])
    virial = virial_from_edge_gradient(edge_gradient, edge_vectors, graph.batch[graph.edge_index[0]], graph.num_graphs)
    t2 = time.perf_counter()
    loss = (energy.float() ** 2).mean() + (forces**2).mean() + (virial**2).mean() + 0.01 * balance_loss(
        routing.probability_sum, routing.expert_load, graph.species.shape[0])
    model.zero_grad(set_to_none=True)
    loss.backward()
    t3 = time.perf_counter()
    if timings is not None:
        timings["forward"].append(t1 - t0)
        timings["force_pass"].append(t2 - t1)
        timings["backward"].append(t3 - t2)


def labelled_batch(graph):
    """The batch as the trainer sees it, with zero labels (the step's cost does not depend on them)."""
    from janus_potential.training.data import Batch

    g = graph.num_graphs
    n = graph.species.shape[0]
    dtype = graph.positions.dtype
    return Batch(graph=graph, energy=torch.zeros(g, dtype=torch.float64), forces=torch.zeros(n, 3, dtype=dtype),
                 stress=torch.zeros(g, 3, 3, dtype=dtype), has_energy=torch.ones(g, dtype=torch.bool),
                 has_forces=torch.ones(n, dtype=torch.bool), has_stress=torch.ones(g, dtype=torch.bool),
                 weight=torch.ones(g), sources=["bench"] * g, files=["bench"] * g)


def trainer_step(model, batch, config, compiled=None) -> None:
    """The trainer's step on one evaluation: eager (model.compute, loss_terms, backward) or
    through `compiled` (a training.compiled.CompiledStep)."""
    from janus_potential.training.compiled import expert_loads
    from janus_potential.training.loss import loss_terms

    loads = expert_loads(model, batch.graph.species)
    coefficients = loads.shape[-1] * loads / loads.sum(dim=-1, keepdim=True) / batch.graph.species.shape[0]
    ratios = torch.ones(3, dtype=batch.graph.positions.dtype, device=batch.graph.positions.device)
    model.zero_grad(set_to_none=True)
    if compiled is not None:
        for name, grad in compiled(batch, True, ratios, coefficients)["gradients"].items():
            if grad is not None:
                model.get_parameter(name).grad = grad
        return
    prediction = model.compute(batch.graph, compute_virial=True, create_graph=True)
    terms = loss_terms(prediction, batch, config)
    balance = (coefficients.to(terms["total"].dtype) * prediction["router_probability_sum"]).sum()
    (terms["total"] + config.balance_weight * balance).backward()


def bench_preset(preset: str, n_structures: int, steps: int, peak_rate: float, fused: bool = False,
                 compile: bool = False) -> dict:
    """One preset's training step; `fused`: the message through janus_potential.ops (the
    fused gather-multiply-scatter) instead of torch operations; `compile`: run.compile's step."""
    from janus_potential.training.compiled import CompiledStep
    from janus_potential.training.config import LossConfig

    torch.manual_seed(0)
    model = JanusPotential.from_preset(preset)
    for layer in model.layers:
        layer.fused = fused
    graph = training_batch(n_structures, model.cutoff)
    batch = labelled_batch(graph)
    config = LossConfig()
    one_step(model, graph)
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as profiler:
        one_step(model, graph)
    flops = sum(event.flops for event in profiler.key_averages() if event.flops)  # the same math in every row
    medians = {}
    compiled, compile_s = None, 0.0
    if compile:
        compiled = CompiledStep(model, config)
        start = time.perf_counter()
        trainer_step(model, batch, config, compiled)
        compile_s = time.perf_counter() - start
    else:
        timings = {"forward": [], "force_pass": [], "backward": []}
        for _ in range(steps):
            one_step(model, graph, timings)
        medians = {k: float(np.median(v)) for k, v in timings.items()}
    trainer_step(model, batch, config, compiled)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer_step(model, batch, config, compiled)
        times.append(time.perf_counter() - start)
    step_time = float(np.median(times))
    atoms = int(graph.num_atoms.sum())
    return {
        "preset": preset, "fused": fused, "compiled": compile, "atoms_per_batch": atoms,
        "edges_per_batch": int(graph.edge_index.shape[1]), "compile_s": compile_s,
        "steps_per_s": 1 / step_time, "atoms_per_s": atoms / step_time, "step_s": step_time,
        **{f"{k}_s": v for k, v in medians.items()},
        "matmul_gflop_per_step": flops / 1e9, "achieved_gflop_s": flops / step_time / 1e9,
        "fraction_of_matmul_rate": flops / step_time / peak_rate,
    }


def ep_worker(preset: str, n_structures: int, steps: int, compile: bool) -> dict:
    """One rank of the `--ep` benchmark (module docstring)."""
    import torch.distributed as dist

    from janus_potential.parallel.expert import ExchangeStats, is_expert_shard, shard_experts
    from janus_potential.parallel.mesh import ProcessMesh, init_distributed
    from janus_potential.training.compiled import CompiledStep
    from janus_potential.training.config import LossConfig
    from janus_potential.training.distributed import GradientReducer, split_by_atoms

    torch.set_num_threads(1)
    _, world = init_distributed()
    mesh = ProcessMesh.create(1, world, 1)
    torch.manual_seed(0)
    model = shard_experts(JanusPotential.from_preset(preset), mesh.ep_group)
    reducer = GradientReducer([p for p in model.parameters() if not is_expert_shard(p)], mesh.dense_grad_group)
    structures = training_structures(n_structures)
    mine = split_by_atoms(list(range(len(structures))), [len(s) for s in structures], world)[mesh.rank]
    graph = batch_graphs([build_graph(structures[k], model.cutoff) for k in mine])
    batch = labelled_batch(graph)
    config = LossConfig()
    compiled = CompiledStep(model, config) if compile else None

    def step() -> None:
        trainer_step(model, batch, config, compiled)
        reducer.finish()

    start = time.perf_counter()
    step()
    first_s = time.perf_counter() - start
    step()
    dist.barrier()
    seconds0, times = ExchangeStats.seconds, []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    record = {"rank": mesh.rank, "step_s": float(np.median(times)), "first_step_s": first_s,
              "exchange_s": (ExchangeStats.seconds - seconds0) / steps, "atoms": int(graph.num_atoms.sum())}
    records = [None] * world
    dist.all_gather_object(records, record)
    dist.destroy_process_group()
    return {"preset": preset, "ranks": world, "compiled": compile, "per_rank": records}


def bench_ep(presets: list, ranks: int, n_structures: int, steps: int) -> None:
    """`--ep`: every preset eager and compiled on `ranks` expert-parallel ranks (module docstring)."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    mpirun = Path(sys.executable).parent / "mpirun"
    rows = []
    for preset in presets:
        for compile in (False, True):
            command = [str(mpirun), "-np", str(ranks), sys.executable, __file__, "--ep-worker", preset,
                       "--structures", str(n_structures), "--steps", str(steps)] + (["--compile"] if compile else [])
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                raise RuntimeError(f"ep worker failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
            result = json.loads(lines[0][len("RESULT "):])
            result["step_s"] = max(r["step_s"] for r in result["per_rank"])
            result["atoms_per_batch"] = sum(r["atoms"] for r in result["per_rank"])
            result["atoms_per_s"] = result["atoms_per_batch"] / result["step_s"]
            rows.append(result)
    print(f"{'preset':>6} {'ranks':>5} {'path':>8} {'atoms':>6} {'step s':>8} {'x eager':>8} {'atoms/s':>8} "
          f"{'exchange s':>10} {'first step s':>12}")
    for r in rows:
        eager = next(b for b in rows if b["preset"] == r["preset"] and not b["compiled"])
        r["speedup_vs_eager"] = eager["step_s"] / r["step_s"]
        print(f"{r['preset']:>6} {r['ranks']:>5} {'compiled' if r['compiled'] else 'eager':>8} "
              f"{r['atoms_per_batch']:>6} {r['step_s']:8.3f} {r['speedup_vs_eager']:8.2f} {r['atoms_per_s']:8.0f} "
              f"{max(p['exchange_s'] for p in r['per_rank']):10.4f} {max(p['first_step_s'] for p in r['per_rank']):12.1f}")
    RESULTS.mkdir(exist_ok=True)
    out = {"machine": {"cpus": os.cpu_count(), "threads_per_rank": 1, "platform": platform.platform()},
           "command": "python bench/train_step.py " + " ".join(sys.argv[1:]), "rows": rows}
    path = RESULTS / f"train_step_ep{ranks}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small", "base"])
    parser.add_argument("--structures", type=int, default=8, help="structures per batch (24-40 atoms each)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled rows (compiling takes minutes)")
    parser.add_argument("--ep", type=int, default=0, help="expert parallelism on this many ranks (mpirun)")
    parser.add_argument("--ep-worker", help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = 3 if args.quick else args.steps
    if args.ep_worker:
        result = ep_worker(args.ep_worker, args.structures, steps, args.compile)
        if int(os.environ.get("PMI_RANK", "0")) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return
    if args.ep:
        bench_ep(args.presets, args.ep, args.structures, steps)
        return
    peak = matmul_rate(seconds=1.0 if args.quick else 3.0)
    print(f"fp32 matmul rate (1024x1024, {torch.get_num_threads()} threads): {peak / 1e9:.1f} GFLOP/s")
    from janus_potential import ops

    variants = [(False, False)] + ([(True, False)] if ops.available() else [])
    if not args.no_compile:
        variants.append((ops.available(), True))
    rows = [bench_preset(p, args.structures, steps, peak, fused, compile) for p in args.presets
            for fused, compile in variants]
    header = (f"{'preset':>6} {'path':>16} {'atoms':>6} {'steps/s':>8} {'x eager':>8} {'atoms/s':>8} {'fwd s':>7} "
              f"{'force s':>8} {'bwd s':>7} {'GFLOP':>7} {'GFLOP/s':>8} {'of peak':>8} {'compile s':>9}")
    print(header)
    for r in rows:
        base = next(b for b in rows if b["preset"] == r["preset"] and not b["fused"] and not b["compiled"])
        r["speedup_vs_eager_torch_ops"] = r["steps_per_s"] / base["steps_per_s"]
        path = ("compiled" if r["compiled"] else "eager") + (", fused" if r["fused"] else ", torch ops")
        phases = " ".join(f"{r[k]:{w}.3f}" if k in r else f"{'-':>{w}}" for k, w in
                          (("forward_s", 7), ("force_pass_s", 8), ("backward_s", 7)))
        print(f"{r['preset']:>6} {path:>16} {r['atoms_per_batch']:>6} {r['steps_per_s']:8.2f} "
              f"{r['speedup_vs_eager_torch_ops']:8.2f} {r['atoms_per_s']:8.0f} {phases} "
              f"{r['matmul_gflop_per_step']:7.2f} {r['achieved_gflop_s']:8.2f} {100 * r['fraction_of_matmul_rate']:7.1f}% "
              f"{r['compile_s']:9.1f}")
    RESULTS.mkdir(exist_ok=True)
    out = {"machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "platform": platform.platform(), "openmp": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}},
           "matmul_gflop_s": peak / 1e9, "rows": rows}
    (RESULTS / "train_step.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {RESULTS / 'train_step.json'}")


if __name__ == "__main__":
    main()
