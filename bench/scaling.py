"""Scaling of data (dp), expert (ep) and domain (dd) parallelism on 1, 2 and 4 ranks.

    .venv/bin/python bench/scaling.py [--ranks 1 2 4] [--steps 3]
    .venv/bin/python bench/scaling.py --weak [--atoms-per-rank 2048] [--ranks 1 2]

Each (kind, ranks) point runs under `mpirun -np N` (oversubscribed past the 2 cores) and
measures one training step with energy+force loss (second derivatives) on the `small`
preset, float32, structures of 16 elements: dp splits a global batch of 8 structures x 32 atoms, ep shards the 8
experts of every layer over the ranks for the same batch, dd splits one 512-atom periodic
structure into slabs. Reported per step: steps/s, atoms/s, communication seconds and
off-rank bytes per rank, and the achieved FLOP rate (matmul FLOPs of one step counted
by the torch profiler on every rank, as in bench/train_step.py) against the fp32 matmul
rate of the cores the ranks can use (one thread per rank, measured in the same run); plus an alpha-beta cost model per rank (latency alpha, bandwidth
beta fitted from all_reduce timings on 2 ranks) that predicts the communication time of
each point and extrapolates to 1,000+ ranks. Writes bench/results/scaling.json.

`--weak` keeps the work per rank fixed instead (the paper's weak scaling): every rank gets
`--atoms-per-rank` atoms (dp/ep: that many atoms of 32-atom structures per rank, so the
global batch grows with the ranks; dd: one structure of atoms-per-rank x ranks atoms), and
efficiency = throughput(N) / (N x throughput(1)). Writes bench/results/scaling_weak.json.

Before timing, the router is balanced (`--balance-steps`, default 30 AdamW steps on the MoE
balance loss alone, `balance_router`): at its random initialisation it sends every atom to one
or two experts per layer. "imbal" = the busiest ep rank's expert slots over the mean (1 = even).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

GLOBAL_STRUCTURES, ATOMS_PER_STRUCTURE, DOMAIN_ATOMS = 8, 32, 512
# 16 elements: the router picks experts by element, so a two-element batch can use at most
# 2 x top-k of the experts, however balanced the router (a universal potential's batches mix
# dozens of elements)
ELEMENTS = ["H", "Li", "C", "N", "O", "F", "Na", "Mg", "Al", "Si", "P", "S", "Cl", "K", "Ca", "Fe"]


def balance_router(model, graph, reducers, steps: int, world: int) -> None:
    """AdamW steps on the MoE balance loss alone, so that the router spreads the atoms over the
    experts as a trained model's does (the balance loss is part of training). A router at its
    random initialisation sends every atom of a 2-element batch to the same one or two experts
    per layer, and ep then measures that one rank works for all: the router, not the parallelism."""
    import torch
    import torch.distributed as dist

    from janus_potential.nn.moe import balance_loss

    balancer = torch.optim.AdamW(model.parameters(), lr=0.02)
    for _ in range(steps):
        balancer.zero_grad(set_to_none=True)
        out = model.compute(graph, compute_virial=False, create_graph=False)
        totals = torch.cat([out["expert_load"].detach().to(torch.float64).reshape(-1),
                            torch.tensor([float(graph.positions.shape[0])], dtype=torch.float64)])
        if world > 1:
            dist.all_reduce(totals)
        load = totals[:-1].view_as(out["expert_load"]).to(out["router_probability_sum"].dtype)
        balance_loss(out["router_probability_sum"], load, float(totals[-1])).backward()
        for reducer in reducers:
            reducer.finish()
        balancer.step()


def worker(kind: str, steps: int, atoms_per_rank: int = 0, balance_steps: int = 0) -> dict:
    """One (kind, ranks) point; `atoms_per_rank` > 0: weak scaling with that much work per rank."""
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from janus_potential import JanusPotential
    from janus_potential.graph import batch_graphs, build_graph
    from janus_potential.parallel.domain import DomainModel
    from janus_potential.parallel.expert import ExchangeStats, is_expert_shard, shard_experts
    from janus_potential.parallel.mesh import ProcessMesh, init_distributed
    from janus_potential.testing import random_structure
    from janus_potential.training.distributed import GradientReducer, split_by_atoms

    torch.set_num_threads(1)
    _, world = init_distributed()
    global_structures, domain_atoms = GLOBAL_STRUCTURES, DOMAIN_ATOMS
    if atoms_per_rank:
        global_structures = world * max(1, atoms_per_rank // ATOMS_PER_STRUCTURE)
        domain_atoms = world * atoms_per_rank
    sizes = {"dp": (world, 1, 1), "ep": (1, world, 1), "dd": (1, 1, world)}[kind]
    mesh = ProcessMesh.create(*sizes)
    torch.manual_seed(0)
    model = JanusPotential.from_preset("small")
    model = shard_experts(model, mesh.ep_group)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dense = [p for p in model.parameters() if not is_expert_shard(p)]
    reducers = []
    if world > 1:
        reducers.append(GradientReducer(dense, mesh.dense_grad_group))
        experts = [p for p in model.parameters() if is_expert_shard(p)]
        if experts and mesh.dp > 1:
            reducers.append(GradientReducer(experts, mesh.expert_grad_group))
    if kind == "dd":
        atoms = random_structure(ELEMENTS, domain_atoms, seed=0, density=0.07, min_distance=1.5)
        graph = build_graph(atoms, model.cutoff, dtype=torch.float32)
        domain_model = DomainModel.build(model, graph, mesh.dd_group)
        local_atoms = domain_model.domain.n_owned
    else:
        mine = split_by_atoms(list(range(global_structures)), [ATOMS_PER_STRUCTURE] * global_structures, world)[mesh.rank]
        frames = {k: random_structure(ELEMENTS, ATOMS_PER_STRUCTURE, seed=k, density=0.07) for k in mine}
        graphs = {k: build_graph(a, model.cutoff, dtype=torch.float32) for k, a in frames.items()}
        graph = batch_graphs([graphs[k] for k in mine])
        local_atoms = graph.positions.shape[0]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        if kind == "dd":
            out = domain_model(graph.positions, graph.cell[0], compute_virial=False, create_graph=True)
            loss = (out["forces"] ** 2).sum() / (3 * domain_atoms) + out["energy"].float() ** 2 / domain_atoms ** 2 / world
        else:
            out = model.compute(graph, compute_virial=False, create_graph=True)
            loss = (out["forces"] ** 2).sum() / (3 * global_structures * ATOMS_PER_STRUCTURE)
            loss = loss + (out["energy"].float() ** 2).sum() / ATOMS_PER_STRUCTURE ** 2 / global_structures
        loss.backward()
        for reducer in reducers:
            reducer.finish()
        optimizer.step()

    def counters() -> tuple[float, float]:
        seconds = sum(r.seconds for r in reducers) + ExchangeStats.seconds
        sent = sum(r.bytes * (2 * (world - 1) / world) for r in reducers) + ExchangeStats.bytes_sent
        if kind == "dd":
            seconds += domain_model.plan.seconds[0]
            sent += domain_model.plan.bytes_sent[0]
        return seconds, sent

    if balance_steps and kind != "dd":
        balance_router(model, graph, reducers, balance_steps, world)
    if kind != "dd":
        load = model.compute(graph, compute_virial=False, create_graph=False)["expert_load"].detach()
        if world > 1:
            dist.all_reduce(load)
        # slots each ep rank's experts process, per layer: the slowest rank's share against the mean
        per_rank = load.view(load.shape[0], mesh.ep, -1).sum(-1)
        imbalance = float((per_rank.max(dim=1).values / per_rank.mean(dim=1)).max())
    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as profiler:
        step()
    flops = sum(event.flops for event in profiler.key_averages() if event.flops)
    if world > 1:
        dist.barrier()
    seconds0, bytes0 = counters()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = (time.perf_counter() - start) / steps
    seconds1, bytes1 = counters()
    record = {"kind": kind, "ranks": world, "rank": mesh.rank, "step_s": elapsed, "local_atoms": int(local_atoms),
              "matmul_flops": flops,
              "comm_s": (seconds1 - seconds0) / steps, "comm_bytes": (bytes1 - bytes0) / steps,
              "grad_bytes": sum(p.numel() * p.element_size() for p in dense),
              "expert_bytes": sum(p.numel() * p.element_size() for p in model.parameters() if is_expert_shard(p))}
    if kind == "dd":
        record["ghosts"] = domain_model.domain.n_local - domain_model.domain.n_owned
    else:
        record["expert_imbalance"] = imbalance
    if kind == "dp" and world == 2:
        record["alpha_beta"] = fit_alpha_beta(mesh)
    records = [record]
    if world > 1:
        records = [None] * world
        dist.all_gather_object(records, record)
        dist.destroy_process_group()
    return {"kind": kind, "ranks": world, "per_rank": records}


def fit_alpha_beta(mesh) -> dict:
    """Latency (s) and bandwidth (bytes/s) of a 2-rank all_reduce: t = alpha + bytes/beta."""
    import torch
    import torch.distributed as dist

    points = []
    for n in (16, 1 << 20):
        buffer = torch.zeros(n // 4)
        dist.all_reduce(buffer, group=mesh.dense_grad_group)
        start = time.perf_counter()
        for _ in range(10):
            dist.all_reduce(buffer, group=mesh.dense_grad_group)
        points.append((n, (time.perf_counter() - start) / 10))
    (n0, t0), (n1, t1) = points
    beta = (n1 - n0) / max(t1 - t0, 1e-9)
    return {"alpha_s": max(t0 - n0 / beta, 1e-6), "beta_bytes_per_s": beta}


def model_comm_seconds(kind: str, ranks: int, point: dict, alpha: float, beta: float) -> float:
    """Alpha-beta model of one step's communication time per rank."""
    if ranks == 1:
        return 0.0
    if kind == "dp":  # ring all-reduce of the gradient buckets
        buckets = max(1, point["grad_bytes"] // (8 << 20) + 1)
        return 2 * (ranks - 1) * buckets * alpha + 2 * (ranks - 1) / ranks * point["grad_bytes"] / beta
    # ep / dd: point-to-point payload measured (or predicted) per rank, messages to each peer
    exchanges = {"ep": 4 * 2 * 3, "dd": 4 * 2 + 2}[kind]  # see predicted_bytes
    return exchanges * (ranks - 1) * alpha + point["comm_bytes"] / beta


def predicted_bytes(kind: str, ranks: int, grad_bytes: float, atoms_per_rank: float, features: int = 64,
                    layers: int = 3, cutoff: float = 5.0, density: float = 0.07, slab_area: float = 0.0) -> float:
    """Off-rank bytes per rank per training step with an energy+force loss.

    Counting the autograd passes: the forward, the create_graph force pass and the
    loss.backward (which replays both) move every dispatched/ghost row 4 times per
    exchange point. ep: 2 exchange points per layer (dispatch, combine), slots leave with
    probability (P-1)/P under uniform routing. dd: L-1 exchange points, plus the reverse
    force sum and its replay (3 floats per ghost, twice); ghosts from the geometry: slabs
    of cross-section `slab_area` (2-4 ranks, as measured) or 3-D cubic domains (1,000+).
    """
    if ranks == 1:
        return 0.0
    if kind == "dp":
        return 2 * (ranks - 1) / ranks * grad_bytes
    if kind == "ep":
        return 4 * 2 * layers * atoms_per_rank * (ranks - 1) / ranks * features * 4
    if slab_area:
        side = slab_area ** 0.5
        ghosts = density * (side + 2 * cutoff) ** 2 * 2 * cutoff
    else:
        side = (atoms_per_rank / density) ** (1 / 3)
        ghosts = density * ((side + 2 * cutoff) ** 3 - side ** 3)
    return (4 * (layers - 1) * features + 2 * 3) * 4 * ghosts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--kinds", nargs="+", default=["dp", "ep", "dd"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--weak", action="store_true", help="fixed work per rank (weak scaling)")
    parser.add_argument("--atoms-per-rank", type=int, default=2048, help="--weak: atoms per rank (default 2048)")
    parser.add_argument("--balance-steps", type=int, default=30,
                        help="AdamW steps on the MoE balance loss before timing (0: the random-init router)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    atoms_per_rank = args.atoms_per_rank if args.weak else 0
    if args.worker:
        result = worker(args.worker, args.steps, atoms_per_rank, args.balance_steps)
        if int(os.environ.get("PMI_RANK", "0")) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    import torch

    from train_step import matmul_rate

    torch.set_num_threads(1)
    core_rate = matmul_rate(seconds=2.0)  # one thread, as every rank runs
    cores = len(os.sched_getaffinity(0))
    points = []
    for kind in args.kinds:
        for ranks in args.ranks:
            command = [sys.executable, __file__, "--worker", kind, "--steps", str(args.steps),
                       "--balance-steps", str(args.balance_steps)]
            if args.weak:
                command += ["--weak", "--atoms-per-rank", str(args.atoms_per_rank)]
            if ranks > 1:
                command = [str(Path(sys.executable).parent / "mpirun"), "-np", str(ranks), *command]
            done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
            lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
            if not lines:
                raise SystemExit(f"{kind} x{ranks} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
            points.append(json.loads(lines[0][7:]))
    fit = next((r["alpha_beta"] for p in points for r in p["per_rank"] if "alpha_beta" in r),
               {"alpha_s": 1e-4, "beta_bytes_per_s": 1e9})
    alpha, beta = fit["alpha_s"], fit["beta_bytes_per_s"]
    def domain_atoms(ranks: int) -> int:
        return ranks * args.atoms_per_rank if args.weak else DOMAIN_ATOMS

    extrapolation_atoms = args.atoms_per_rank if args.weak else 256
    rows = []
    for p in points:
        per_rank = p["per_rank"]
        step_s = max(r["step_s"] for r in per_rank)
        atoms = sum(r["local_atoms"] for r in per_rank)
        mean = {k: sum(r[k] for r in per_rank) / len(per_rank) for k in ("comm_s", "comm_bytes", "local_atoms")}
        point = dict(per_rank[0], comm_bytes=mean["comm_bytes"])
        rows.append({
            "kind": p["kind"], "ranks": p["ranks"], "steps_per_s": 1 / step_s, "atoms_per_s": atoms / step_s,
            "comm_s": mean["comm_s"], "comm_bytes": mean["comm_bytes"],
            "model_bytes": predicted_bytes(p["kind"], p["ranks"], per_rank[0]["grad_bytes"], mean["local_atoms"],
                                           slab_area=(domain_atoms(p["ranks"]) / 0.07) ** (2 / 3)
                                           if p["kind"] == "dd" else 0.0),
            "model_comm_s": model_comm_seconds(p["kind"], p["ranks"], point, alpha, beta),
            "gflop_s": sum(r["matmul_flops"] for r in per_rank) / step_s / 1e9,
            "expert_imbalance": per_rank[0].get("expert_imbalance"),
        })
        rows[-1]["fraction_of_matmul_rate"] = rows[-1]["gflop_s"] * 1e9 / (core_rate * min(p["ranks"], cores))
    base = {r["kind"]: r["atoms_per_s"] for r in rows if r["ranks"] == 1}
    for r in rows:
        r["efficiency"] = r["atoms_per_s"] / (r["ranks"] * base[r["kind"]]) if r["kind"] in base else None
    grad_bytes = points[0]["per_rank"][0]["grad_bytes"]
    extrapolation = [
        {"ranks": n, **{f"{k}_bytes_per_rank": predicted_bytes(k, n, grad_bytes, extrapolation_atoms)
                        for k in ("dp", "ep", "dd")},
         "dp_comm_s": 2 * (n - 1) * (grad_bytes // (8 << 20) + 1) * alpha + 2 * (n - 1) / n * grad_bytes / beta,
         "dp_comm_s_tree": 2 * np.log2(n) * (grad_bytes // (8 << 20) + 1) * alpha + 2 * grad_bytes / beta,
         "ep_comm_s": 24 * (n - 1) * alpha + predicted_bytes("ep", n, grad_bytes, extrapolation_atoms) / beta,
         "dd_comm_s": 10 * min(n - 1, 26) * alpha + predicted_bytes("dd", n, grad_bytes, extrapolation_atoms) / beta}
        for n in (2, 4, 64, 1024, 4096)
    ]
    print(f"alpha = {alpha * 1e6:.1f} us, beta = {beta / 1e9:.2f} GB/s (2-rank gloo all_reduce on this machine)")
    print(f"fp32 matmul rate: {core_rate / 1e9:.1f} GFLOP/s per core (1024x1024, one thread), {cores} cores; "
          f"'% peak' = achieved / (that x min(ranks, cores))")
    print(f"{'kind':4} {'ranks':>5} {'steps/s':>8} {'atoms/s':>8} {'eff':>5} {'comm s':>8} {'model s':>8} "
          f"{'MB/rank':>8} {'model MB':>8} {'GFLOP/s':>8} {'% peak':>7} {'imbal':>6}")
    for r in rows:
        eff = f"{r['efficiency']:.2f}" if r["efficiency"] is not None else "-"
        print(f"{r['kind']:4} {r['ranks']:5d} {r['steps_per_s']:8.2f} {r['atoms_per_s']:8.0f} {eff:>5} "
              f"{r['comm_s']:8.4f} {r['model_comm_s']:8.4f} {r['comm_bytes'] / 1e6:8.3f} {r['model_bytes'] / 1e6:8.3f} "
              f"{r['gflop_s']:8.2f} {100 * r['fraction_of_matmul_rate']:6.1f}% "
              f"{r['expert_imbalance'] or 0:6.2f}")
    print(f"extrapolation ({extrapolation_atoms} atoms per rank; dd as 3-D cubic domains):")
    for e in extrapolation:
        print(f"  {e['ranks']:5d} ranks: dp {e['dp_bytes_per_rank'] / 1e6:7.2f} MB {e['dp_comm_s']:8.3f} s ring "
              f"{e['dp_comm_s_tree']:6.3f} s tree | ep {e['ep_bytes_per_rank'] / 1e6:6.2f} MB {e['ep_comm_s']:7.3f} s "
              f"| dd {e['dd_bytes_per_rank'] / 1e6:6.2f} MB {e['dd_comm_s']:6.3f} s")
    out = ROOT / "bench" / "results" / ("scaling_weak.json" if args.weak else "scaling.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "weak": args.weak,
                               "atoms_per_rank": atoms_per_rank, "balance_steps": args.balance_steps, "alpha_beta": fit, "matmul_gflop_s_per_core": core_rate / 1e9, "cores": cores,
                               "points": points, "table": rows, "extrapolation": extrapolation}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
