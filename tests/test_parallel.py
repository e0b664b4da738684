"""Domain decomposition, halo exchange, expert parallelism and the process mesh.

One-process tests check the halo protocol itself (the periodic self-image backend against
the ghost-free model, adjointness, double-backward gradcheck). The MPI tests launch
`tests/parallel_worker.py` under `mpirun -np 2` and `-np 4` (oversubscribed): every
layout's energy, forces, stress and force/stress-loss parameter gradient equal the
one-process values to 1e-10 (float64), and a halo with a raw collective in its backward
is shown to give wrong second derivatives. The parallel ASE calculator's slab domains
(built without a global graph) reproduce the global graph's edges, and the calculator equals
the one-process `JanusCalculator` on 1, 2 and 4 ranks through MD steps, rebuilds and errors.
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
from janus_potential.parallel.domain import request_halo_plan, slab_domain
from janus_potential.testing import random_structure

from .devices import DEVICES
from .model_suite import PERIODIC, STRUCTURES, evaluate, make_model

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run_worker(ranks: int, *checks: str, device: str = "cpu") -> list[dict]:
    """`tests/parallel_worker.py CHECK...` on `ranks` MPI ranks; `device`: where the parallel
    side runs (the one-process references always run on the CPU)."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", JANUS_TEST_DEVICE=device)
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
    """Reference: the model's `forward` on the ghost-free graph (the model suite's `evaluate`),
    on these structures and on the suite's periodic ones (one of them a 2-atom cell smaller
    than the cutoff: many ghost images of each atom)."""
    model = make_model()
    suite_graphs = [build_graph(STRUCTURES[name](), model.cutoff, dtype=torch.float64) for name in PERIODIC]
    for graph in structure_graphs + suite_graphs:
        reference = evaluate(model, graph)
        reference_stress = -reference["virial"][0] / float(graph.volumes()[0])
        domain_model = DomainModel.build(model, graph)
        assert domain_model.domain.n_local > domain_model.domain.n_owned  # periodic self-images are ghosts
        out = domain_model(graph.positions, graph.cell[0])
        owned = domain_model.domain.owned.numpy()
        assert abs(float(out["energy"].detach()) - reference["energy"][0]) < 1e-10
        np.testing.assert_allclose(out["forces"].detach().numpy(), reference["forces"][owned], rtol=0, atol=1e-10)
        np.testing.assert_allclose(out["stress"].detach().numpy(), reference_stress, rtol=0, atol=1e-12)


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


def edge_keys(centre, neighbour, shift) -> set:
    """Edges as (centre atom, neighbour atom, integer cell shift) tuples."""
    shift = np.asarray(shift).round().astype(np.int64)
    return set(zip(np.asarray(centre).tolist(), np.asarray(neighbour).tolist(), map(tuple, shift.tolist())))


@pytest.mark.parametrize("n_domains", [1, 2, 3, 4])
def test_slab_domains_partition_atoms_and_reproduce_the_graph_edges(n_domains):
    """Owned atoms partition the structure; the local edges within the cutoff, over all
    ranks, are the global graph's edges once each (unwrapped positions, triclinic, and a cell
    smaller than the cutoff); every ghost points at its owner's row of the same atom."""
    rng = np.random.default_rng(4)
    frames = [random_structure(["Mg", "Al", "O", "O"], 120, seed=5),
              random_structure(["Si", "O"], 100, seed=6, cell=np.diag([13.0, 11.0, 12.0])),
              random_structure(["Si"], 6, seed=7)]
    cutoff, skin = 4.0, 1.0
    for atoms in frames:
        atoms.positions += 6.0 * rng.normal(size=(len(atoms), 3))  # not wrapped into the cell
        graph = build_graph(atoms, cutoff, dtype=torch.float64)
        domains = [slab_domain(atoms.positions, atoms.cell.array, atoms.numbers, n_domains, r, cutoff + skin)
                   for r in range(n_domains)]
        owned = torch.cat([d.owned for d in domains]).sort().values
        assert torch.equal(owned, torch.arange(len(atoms)))
        found = []
        for d in domains:
            vectors = DomainModel(None, d, None).edge_vectors(torch.as_tensor(atoms.positions),
                                                              torch.as_tensor(atoms.cell.array))
            within = vectors.norm(dim=1) < cutoff
            found += list(zip(d.atom[d.edge_index[0, within]].tolist(), d.atom[d.edge_index[1, within]].tolist(),
                              map(tuple, d.edge_shift[within].tolist())))
            ghosts = torch.arange(d.n_owned, d.n_local)
            owners = [domains[int(r)] for r in d.owner_rank[ghosts]]
            assert [int(o.atom[int(i)]) for o, i in zip(owners, d.owner_index[ghosts])] == d.atom[ghosts].tolist()
        assert len(found) == len(set(found)) == graph.edge_index.shape[1]
        assert set(found) == edge_keys(graph.edge_index[0], graph.edge_index[1], graph.edge_shift)


