"""`janus eval`: errors of a model (exported file or checkpoint) on labelled data files."""

from __future__ import annotations

from typing import Any, Dict, Sequence

import torch

from janus_potential.export import DTYPES, is_exported_file, load_exported

from .checkpoint import load_model_for_export
from .data import atom_budget_batches, collate, load_dataset
from .loss import ErrorMetrics


class _ExportedModel:
    """Gives an exported TorchScript module the `compute(graph)` of JanusPotential."""

    def __init__(self, module) -> None:
        self.module = module

    def compute(self, graph, compute_virial: bool = True, create_graph: bool = False) -> Dict[str, torch.Tensor]:
        result = self.module(graph.species, graph.edge_index, graph.edge_vectors(), graph.batch, graph.num_graphs,
                             True, compute_virial, create_graph)
        if compute_virial:
            result["stress"] = -result["virial"] / graph.volumes().to(result["virial"].dtype).view(-1, 1, 1)
        return result


def load_for_evaluation(path: str):
    """(model with .compute, cutoff, dtype) from an exported file or any checkpoint."""
    if is_exported_file(path):
        module, metadata = load_exported(path)
        return _ExportedModel(module), float(metadata["cutoff"]), DTYPES[metadata["dtype"]]
    model = load_model_for_export(path).eval()
    return model, model.cutoff, model.embedding.weight.dtype


def evaluate(model_path: str, data: Sequence[str], max_atoms_per_batch: int = 512, progress: bool = False,
             cache_dir: str | None = None, group_by: str = "source") -> Dict[str, Any]:
    model, cutoff, dtype = load_for_evaluation(model_path)
    samples = load_dataset(list(data), cutoff, cache_dir, dtype, progress=progress)
    metrics = ErrorMetrics(group_by)
    for indices in atom_budget_batches([s.num_atoms for s in samples], max_atoms_per_batch, 0, 0, shuffle=False):
        batch = collate([samples[k] for k in indices])
        with torch.enable_grad():
            prediction = model.compute(batch.graph, compute_virial=bool(batch.has_stress.any()))
        metrics.update(prediction, batch)
    return metrics.summary()


def format_table(summary: Dict[str, Any]) -> str:
    lines = [f"{'source':<28} {'E MAE meV/at':>13} {'E RMSE':>9} {'F MAE eV/A':>11} {'F RMSE':>9} "
             f"{'S MAE GPa':>10} {'S RMSE':>9} {'frames':>7}"]
    for source, keys in summary.items():
        e = keys.get("energy_per_atom", {})
        f = keys.get("forces", {})
        s = keys.get("stress_gpa", {})
        lines.append(
            f"{source:<28} {1000 * e.get('mae', float('nan')):13.1f} {1000 * e.get('rmse', float('nan')):9.1f} "
            f"{f.get('mae', float('nan')):11.4f} {f.get('rmse', float('nan')):9.4f} "
            f"{s.get('mae', float('nan')):10.3f} {s.get('rmse', float('nan')):9.3f} {e.get('count', 0):7d}"
        )
    return "\n".join(lines)
