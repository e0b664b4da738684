"""Radial basis and cutoff envelope, computed once per edge and reused by every layer."""

from __future__ import annotations

import math

import torch
from torch import nn


def smooth_envelope(scaled_distance: torch.Tensor) -> torch.Tensor:
    """u(x) = 1 - 10x^3 + 15x^4 - 6x^5 for x < 1, else 0.

    u, u' and u'' all vanish at x = 1 (u' = -30 x^2 (1-x)^2, u'' = -60 x (1-x)(1-2x)), so
    energies, forces and their first derivatives are continuous when a neighbour crosses the
    cutoff.
    """
    x = scaled_distance.clamp(max=1.0)
    x3 = x * x * x
    return 1.0 + x3 * (-10.0 + x * (15.0 - 6.0 * x))


class BesselBasis(nn.Module):
    """sqrt(2/rc) sin(n pi r / rc) / r, n = 1..num_basis, multiplied by the smooth envelope."""

    def __init__(self, cutoff: float, num_basis: int) -> None:
        super().__init__()
        self.cutoff = float(cutoff)
        self.prefactor = math.sqrt(2.0 / cutoff)
        self.register_buffer(
            "frequencies", torch.arange(1, num_basis + 1, dtype=torch.get_default_dtype()) * math.pi / cutoff
        )

    def forward(self, distance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (basis [E, num_basis] including the envelope, envelope [E])."""
        envelope = smooth_envelope(distance / self.cutoff)
        safe = distance.clamp(min=1e-6).unsqueeze(-1)
        basis = self.prefactor * torch.sin(self.frequencies * safe) / safe
        return basis * envelope.unsqueeze(-1), envelope


def legendre_basis(cosine: torch.Tensor, order: int) -> torch.Tensor:
    """Legendre polynomials P_0..P_order of cos(theta), stacked on the last axis."""
    values = [torch.ones_like(cosine), cosine]
    for n in range(1, order):
        values.append(((2 * n + 1) * cosine * values[n] - n * values[n - 1]) / (n + 1))
    return torch.stack(values[: order + 1], dim=-1)
