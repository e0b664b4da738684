"""The model test suite: every check a Janus model configuration must pass.

In the spirit of NequIP's `nequip/utils/unittests/model_tests_basic.py`: a model
configuration subclasses `ModelTests`, sets `preset` (and `overrides`), and gets each check
below as a pytest test, parametrized over dtype and structures:

    class TestTiny(ModelTests):
        preset = "tiny"

Every check compares with an independent reference: central finite differences of the
energy, a rotated / translated / permuted copy, each structure on its own, a supercell,
one-sided limits at every radius where a term switches on or off, the eager model.
Float64 runs every check at tight tolerances; float32 runs the checks that do not need the
precision, at looser ones. The structures, `make_model` and the reference helpers
(`calculator_results`, `assert_results_match`, `evaluate`) are shared with the LAMMPS and
domain-decomposition tests. This module lives with the tests, so that the library imports
no front end; it is not collected by itself (no `test_` prefix).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.data import covalent_radii
from ase.stress import full_3x3_to_voigt_6_stress, voigt_6_to_full_3x3_stress
from scipy.spatial.transform import Rotation

from janus_potential import JanusPotential
from janus_potential.ase import JanusCalculator
from janus_potential.export import export_model
from janus_potential.graph import batch_graphs, build_graph
from janus_potential.testing import (
    assert_forces_match_fd,
    assert_invariant,
    assert_stress_match_fd,
    random_structure,
)

from .devices import DEVICES

DTYPES = {"float64": torch.float64, "float32": torch.float32}
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}  # relative, for checks that are exact in exact arithmetic


def make_model(preset: str = "tiny", dtype: torch.dtype = torch.float64, seed: int = 0, **overrides) -> JanusPotential:
    """A randomly initialised model with non-trivial reference energies and energy scale."""
    torch.manual_seed(seed)
    model = JanusPotential.from_preset(preset, **overrides).to(dtype)
    with torch.no_grad():
        model.reference_energies.uniform_(-5.0, -1.0)
        model.energy_scale.fill_(2.0)
    return model.eval()


# --------------------------------------------------------------------------- structures
def lammps_frame(atoms: Atoms) -> Atoms:
    """The same structure rotated so that its cell is lower triangular (LAMMPS's form)."""
    cell, rotation = atoms.cell.standard_form()
    rotated = atoms.copy()
    rotated.set_cell(cell)
    rotated.set_positions(atoms.get_positions() @ rotation.T)
    return rotated


def triclinic() -> Atoms:
    """Random triclinic multi-element periodic cell, 24 atoms, wider than the cutoff."""
    atoms = random_structure(["Mg", "Al", "O", "O"], 24, seed=1)
    atoms.rattle(0.05, seed=3)
    return atoms


def ethanol() -> Atoms:
    """A molecule (no cell, no periodicity)."""
    return molecule("CH3CH2OH")


def slab() -> Atoms:
    """Periodic in x and y only."""
    return random_structure(["Cu", "O"], 12, seed=4, pbc=[True, True, False])


def small_cell() -> Atoms:
    """Rattled rock-salt MgO primitive cell (2 atoms, triclinic, 2.4 A between lattice planes):
    each atom meets many images of its neighbour and of itself within the cutoff."""
    atoms = lammps_frame(bulk("MgO", "rocksalt", a=4.21))
    atoms.rattle(0.05, seed=0)
    return atoms


def one_atom_cell() -> Atoms:
    """fcc Cu primitive cell: one atom, all of whose neighbours are its own images."""
    return lammps_frame(bulk("Cu", "fcc", a=3.6))


STRUCTURES: dict[str, Callable[[], Atoms]] = {
    "triclinic": triclinic, "molecule": ethanol, "slab": slab, "small_cell": small_cell,
}
PERIODIC = ["triclinic", "small_cell"]  # fully periodic: stress is defined
SUPERCELLS = {"one_atom_cell": (one_atom_cell, (3, 3, 3)), "small_cell": (small_cell, (3, 3, 3)),
              "triclinic": (triclinic, (2, 2, 2))}


# --------------------------------------------------------------------------- reference helpers
def evaluate(model: JanusPotential, graph) -> dict[str, np.ndarray]:
    """Energies [G], atom energies, forces and virial [G, 3, 3] of a graph through the
    model's `forward` (float64 numpy arrays)."""
    out = model(graph.species, graph.edge_index, graph.edge_vectors(), graph.batch, graph.num_graphs,
                True, True, False)
    return {key: value.detach().to(torch.float64).numpy() for key, value in out.items()}


def calculator_results(calculator, atoms: Atoms) -> dict[str, np.ndarray]:
    """Energy, forces, per-atom energies and (fully periodic cells) stress of a calculator
    (Voigt order xx yy zz yz xz xy, ASE sign, eV/A^3)."""
    atoms = atoms.copy()
    atoms.calc = calculator
    results = {"energy": np.array(atoms.get_potential_energy()), "forces": atoms.get_forces(),
               "energies": atoms.get_potential_energies()}
    if atoms.pbc.all():
        results["stress"] = atoms.get_stress(voigt=True)
    return results


def assert_results_match(actual: dict[str, Any], expected: dict[str, Any], rtol: float, floor: float = 1.0) -> None:
    """Every quantity of `expected` is in `actual` and equal to `rtol` relative to its largest
    magnitude (at least `floor`: quantities that vanish by symmetry)."""
    for key, reference in expected.items():
        reference = np.asarray(reference, dtype=np.float64)
        value = np.asarray(actual[key], dtype=np.float64)
        assert value.shape == reference.shape, f"{key}: shape {value.shape}, expected {reference.shape}"
        scale = max(float(np.abs(reference).max(initial=0.0)), floor)
        deviation = float(np.abs(value - reference).max(initial=0.0))
        assert deviation <= rtol * scale, f"{key} differ by {deviation:.3e} (scale {scale:.3e}, rtol {rtol:.0e})"


def assert_stress_rotates(calculator, atoms: Atoms, rtol: float, seed: int = 0) -> None:
    """Stress of a rotated cell = R stress R^T."""
    rotation = Rotation.random(random_state=seed).as_matrix()
    rotated = atoms.copy()
    rotated.set_cell(atoms.get_cell() @ rotation.T)
    rotated.set_positions(atoms.get_positions() @ rotation.T)
    stress = calculator_results(calculator, atoms)["stress"]
    stress_rotated = calculator_results(calculator, rotated)["stress"]
    expected = full_3x3_to_voigt_6_stress(rotation @ voigt_6_to_full_3x3_stress(stress) @ rotation.T)
    assert_results_match({"stress": stress_rotated}, {"stress": expected}, rtol, floor=1e-3)


def one_sided_limits(values: Callable[[float], np.ndarray], radius: float,
                     step: float) -> tuple[np.ndarray, np.ndarray]:
    """Limits of `values(r)` as r -> radius from below and from above, each by quadratic
    extrapolation from three points on its own side (error of order step^3)."""
    below = [values(radius - k * step) for k in (1, 2, 3)]
    above = [values(radius + k * step) for k in (1, 2, 3)]
    return 3 * below[0] - 3 * below[1] + below[2], 3 * above[0] - 3 * above[1] + above[2]


SPECTATOR = np.array([-1.2, 1.6, 0.0])  # Si, 2.0 A from the centre atom: inside every three-body cutoff


def trimer(distance: float) -> Atoms:
    """Cu at the origin, O at `distance` along x, and a Si spectator 2.0 A from Cu (so that
    three-body terms exist around Cu and the ZBL pair sits next to other atoms)."""
    return Atoms("CuOSi", positions=[[0.0, 0.0, 0.0], [distance, 0.0, 0.0], SPECTATOR])


def switching_radii(model: JanusPotential, z_a: int, z_b: int) -> dict[str, float]:
    """Pair distances at which a term of the energy switches on or off for elements a, b."""
    config = model.config
    radii = {"cutoff": config.cutoff, "three_body_cutoff": config.three_body_cutoff}
    if config.zbl:
        radius_sum = covalent_radii[z_a] + covalent_radii[z_b]
        radii.update(zbl_switch_on=config.zbl_switch_on * radius_sum, zbl_switch_off=config.zbl_switch_off * radius_sum)
    return radii


# --------------------------------------------------------------------------- the suite
class ModelTests:
    """Subclass with `preset = "..."` (and `overrides = {...}`) to test a model configuration."""

    preset: ClassVar[str] = "tiny"
    overrides: ClassVar[dict[str, Any]] = {}

    # ----------------------------------------------------------------- fixtures
    @pytest.fixture(scope="class")
    @classmethod
    def models(cls) -> dict[str, JanusPotential]:
        """The same weights in float64 and float32 (float32 = float64 weights rounded)."""
        return {"float64": make_model(cls.preset, torch.float64, **cls.overrides),
                "float32": make_model(cls.preset, torch.float64, **cls.overrides).to(torch.float32)}

    @pytest.fixture(params=list(DTYPES))
    def dtype(self, request) -> str:
        return request.param

    @pytest.fixture
    def model(self, models, dtype) -> JanusPotential:
        return models[dtype]

    @pytest.fixture
    def model64(self, models) -> JanusPotential:
        return models["float64"]

    @pytest.fixture(params=list(STRUCTURES))
    def structure(self, request) -> Atoms:
        return STRUCTURES[request.param]()

    @pytest.fixture(params=PERIODIC)
    def periodic_structure(self, request) -> Atoms:
        return STRUCTURES[request.param]()

    @pytest.fixture(scope="class")
    @classmethod
    def exported(cls, models, tmp_path_factory) -> dict[str, str]:
        """The float64 weights exported as TorchScript in each dtype."""
        folder = tmp_path_factory.mktemp("exported")
        paths = {}
        for dtype in DTYPES:
            paths[dtype] = str(folder / f"model_{dtype}.pt")
            export_model(models["float64"], paths[dtype], dtype=dtype)
        return paths

    # ----------------------------------------------------------------- derivatives
    @pytest.fixture(params=DEVICES)
    def device(self, request) -> str:
        return request.param

    def test_forces_match_finite_differences(self, model64, structure, device):
        # truncation error of the central difference at delta 1e-4: about 1e-9 eV/A; the
        # forces of these random models are 5e-4 to 7e-2 eV/A
        assert_forces_match_fd(JanusCalculator(model64, device=device), structure, delta=1e-4, atol=1e-7)

    def test_stress_matches_finite_differences(self, model64, periodic_structure, device):
        # truncation and round-off at delta 1e-5: below 1e-11 eV/A^3; stresses 1e-5 to 1e-3
        assert_stress_match_fd(JanusCalculator(model64, device=device), periodic_structure, delta=1e-5, atol=1e-9)

    def test_forces_are_nontrivial_and_sum_to_zero(self, model64, structure):
        """Newton's third law (no external field), and not because every force is zero."""
        forces = calculator_results(JanusCalculator(model64), structure)["forces"]
        assert np.abs(forces).max() > 1e-4
        assert np.abs(forces.sum(axis=0)).max() < 1e-10 * max(1.0, np.abs(forces).sum())

    # ----------------------------------------------------------------- symmetries
    def test_rotation_translation_permutation(self, model, dtype, structure):
        calculator = JanusCalculator(model)
        assert_invariant(calculator, structure, rtol=TOLERANCE[dtype])
        if structure.pbc.all():
            assert_stress_rotates(calculator, structure, rtol=10 * TOLERANCE[dtype])

    def test_batched_equals_one_by_one(self, model, dtype):
        """All suite structures (periodic, slab, molecule, small cell) in one batch through
        `forward` = each structure on its own."""
        graphs = [build_graph(make(), model.cutoff, dtype=DTYPES[dtype]) for make in STRUCTURES.values()]
        batched = evaluate(model, batch_graphs(graphs))
        first_atom = 0
        for k, graph in enumerate(graphs):
            alone = evaluate(model, graph)
            atoms = slice(first_atom, first_atom + graph.positions.shape[0])
            assert_results_match(
                {"energy": batched["energy"][k], "atom_energies": batched["atom_energies"][atoms],
                 "forces": batched["forces"][atoms], "virial": batched["virial"][k]},
                {"energy": alone["energy"][0], "atom_energies": alone["atom_energies"],
                 "forces": alone["forces"], "virial": alone["virial"][0]},
                rtol=TOLERANCE[dtype])
            first_atom = atoms.stop

    @pytest.mark.parametrize("case", list(SUPERCELLS))
    def test_supercell_equals_cell(self, model, dtype, case):
        """A cell (smaller than the cutoff for `one_atom_cell` and `small_cell`: many images of
        each neighbour) against the same crystal as a supercell: energy per atom, per-atom
        energies, forces and stress are the same."""
        make, repeat = SUPERCELLS[case]
        atoms = make()
        supercell = atoms.repeat(repeat)
        copies = len(supercell) // len(atoms)
        cell_out = evaluate(model, build_graph(atoms, model.cutoff, dtype=DTYPES[dtype]))
        super_out = evaluate(model, build_graph(supercell, model.cutoff, dtype=DTYPES[dtype]))
        assert_results_match(
            {"energy_per_atom": super_out["energy"][0] / len(supercell), "atom_energies": super_out["atom_energies"],
             "forces": super_out["forces"], "stress": -super_out["virial"][0] / supercell.get_volume()},
            {"energy_per_atom": cell_out["energy"][0] / len(atoms),
             "atom_energies": np.tile(cell_out["atom_energies"], copies),
             "forces": np.tile(cell_out["forces"], (copies, 1)), "stress": -cell_out["virial"][0] / atoms.get_volume()},
            rtol=TOLERANCE[dtype])

    # ----------------------------------------------------------------- smoothness
    @pytest.mark.parametrize("radius_name", ["cutoff", "three_body_cutoff", "zbl_switch_on", "zbl_switch_off"])
    def test_smooth_where_terms_switch(self, model64, radius_name):
        """Energy and forces are continuous where the O neighbour of Cu crosses a radius at
        which a term switches: the cutoff, the three-body cutoff and both ends of the ZBL
        switch. The one-sided limits (extrapolated from each side) agree."""
        radii = switching_radii(model64, 29, 8)
        if radius_name not in radii:
            pytest.skip(f"this configuration has no {radius_name}")
        radius = radii[radius_name]
        step = 1e-6
        # only the Cu-O distance may be near a switching radius while O moves
        for probe in (radius - 3 * step, radius + 3 * step):
            spectator_distances = {(29, 14): np.linalg.norm(SPECTATOR),
                                   (8, 14): np.linalg.norm(SPECTATOR - [probe, 0.0, 0.0])}
            for (z_a, z_b), distance in spectator_distances.items():
                nearest = min(abs(distance - r) for r in switching_radii(model64, z_a, z_b).values())
                assert nearest > 0.05, "the spectator atom sits on a switching radius: move it"

        def energy_and_forces(distance: float) -> np.ndarray:
            out = evaluate(model64, build_graph(trimer(distance), model64.cutoff, dtype=torch.float64))
            return np.concatenate([out["energy"], out["forces"].reshape(-1)])

        below, above = one_sided_limits(energy_and_forces, radius, step)
        # at step 1e-6 the limits of a smooth energy agree to about 1e-13 relative (round-off;
        # truncation error of order step^3)
        energy_jump, force_jump = abs(below[0] - above[0]), float(np.abs(below[1:] - above[1:]).max())
        assert energy_jump < 1e-11 * max(1.0, abs(below[0])), f"energy jumps by {energy_jump:.3e} at {radius_name}"
        assert force_jump < 1e-10 * max(1.0, float(np.abs(below[1:]).max())), \
            f"forces jump by {force_jump:.3e} at {radius_name}"
        if radius_name == "cutoff":  # beyond it: no interaction at all; inside: there is one
            far = energy_and_forces(radius + 2.0)
            just_outside, just_inside = energy_and_forces(radius + 1e-6), energy_and_forces(radius - 1e-6)
            assert abs(just_outside[0] - far[0]) < 1e-12 * max(1.0, abs(far[0]))
            assert abs(just_inside[0] - just_outside[0]) < 1e-8
            assert np.abs(just_inside[4:7]).max() < 1e-8  # the force on O vanishes at the cutoff
            assert abs(energy_and_forces(radius - 0.5)[0] - far[0]) > 1e-6

    # ----------------------------------------------------------------- export
    def test_exported_matches_eager(self, models, exported, dtype, structure):
        """The TorchScript file (float64, or float32 to float32 precision) = the eager float64
        model it was exported from."""
        expected = calculator_results(JanusCalculator(models["float64"]), structure)
        actual = calculator_results(JanusCalculator(exported[dtype]), structure)
        assert_results_match(actual, expected, rtol=TOLERANCE[dtype], floor=1e-2)
