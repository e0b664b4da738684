"""ZBL short-range repulsion: the physical prior under the learned energy.

The Ziegler–Biersack–Littmark universal screened-nuclear potential

    phi(r) = k Z_i Z_j / r * sum_k c_k exp(-d_k r / a),  a = 0.46850 / (Z_i^0.23 + Z_j^0.23) Å

is added on every pair closer than a fraction of the sum of the two covalent radii, so that
atoms cannot merge however short the training was. It is switched off smoothly (value,
first and second derivative continuous) between `switch_on` and `switch_off` times the
covalent-radius sum: at the defaults (0.25, 0.5) it acts below about 0.9 Å for Si–O and
0.3 Å for H–H, beneath the shortest contacts of high-pressure DFT data, so the model learns
the residual on top of it and near-equilibrium structures do not see it at all.

Each directed edge i -> j carries half of phi(r_ij) for its centre atom, so the per-atom
energy depends only on edges centred at that atom (DESIGN.md's locality rule) and every
front end (one process, domains, LAMMPS) sums the same pairs once.
"""

from __future__ import annotations

import torch
from torch import nn

from .radial import smooth_envelope

COULOMB_EV_ANGSTROM = 14.399645  # e^2 / (4 pi epsilon_0) in eV Å
SCREENING_LENGTH = 0.46850  # Å
SCREENING_EXPONENT = 0.23
COEFFICIENTS = (0.18175, 0.50986, 0.28022, 0.02817)
EXPONENTS = (3.19980, 0.94229, 0.40290, 0.20162)


class ZBLRepulsion(nn.Module):
    """Per-edge ZBL energy (half of the pair energy), smoothly switched off."""

    def __init__(self, max_atomic_number: int, switch_on: float, switch_off: float) -> None:
        super().__init__()
        from ase.data import covalent_radii

        if not 0.0 <= switch_on < switch_off:
            raise ValueError("the ZBL switch needs 0 <= zbl_switch_on < zbl_switch_off")
        # float64 at construction: `model.to(dtype)` then rounds once, to the model's dtype
        radii = torch.zeros(max_atomic_number + 1, dtype=torch.float64)
        count = min(max_atomic_number + 1, len(covalent_radii))
        radii[:count] = torch.as_tensor(covalent_radii[:count], dtype=radii.dtype)
        self.register_buffer("covalent_radii", radii, persistent=False)
        self.register_buffer("coefficients", torch.tensor(COEFFICIENTS, dtype=torch.float64), persistent=False)
        self.register_buffer("exponents", torch.tensor(EXPONENTS, dtype=torch.float64), persistent=False)
        self.coulomb = COULOMB_EV_ANGSTROM
        self.screening_length = SCREENING_LENGTH
        self.screening_exponent = SCREENING_EXPONENT
        self.switch_on = float(switch_on)
        self.switch_off = float(switch_off)

    def forward(self, species: torch.Tensor, edge_index: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
        z_centre = species.index_select(0, edge_index[0])
        z_neighbour = species.index_select(0, edge_index[1])
        zi = z_centre.to(distance.dtype)
        zj = z_neighbour.to(distance.dtype)
        screening = self.screening_length / (zi.pow(self.screening_exponent) + zj.pow(self.screening_exponent))
        r = distance.clamp(min=1e-4)
        x = (r / screening).unsqueeze(-1)
        phi = (self.coefficients.to(r.dtype) * torch.exp(-self.exponents.to(r.dtype) * x)).sum(dim=-1)
        pair = self.coulomb * zi * zj / r * phi
        radius_sum = (self.covalent_radii.index_select(0, z_centre)
                      + self.covalent_radii.index_select(0, z_neighbour)).to(distance.dtype)
        start = self.switch_on * radius_sum
        scaled = (r - start) / ((self.switch_off - self.switch_on) * radius_sum)
        switch = smooth_envelope(scaled.clamp(min=0.0))
        return 0.5 * pair * switch
