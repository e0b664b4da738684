"""`janus export --format aoti` (janus_potential/aoti.py): the AOTInductor package in ASE
equals the eager model (float64, 1e-10) on structures of other sizes than the one it was
traced with, through MD steps (neighbour-list reuse), and the package's limits are clear
errors. The reference is the eager model (and the TorchScript export) in the same
calculator."""

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
def test_package_limits_are_clear_errors_and_info_reads_it(package):
    _, path = package
    with pytest.raises(JanusInputError, match="TorchScript export"):
        JanusCalculator(str(path), parallel=True)
    dimer = Atoms("LiO", positions=[[0, 0, 0], [0, 0, 2.0]], cell=[20, 20, 20], pbc=False)
    dimer.calc = JanusCalculator(str(path))
    with pytest.raises(JanusInputError, match="at least 2 atoms, edges and triplets"):
        dimer.get_potential_energy()
    info = subprocess.run([sys.executable, "-m", "janus_potential", "info", str(path)], capture_output=True, text=True,
                          check=True)
    metadata = json.loads(info.stdout)
    assert metadata["format"] == "janus-aoti" and metadata["dtype"] == "float64"
