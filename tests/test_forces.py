"""Forces and stress are exact derivatives of the energy (finite differences, float64)."""

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule

from janus_potential.ase import JanusCalculator
from janus_potential.testing import assert_forces_match_fd, assert_stress_match_fd, random_structure


def test_forces_match_finite_differences_triclinic(tiny_model, oxide):
    oxide.rattle(0.05, seed=3)
    assert_forces_match_fd(JanusCalculator(tiny_model), oxide, atoms_to_check=range(6), atol=1e-6)


def test_stress_matches_finite_differences_triclinic(tiny_model, oxide):
    assert_stress_match_fd(JanusCalculator(tiny_model), oxide, atol=1e-7)


def test_forces_and_stress_in_a_cell_smaller_than_the_cutoff(tiny_model):
    # 2-atom Si cell (2.7 A edge vectors < 4 A cutoff): each atom meets several images of
    # the same neighbour, including its own images.
    atoms = bulk("Si", "diamond", a=5.43)
    atoms.rattle(0.05, seed=0)
    calculator = JanusCalculator(tiny_model)
    assert_forces_match_fd(calculator, atoms)
    assert_stress_match_fd(calculator, atoms)


def test_forces_match_finite_differences_molecule_and_slab(tiny_model):
    water = molecule("CH3CH2OH")
    assert_forces_match_fd(JanusCalculator(tiny_model), water)
    slab = random_structure(["Cu", "O"], 12, seed=4, pbc=[True, True, False])
    assert_forces_match_fd(JanusCalculator(tiny_model), slab, atoms_to_check=range(4))


def test_forces_are_nontrivial(tiny_model, oxide):
    oxide.calc = JanusCalculator(tiny_model)
    forces = oxide.get_forces()
    assert np.abs(forces).max() > 1e-2
    assert np.abs(forces.sum(axis=0)).max() < 1e-10  # Newton's third law


def test_energy_is_continuous_across_the_cutoff(tiny_model):
    calculator = JanusCalculator(tiny_model, skin=0.0)
    cutoff = tiny_model.cutoff

    def energy(r):
        atoms = Atoms("CuO", positions=[[0, 0, 0], [r, 0, 0]])
        atoms.calc = calculator
        return atoms.get_potential_energy(), atoms.get_forces()[0, 0]

    e_out, f_out = energy(cutoff + 1e-6)
    e_in, f_in = energy(cutoff - 1e-4)
    e_far, _ = energy(cutoff + 1.0)
    assert e_out == pytest.approx(e_far, abs=1e-12)  # beyond the cutoff: isolated atoms
    assert abs(e_in - e_out) < 1e-9
    assert abs(f_in) < 1e-6 and f_out == 0.0
    e_mid, _ = energy(cutoff - 0.5)
    assert abs(e_mid - e_far) > 1e-6  # the pair does interact inside the cutoff
