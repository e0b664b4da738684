"""Per-graph geometry shared by all interaction layers: built once, reused L times.

`build_geometry` turns edges (centre i -> neighbour j, edge vector r_ij = x_j - x_i) into
the radial basis, the envelope, the three-body triplet list (pairs of distinct short
edges i->j, i->k around the same centre, with the angle basis) and the per-edge ZBL
repulsion energy (zeros when the prior is off). Only indices are non-differentiable; every
float tensor keeps its autograd link to the edge vectors.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import nn

from .radial import BesselBasis, legendre_basis, smooth_envelope
from .repulsion import ZBLRepulsion


class Geometry(NamedTuple):
    centre: torch.Tensor
    neighbour: torch.Tensor
    radial: torch.Tensor
    envelope: torch.Tensor
    triplet_edge: torch.Tensor
    triplet_neighbour: torch.Tensor
    triplet_basis: torch.Tensor
    repulsion: torch.Tensor  # [E] half the ZBL pair energy, for the centre atom


def build_triplets(centre: torch.Tensor, short: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All ordered pairs (a, b), a != b, of short edges that share a centre atom.

    `short` holds edge indices; returns edge indices (first, second) of each pair.
    """
    if short.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=centre.device)
        return empty, empty
    short_centre = centre.index_select(0, short)
    order = torch.argsort(short_centre, stable=True)
    short = short.index_select(0, order)
    short_centre = short_centre.index_select(0, order)
    unique_centres, counts = torch.unique_consecutive(short_centre, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    group_size = counts.repeat_interleave(counts)
    group_start = starts.repeat_interleave(counts)
    first_pos = torch.arange(short.shape[0], device=centre.device).repeat_interleave(group_size)
    pair_start = torch.cumsum(group_size, 0) - group_size
    # no .item(): the pair count is a shape, so make_fx can trace the triplet build
    offset_in_group = torch.arange(first_pos.shape[0], device=centre.device) - pair_start.repeat_interleave(group_size)
    second_pos = group_start.repeat_interleave(group_size) + offset_in_group
    keep = first_pos != second_pos
    return short.index_select(0, first_pos[keep]), short.index_select(0, second_pos[keep])


def short_edge_triplets(centre: torch.Tensor, distance: torch.Tensor, cutoff: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`build_triplets` of the edges shorter than the three-body `cutoff`: the one triplet rule
    of the model, its compiled training step and the AOTInductor package (which get the list
    from outside their traced graphs: its size is data-dependent)."""
    short = torch.nonzero(distance.detach() < cutoff).reshape(-1)
    return build_triplets(centre, short)


class GeometryBuilder(nn.Module):
    """Edge geometry -> radial basis, envelope and triplets (see the module docstring)."""

    def __init__(self, cutoff: float, num_radial: int, three_body_cutoff: float, num_three_body_radial: int,
                 angular_order: int, zbl: bool, zbl_switch: tuple[float, float], max_atomic_number: int) -> None:
        super().__init__()
        self.zbl = bool(zbl)
        self.repulsion = ZBLRepulsion(max_atomic_number, zbl_switch[0], zbl_switch[1])
        self.radial_basis = BesselBasis(cutoff, num_radial)
        self.three_body_radial = BesselBasis(three_body_cutoff, num_three_body_radial)
        self.three_body_cutoff = float(three_body_cutoff)
        self.angular_order = int(angular_order)

    @torch.jit.export
    def triplets(self, edge_index: torch.Tensor, edge_vectors: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The triplet list (first, second edge of each pair) of these edges: integer indices,
        data-dependent in size. The compiled training step (training/compiled.py) computes
        them here, outside its traced graph, and passes them to `forward`."""
        distance = torch.linalg.norm(edge_vectors.detach(), dim=1)
        return short_edge_triplets(edge_index[0], distance, self.three_body_cutoff)

    def forward(self, species: torch.Tensor, edge_index: torch.Tensor, edge_vectors: torch.Tensor,
                triplets: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Geometry:
        centre = edge_index[0]
        neighbour = edge_index[1]
        distance = torch.linalg.norm(edge_vectors, dim=1)
        radial, envelope = self.radial_basis(distance)

        if triplets is None:
            first, second = short_edge_triplets(centre, distance, self.three_body_cutoff)
        else:
            first, second = triplets
        vec_a = edge_vectors.index_select(0, first)
        vec_b = edge_vectors.index_select(0, second)
        dist_a = distance.index_select(0, first)
        dist_b = distance.index_select(0, second)
        cosine = (vec_a * vec_b).sum(dim=1) / (dist_a * dist_b).clamp(min=1e-9)
        basis_b, _ = self.three_body_radial(dist_b)
        envelope_a = smooth_envelope(dist_a / self.three_body_radial.cutoff)
        angular = legendre_basis(cosine, self.angular_order)
        triplet_basis = (angular.unsqueeze(2) * basis_b.unsqueeze(1)).flatten(1) * envelope_a.unsqueeze(-1)
        if self.zbl:
            repulsion = self.repulsion(species, edge_index, distance)
        else:
            repulsion = torch.zeros_like(distance)
        return Geometry(
            centre=centre,
            neighbour=neighbour,
            radial=radial,
            envelope=envelope,
            triplet_edge=first,
            triplet_neighbour=neighbour.index_select(0, second),
            triplet_basis=triplet_basis,
            repulsion=repulsion,
        )
