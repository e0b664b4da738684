"""Spatial domain decomposition of one periodic structure, and the model evaluated on it.

`decompose(graph, n_domains)` cuts the cell into `n_domains` slabs along the fractional
coordinate whose slab is widest. Domain d owns the atoms whose (wrapped) fractional
coordinate falls in [d/n, (d+1)/n); its ghosts are every other atom image within one
cutoff of an owned atom, each recorded as (owner rank, owner's local index, integer image
shift). Local edges are exactly the edges of the global graph centred at owned atoms, so
every edge lives on exactly one rank.

`DomainModel` runs DESIGN.md's layer sequence on one domain with a halo exchange after
every interaction layer but the last (the readout only needs owned rows), takes forces
and the virial from one autograd pass w.r.t. the local edge vectors, sums ghost forces
into their owners with the reverse halo and all-reduces energy and virial. Everything is
differentiable to second order, so force/stress losses train across ranks exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from janus_potential.graph import AtomGraph
from janus_potential.model import forces_from_edge_gradient, virial_from_edge_gradient

from .halo import HaloPlan, all_reduce_sum, halo_exchange, halo_reverse


@dataclass
class Domain:
    """One rank's share of a structure: `n_owned` owned rows first, then ghosts."""

    rank: int
    n_owned: int
    atom: torch.Tensor  # [n_local] global atom index of each local row
    image_shift: torch.Tensor  # [n_local, 3] integer periodic image of each local row (0 for owned)
    owner_rank: torch.Tensor  # [n_local]
    owner_index: torch.Tensor  # [n_local] row on the owner rank
    species: torch.Tensor  # [n_local]
    edge_index: torch.Tensor  # [2, E_local] local rows
    edge_shift: torch.Tensor  # [E_local, 3] the global edge's cell shift
    edge_ids: torch.Tensor  # [E_local] index of the edge in the global graph

    @property
    def n_local(self) -> int:
        return int(self.atom.shape[0])

    @property
    def owned(self) -> torch.Tensor:
        return self.atom[: self.n_owned]


def slab_axis(cell: np.ndarray) -> int:
    """The cell axis whose fractional slabs are thickest (width 1/|reciprocal row|)."""
    reciprocal = np.linalg.inv(cell).T
    return int(np.argmax(1.0 / np.linalg.norm(reciprocal, axis=1)))


def owner_domains(positions: np.ndarray, cell: np.ndarray, n_domains: int, axis: int) -> np.ndarray:
    fractional = positions @ np.linalg.inv(cell)
    coordinate = fractional[:, axis] - np.floor(fractional[:, axis])
    return np.minimum((coordinate * n_domains).astype(np.int64), n_domains - 1)


