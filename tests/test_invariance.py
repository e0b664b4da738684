"""Energy accumulation of a float32 model. (Rotation, translation and permutation invariance,
supercells and batching are checks of the model suite: tests/model_suite.py.)"""

import math

import numpy as np
import torch

from janus_potential.ase import JanusCalculator

from .model_suite import make_model


def test_supercell_energy_is_accumulated_in_float64(oxide):
    """A float32 model: the total energy of a 192-atom supercell is the float64 sum of its
    float32 per-atom energies (DESIGN.md: energies are accumulated in float64), which a
    float32 running sum misses by far more than the tolerance."""
    supercell = oxide.repeat((2, 2, 2))
    supercell.calc = JanusCalculator(make_model("tiny", torch.float32))
    energy = supercell.get_potential_energy()
    atom_energies = supercell.get_potential_energies()
    assert np.array_equal(atom_energies.astype(np.float32), atom_energies)  # float32 values
    exact = math.fsum(atom_energies)
    float32_sum = float(torch.zeros(1, dtype=torch.float32).index_add(
        0, torch.zeros(len(supercell), dtype=torch.long), torch.as_tensor(atom_energies, dtype=torch.float32)))
    tolerance = 1e-12 * sum(abs(atom_energies))
    assert abs(float32_sum - exact) > 100 * tolerance  # the check below can tell the two apart
    assert abs(energy - exact) < tolerance
