"""Multi-rank checks run under `mpirun -np N python tests/parallel_worker.py CHECK...`.

Every check compares against the one-process model on the same data (computed on every
rank) and prints one JSON line per check from rank 0: {"check", "errors", "ok"}.
Checks: `mesh:DP,EP,DD` (energy, forces, stress, the parameter gradient of an
energy+force+stress loss, and the MoE expert loads -- owned atoms only, summed over ranks --
under that layout), `naive-halo` (a halo whose backward calls the
collective directly: first derivatives right, second derivatives wrong -- the failure mode
the real Functions exist to prevent), `bad-mesh` (the error message), `ase-md`
(`JanusCalculator(parallel=True)` = one process through MD steps within the skin, a move
beyond half the skin and a strained cell, with the expected neighbour-list reuse and
rebuilds; the halo plan built from ghost requests = the plan from every rank's domain),
`ase-errors` (overlapping atoms and NaN positions in one rank's slab: every rank raises the
same `JanusInputError` instead of hanging in a collective).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from janus_potential.graph import build_graph  # noqa: E402
from janus_potential.parallel import domain as domain_module  # noqa: E402
from janus_potential.parallel.domain import DomainModel  # noqa: E402
from janus_potential.parallel.expert import is_expert_shard, shard_experts  # noqa: E402
from janus_potential.parallel.halo import HaloForward  # noqa: E402
from janus_potential.parallel.mesh import MeshError, ProcessMesh  # noqa: E402
from janus_potential.testing import random_structure  # noqa: E402
from tests.model_suite import make_model  # noqa: E402

TOLERANCE = 1e-10
STRESS_WEIGHT, ENERGY_WEIGHT = 10.0, 1.0


def structures(count: int, n_atoms: int):
    """Periodic structures alternating orthogonal and triclinic cells."""
    out = []
    for k in range(count):
        if k % 2 == 0:
            length = (n_atoms / 0.06) ** (1 / 3)
            cell = np.diag([length * 1.1, length, length / 1.1])
            atoms = random_structure(["Mg", "Al", "O", "O"], n_atoms, seed=10 + k, cell=cell)
        else:
            atoms = random_structure(["Mg", "Al", "O", "O"], n_atoms, seed=10 + k)
        out.append(atoms)
    return out


def labels(graph, seed: int):
    generator = torch.Generator().manual_seed(seed)
    n = graph.positions.shape[0]
    return (torch.randn(n, 3, generator=generator, dtype=torch.float64),
            0.01 * torch.randn(3, 3, generator=generator, dtype=torch.float64),
            float(torch.randn((), generator=generator, dtype=torch.float64)) - 3.0)


def loss_of(energy, forces, stress, label, n_atoms, n_forces_total, n_structures, share):
    """Force term normalised by the GLOBAL force count; per-structure terms by the number of
    structures and divided by `share` (the dd ranks that all hold the same value)."""
    force_label, stress_label, energy_label = label
    force_term = ((forces - force_label) ** 2).sum() / n_forces_total
    per_structure = STRESS_WEIGHT * ((stress - stress_label) ** 2).sum() + ENERGY_WEIGHT * (energy / n_atoms - energy_label) ** 2
    return force_term + per_structure / (n_structures * share)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def check_mesh(dp: int, ep: int, dd: int, n_structures: int, n_atoms: int) -> dict:
    mesh = ProcessMesh.create(dp, ep, dd)
    reference = make_model(num_experts=4)
    model = shard_experts(make_model(num_experts=4), mesh.ep_group)
    frames = structures(n_structures, n_atoms)
    graphs = [build_graph(a, reference.cutoff, dtype=torch.float64) for a in frames]
    targets = [labels(g, 100 + k) for k, g in enumerate(graphs)]
    n_forces_total = sum(3 * g.positions.shape[0] for g in graphs)

    reference_out = []
    reference_loss = 0.0
    reference_load = torch.zeros(len(reference.layers), 4, dtype=torch.float64)
    for g, target in zip(graphs, targets):
        out = reference.compute(g, create_graph=True)
        reference_load += out["expert_load"].to(torch.float64)
        reference_out.append(out)
        reference_loss = reference_loss + loss_of(out["energy"][0], out["forces"], out["stress"][0], target,
                                                  g.positions.shape[0], n_forces_total, n_structures, 1)
    reference_loss.backward()

    data_rank, data_ranks = mesh.dp_index * ep + mesh.ep_index, dp * ep
    errors = {"energy": 0.0, "forces": 0.0, "stress": 0.0}
    local_loss = 0.0
    load = torch.zeros_like(reference_load)
    for k in range(data_rank, n_structures, data_ranks):
        g, target, ref = graphs[k], targets[k], reference_out[k]
        domain_model = DomainModel.build(model, g, mesh.dd_group if mesh.world_size > 1 else None)
        out = domain_model(g.positions, g.cell[0], create_graph=True)
        load += out["expert_load"].to(torch.float64)
        owned = domain_model.domain.owned
        errors["energy"] = max(errors["energy"], relative_error(out["energy"].detach(), ref["energy"][0].detach()))
        errors["forces"] = max(errors["forces"], relative_error(out["forces"].detach(), ref["forces"][owned].detach()))
        errors["stress"] = max(errors["stress"], relative_error(out["stress"].detach(), ref["stress"][0].detach()))
        force_label = (target[0][owned], target[1], target[2])
        local_loss = local_loss + loss_of(out["energy"], out["forces"], out["stress"], force_label,
                                          g.positions.shape[0], n_forces_total, n_structures, dd)
    local_loss.backward()
    if mesh.world_size > 1:  # expert loads of OWNED atoms summed over ranks = the one-process loads
        dist.all_reduce(load)
    errors["expert_load"] = float((load - reference_load).abs().max())

    reference_params = dict(reference.named_parameters())
    grad_error = 0.0
    for name, parameter in model.named_parameters():
        grad = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
        expected = reference_params[name].grad
        if expected is None:
            expected = torch.zeros_like(reference_params[name])
        if is_expert_shard(parameter):
            if mesh.world_size > 1:
                dist.all_reduce(grad, group=mesh.expert_grad_group)
            first = parameter.shape[0] * mesh.ep_index
            expected = expected[first: first + parameter.shape[0]]
        elif mesh.world_size > 1:
            dist.all_reduce(grad, group=mesh.dense_grad_group)
        grad_error = max(grad_error, relative_error(grad, expected))
    errors["loss_gradient"] = grad_error
    return reduce_errors(f"mesh:{dp},{ep},{dd}", errors)


def reduce_errors(name: str, errors: dict) -> dict:
    values = torch.tensor(list(errors.values()), dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    errors = dict(zip(errors, values.tolist()))
    return {"check": name, "errors": errors, "ok": all(v <= TOLERANCE for v in errors.values())}


class NaiveHaloForward(torch.autograd.Function):
    """WRONG on purpose: backward runs the reverse-sum collective directly."""

    @staticmethod
    def forward(ctx, h, plan):
        ctx.plan = plan
        return plan.forward_copy(h)

    @staticmethod
    def backward(ctx, grad):
        return ctx.plan.reverse_sum(grad), None


def check_naive_halo() -> dict:
    domain_module.halo_exchange = lambda h, plan: NaiveHaloForward.apply(h, plan)
    try:
        result = check_mesh(1, 1, dist.get_world_size(), 2, 96)
    finally:
        domain_module.halo_exchange = lambda h, plan: HaloForward.apply(h, plan)
    errors = result["errors"]
    # forces still right, but the second-order gradient must be visibly wrong
    ok = errors["forces"] <= TOLERANCE and errors["loss_gradient"] > 1e-6
    return {"check": "naive-halo", "errors": errors, "ok": ok}


def check_bad_mesh() -> dict:
    world = dist.get_world_size() if dist.is_initialized() else 1
    try:
        ProcessMesh.create(world, 2, 1)
    except MeshError as exc:
        return {"check": "bad-mesh", "errors": {}, "ok": "does not match" in str(exc), "message": str(exc)}
    return {"check": "bad-mesh", "errors": {}, "ok": False}


def check_calculator() -> dict:
    from janus_potential.ase import JanusCalculator

    model = make_model()
    atoms = structures(2, 150)[1]
    expected = atoms.copy()
    expected.calc = JanusCalculator(model)
    atoms.calc = JanusCalculator(model, parallel=True)
    errors = {
        "energy": abs(atoms.get_potential_energy() - expected.get_potential_energy()) / abs(expected.get_potential_energy()),
        "forces": float(np.abs(atoms.get_forces() - expected.get_forces()).max()),
        "stress": float(np.abs(atoms.get_stress() - expected.get_stress()).max()),
        "energies": float(np.abs(atoms.get_potential_energies() - expected.get_potential_energies()).max()),
    }
    return reduce_errors("calculator", errors)


def calculator_errors(atoms, expected) -> dict:
    """Largest deviations of the parallel results from the one-process ones (energy relative)."""
    return {
        "energy": abs(atoms.get_potential_energy() - expected.get_potential_energy())
        / abs(expected.get_potential_energy()),
        "forces": float(np.abs(atoms.get_forces() - expected.get_forces()).max()),
        "stress": float(np.abs(atoms.get_stress() - expected.get_stress()).max()),
        "energies": float(np.abs(atoms.get_potential_energies() - expected.get_potential_energies()).max()),
    }


def check_ase_md(model_file: str | None = None) -> dict:
    """`JanusCalculator(parallel=True)` = the one-process eager calculator through MD, rebuilds
    and strain; with `model_file` (an exported file or a .pt2 package of `make_model()`) the
    parallel calculator runs that file."""
    from ase import units
    from ase.md.verlet import VelocityVerlet

    from janus_potential.ase import JanusCalculator
    from janus_potential.parallel.domain import halo_plan, request_halo_plan, slab_axis, slab_domain

    model = make_model()
    n_ranks = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    errors: dict = {}

    def record(stage: str, values: dict) -> None:
        for key, value in values.items():
            errors[f"{stage}.{key}"] = max(errors.get(f"{stage}.{key}", 0.0), value)

    for name, atoms in (("orthogonal", structures(1, 200)[0]), ("triclinic", structures(2, 150)[1])):
        expected = atoms.copy()
        expected.calc = JanusCalculator(model, device="cpu")
        calculator = JanusCalculator(model_file or model, parallel=True, device=DEVICE)
        atoms.calc = calculator
        parallel = calculator._parallel
        record(name, {"model_loaded_twice": float(parallel.module is not calculator.module)})
        record(f"{name}.first", calculator_errors(atoms, expected))

        kinetic = np.sqrt(atoms.get_masses() * units.kB * 1000.0)[:, None]  # Maxwell-Boltzmann at 1000 K
        atoms.set_momenta(kinetic * np.random.default_rng(3).normal(size=(len(atoms), 3)))
        expected.set_velocities(atoms.get_velocities())
        dynamics, reference_dynamics = VelocityVerlet(atoms, 2 * units.fs), VelocityVerlet(expected, 2 * units.fs)
        for _ in range(3):
            dynamics.run(1)
            reference_dynamics.run(1)
            record(f"{name}.md_within_skin", calculator_errors(atoms, expected))
        record(name, {"rebuilt_within_skin": float(parallel.statistics()["builds"] != 1)})

        cell = atoms.get_cell().array
        axis = slab_axis(cell)
        normal = np.linalg.inv(cell)[:, axis] / np.linalg.norm(np.linalg.inv(cell)[:, axis])
        coordinate = (atoms.positions @ np.linalg.inv(cell))[:, axis] % 1.0
        mover = int(np.argmin(np.abs(coordinate - 1.0 / max(n_ranks, 2)) + (coordinate > 1.0 / max(n_ranks, 2))))
        positions = atoms.get_positions()
        positions[mover] += 0.6 * calculator.skin * normal  # beyond half the skin, across a slab boundary
        atoms.set_positions(positions)
        expected.set_positions(positions)
        record(f"{name}.moved", calculator_errors(atoms, expected))
        record(name, {"no_rebuild_after_move": float(parallel.statistics()["builds"] != 2)})

        strained = cell @ (np.eye(3) + 0.01 * np.array([[1.0, 0.2, 0.0], [0.2, -0.5, 0.1], [0.0, 0.1, 0.3]]))
        for target in (atoms, expected):
            target.set_cell(strained, scale_atoms=True)
        record(f"{name}.strained", calculator_errors(atoms, expected))
        record(name, {"no_rebuild_after_strain": float(parallel.statistics()["builds"] != 3)})

        domains = [slab_domain(atoms.positions, strained, atoms.numbers, n_ranks, r, 5.0) for r in range(n_ranks)]
        requested = request_halo_plan(domains[rank])
        planned = halo_plan(domains, rank)
        same_plan = (torch.equal(requested.send_index, planned.send_index)
                     and torch.equal(requested.recv_rows, planned.recv_rows)
                     and (requested.send_counts, requested.recv_counts) == (planned.send_counts, planned.recv_counts))
        record(name, {"request_plan_differs": float(not same_plan)})
    return reduce_errors("ase-md", errors)


def check_ase_errors() -> dict:
    from janus_potential.ase import JanusCalculator
    from janus_potential.errors import JanusInputError

    model = make_model()
    atoms = structures(1, 200)[0]
    last = int(np.argmax(atoms.get_scaled_positions()[:, 0]))  # owned by the last rank (slabs along x)
    other = int(np.argsort(atoms.get_scaled_positions()[:, 0])[-2])
    errors = {}
    for problem, expected_text in (("overlap", "overlapping atoms"), ("nan", "NaN")):
        broken = atoms.copy()
        broken.calc = JanusCalculator(model, parallel=True)
        broken.get_potential_energy()  # a valid first step, then the problem appears within the skin
        positions = broken.get_positions()
        if problem == "overlap":
            positions[other] = positions[last] + [0.05, 0.0, 0.0]
        else:
            positions[last] = np.nan
        broken.set_positions(positions)
        try:
            broken.get_forces()
            errors[problem] = 1.0
        except JanusInputError as exc:
            errors[problem] = 0.0 if expected_text in str(exc) else 1.0
    return reduce_errors("ase-errors", errors)


DEVICE = os.environ.get("JANUS_TEST_DEVICE", "cpu")  # where the parallel side runs (run_worker's `device`)


def start_distributed() -> None:
    """The default process group, its backend following DEVICE (as the calculators do)."""
    from janus_potential.devices import rank_device
    from janus_potential.parallel.mesh import init_distributed, local_rank

    init_distributed(device=rank_device(DEVICE, local_rank()))


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    results = []
    for item in argv:
        if item.startswith("mesh:"):
            sizes, _, shape = item[5:].partition("/")
            dp, ep, dd = (int(v) for v in sizes.split(","))
            n_structures, n_atoms = (int(v) for v in (shape or "2x200").split("x"))
            results.append(check_mesh(dp, ep, dd, n_structures, n_atoms))
        elif item == "naive-halo":
            results.append(check_naive_halo())
        elif item == "calculator":
            start_distributed()
            results.append(check_calculator())
        elif item.startswith("ase-md"):  # ase-md or ase-md:MODEL_FILE
            start_distributed()
            results.append(check_ase_md(item.partition(":")[2] or None))
        elif item == "ase-errors":
            start_distributed()
            results.append(check_ase_errors())
        elif item == "bad-mesh":
            results.append(check_bad_mesh())
        else:
            raise SystemExit(f"unknown check {item!r}")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        for result in results:
            print(json.dumps(result), flush=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