def decompose(graph: AtomGraph, n_domains: int, axis: Optional[int] = None) -> List[Domain]:
    """Split a one-structure, fully periodic `graph` into `n_domains` slab domains."""
    if graph.num_graphs != 1:
        raise ValueError("domain decomposition takes one structure at a time")
    if n_domains < 1:
        raise ValueError("n_domains must be at least 1")
    cell = graph.cell[0].detach().to(torch.float64).numpy()
    positions = graph.positions.detach().to(torch.float64).numpy()
    if not bool(graph.pbc.all()):
        raise ValueError("domain decomposition needs a fully periodic structure")
    axis = slab_axis(cell) if axis is None else axis
    owner = owner_domains(positions, cell, n_domains, axis)
    local_of = np.zeros(len(owner), dtype=np.int64)
    for d in range(n_domains):
        members = np.nonzero(owner == d)[0]
        local_of[members] = np.arange(members.size)

    centre, neighbour = graph.edge_index.numpy()
    shift = graph.edge_shift.detach().numpy().round().astype(np.int64)
    span = int(np.abs(shift).max(initial=0)) + 1
    base = 2 * span + 1
    shift_code = ((shift[:, 0] + span) * base + (shift[:, 1] + span)) * base + (shift[:, 2] + span)
    zero_code = (span * base + span) * base + span
    key = neighbour * base**3 + shift_code

    domains = []
    for d in range(n_domains):
        owned = np.nonzero(owner == d)[0]
        edges = np.nonzero(owner[centre] == d)[0]
        nb, nb_key = neighbour[edges], key[edges]
        is_owned = (owner[nb] == d) & (shift_code[edges] == zero_code)
        ghost_keys, ghost_of_edge = np.unique(nb_key[~is_owned], return_inverse=True)
        ghost_atom = ghost_keys // base**3
        code = ghost_keys % base**3
        ghost_shift = np.stack([code // base**2, (code // base) % base, code % base], axis=1) - span
        local_nb = np.empty(edges.size, dtype=np.int64)
        local_nb[is_owned] = local_of[nb[is_owned]]
        local_nb[~is_owned] = owned.size + ghost_of_edge.reshape(-1)
        atom = np.concatenate([owned, ghost_atom])
        domains.append(Domain(
            rank=d,
            n_owned=int(owned.size),
            atom=torch.as_tensor(atom),
            image_shift=torch.as_tensor(np.concatenate([np.zeros((owned.size, 3), dtype=np.int64), ghost_shift])),
            owner_rank=torch.as_tensor(owner[atom]),
            owner_index=torch.as_tensor(local_of[atom]),
            species=graph.species[torch.as_tensor(atom)],
            edge_index=torch.as_tensor(np.stack([local_of[centre[edges]], local_nb])),
            edge_shift=graph.edge_shift[torch.as_tensor(edges)],
            edge_ids=torch.as_tensor(edges),
        ))
    return domains


def halo_plan(domains: List[Domain], rank: int, group: Optional[dist.ProcessGroup] = None) -> HaloPlan:
    """The send/receive lists of `rank`, from every domain's ghost list.

    Every rank decomposes the whole structure (cheap next to the model), so the lists need
    no negotiation; receivers order ghosts by (owner rank, ghost row), senders follow suit.
    """
    n_ranks = len(domains)
    mine = domains[rank]
    ghost_rows = torch.arange(mine.n_owned, mine.n_local)
    ghost_owner = mine.owner_rank[mine.n_owned:]
    order = torch.argsort(ghost_owner, stable=True)
    recv_rows = ghost_rows[order]
    recv_counts = torch.bincount(ghost_owner, minlength=n_ranks).tolist()
    send_index, send_counts = [], []
    for other in domains:
        owners = other.owner_rank[other.n_owned:]
        wanted = other.owner_index[other.n_owned:][owners == rank]
        send_index.append(wanted)
        send_counts.append(int(wanted.numel()))
    return HaloPlan(
        n_owned=mine.n_owned, n_local=mine.n_local, send_index=torch.cat(send_index), send_counts=send_counts,
        recv_rows=recv_rows, recv_counts=recv_counts, rank=rank, group=group,
    )


class DomainModel:
    """A `JanusPotential` evaluated on one domain of a decomposed structure."""

    def __init__(self, model, domain: Domain, plan: HaloPlan, group: Optional[dist.ProcessGroup] = None) -> None:
        self.model = model
        self.domain = domain
        self.plan = plan
        self.group = group

    @classmethod
    def build(cls, model, graph: AtomGraph, group: Optional[dist.ProcessGroup] = None,
              axis: Optional[int] = None) -> "DomainModel":
        """Decompose `graph` over the ranks of `group` (one process when None)."""
        distributed = group is not None or (dist.is_initialized() and dist.get_world_size() > 1)
        n_ranks = dist.get_world_size(group) if distributed else 1
        rank = dist.get_rank(group) if distributed else 0
        domains = decompose(graph, n_ranks, axis)
        return cls(model, domains[rank], halo_plan(domains, rank, group if distributed else None),
                   group if distributed else None)

    def edge_vectors(self, positions: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """r = x_j - x_i + shift . cell for the local edges (same arithmetic as AtomGraph)."""
        centre_atom = self.domain.atom.index_select(0, self.domain.edge_index[0])
        neighbour_atom = self.domain.atom.index_select(0, self.domain.edge_index[1])
        shift = self.domain.edge_shift.to(cell.dtype) @ cell
        return positions.index_select(0, neighbour_atom) - positions.index_select(0, centre_atom) + shift

    def __call__(self, positions: torch.Tensor, cell: torch.Tensor, compute_virial: bool = True,
                 create_graph: bool = False) -> Dict[str, torch.Tensor]:
        """Energy (global, float64 scalar), owned atom energies and forces, global virial
        [3, 3] and stress (ASE sign)."""
        model, domain, plan = self.model, self.domain, self.plan
        edge_vectors = self.edge_vectors(positions, cell)
        if not edge_vectors.requires_grad:
            edge_vectors = edge_vectors.detach().requires_grad_(True)
        species = domain.species
        geometry = model.prepare(species, domain.edge_index, edge_vectors)
        h = model.embed(species)
        for layer in range(model.num_interactions):
            h = model.interaction(layer, h, species, geometry, domain.n_owned)
            if layer + 1 < model.num_interactions:
                h = halo_exchange(h, plan)
        atom_energy = model.readout(h[: domain.n_owned], species[: domain.n_owned], geometry)
        (edge_gradient,) = torch.autograd.grad([atom_energy.sum()], [edge_vectors], create_graph=create_graph,
                                               allow_unused=True)
        if edge_gradient is None:
            edge_gradient = torch.zeros_like(edge_vectors)
        local_forces = forces_from_edge_gradient(edge_gradient, domain.edge_index, domain.n_local)
        forces = halo_reverse(local_forces, plan)[: domain.n_owned]
        energy = all_reduce_sum(atom_energy.to(torch.float64).sum(), self.group)
        result = {"energy": energy, "atom_energies": atom_energy, "forces": forces}
        if compute_virial:
            edge_graph = torch.zeros(edge_vectors.shape[0], dtype=torch.long)
            virial = all_reduce_sum(virial_from_edge_gradient(edge_gradient, edge_vectors, edge_graph, 1)[0],
                                    self.group)
            result["virial"] = virial
            result["stress"] = -virial / torch.linalg.det(cell).abs()
        return result
