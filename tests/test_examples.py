"""The ASE examples (`examples/ase/*.py`), run as a user runs them, on a random tiny model.

Each script runs in a subprocess on a float64 export of a tiny model restricted to four
elements. The references are computed here, independently of the scripts: the model's own
element list, LAMMPS (`pair_style janus`) on the written data file, the calculator on the
relaxed structure, finite differences of the energy (stress, pressure, bulk modulus) and
of the forces (frequencies at Gamma), and the energy minimum found by a scan.
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
from ase import Atoms
from ase.build import bulk
from ase.data import atomic_numbers, chemical_symbols
from ase.io import read
from scipy.optimize import minimize_scalar

from janus_potential import JanusPotential
from janus_potential.ase import JanusCalculator
from janus_potential.export import export_model

from .conftest import make_model
from .test_lammps import NKTV2P, check_ran, run_lammps, thermo_table

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "ase"
ELEMENTS = ["O", "Mg", "Si", "Cu"]  # the model covers these only, as a trained model covers its data
GPA = 1.602176634e-19 * 1e30 / 1e9  # GPa per eV/A^3 (CODATA e), independent of ase.units
THZ = np.sqrt(1.602176634e-19 / 1e-20 / 1.66053906660e-27) / (2 * np.pi * 1e12)  # THz per sqrt(eV/A^2/amu)


# --------------------------------------------------------------------------- helpers
def run_example(script: str, *args: str, cwd: Path) -> str:
    """stdout of `python examples/ase/SCRIPT ARGS` (fails the test on a non-zero exit status)."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def values(output: str, label: str) -> np.ndarray:
    """The numbers after `label:` on the output line that starts with it."""
    line = next((line for line in output.splitlines() if line.startswith(f"{label}:")), None)
    assert line is not None, f"no line '{label}: …' in the output:\n{output}"
    return np.array([float(v) for v in line[len(label) + 1:].split()])


def energy(calculator: JanusCalculator, atoms: Atoms) -> float:
    atoms = atoms.copy()
    atoms.calc = calculator
    return float(atoms.get_potential_energy())


def scaled(atoms: Atoms, factor: float) -> Atoms:
    """`atoms` with the cell (and the atoms) scaled by `factor` in every direction."""
    atoms = atoms.copy()
    atoms.set_cell(atoms.get_cell() * factor, scale_atoms=True)
    return atoms


def equilibrium_lattice_constant(calculator: JanusCalculator, formula: str, lattice: str, guess: float) -> float:
    """The lattice constant of lowest energy (scan of +-30% around `guess`, then a bounded search)."""
    atoms = bulk(formula, lattice, a=guess, cubic=True)
    factors = np.linspace(0.7, 1.3, 31)
    energies = [energy(calculator, scaled(atoms, f)) for f in factors]
    k = int(np.argmin(energies))
    assert 0 < k < len(factors) - 1, f"the random model has no energy minimum for {formula} near a = {guess}"
    best = minimize_scalar(lambda f: energy(calculator, scaled(atoms, f)), bounds=(factors[k - 1], factors[k + 1]),
                           method="bounded", options={"xatol": 1e-7})
    return guess * float(best.x)


def strain_derivatives(calculator: JanusCalculator, atoms: Atoms, step: float = 1e-5) -> np.ndarray:
    """(1/V) dE/d(epsilon_ij) by central differences, Voigt order xx yy zz yz xz xy."""
    derivatives = []
    for i, j in [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]:
        energies = []
        for sign in (1, -1):
            strain = np.eye(3)
            strain[i, j] += sign * step
            strained = atoms.copy()
            strained.set_cell(atoms.get_cell() @ strain, scale_atoms=True)
            energies.append(energy(calculator, strained))
        derivatives.append((energies[0] - energies[1]) / (2 * step) / atoms.get_volume())
    return np.array(derivatives)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model() -> JanusPotential:
    """Random tiny float64 model for O, Mg, Si, Cu. Random weights give meV-scale energy
    differences; a larger energy scale gives forces and stresses of realistic size, so that
    convergence thresholds and frequencies are not met trivially."""
    model = make_model("tiny")
    with torch.no_grad():
        model.energy_scale.fill_(50.0)
        model.supported.zero_()
        model.supported[[atomic_numbers[symbol] for symbol in ELEMENTS]] = True
    return model


