"""Energy/force/stress losses and error metrics.

The force and stress predictions are derivatives of the energy, so the loss on them needs
`create_graph=True`: the parameter gradient flows through the force computation (a
second-order derivative). Missing labels are masked per frame (energy, stress) or per atom
(forces); per-frame weights multiply every term of that frame.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict

import torch
from torch.nn import functional as F

from .config import LossConfig
from .data import Batch

EV_PER_A3_TO_GPA = 160.21766208


def penalty(error: torch.Tensor, config: LossConfig, delta: float = 0.0) -> torch.Tensor:
    """MSE or Huber of `error`; `delta` (0: `config.huber_delta`) is the Huber threshold."""
    if config.kind == "mse":
        return error * error
    if config.kind == "huber":
        return F.huber_loss(error, torch.zeros_like(error), reduction="none", delta=delta or config.huber_delta)
    raise ValueError(f"unknown loss kind {config.kind!r} (use 'mse' or 'huber')")


def force_error_scale(batch: Batch, config: LossConfig) -> torch.Tensor | None:
    """Per-frame factor on the force errors with `forces_normalization: frame`:
    floor / (RMS of the frame's force labels + floor) -- 1 for a relaxed frame, ~floor/RMS for
    a hot one (None: no normalisation). The RMS is taken over the whole frame at collate time,
    so a domain-decomposed evaluation uses the same factor as one process."""
    if config.forces_normalization == "none":
        return None
    floor = config.forces_scale_floor
    return floor / (batch.force_rms + floor)


def predict(model, batch: Batch, create_graph: bool) -> Dict[str, torch.Tensor]:
    return model.compute(batch.graph, compute_virial=bool(batch.has_stress.any()), create_graph=create_graph,
                         head=batch.head)


def _masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    total = weights.sum()
    return (values * weights).sum() / total.clamp(min=1e-12)


def loss_terms(prediction: Dict[str, torch.Tensor], batch: Batch, config: LossConfig) -> Dict[str, torch.Tensor]:
    """Per-term losses (energy per atom, forces, stress in GPa) and their weighted sum."""
    dtype = prediction["forces"].dtype
    n_atoms = batch.graph.num_atoms.to(torch.float64)
    frame_weight = batch.weight.to(dtype)

    energy_error = prediction["energy"] - torch.nan_to_num(batch.energy)
    if config.energy_per == "atom":
        energy_error = energy_error / n_atoms
    energy_error = energy_error.to(dtype)
    energy_error = torch.where(batch.has_energy, energy_error, torch.zeros_like(energy_error))
    energy = _masked_mean(penalty(energy_error, config, config.energy_huber_delta), frame_weight * batch.has_energy)

    atom_weight = frame_weight[batch.graph.batch] * batch.has_forces
    force_error = prediction["forces"] - torch.nan_to_num(batch.forces)
    force_error = torch.where(batch.has_forces.unsqueeze(-1), force_error, torch.zeros_like(force_error))
    scale = force_error_scale(batch, config)
    if scale is not None:
        force_error = force_error * scale.to(dtype)[batch.graph.batch].unsqueeze(-1)
    forces = _masked_mean(penalty(force_error, config, config.forces_huber_delta).mean(dim=1), atom_weight)

    terms = {"energy": energy, "forces": forces}
    total = config.energy_weight * energy + config.forces_weight * forces
    if "stress" in prediction:
        stress_error = (prediction["stress"] - torch.nan_to_num(batch.stress)) * EV_PER_A3_TO_GPA
        stress_error = torch.where(batch.has_stress.view(-1, 1, 1), stress_error, torch.zeros_like(stress_error))
        stress = _masked_mean(penalty(stress_error, config, config.stress_huber_delta).mean(dim=(1, 2)), frame_weight * batch.has_stress)
        terms["stress"] = stress
        total = total + config.stress_weight * stress
    terms["total"] = total
    return terms


class ErrorMetrics:
    """MAE and RMSE of energy per atom (eV/atom), forces (eV/A) and stress (GPa), overall and
    per group: the frames' `source` (group_by="source") or their data file (group_by="file").
    A quantity with no labels in a group has no entry (never an average over zero labels);
    `frames` counts every frame of the group, labelled or not. `forces_zero` is the error of
    predicting zero forces on the same atoms: the baseline a force error must beat."""

    def __init__(self, group_by: str = "source") -> None:
        if group_by not in ("source", "file"):
            raise ValueError("group_by must be 'source' or 'file'")
        self.group_by = group_by
        self.sums: Dict[str, Dict[str, list]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0, 0]))

    def _add(self, source: str, key: str, errors: torch.Tensor) -> None:
        errors = errors.detach().to(torch.float64).reshape(-1)
        if errors.numel() == 0:
            return
        for name in (source, "all"):
            entry = self.sums[name][key]
            entry[0] += float(errors.abs().sum())
            entry[1] += float((errors * errors).sum())
            entry[2] += errors.numel()

    def update(self, prediction: Dict[str, torch.Tensor], batch: Batch,
               reference_energies: torch.Tensor | None = None) -> None:
        """Add a batch. With `reference_energies` ([Z] eV, the per-element fit the model
        starts from), `energy_reference_per_atom` records the error of that fit alone: the
        baseline an energy error must beat."""
        n_atoms = batch.graph.num_atoms.to(torch.float64)
        energy_error = (prediction["energy"].detach() - batch.energy) / n_atoms
        reference_error = None
        if reference_energies is not None:
            fitted = torch.zeros_like(batch.energy).index_add_(
                0, batch.graph.batch, reference_energies.detach().to(torch.float64).cpu()[batch.graph.species])
            reference_error = (fitted - batch.energy) / n_atoms
        atom_graph = batch.graph.batch
        groups = batch.sources if self.group_by == "source" else batch.files
        for g, source in enumerate(groups):
            for name in (source, "all"):
                self.sums[name]["frames"][2] += 1
            if batch.has_energy[g]:
                self._add(source, "energy_per_atom", energy_error[g : g + 1])
                if reference_error is not None:
                    self._add(source, "energy_reference_per_atom", reference_error[g : g + 1])
            atoms = (atom_graph == g) & batch.has_forces
            if atoms.any():
                self._add(source, "forces", prediction["forces"].detach()[atoms] - batch.forces[atoms])
                # the baseline every force error should beat: predicting zero forces
                self._add(source, "forces_zero", batch.forces[atoms])
            if batch.has_stress[g] and "stress" in prediction:
                self._add(source, "stress_gpa", (prediction["stress"].detach()[g] - batch.stress[g]) * EV_PER_A3_TO_GPA)
                self._add(source, "stress_zero_gpa", batch.stress[g] * EV_PER_A3_TO_GPA)

    def plain_sums(self) -> Dict[str, Dict[str, list]]:
        """The running sums as plain dicts (picklable, e.g. to gather them over ranks)."""
        return {group: {key: list(entry) for key, entry in keys.items()} for group, keys in self.sums.items()}

    def add_sums(self, sums: Dict[str, Dict[str, list]]) -> None:
        """Add another instance's `plain_sums()` (the union of the two data sets)."""
        for group, keys in sums.items():
            for key, values in keys.items():
                entry = self.sums[group][key]
                for k, value in enumerate(values):
                    entry[k] += value

    def summary(self) -> Dict[str, Dict[str, Any]]:
        """{group: {quantity: {mae, rmse, count}, "frames": n}} for the labelled quantities."""
        out: Dict[str, Dict[str, Any]] = {}
        for source, keys in sorted(self.sums.items()):
            out[source] = {
                key: {"mae": s[0] / s[2], "rmse": (s[1] / s[2]) ** 0.5, "count": s[2]}
                for key, s in keys.items() if key != "frames" and s[2] > 0
            }
            out[source]["frames"] = int(keys["frames"][2])
        return out
