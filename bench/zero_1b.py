"""One training step of the `1b` preset (float32, energy+force loss) on 2 ranks.

    mpirun -np 2 .venv/bin/python bench/zero_1b.py [--atoms 16]

Memory plan: the expert weights (98% of the parameters) are sharded over the ep group
(each rank holds, trains and keeps Adam state for half of the experts); the replicated
dense parameters use `ZeroRedundancyOptimizer`, so their Adam state is sharded too and
their gradients are summed over the ranks. Prints and writes bench/results/zero_1b.json
with the peak resident memory of every rank.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.optim import ZeroRedundancyOptimizer  # noqa: E402

from janus_potential import JanusPotential  # noqa: E402
from janus_potential.graph import build_graph  # noqa: E402
from janus_potential.parallel.expert import is_expert_shard, shard_experts  # noqa: E402
from janus_potential.parallel.mesh import ProcessMesh  # noqa: E402
from janus_potential.testing import random_structure  # noqa: E402


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--atoms", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    mesh = ProcessMesh.create(dp=1, ep=dist_size(), dd=1)
    torch.manual_seed(0)
    start = time.perf_counter()
    model = JanusPotential.from_preset("1b")
    total = sum(p.numel() for p in model.parameters())
    shard_experts(model, mesh.ep_group)
    build_seconds = time.perf_counter() - start
    expert = [p for p in model.parameters() if is_expert_shard(p)]
    dense = [p for p in model.parameters() if not is_expert_shard(p)]
    local = sum(p.numel() for p in model.parameters())
    expert_optimizer = torch.optim.AdamW(expert, lr=1e-4, foreach=False)
    dense_optimizer = ZeroRedundancyOptimizer(dense, optimizer_class=torch.optim.AdamW, lr=1e-4, foreach=False,
                                              process_group=mesh.dense_grad_group)
    atoms = random_structure(["Si", "O"], args.atoms, seed=mesh.rank)
    graph = build_graph(atoms, model.cutoff, dtype=torch.float32)
    start = time.perf_counter()
    out = model.compute(graph, compute_virial=False, create_graph=True)
    loss = (out["energy"][0] / args.atoms).float() ** 2 + (out["forces"] ** 2).mean()
    loss.backward()
    for p in dense:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, group=mesh.dense_grad_group)
    expert_optimizer.step()
    dense_optimizer.step()
    step_seconds = time.perf_counter() - start
    record = {"rank": mesh.rank, "total_parameters": total, "local_parameters": local,
              "peak_rss_gib": round(peak_gib(), 2), "build_s": round(build_seconds, 1),
              "step_s": round(step_seconds, 1), "loss": float(loss.detach())}
    records = [None] * mesh.world_size
    dist.all_gather_object(records, record)
    if mesh.rank == 0:
        for r in records:
            print(json.dumps(r))
        path = Path(__file__).parent / "results" / "zero_1b.json"
        path.write_text(json.dumps({"preset": "1b", "dtype": "float32", "ranks": records}, indent=1))
    dist.destroy_process_group()


def dist_size() -> int:
    from janus_potential.parallel.mesh import init_distributed

    return init_distributed()[1]


if __name__ == "__main__":
    main()
