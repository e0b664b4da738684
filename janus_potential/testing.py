"""Reusable checks for any Janus front end (eager model, exported file, ASE, LAMMPS).

Each helper takes an ASE calculator (anything with `get_potential_energy` semantics) and a
structure, computes an independent reference (central finite differences, a transformed
copy of the structure, the eager model) and raises AssertionError with the worst deviation.
Use float64 models: the finite-difference checks need the precision.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from ase import Atoms
from ase.geometry import get_distances
from scipy.spatial.transform import Rotation


def _energy(calculator, atoms: Atoms) -> float:
    atoms = atoms.copy()
    atoms.calc = calculator
    return float(atoms.get_potential_energy())


def _properties(calculator, atoms: Atoms, stress: bool = False):
    atoms = atoms.copy()
    atoms.calc = calculator
    results = [atoms.get_potential_energy(), atoms.get_forces()]
    if stress:
        results.append(atoms.get_stress(voigt=False))
    return results


def assert_forces_match_fd(calculator, atoms: Atoms, delta: float = 1e-4, atol: float = 1e-6,
                           atoms_to_check: Sequence[int] | None = None) -> float:
    """Forces equal -dE/dx by central differences; returns the largest deviation."""
    _, forces = _properties(calculator, atoms)
    indices = range(len(atoms)) if atoms_to_check is None else atoms_to_check
    worst = 0.0
    for a in indices:
        for k in range(3):
            shifted = []
            for sign in (+1, -1):
                moved = atoms.copy()
                positions = moved.get_positions()
                positions[a, k] += sign * delta
                moved.set_positions(positions)
                shifted.append(_energy(calculator, moved))
            numeric = -(shifted[0] - shifted[1]) / (2 * delta)
            worst = max(worst, abs(numeric - forces[a, k]))
    assert worst < atol, f"forces differ from finite differences by {worst:.3e} (tolerance {atol:.1e})"
    return worst


def assert_stress_match_fd(calculator, atoms: Atoms, delta: float = 1e-5, atol: float = 1e-7) -> float:
    """Stress equals (1/V) dE/d(strain) by central differences (ASE sign convention)."""
    _, _, stress = _properties(calculator, atoms, stress=True)
    volume = atoms.get_volume()
    worst = 0.0
    for a in range(3):
        for b in range(3):
            energies = []
            for sign in (+1, -1):
                strain = np.eye(3)
                strain[a, b] += sign * delta
                strained = atoms.copy()
                strained.set_cell(atoms.get_cell() @ strain, scale_atoms=True)
                energies.append(_energy(calculator, strained))
            numeric = (energies[0] - energies[1]) / (2 * delta) / volume
            worst = max(worst, abs(numeric - stress[a, b]))
    assert worst < atol, f"stress differs from finite differences by {worst:.3e} (tolerance {atol:.1e})"
    return worst


def assert_invariant(calculator, atoms: Atoms, rtol: float = 1e-9, seed: int = 0) -> None:
    """Energy invariant and forces equivariant under rotation, translation and permutation."""
    rng = np.random.default_rng(seed)
    energy, forces = _properties(calculator, atoms)
    scale = max(1.0, abs(energy))
    force_scale = max(1e-3, np.abs(forces).max())

    rotation = Rotation.random(random_state=seed).as_matrix()
    rotated = atoms.copy()
    rotated.set_cell(atoms.get_cell() @ rotation.T)
    rotated.set_positions(atoms.get_positions() @ rotation.T)
    e_rot, f_rot = _properties(calculator, rotated)
    assert abs(e_rot - energy) < rtol * scale, f"energy changed by {e_rot - energy:.3e} under rotation"
    assert np.abs(f_rot - forces @ rotation.T).max() < rtol * force_scale * 10, "forces do not rotate with the structure"

    translated = atoms.copy()
    translated.translate(rng.normal(size=3))
    e_tr, f_tr = _properties(calculator, translated)
    assert abs(e_tr - energy) < rtol * scale, f"energy changed by {e_tr - energy:.3e} under translation"
    assert np.abs(f_tr - forces).max() < rtol * force_scale * 10, "forces changed under translation"

    order = rng.permutation(len(atoms))
    permuted = atoms[order]
    e_perm, f_perm = _properties(calculator, permuted)
    assert abs(e_perm - energy) < rtol * scale, f"energy changed by {e_perm - energy:.3e} under permutation"
    assert np.abs(f_perm - forces[order]).max() < rtol * force_scale * 10, "forces do not follow the permutation"


def assert_calculators_match(reference, other, atoms: Atoms, rtol: float = 1e-10, stress: bool = True) -> None:
    """Two front ends give the same energy, forces (and stress) to a relative tolerance."""
    e_ref, *rest_ref = _properties(reference, atoms, stress)
    e_other, *rest_other = _properties(other, atoms, stress)
    assert abs(e_ref - e_other) <= rtol * max(1.0, abs(e_ref)), f"energies {e_ref} and {e_other} differ"
    for name, a, b in zip(["forces", "stress"], rest_ref, rest_other):
        scale = max(1e-8, float(np.abs(a).max()))
        deviation = float(np.abs(a - b).max())
        assert deviation <= rtol * scale * 10, f"{name} differ by {deviation:.3e} (scale {scale:.3e})"


def random_structure(symbols: Sequence[str], n_atoms: int, density: float = 0.06, seed: int = 0,
                     cell: np.ndarray | None = None, min_distance: float = 1.6,
                     pbc: bool | Sequence[bool] = True) -> Atoms:
    """A random structure (triclinic by default) with no pair closer than `min_distance`."""
    rng = np.random.default_rng(seed)
    if cell is None:
        length = (n_atoms / density) ** (1 / 3)
        cell = np.array([[length, 0, 0], [0.2 * length, 0.95 * length, 0], [0.1 * length, -0.15 * length, 1.05 * length]])
    positions: list[np.ndarray] = []
    while len(positions) < n_atoms:
        candidate = rng.random(3) @ cell
        if positions:
            _, distances = get_distances(candidate, np.array(positions), cell=cell, pbc=pbc)
            if distances.min() < min_distance:
                continue
        positions.append(candidate)
    chemical = [symbols[k % len(symbols)] for k in range(n_atoms)]
    rng.shuffle(chemical)
    return Atoms(chemical, positions=np.array(positions), cell=cell, pbc=pbc)

