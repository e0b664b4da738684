"""The ZBL short-range repulsion prior: closed form, switching, derivatives, on/off key."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms

from janus_potential.ase import JanusCalculator
from janus_potential.testing import assert_forces_match_fd, assert_stress_match_fd, random_structure

from .conftest import make_model


def zbl_closed_form(z1: int, z2: int, r: float) -> float:
    """Ziegler, Biersack, Littmark (1985), the universal screened-nuclear potential (eV)."""
    a = 0.46850 / (z1 ** 0.23 + z2 ** 0.23)
    x = r / a
    phi = (0.18175 * np.exp(-3.19980 * x) + 0.50986 * np.exp(-0.94229 * x) + 0.28022 * np.exp(-0.40290 * x)
           + 0.02817 * np.exp(-0.20162 * x))
    return 14.399645 * z1 * z2 / r * phi


def dimer_energy(calculator, symbols: str, r: float) -> float:
    atoms = Atoms(symbols, positions=[[0, 0, 0], [0, 0, r]])
    atoms.calc = calculator
    return float(atoms.get_potential_energy())


def test_fresh_model_repels_merging_atoms():
    """A freshly built model: E(Si-O at 0.3 A) - E(1.2 A) > 50 eV (issue 8, item 5)."""
    calculator = JanusCalculator(make_model("small"))
    assert dimer_energy(calculator, "SiO", 0.3) - dimer_energy(calculator, "SiO", 1.2) > 50.0


@pytest.mark.parametrize("pair, z", [("SiO", (14, 8)), ("H2", (1, 1)), ("Cu2", (29, 29))])
def test_prior_is_zbl_inside_and_zero_outside_the_switch(pair, z):
    """E(zbl on) - E(zbl off) of the same weights = the ZBL closed form below 0.25 x the
    covalent-radius sum, and exactly 0 beyond 0.5 x that sum."""
    from ase.data import covalent_radii

    with_prior = JanusCalculator(make_model("tiny", zbl=True))
    without = JanusCalculator(make_model("tiny", zbl=False))
    radius_sum = sum(covalent_radii[number] for number in z)
    for r in (max(0.1 * radius_sum, 0.11), 0.2 * radius_sum):
        prior = dimer_energy(with_prior, pair, r) - dimer_energy(without, pair, r)
        assert prior == pytest.approx(zbl_closed_form(*z, r), rel=1e-10)
    for r in (0.5 * radius_sum, 0.8 * radius_sum):
        assert dimer_energy(with_prior, pair, r) == pytest.approx(dimer_energy(without, pair, r), abs=1e-12)
    inside = dimer_energy(with_prior, pair, 0.37 * radius_sum) - dimer_energy(without, pair, 0.37 * radius_sum)
    assert 0.0 < inside < zbl_closed_form(*z, 0.37 * radius_sum)


def test_forces_and_stress_with_short_pairs_match_finite_differences():
    """Pairs inside the ZBL and the switching region: forces and stress are exact derivatives."""
    model = make_model("tiny")
    atoms = random_structure(["Si", "O", "H"], 12, density=0.05, seed=2, min_distance=1.8)
    atoms.positions[1] = atoms.positions[0] + [0.45, 0.1, 0.0]  # Si-O in the switching region
    atoms.positions[3] = atoms.positions[2] + [0.12, 0.05, 0.1]  # deep inside
    calculator = JanusCalculator(model)
    assert_forces_match_fd(calculator, atoms, delta=1e-5, atol=1e-5, atoms_to_check=[0, 1, 2, 3])
    assert_stress_match_fd(calculator, atoms, delta=1e-6, atol=1e-5)


def test_prior_is_exported(tmp_path):
    """The exported file carries the prior: same energies as the eager model at short range."""
    from janus_potential.export import export_model

    model = make_model("tiny")
    export_model(model, tmp_path / "m.pt", dtype="float64")
    eager, exported = JanusCalculator(model), JanusCalculator(str(tmp_path / "m.pt"))
    for r in (0.2, 0.6, 1.5):
        assert dimer_energy(exported, "SiO", r) == pytest.approx(dimer_energy(eager, "SiO", r), rel=1e-12)
