"""`ParallelJanusCalculator`: one large periodic structure evaluated by all MPI ranks.

Under `mpirun -np N`, every rank holds the same `ase.Atoms` (as ASE's MPI scripts do) and
owns one slab of it (`janus_potential.parallel.domain.slab_domain`, fixed until the next
rebuild). Each rank builds the neighbour list of its own atoms and ghost shell only
(cutoff + skin) and keeps it, as the one-process `JanusCalculator` does, until some atom
has moved more than half the skin since the build, or the cell, the periodic flags, the
elements or the atom count change; the decision is all-reduced so that every rank
rebuilds together. Edges beyond the cutoff are masked at every step. The model runs on the
slab with the halo protocol of DESIGN.md (`DomainModel`, per-layer exchange of boundary
rows only, planned by `request_halo_plan`), and one all-gather of the owned rows gives
every rank the full forces and per-atom energies, equal to the one-process
`JanusCalculator`. One process (no launcher) is a world of one: the same code with
periodic self-images. `JanusCalculator(model, parallel=True)` is the usual way in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from janus_potential.devices import on_device, rank_device
from janus_potential.errors import JanusInputError
from janus_potential.graph import MIN_DISTANCE, check_overlaps, check_structure
from janus_potential.io import InferenceModel, load_for_inference
from janus_potential.model import edge_vectors
from janus_potential.parallel.domain import Domain, DomainModel, request_halo_plan, slab_domain
from janus_potential.parallel.halo import HaloPlan
from janus_potential.parallel.mesh import init_distributed, local_rank


@dataclass
class SlabNeighbors:
    """This rank's slab with its cutoff + skin edges, valid until the next rebuild."""

    domain: Domain
    plan: HaloPlan
    offsets: torch.Tensor  # [E, 3] edge_shift . cell (Angstrom), float64
    cell: np.ndarray
    pbc: np.ndarray
    n_atoms: int
    owned_numbers: np.ndarray
    owned_positions: np.ndarray  # owned atoms' positions at the build
    gathered_atoms: torch.Tensor  # [N] atom of each valid row of the all-gather, rank by rank
    gathered_valid: torch.Tensor  # [ranks * max_owned] rows of the all-gather that hold an atom
    max_owned: int