def test_slab_domain_with_request_plan_equals_model_on_one_process(structure_graphs):
    model = make_model()
    for graph in structure_graphs:
        positions, cell = graph.positions.numpy(), graph.cell[0].numpy()
        domain = slab_domain(positions, cell, graph.species.numpy(), 1, 0, model.cutoff)
        out = DomainModel(model, domain, request_halo_plan(domain))(graph.positions, graph.cell[0])
        reference = model.compute(graph)
        assert abs(float(out["energy"].detach()) - float(reference["energy"][0].detach())) < 1e-10
        torch.testing.assert_close(out["forces"].detach(), reference["forces"][domain.owned].detach(),
                                   rtol=0, atol=1e-10)
        torch.testing.assert_close(out["stress"].detach(), reference["stress"][0].detach(), rtol=0, atol=1e-12)


def test_parallel_calculator_on_one_process_equals_serial_through_md_and_rebuilds():
    from .parallel_worker import check_ase_errors, check_ase_md

    assert_all_ok([check_ase_md(), check_ase_errors()])


def test_parallel_calculator_loads_the_model_once_and_imports_no_cycle(monkeypatch, tmp_path):
    import ast

    import janus_potential.ase.calculator as calculator_module
    import janus_potential.io as io_module
    from janus_potential.ase import JanusCalculator

    model = make_model()
    model.save_checkpoint(tmp_path / "model.ckpt")
    loads = []
    original = io_module.load_model
    monkeypatch.setattr(io_module, "load_model", lambda *a, **k: loads.append(a) or original(*a, **k))
    calculator = JanusCalculator(str(tmp_path / "model.ckpt"), parallel=True)
    assert len(loads) == 1 and calculator._parallel.module is calculator.module
    source = Path(calculator_module.__file__).with_name("parallel.py").read_text()
    imported = {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
    assert not {"calculator", "janus_potential.ase", "janus_potential.ase.calculator"} & imported


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 4])
def test_parallel_calculator_on_several_ranks_equals_serial(ranks):
    assert_all_ok(run_worker(ranks, "ase-md", "ase-errors"))


@pytest.mark.mpi
@pytest.mark.parametrize("device", [d for d in DEVICES if d.id == "cuda"])
def test_parallel_calculator_on_a_gpu_equals_serial_cpu(device):
    """Two ranks sharing the GPU (halo exchanges on the device through the backend, or
    through host memory) = the one-process CPU calculator, through MD and rebuilds."""
    assert_all_ok(run_worker(2, "ase-md", device=device))


def test_traced_expert_exchanges_form_one_chain_in_program_order():
    """Inside `ordered_exchanges` every expert exchange takes the token the previous one
    returned, forward and backward alike, so that a compiler cannot reorder them (two
    independent exchanges would otherwise be free to run in either order, differently on
    different ranks: the compiled ep=2 step deadlocked that way before the chain). Traced with
    fake tensors, so no process group is needed; the real exchanges run in
    tests/test_parallel_training.py (compiled ep=2 = eager one process)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from janus_potential.parallel.expert import exchange, ordered_exchanges

    def step(a, b, token, counts):
        with torch.enable_grad(), ordered_exchanges(token) as order:
            a, b = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
            x = exchange(a, counts, counts, 0, a.shape[0])  # independent of y
            y = exchange(b, counts, counts, 0, b.shape[0])
            grads = torch.autograd.grad((x * x).sum() + (y * y).sum(), [a, b])  # two more exchanges
        return grads, order.token

    graph = make_fx(step, tracing_mode="fake")(torch.randn(5, 4), torch.randn(5, 4), torch.zeros(1),
                                                torch.tensor([3, 2]))
    calls = [node for node in graph.graph.nodes if node.op == "call_function"
             and node.target is torch.ops.janus_parallel.all_to_all_rows.default]
    assert len(calls) == 4
    assert calls[0].args[1].op == "placeholder"  # the first takes the graph's input token
    for before, after in zip(calls, calls[1:]):
        token = after.args[1]
        assert token.op == "call_function" and token.args[0] is before and token.args[1] == 1, \
            "each exchange must take the token its predecessor returned"
    output = next(node for node in graph.graph.nodes if node.op == "output")
    assert output.args[0][1].args[0] is calls[-1], "the last token must be an output (no dead exchange)"


def test_backend_follows_the_device_and_gpu_sharing(monkeypatch):
    """gloo on the CPU; NCCL for CUDA tensors when each rank of a node has its own GPU; gloo
    alone when ranks share a GPU (NCCL refuses two ranks of a communicator on one device);
    JANUS_DIST_BACKEND overrides."""
    from janus_potential.parallel import mesh

    for name in mesh.LOCAL_SIZE_VARIABLES + mesh.MPI_ENVIRONMENT + ("JANUS_DIST_BACKEND",):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert mesh.backend_for(torch.device("cpu")) == "gloo"
    assert mesh.backend_for(None) == "gloo"
    assert mesh.local_world_size() == 1
    assert mesh.backend_for(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    monkeypatch.setenv("MPI_LOCALNRANKS", "2")  # MPICH's mpirun: two ranks, two GPUs
    assert mesh.local_world_size() == 2
    assert mesh.backend_for(torch.device("cuda", 1)) == "cpu:gloo,cuda:nccl"
    monkeypatch.setenv("MPI_LOCALNRANKS", "4")  # four ranks share two GPUs
    assert mesh.backend_for(torch.device("cuda", 1)) == "gloo"
    monkeypatch.setenv("JANUS_DIST_BACKEND", "cpu:gloo,cuda:nccl")
    assert mesh.backend_for(torch.device("cuda", 1)) == "cpu:gloo,cuda:nccl"
