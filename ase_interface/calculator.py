"""`JanusCalculator`: the ASE front end of a Janus model.

Takes an exported TorchScript file (`janus export`), a compiled AOTInductor package
(`janus export --format aoti`, `.pt2`, on the CPU: janus_potential.aoti), a model or training checkpoint
(EMA weights), or a `JanusPotential` instance (`janus_potential.io.load_for_inference`). The neighbour list is built with `cutoff + skin` and reused
until an atom has moved more than half the skin (or the cell, the elements or the periodic
flags change), so an MD step costs one model evaluation and no neighbour search; edges
beyond the cutoff are masked out at every step. Input checks (unknown elements, NaN/inf
positions, overlapping atoms, a zero-volume periodic cell) raise `JanusInputError`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from janus_potential.aoti import PackagedPotential
from janus_potential.devices import keep_freed_memory, on_device, rank_device, resolve_device
from janus_potential.parallel.mesh import local_rank
from janus_potential.precision import apply_precision
from janus_potential.errors import JanusInputError
from janus_potential.graph import MIN_DISTANCE, check_overlaps, check_structure, neighbor_pairs
from janus_potential.io import load_for_inference
from janus_potential.model import edge_vectors, evaluate

from .parallel import ParallelJanusCalculator


class JanusCalculator(Calculator):
    """ASE calculator for energy, free_energy, forces, stress (Voigt, ASE sign) and energies."""

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]

    def __init__(self, model: Any, skin: float = 1.0, parallel: bool = False, device: str = "auto",
                 precision: str = "float32", **kwargs: Any) -> None:
        """`model`: exported file, model or training checkpoint, or a JanusPotential. `skin`: neighbour-list skin
        (A). `parallel=True`: under mpirun, split the structure over all ranks with the
        domain (halo) backend of the trainer (`ParallelJanusCalculator`: each rank builds and
        evaluates only its own slab); every rank gets the full results. `device`: "auto"
        (CUDA when visible), "cpu", "cuda" or "cuda:N" (`janus_potential.devices`); the
        neighbour list is built on the CPU and moved once per evaluation. With
        `parallel=True` each rank takes the GPU of its node-local rank. `precision`: "float32"
        (the model's dtype), "tf32" or "bf16" (`janus_potential.precision`)."""
        super().__init__(**kwargs)
        keep_freed_memory()  # large temporaries reuse heap pages (janus_potential.devices)
        self.device = resolve_device(device) if not parallel else rank_device(device, local_rank())
        loaded = load_for_inference(model)
        if isinstance(loaded.module, PackagedPotential) and (self.device.type != "cpu" or precision != "float32"):
            raise JanusInputError("a compiled package (.pt2) runs on the CPU in its own precision: "
                                  "use the TorchScript export for a GPU or another precision")
        loaded.module = on_device(loaded.module, self.device)
        if precision != "float32":
            if loaded.module is model:  # never change the caller's model behind its back
                import copy

                loaded.module = copy.deepcopy(loaded.module)
            apply_precision(loaded.module, precision)
        self.module, self.cutoff, self.supported_elements, self.dtype = (loaded.module, loaded.cutoff,
                                                                         loaded.elements, loaded.dtype)
        self.skin = float(skin)
        self._neighbors: dict[str, Any] | None = None
        self._parallel = ParallelJanusCalculator(loaded, skin=self.skin, device=str(self.device)) if parallel else None

    # ----------------------------------------------------------------- neighbour list
    def _neighbor_list(self, atoms) -> dict[str, Any]:
        positions = np.asarray(atoms.get_positions(), dtype=np.float64)
        cell = np.asarray(atoms.get_cell(), dtype=np.float64)
        pbc = np.asarray(atoms.get_pbc(), dtype=bool)
        numbers = np.asarray(atoms.get_atomic_numbers())
        cached = self._neighbors
        if (
            cached is not None
            and cached["numbers"].shape == numbers.shape
            and np.array_equal(cached["numbers"], numbers)
            and np.array_equal(cached["pbc"], pbc)
            and np.array_equal(cached["cell"], cell)
            and np.max(np.linalg.norm(positions - cached["positions"], axis=1)) < 0.5 * self.skin
        ):
            return cached
        check_structure(atoms, self.supported_elements)
        i, j, shifts, _ = neighbor_pairs(positions, cell, pbc, self.cutoff + self.skin)
        self._neighbors = {
            "numbers": numbers.copy(), "pbc": pbc.copy(), "cell": cell.copy(), "positions": positions.copy(),
            "edge_index": torch.as_tensor(np.stack([i, j])),
            "offsets": torch.as_tensor(shifts.astype(np.float64) @ cell),
            "species": torch.as_tensor(numbers, dtype=torch.long),
        }
        return self._neighbors

    # ----------------------------------------------------------------- evaluation
    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        if self._parallel is not None:
            self.results.update(self._parallel.compute(self.atoms))
            return
        atoms = self.atoms
        positions = np.asarray(atoms.get_positions(), dtype=np.float64)
        if not np.isfinite(positions).all():
            bad = np.nonzero(~np.isfinite(positions).all(axis=1))[0]
            raise JanusInputError(f"positions contain NaN or infinite values (atoms {bad[:10].tolist()})")
        neighbors = self._neighbor_list(atoms)
        positions_t = torch.as_tensor(positions)
        pairs = neighbors["edge_index"]
        vectors = edge_vectors(positions_t, pairs, neighbors["offsets"])
        distances = torch.linalg.norm(vectors, dim=1)
        within = distances < self.cutoff
        if distances.numel() and float(distances.min()) < MIN_DISTANCE:
            check_overlaps(pairs[0].numpy(), pairs[1].numpy(), distances.numpy())
        edge_index = pairs[:, within]
        n = len(atoms)
        periodic = bool(np.all(atoms.get_pbc()))
        volume = torch.tensor([atoms.get_volume()]) if periodic else None
        # The TorchScript profiling executor's optimised graphs keep more memory per atom and
        # ran no faster here (docs/benchmarks.md): run the exported graph as written.
        device = self.device
        with torch.enable_grad(), torch.jit.optimized_execution(False):
            out = evaluate(self.module, neighbors["species"].to(device), edge_index.to(device),
                           vectors[within].to(device=device, dtype=self.dtype),
                           torch.zeros(n, dtype=torch.long, device=device), 1, True, periodic, False,
                           volume.to(device) if volume is not None else None)
        out = {key: value.detach().cpu() for key, value in out.items()}
        energy = float(out["energy"][0].detach())
        self.results["energy"] = energy
        self.results["free_energy"] = energy
        self.results["energies"] = out["atom_energies"].detach().to(torch.float64).numpy()
        self.results["forces"] = out["forces"].detach().to(torch.float64).numpy()
        if periodic:
            stress = out["stress"][0].detach().to(torch.float64).numpy()
            self.results["stress"] = full_3x3_to_voigt_6_stress(stress)