class ParallelJanusCalculator(Calculator):
    """Energy, forces, stress and per-atom energies of a fully periodic structure, split
    spatially over the ranks of `group` (default: every launched rank).

    `model`: what `JanusCalculator` takes, or an already loaded `InferenceModel`.
    `skin`: neighbour-list skin (Angstrom). `statistics()`: evaluations, rebuilds, and the
    bytes sent and seconds spent by this rank in rebuilds, halo exchanges and the all-gather."""

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]

    def __init__(self, model: Any, skin: float = 1.0, group: Optional[dist.ProcessGroup] = None,
                 device: str = "auto", **kwargs: Any) -> None:
        """`device`: "auto" (CUDA when visible), "cpu", "cuda" or "cuda:N"; each rank takes the
        GPU of its node-local rank (several ranks may share one). Slabs and neighbour lists
        are built on the CPU; the model, its halo exchanges (NCCL, or through host memory)
        and the edge vectors of each step live on the device; the owned rows come back to
        the CPU for the all-gather."""
        super().__init__(**kwargs)
        self.device = rank_device(device, local_rank())
        loaded = model if isinstance(model, InferenceModel) else load_for_inference(model)
        self.module, self.cutoff, self.supported_elements, self.dtype = (on_device(loaded.module, self.device), loaded.cutoff,
                                                                         loaded.elements, loaded.dtype)
        self.skin = float(skin)
        init_distributed(device=self.device)
        self.distributed = group is not None or (dist.is_initialized() and dist.get_world_size() > 1)
        self.group = group  # None: every launched rank (or one process)
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.n_ranks = dist.get_world_size(group) if self.distributed else 1
        self._neighbors: Optional[SlabNeighbors] = None
        self._counters: Dict[str, float] = {"evaluations": 0, "builds": 0, "build_s": 0.0, "halo_bytes": 0,
                                            "halo_s": 0.0, "gather_bytes": 0, "gather_s": 0.0}

    # ----------------------------------------------------------------- neighbour list
    def _must_rebuild(self, atoms, positions: np.ndarray) -> bool:
        """True on every rank if any rank's owned atoms moved more than half the skin since
        the build, or the structure changed (one all-reduced flag)."""
        cached = self._neighbors
        stale = (
            cached is None
            or len(atoms) != cached.n_atoms
            or not np.array_equal(np.asarray(atoms.get_pbc(), dtype=bool), cached.pbc)
            or not np.array_equal(np.asarray(atoms.get_cell(), dtype=np.float64), cached.cell)
        )
        if not stale:
            owned = cached.domain.owned.numpy()
            moved = np.linalg.norm(positions[owned] - cached.owned_positions, axis=1)
            stale = (not np.array_equal(atoms.numbers[owned], cached.owned_numbers)
                     or not np.max(moved, initial=0.0) < 0.5 * self.skin)  # NaN positions: stale
        flag = torch.tensor([1.0 if stale else 0.0])
        if self.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag[0] > 0)

    def _build(self, atoms, positions: np.ndarray) -> SlabNeighbors:
        start = time.perf_counter()
        check_structure(atoms, self.supported_elements)
        if self._neighbors is not None:  # the old plan's halo counters
            self._counters["halo_bytes"] += self._neighbors.plan.bytes_sent[0]
            self._counters["halo_s"] += self._neighbors.plan.seconds[0]
        cell = np.asarray(atoms.get_cell(), dtype=np.float64)
        domain = slab_domain(positions, cell, atoms.numbers, self.n_ranks, self.rank, self.cutoff + self.skin)
        plan = request_halo_plan(domain, self.group)
        counts = torch.tensor([domain.n_owned])
        ids = domain.owned
        if self.distributed:
            all_counts = [torch.zeros_like(counts) for _ in range(self.n_ranks)]
            dist.all_gather(all_counts, counts, group=self.group)
            max_owned = int(max(int(c) for c in all_counts))
            padded = torch.full((max_owned,), -1, dtype=torch.long)
            padded[: domain.n_owned] = ids
            parts = [torch.empty_like(padded) for _ in range(self.n_ranks)]
            dist.all_gather(parts, padded, group=self.group)
            ids = torch.cat(parts)
        else:
            max_owned = domain.n_owned
        valid = ids >= 0
        self._neighbors = SlabNeighbors(
            domain=domain, plan=plan, offsets=domain.edge_shift.to(torch.float64) @ torch.as_tensor(cell),
            cell=cell.copy(), pbc=np.asarray(atoms.get_pbc(), dtype=bool).copy(), n_atoms=len(atoms),
            owned_numbers=atoms.numbers[domain.owned.numpy()].copy(),
            owned_positions=positions[domain.owned.numpy()].copy(),
            gathered_atoms=ids[valid], gathered_valid=valid, max_owned=max_owned,
        )
        self._counters["builds"] += 1
        self._counters["build_s"] += time.perf_counter() - start
        return self._neighbors

    # ----------------------------------------------------------------- collectives
    def _check_overlaps(self, domain: Domain, distances: torch.Tensor) -> None:
        """`check_overlaps` over all ranks: every rank raises the same error."""
        local_min = float(distances.min()) if distances.numel() else float("inf")
        closest = torch.tensor([local_min], dtype=torch.float64)
        if self.distributed:
            dist.all_reduce(closest, op=dist.ReduceOp.MIN, group=self.group)
        if float(closest[0]) >= MIN_DISTANCE:
            return
        pair = torch.tensor([local_min, -1.0, -1.0], dtype=torch.float64)
        if local_min < MIN_DISTANCE:
            k = int(torch.argmin(distances))
            pair[1:] = domain.atom[domain.edge_index[:, k]].to(torch.float64)
        pairs = [pair]
        if self.distributed:
            pairs = [torch.empty_like(pair) for _ in range(self.n_ranks)]
            dist.all_gather(pairs, pair, group=self.group)
        worst = min(pairs, key=lambda p: float(p[0]))
        check_overlaps(np.array([int(worst[1])]), np.array([int(worst[2])]), np.array([float(worst[0])]))

    def _gather(self, neighbors: SlabNeighbors, owned_rows: torch.Tensor) -> np.ndarray:
        """Rows of the owned atoms of every rank -> [N, columns] in atom order, on every rank."""
        start = time.perf_counter()
        if not self.distributed:
            rows = owned_rows
        else:
            padded = owned_rows.new_zeros((neighbors.max_owned, owned_rows.shape[1]))
            padded[: owned_rows.shape[0]] = owned_rows
            parts = [torch.empty_like(padded) for _ in range(self.n_ranks)]
            dist.all_gather(parts, padded, group=self.group)
            rows = torch.cat(parts)[neighbors.gathered_valid]
            self._counters["gather_bytes"] += (self.n_ranks - 1) * padded.numel() * padded.element_size()
        full = np.empty((neighbors.n_atoms, owned_rows.shape[1]), dtype=np.float64)
        full[neighbors.gathered_atoms.numpy()] = rows.numpy()
        self._counters["gather_s"] += time.perf_counter() - start
        return full

    # ----------------------------------------------------------------- evaluation
    def compute(self, atoms) -> Dict[str, Any]:
        """Energy, free energy, forces, per-atom energies and stress (Voigt) of `atoms`, the
        same on every rank. Collective: every rank of the group calls it with the same atoms."""
        if not np.all(atoms.get_pbc()):
            raise JanusInputError("the parallel calculator needs a fully periodic structure")
        positions = np.asarray(atoms.positions, dtype=np.float64)
        neighbors = self._neighbors
        if self._must_rebuild(atoms, positions):
            neighbors = self._build(atoms, positions)
        domain = neighbors.domain
        local_positions = torch.as_tensor(positions).index_select(0, domain.atom)
        vectors = edge_vectors(local_positions, domain.edge_index, neighbors.offsets)
        distances = torch.linalg.norm(vectors, dim=1)
        self._check_overlaps(domain, distances)
        within = distances < self.cutoff
        step_domain = replace(domain, edge_index=domain.edge_index[:, within], edge_shift=domain.edge_shift[within])
        volume = torch.tensor(abs(np.linalg.det(neighbors.cell)), dtype=torch.float64)
        # as in JanusCalculator: run an exported graph as written (no profiling executor)
        with torch.enable_grad(), torch.jit.optimized_execution(False):
            out = DomainModel(self.module, step_domain, neighbors.plan, self.group).outputs(
                vectors[within].to(device=self.device, dtype=self.dtype), volume)
        out = {key: value.detach().cpu() for key, value in out.items()}
        owned_rows = torch.cat([out["forces"].to(torch.float64),
                                out["atom_energies"].to(torch.float64).unsqueeze(1)], dim=1)
        full = self._gather(neighbors, owned_rows)
        self._counters["evaluations"] += 1
        energy = float(out["energy"].detach())
        stress = out["stress"].detach().to(torch.float64).numpy()
        return {"energy": energy, "free_energy": energy, "forces": np.ascontiguousarray(full[:, :3]),
                "energies": np.ascontiguousarray(full[:, 3]),
                "stress": full_3x3_to_voigt_6_stress(stress)}

    def statistics(self) -> Dict[str, float]:
        """This rank's counters since construction, and the size of its current slab."""
        totals = dict(self._counters)
        if self._neighbors is not None:
            domain, plan = self._neighbors.domain, self._neighbors.plan
            totals["halo_bytes"] += plan.bytes_sent[0]
            totals["halo_s"] += plan.seconds[0]
            totals.update(owned=domain.n_owned, ghosts=domain.n_local - domain.n_owned,
                          skin_edges=int(domain.edge_index.shape[1]),
                          off_rank_ghosts=sum(plan.recv_counts) - plan.recv_counts[plan.rank])
        return totals

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        self.results.update(self.compute(self.atoms))