@pytest.fixture(scope="module")
def model_file(model, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model") / "model.pt"
    export_model(model, path, dtype="float64")
    return str(path)


@pytest.fixture(scope="module")
def calculator(model_file) -> JanusCalculator:
    return JanusCalculator(model_file)


@pytest.fixture(scope="module")
def copper(calculator) -> float:
    """The equilibrium fcc lattice constant of Cu for the test model."""
    return equilibrium_lattice_constant(calculator, "Cu", "fcc", 3.6)


# --------------------------------------------------------------------------- the examples
def test_elements(model, model_file, tmp_path):
    """elements.py on the exported file and on a checkpoint, and `janus info`, list the model's elements."""
    expected = [chemical_symbols[z] for z in model.supported_elements()]
    checkpoint = tmp_path / "model.ckpt"
    model.save_checkpoint(checkpoint)
    for path in (model_file, str(checkpoint)):
        output = run_example("elements.py", "--model", path, "Cu", "Al", "Og", cwd=tmp_path)
        assert f"elements: {' '.join(expected)}" in output.splitlines()
        assert {"Cu: covered", "Al: not covered", "Og: not covered"} <= set(output.splitlines())
    janus = os.path.join(os.path.dirname(sys.executable), "janus")
    info = subprocess.run([janus, "info", model_file], capture_output=True, text=True, check=True)
    assert json.loads(info.stdout)["elements"] == expected


@pytest.mark.lammps
def test_lammps_data(model_file, calculator, tmp_path):
    """The data file and printed input, run by LAMMPS, give the calculator's energy: the
    `pair_coeff` elements follow the data file's type order (O first, unlike the formula).
    Fluorite SiO2 has twice as many O as Si, so swapped types change the energy by eVs."""
    output = run_example("lammps_data.py", "--model", model_file, "--formula", "SiO2", "--lattice", "fluorite",
                         "-a", "4.8", "--rattle", "0.1", "--specorder", "O", "Si", "-o", "structure.data",
                         cwd=tmp_path)
    lines = output.splitlines()
    printed_input = "\n".join(lines[lines.index("LAMMPS input:") + 1:])
    assert f"pair_coeff   * * {model_file} O Si" in printed_input
    script = printed_input + "\nthermo_style custom step pe\nthermo_modify format float %.17g\nrun 0\n"
    check_ran(run_lammps(script, tmp_path))
    columns, rows = thermo_table((tmp_path / "log.lammps").read_text())
    lammps_energy = dict(zip(columns, rows[0]))["PotEng"]

    atoms = read(tmp_path / "structure.data", format="lammps-data", atom_style="atomic", units="metal")
    assert atoms.get_chemical_formula() == "O64Si32"  # elements from the Masses section
    reference = energy(calculator, atoms)
    assert abs(lammps_energy - reference) < 1e-10 * abs(reference)


def test_relax(model_file, calculator, copper, tmp_path):
    """FrechetCellFilter + FIRE from a stretched, rattled Cu cell: the relaxed structure (checked
    with the calculator here) has forces and virial per atom below fmax and a lower energy."""
    fmax, a, rattle = 0.005, 1.03 * copper, 0.05
    output = run_example("relax.py", "--model", model_file, "-a", f"{a!r}", "--repeat", "2", "--rattle", f"{rattle}",
                         "--fmax", f"{fmax}", "--steps", "300", "-o", "relaxed.extxyz", cwd=tmp_path)
    assert any(line.startswith("converged after") for line in output.splitlines()), output
    initial = bulk("Cu", "fcc", a=a, cubic=True).repeat(2)
    initial.rattle(stdev=rattle, seed=0)
    initial.calc = calculator
    assert abs(values(output, "initial energy (eV)")[0] - initial.get_potential_energy()) < 1e-8
    assert np.linalg.norm(initial.get_forces(), axis=1).max() > 5 * fmax  # not relaxed to start with

    relaxed = read(tmp_path / "relaxed.extxyz")
    relaxed.calc = calculator
    # The filter measures forces in its reference (initial) cell: a few percent of strain
    # separate that from the plain forces and virial checked here.
    assert np.linalg.norm(relaxed.get_forces(), axis=1).max() < 1.1 * fmax
    assert np.abs(relaxed.get_stress()).max() * relaxed.get_volume() / len(relaxed) < 1.1 * fmax
    assert relaxed.get_potential_energy() < initial.get_potential_energy() - 0.01
    assert abs(values(output, "final energy (eV)")[0] - relaxed.get_potential_energy()) < 1e-8


def test_eos(model_file, calculator, copper, tmp_path):
    """The fitted E0, V0 and bulk modulus of fcc Cu against the energy minimum and a finite-difference
    second derivative of E(V) computed here."""
    output = run_example("eos.py", "--model", model_file, "-a", f"{1.01 * copper!r}", "--points", "9",
                         "--range", "0.08", cwd=tmp_path)
    v0, e0, bulk_modulus = (values(output, label)[0] for label in ("V0 (A^3)", "E0 (eV)", "B (GPa)"))
    cell = bulk("Cu", "fcc", a=copper, cubic=True)
    minimum = energy(calculator, cell)
    energies = [energy(calculator, scaled(cell, f)) for f in np.linspace(0.95, 1.05, 21)]
    assert e0 <= min(energies) + 1e-5  # the fit's own error, a few 1e-6 eV here
    assert abs(e0 - minimum) < 1e-4
    assert abs(v0 / cell.get_volume() - 1) < 1e-3

    step = 0.01  # relative volume step
    at_v0 = scaled(cell, (v0 / cell.get_volume()) ** (1 / 3))
    e_minus, e_zero, e_plus = (energy(calculator, scaled(at_v0, (1 + s) ** (1 / 3))) for s in (-step, 0, step))
    curvature = (e_plus - 2 * e_zero + e_minus) / (step * v0) ** 2
    reference = v0 * curvature * GPA
    assert np.isfinite(bulk_modulus) and reference > 1.0
    assert abs(bulk_modulus / reference - 1) < 0.05, (bulk_modulus, reference)


@pytest.mark.parametrize("factor", [0.97, 1.03])
def test_stress(model_file, calculator, copper, factor, tmp_path):
    """Printed stress = (1/V) dE/d(strain) by finite differences, in eV/A^3 and GPa; the pressure is
    -dE/dV, positive for the compressed crystal (negative diagonal stress) and negative for the
    stretched one; the LAMMPS line is -stress in bar, LAMMPS order."""
    a, rattle, seed = factor * copper, 0.05, 1
    output = run_example("stress.py", "--model", model_file, "-a", f"{a!r}", "--repeat", "2",
                         "--rattle", f"{rattle}", "--seed", f"{seed}", cwd=tmp_path)
    atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat(2)
    atoms.rattle(stdev=rattle, seed=seed)
    reference = strain_derivatives(calculator, atoms)
    stress = values(output, "stress (eV/A^3, xx yy zz yz xz xy)")
    assert np.abs(stress - reference).max() < 1e-8
    assert np.abs(stress[3:]).max() > 1e-5  # the rattled cell has shear components to compare
    assert np.abs(values(output, "stress (GPa, xx yy zz yz xz xy)") - reference * GPA).max() < 1e-6

    step = 1e-5
    volume = atoms.get_volume()
    e_plus, e_minus = (energy(calculator, scaled(atoms, (1 + s) ** (1 / 3))) for s in (step, -step))
    pressure = -(e_plus - e_minus) / (2 * step * volume) * GPA
    printed = values(output, "pressure (GPa) = -trace/3")[0]
    assert abs(printed - pressure) < 1e-6
    if factor < 1:
        assert printed > 0 and (stress[:3] < 0).all() and "compressed" in output
    else:
        assert printed < 0 and (stress[:3] > 0).all() and "stretched" in output
    lammps = values(output, "LAMMPS pressure (bar, pxx pyy pzz pxy pxz pyz)")
    expected = -reference[[0, 1, 2, 5, 4, 3]] * NKTV2P  # LAMMPS's bar differs from ase.units.bar by 1e-7
    assert np.abs(lammps - expected).max() < 1e-6 * np.abs(expected).max()


def test_phonons(model_file, calculator, tmp_path):
    """phonopy's frequencies at Gamma for diamond Si against the Gamma dynamical matrix from
    central differences of the forces in the primitive cell; three acoustic zeros; the saved
    force constants are symmetric and sum to zero."""
    phonopy = pytest.importorskip("phonopy")
    a = equilibrium_lattice_constant(calculator, "Si", "diamond", 5.43)
    output = run_example("phonons.py", "--model", model_file, "--formula", "Si", "--lattice", "diamond",
                         "-a", f"{a!r}", "--supercell", "2", "--save", "phonopy_params.yaml", cwd=tmp_path)
    frequencies = np.sort(values(output, "frequencies at Gamma (THz)"))

    primitive = bulk("Si", "diamond", a=a)
    step = 1e-3
    hessian = np.zeros((3 * len(primitive), 3 * len(primitive)))
    for column in range(3 * len(primitive)):
        forces = []
        for sign in (1, -1):
            displaced = primitive.copy()
            positions = displaced.get_positions()
            positions[column // 3, column % 3] += sign * step
            displaced.set_positions(positions)
            displaced.calc = calculator
            forces.append(displaced.get_forces().reshape(-1))
        hessian[:, column] = -(forces[0] - forces[1]) / (2 * step)
    masses = np.repeat(primitive.get_masses(), 3)
    eigenvalues = np.linalg.eigvalsh(hessian / np.sqrt(np.outer(masses, masses)))
    reference = np.sort(np.sign(eigenvalues) * np.sqrt(np.abs(eigenvalues)) * THZ)
    assert reference[-1] > 1.0
    assert np.abs(frequencies[:3]).max() < 0.05
    assert np.abs(frequencies - reference).max() < 5e-3 * reference[-1], (frequencies, reference)

    saved = phonopy.load(tmp_path / "phonopy_params.yaml", produce_fc=False, symmetrize_fc=False, is_compact_fc=False)
    constants = saved.force_constants  # [atom i, atom j, 3, 3], eV/A^2
    assert np.abs(constants - constants.transpose(1, 0, 3, 2)).max() < 1e-3 * np.abs(constants).max()
    assert np.abs(constants.sum(axis=1)).max() < 1e-3 * np.abs(constants).max()
