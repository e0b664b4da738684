"""Symmetries: rotation, translation, permutation, supercells, batching."""

import numpy as np
import torch
from ase.build import bulk

from janus_potential import batch_graphs, build_graph
from janus_potential.ase import JanusCalculator
from janus_potential.testing import assert_invariant, random_structure


def test_rotation_translation_permutation(tiny_model, oxide):
    assert_invariant(JanusCalculator(tiny_model), oxide, rtol=1e-10)


def test_supercell_is_extensive(tiny_model, oxide):
    calculator = JanusCalculator(tiny_model)
    oxide.calc = calculator
    energy, forces = oxide.get_potential_energy(), oxide.get_forces()
    stress = oxide.get_stress()
    supercell = oxide.repeat((2, 2, 2))
    supercell.calc = calculator
    assert supercell.get_potential_energy() == np.float64(supercell.get_potential_energy())
    np.testing.assert_allclose(supercell.get_potential_energy(), 8 * energy, rtol=1e-11)
    np.testing.assert_allclose(supercell.get_forces(), np.tile(forces, (8, 1)), atol=1e-10)
    np.testing.assert_allclose(supercell.get_stress(), stress, atol=1e-10)


def test_batched_equals_one_by_one(tiny_model):
    structures = [
        random_structure(["Mg", "O"], 10, seed=5),
        bulk("Cu", "fcc", a=3.6).repeat((2, 1, 1)),
        random_structure(["Li", "Fe", "P", "O"], 14, seed=6),
    ]
    graphs = [build_graph(s, tiny_model.cutoff, dtype=torch.float64) for s in structures]
    batched = tiny_model.compute(batch_graphs(graphs))
    offset = 0
    for k, graph in enumerate(graphs):
        single = tiny_model.compute(graph)
        n = graph.positions.shape[0]
        torch.testing.assert_close(batched["energy"][k], single["energy"][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(batched["forces"][offset:offset + n], single["forces"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(batched["stress"][k], single["stress"][0], rtol=1e-10, atol=1e-12)
        offset += n
