"""`janus export --format aoti` (janus_potential/aoti.py): the per-layer AOTInductor package
equals the eager model (float64, 1e-10) in ASE on one process (structures of other sizes
than the one it was traced with, periodic and free, through MD steps; its one-structure
function and its per-layer sequence), in the parallel ASE
calculator on 2 MPI ranks (the halo protocol, through MD, rebuilds and strain), and in
LAMMPS (`pair_style janus` loading the .pt2) on 1 and 2 ranks; the package's limits and a
wrong file are clear errors. The reference is the eager model in the one-process calculator;
one package (compiled once per test session, about 90 s) serves every test."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from ase import Atoms
from ase.md.verlet import VelocityVerlet
from ase import units

from janus_potential import JanusInputError
from janus_potential.ase import JanusCalculator
from janus_potential.testing import assert_calculators_match, random_structure


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    from .model_suite import make_model

    model = make_model()
    root = tmp_path_factory.mktemp("aoti")
    checkpoint = root / "ckpt.pt"
    model.save_checkpoint(checkpoint)
    output = root / "model.pt2"
    done = subprocess.run([sys.executable, "-m", "janus_potential", "export", str(checkpoint), "-o", str(output),
                           "--dtype", "float64", "--format", "aoti"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return model, output


@pytest.mark.slow
def test_package_equals_the_eager_model_in_ase(package):
    model, path = package
    compiled = JanusCalculator(str(path))
    eager = JanusCalculator(model)
    for atoms in (random_structure(["Mg", "Al", "O", "O"], 24, seed=1), random_structure(["Li", "Mg", "O"], 41, seed=5),
                  random_structure(["Li", "O"], 12, seed=2, pbc=False)):
        assert_calculators_match(eager, compiled, atoms, rtol=1e-10, stress=bool(atoms.pbc.all()))
    # the per-layer sequence on one process (ghost-free: two padding ghost rows), which the
    # calculator's one-structure fast path (the package's `structure` function) does not run
    import torch

    from janus_potential.graph import build_graph
    from janus_potential.model import atom_energies

    graph = build_graph(random_structure(["Li", "Mg", "O"], 41, seed=5), model.cutoff, dtype=torch.float64)
    gradients = []
    for module in (model, compiled.module):
        vectors = graph.edge_vectors().detach().requires_grad_(True)
        energies, _ = atom_energies(module, graph.species, graph.edge_index, vectors)
        gradients.append((energies.detach(), torch.autograd.grad([energies.sum()], [vectors])[0]))
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-10, atol=1e-12)
    # MD: the package follows the eager trajectory step by step
    trajectories = []
    for calculator in (eager, compiled):
        atoms = random_structure(["Mg", "Al", "O", "O"], 24, seed=3)
        atoms.set_velocities(np.random.default_rng(0).normal(0.0, 0.02, (len(atoms), 3)))
        atoms.calc = calculator
        dynamics = VelocityVerlet(atoms, 1.0 * units.fs)
        energies = []
        for _ in range(5):
            dynamics.run(1)
            energies.append(atoms.get_potential_energy())
        trajectories.append((np.array(energies), atoms.get_positions()))
    np.testing.assert_allclose(trajectories[1][0], trajectories[0][0], rtol=1e-10)
    np.testing.assert_allclose(trajectories[1][1], trajectories[0][1], atol=1e-10)


@pytest.mark.slow
@pytest.mark.mpi
def test_package_in_the_parallel_calculator_on_two_ranks(package):
    """The halo protocol on the package's per-layer functions and their VJPs."""
    from .test_parallel import assert_all_ok, run_worker

    assert_all_ok(run_worker(2, f"ase-md:{package[1]}"))


@pytest.mark.slow
@pytest.mark.lammps
@pytest.mark.parametrize("ranks", [1, 2])
def test_package_in_lammps_on_one_and_two_ranks(ranks, package, tmp_path):
    """`pair_coeff * * model.pt2 ...`: the plugin runs the same functions with LAMMPS's
    forward and reverse communication between layers."""
    from .model_suite import calculator_results
    from .test_lammps import ELEMENTS, SINGLE_POINT, check_ran, relative_error, run_lammps, single_point_results, \
        write_data

    model, path = package
    atoms = random_structure(ELEMENTS, 240, density=0.07, seed=3)
    write_data(atoms, tmp_path / "structure.data")
    expected = calculator_results(JanusCalculator(model), atoms)
    script = SINGLE_POINT.format(data=tmp_path / "structure.data", model=path, elements=" ".join(ELEMENTS))
    check_ran(run_lammps(script, tmp_path, ranks))
    assert "compiled package" in (tmp_path / "log.lammps").read_text()
    results = single_point_results(tmp_path)
    for key, value in expected.items():  # energy, forces, per-atom energies, stress
        assert relative_error(results[key], value) < 1e-10, key


@pytest.mark.slow
def test_package_limits_are_clear_errors_and_info_reads_it(package, tmp_path):
    _, path = package
    with pytest.raises(JanusInputError, match="on the CPU"):
        JanusCalculator(str(path), precision="bf16")
    dimer = Atoms("LiO", positions=[[0, 0, 0], [0, 0, 2.0]], cell=[20, 20, 20], pbc=False)
    dimer.calc = JanusCalculator(str(path))
    with pytest.raises(JanusInputError, match="at least 2 atoms, edges and triplets"):
        dimer.get_potential_energy()
    old = tmp_path / "other.pt2"  # an AOTInductor package that is not a Janus one
    import torch

    class Double(torch.nn.Module):
        def forward(self, x):
            return (2 * x,)

    program = torch.export.export(Double(), (torch.ones(3),))
    torch._inductor.aoti_compile_and_package(program, package_path=str(old))
    with pytest.raises(JanusInputError, match="cannot load model package"):
        JanusCalculator(str(old))
    from .test_lammps import ELEMENTS, SINGLE_POINT, run_lammps, write_data  # and in LAMMPS

    write_data(random_structure(ELEMENTS, 40, density=0.07, seed=3), tmp_path / "structure.data")
    done = run_lammps(SINGLE_POINT.format(data=tmp_path / "structure.data", model=old, elements=" ".join(ELEMENTS)),
                      tmp_path, 1)
    assert done.returncode != 0 and "cannot load model package" in done.stdout + done.stderr
    info = subprocess.run([sys.executable, "-m", "janus_potential", "info", str(path)], capture_output=True, text=True,
                          check=True)
    metadata = json.loads(info.stdout)
    assert metadata["format"] == "janus-aoti" and metadata["dtype"] == "float64"
