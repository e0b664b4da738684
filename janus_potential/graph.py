"""From atomic structures to graphs of directed edges i -> j (DESIGN.md's data flow).

`build_graph(atoms, cutoff)` validates the structure and runs `vesin` once; the graph keeps
integer cell shifts so that edge vectors r_ij = x_j - x_i + S_ij . cell can be recomputed
from new positions (MD steps within the skin, finite differences, strained cells).
`batch_graphs` concatenates several graphs into one with a `batch` index per atom.
Periodic, partly periodic and free structures, triclinic cells and cells smaller than the
cutoff (several images of one neighbour) are all handled by the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
import vesin

from .elements import MAX_ATOMIC_NUMBER, number_to_symbol
from .errors import JanusInputError

MIN_DISTANCE = 0.1  # Angstrom; closer atoms are reported as overlapping


@dataclass
class AtomGraph:
    """A (batch of) structure(s) as tensors. Edge k goes from centre edge_index[0, k] to
    neighbour edge_index[1, k] through the periodic image edge_shift[k] of the cell."""

    species: torch.Tensor  # [N] int64 atomic numbers
    positions: torch.Tensor  # [N, 3]
    cell: torch.Tensor  # [G, 3, 3] rows are cell vectors
    pbc: torch.Tensor  # [G, 3] bool
    edge_index: torch.Tensor  # [2, E] int64
    edge_shift: torch.Tensor  # [E, 3] integer-valued, in units of the cell vectors
    batch: torch.Tensor  # [N] graph index of each atom
    num_atoms: torch.Tensor  # [G]

    @property
    def num_graphs(self) -> int:
        return self.cell.shape[0]  # an int (a symbol while tracing: no int() here)

    def edge_vectors(self, positions: torch.Tensor | None = None, cell: torch.Tensor | None = None) -> torch.Tensor:
        """r_ij = x_j - x_i + shift . cell, differentiable in positions and cell."""
        from .model import edge_vectors

        positions = self.positions if positions is None else positions
        cell = self.cell if cell is None else cell
        centre_cell = cell.index_select(0, self.batch.index_select(0, self.edge_index[0]))
        shift = torch.einsum("ek,ekl->el", self.edge_shift.to(cell.dtype), centre_cell)
        return edge_vectors(positions, self.edge_index, shift)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "AtomGraph":
        def move(t: torch.Tensor, floating: bool) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if floating and dtype is not None else t.dtype)

        return AtomGraph(
            species=move(self.species, False), positions=move(self.positions, True),
            cell=move(self.cell, True), pbc=move(self.pbc, False),
            edge_index=move(self.edge_index, False), edge_shift=move(self.edge_shift, True),
            batch=move(self.batch, False), num_atoms=move(self.num_atoms, False),
        )

    def volumes(self) -> torch.Tensor:
        return torch.linalg.det(self.cell).abs()


def check_structure(atoms, supported_elements: Iterable[int] | None = None) -> None:
    """Raise JanusInputError for empty structures, bad coordinates, unknown elements or a
    degenerate periodic cell."""
    if len(atoms) == 0:
        raise JanusInputError("the structure has no atoms")
    positions = np.asarray(atoms.get_positions())
    bad = np.nonzero(~np.isfinite(positions).all(axis=1))[0]
    if bad.size:
        raise JanusInputError(f"positions contain NaN or infinite values (atoms {bad[:10].tolist()})")
    numbers = np.asarray(atoms.get_atomic_numbers())
    out_of_range = sorted({int(z) for z in numbers if not 1 <= z <= MAX_ATOMIC_NUMBER})
    if out_of_range:
        raise JanusInputError(f"unknown element(s): atomic numbers {out_of_range} are outside 1..{MAX_ATOMIC_NUMBER}")
    if supported_elements is not None:
        supported = set(int(z) for z in supported_elements)
        missing = sorted({int(z) for z in numbers} - supported)
        if missing:
            names = ", ".join(f"{number_to_symbol(z)} (Z={z})" for z in missing)
            raise JanusInputError(f"unknown element(s) for this model: {names}")
    pbc = np.asarray(atoms.get_pbc(), dtype=bool)
    if pbc.any():
        cell = np.asarray(atoms.get_cell())
        if not np.isfinite(cell).all():
            raise JanusInputError("the cell contains NaN or infinite values")
        periodic_vectors = cell[pbc]
        singular = np.linalg.matrix_rank(periodic_vectors, tol=1e-6) < periodic_vectors.shape[0]
        if singular or (pbc.all() and abs(np.linalg.det(cell)) < 1e-6):
            raise JanusInputError("the periodic cell has zero volume (degenerate or missing cell vectors)")


def neighbor_pairs(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> tuple[np.ndarray, ...]:
    """Full neighbour list (i, j, integer shift, distance) within `cutoff` from vesin."""
    calculator = vesin.NeighborList(cutoff=float(cutoff), full_list=True)
    i, j, shifts, distances = calculator.compute(
        points=np.ascontiguousarray(positions, dtype=np.float64),
        box=np.ascontiguousarray(cell, dtype=np.float64),
        periodic=[bool(p) for p in pbc],
        quantities="ijSd",
    )
    return i.astype(np.int64), j.astype(np.int64), shifts.astype(np.int64), distances


def check_overlaps(i: np.ndarray, j: np.ndarray, distances: np.ndarray) -> None:
    close = np.nonzero(distances < MIN_DISTANCE)[0]
    if close.size:
        k = close[0]
        raise JanusInputError(
            f"overlapping atoms: atoms {int(i[k])} and {int(j[k])} are {distances[k]:.4f} Angstrom apart "
            f"(minimum {MIN_DISTANCE} Angstrom)"
        )


def build_graph(
    atoms,
    cutoff: float,
    supported_elements: Iterable[int] | None = None,
    dtype: torch.dtype = torch.get_default_dtype(),
) -> AtomGraph:
    """Validate `atoms` (an ase.Atoms) and build its graph with all neighbours within `cutoff`."""
    check_structure(atoms, supported_elements)
    positions = np.asarray(atoms.get_positions(), dtype=np.float64)
    cell = np.asarray(atoms.get_cell(), dtype=np.float64)
    pbc = np.asarray(atoms.get_pbc(), dtype=bool)
    i, j, shifts, distances = neighbor_pairs(positions, cell, pbc, cutoff)
    check_overlaps(i, j, distances)
    n = len(atoms)
    return AtomGraph(
        species=torch.as_tensor(np.asarray(atoms.get_atomic_numbers()), dtype=torch.long),
        positions=torch.as_tensor(positions, dtype=dtype),
        cell=torch.as_tensor(cell, dtype=dtype).unsqueeze(0),
        pbc=torch.as_tensor(pbc).unsqueeze(0),
        edge_index=torch.as_tensor(np.stack([i, j])),
        edge_shift=torch.as_tensor(shifts, dtype=dtype),
        batch=torch.zeros(n, dtype=torch.long),
        num_atoms=torch.tensor([n]),
    )


def batch_graphs(graphs: Sequence[AtomGraph]) -> AtomGraph:
    """Concatenate graphs into one batch (node indices offset, `batch` numbered per graph)."""
    if len(graphs) == 1:
        return graphs[0]
    offsets = np.cumsum([0] + [int(g.positions.shape[0]) for g in graphs[:-1]])
    graph_offsets = np.cumsum([0] + [g.num_graphs for g in graphs[:-1]])
    return AtomGraph(
        species=torch.cat([g.species for g in graphs]),
        positions=torch.cat([g.positions for g in graphs]),
        cell=torch.cat([g.cell for g in graphs]),
        pbc=torch.cat([g.pbc for g in graphs]),
        edge_index=torch.cat([g.edge_index + int(o) for g, o in zip(graphs, offsets)], dim=1),
        edge_shift=torch.cat([g.edge_shift for g in graphs]),
        batch=torch.cat([g.batch + int(o) for g, o in zip(graphs, graph_offsets)]),
        num_atoms=torch.cat([g.num_atoms for g in graphs]),
    )

