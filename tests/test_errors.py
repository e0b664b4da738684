"""Bad input gets a clear error naming the problem."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

from janus_potential import JanusInputError, JanusPotential
from janus_potential.ase import JanusCalculator
from janus_potential.export import export_model, load_exported


def energy(calculator, atoms):
    atoms.calc = calculator
    return atoms.get_potential_energy()


def test_unknown_element(tiny_model):
    atoms = Atoms(numbers=[8, 101], positions=[[0, 0, 0], [1.5, 0, 0]])
    with pytest.raises(JanusInputError, match="unknown element"):
        energy(JanusCalculator(tiny_model), atoms)


def test_element_not_covered_by_the_model(tmp_path):
    model = JanusPotential.from_preset("tiny")
    model.supported.zero_()
    model.supported[[8, 12]] = True
    calculator = JanusCalculator(model)
    with pytest.raises(JanusInputError, match=r"Fe \(Z=26\)"):
        energy(calculator, Atoms("FeO", positions=[[0, 0, 0], [1.9, 0, 0]]))
    path = tmp_path / "mgo.pt"
    export_model(model, path)
    with pytest.raises(JanusInputError, match=r"Fe \(Z=26\)"):
        energy(JanusCalculator(str(path)), Atoms("FeO", positions=[[0, 0, 0], [1.9, 0, 0]]))


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_positions(tiny_model, value):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.positions[1, 2] = value
    with pytest.raises(JanusInputError, match="NaN or infinite"):
        energy(JanusCalculator(tiny_model), atoms)


def test_non_finite_positions_during_md(tiny_model):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    calculator = JanusCalculator(tiny_model)
    energy(calculator, atoms)
    atoms.positions[0, 0] = np.nan
    with pytest.raises(JanusInputError, match="NaN or infinite"):
        atoms.get_potential_energy()


def test_overlapping_atoms(tiny_model):
    atoms = Atoms("CuO", positions=[[0, 0, 0], [0.05, 0, 0]])
    with pytest.raises(JanusInputError, match="overlapping atoms: atoms 0 and 1"):
        energy(JanusCalculator(tiny_model), atoms)


def test_overlapping_periodic_images(tiny_model):
    atoms = Atoms("Cu", positions=[[0, 0, 0]], cell=[0.05, 3, 3], pbc=True)
    with pytest.raises(JanusInputError, match="overlapping atoms"):
        energy(JanusCalculator(tiny_model), atoms)


def test_zero_volume_cell(tiny_model):
    atoms = Atoms("Cu2", positions=[[0, 0, 0], [1.5, 1.5, 0]], cell=[[3, 0, 0], [0, 3, 0], [3, 3, 0]], pbc=True)
    with pytest.raises(JanusInputError, match="zero volume"):
        energy(JanusCalculator(tiny_model), atoms)


def test_empty_structure(tiny_model):
    with pytest.raises(JanusInputError, match="no atoms"):
        energy(JanusCalculator(tiny_model), Atoms())


def test_missing_and_foreign_model_files(tmp_path):
    with pytest.raises(JanusInputError, match="does not exist"):
        JanusCalculator(str(tmp_path / "missing.pt"))
    foreign = tmp_path / "foreign.pt"
    foreign.write_text("not a model")
    with pytest.raises(JanusInputError, match="not a Janus model file or checkpoint, or it is truncated or corrupt"):
        JanusCalculator(str(foreign))
    plain = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(plain))
    with pytest.raises(JanusInputError, match="not a Janus"):
        JanusCalculator(str(plain))


def test_wrong_export_format_version(tmp_path):
    path = tmp_path / "model.pt"
    export_model(JanusPotential.from_preset("tiny"), path)
    module, metadata = load_exported(path)
    metadata["format_version"] = 99
    import json
    module._c.save(str(path), _extra_files={"metadata.json": json.dumps(metadata)})
    with pytest.raises(JanusInputError, match="format version 99"):
        JanusCalculator(str(path))
