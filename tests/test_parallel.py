"""Domain decomposition, halo exchange, expert parallelism and the process mesh.

One-process tests check the halo protocol itself (the periodic self-image backend against
the ghost-free model, adjointness, double-backward gradcheck). The MPI tests launch
`tests/parallel_worker.py` under `mpirun -np 2` and `-np 4` (oversubscribed): every
layout's energy, forces, stress and force/stress-loss parameter gradient equal the
one-process values to 1e-10 (float64), and a halo with a raw collective in its backward
is shown to give wrong second derivatives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from janus_potential.graph import build_graph
from janus_potential.parallel import DomainModel, decompose, halo_exchange, halo_plan, halo_reverse
from janus_potential.testing import random_structure

from .conftest import make_model

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run_worker(ranks: int, *checks: str) -> list[dict]:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    command = [str(BIN / "mpirun"), "-np", str(ranks), sys.executable, str(ROOT / "tests" / "parallel_worker.py"), *checks]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(checks), done.stdout[-3000:] + done.stderr[-3000:]
    return results


def assert_all_ok(results: list[dict]) -> None:
    failed = [r for r in results if not r["ok"]]
    assert not failed, json.dumps(failed, indent=1)


@pytest.fixture(scope="module")
def structure_graphs():
    triclinic = random_structure(["Mg", "Al", "O", "O"], 120, seed=5)
    orthogonal = random_structure(["Si", "O"], 100, seed=6, cell=np.diag([13.0, 11.0, 12.0]))
    return [build_graph(a, 4.0, dtype=torch.float64) for a in (triclinic, orthogonal)]


@pytest.mark.parametrize("n_domains", [1, 2, 4])
def test_decomposition_partitions_atoms_and_edges(structure_graphs, n_domains):
    for graph in structure_graphs:
        domains = decompose(graph, n_domains)
        owned = torch.cat([d.owned for d in domains]).sort().values
        assert torch.equal(owned, torch.arange(graph.positions.shape[0]))
        edges = torch.cat([d.edge_ids for d in domains]).sort().values
        assert torch.equal(edges, torch.arange(graph.edge_index.shape[1]))
        for d in domains:  # each local edge is the global edge, ghosts included
            centre = d.atom[d.edge_index[0]]
            neighbour = d.atom[d.edge_index[1]]
            assert torch.equal(centre, graph.edge_index[0, d.edge_ids])
            assert torch.equal(neighbour, graph.edge_index[1, d.edge_ids])
            ghost_edges = d.edge_index[1] >= d.n_owned
            assert torch.equal(d.image_shift[d.edge_index[1]][ghost_edges].to(torch.float64),
                               graph.edge_shift[d.edge_ids][ghost_edges])
            assert torch.equal(d.owner_index[d.n_owned:].lt(torch.tensor([domains[r].n_owned for r in
                                                              d.owner_rank[d.n_owned:]])),
                               torch.ones(d.n_local - d.n_owned, dtype=torch.bool))


def test_single_process_halo_backend_equals_model(structure_graphs):
    model = make_model()
    for graph in structure_graphs:
        reference = model.compute(graph)
        domain_model = DomainModel.build(model, graph)
        assert domain_model.domain.n_local > domain_model.domain.n_owned  # periodic self-images are ghosts
        out = domain_model(graph.positions, graph.cell[0])
        assert abs(float(out["energy"].detach()) - float(reference["energy"][0].detach())) < 1e-10
        torch.testing.assert_close(out["forces"].detach(), reference["forces"][domain_model.domain.owned],
                                   rtol=0, atol=1e-10)
        torch.testing.assert_close(out["stress"].detach(), reference["stress"][0].detach(), rtol=0, atol=1e-12)


def test_halo_functions_are_adjoint_and_twice_differentiable(structure_graphs):
    graph = structure_graphs[0]
    domains = decompose(graph, 1)
    plan = halo_plan(domains, 0)
    n = plan.n_local
    h = torch.randn(n, 3, dtype=torch.float64)
    g = torch.randn(n, 3, dtype=torch.float64)
    assert abs(float((halo_exchange(h, plan) * g).sum() - (h * halo_reverse(g, plan)).sum())) < 1e-10
    small = torch.randn(n, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: halo_exchange(x, plan) ** 2, (small,))
    assert torch.autograd.gradgradcheck(lambda x: halo_exchange(x, plan) ** 2, (small,))
    assert torch.autograd.gradgradcheck(lambda x: halo_reverse(x, plan) ** 2, (small,))


@pytest.mark.mpi
def test_two_ranks_domain_expert_and_data_layouts():
    assert_all_ok(run_worker(2, "mesh:1,1,2/2x200", "mesh:1,2,1/4x64", "mesh:2,1,1/4x64", "naive-halo", "bad-mesh",
                            "calculator"))


@pytest.mark.mpi
@pytest.mark.slow
def test_four_ranks_domains_experts_and_combined_layouts():
    assert_all_ok(run_worker(4, "mesh:1,1,4/2x200", "mesh:1,4,1/4x48", "mesh:1,2,2/2x128", "mesh:2,1,2/2x128",
                             "mesh:2,2,1/4x48"))
