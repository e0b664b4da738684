"""`janus eval`: errors of a model (exported file or checkpoint) on labelled data files."""

from __future__ import annotations

import sys
from typing import Any, Dict, Sequence

import numpy as np
import torch

from janus_potential.elements import number_to_symbol
from janus_potential.errors import JanusInputError
from janus_potential.io import is_torchscript_file, load_for_inference, load_model
from janus_potential.model import evaluate as evaluate_model

from .data import FrameSamples, atom_budget_batches, collate
from .loader import sample_loader, worker_count
from .loss import ErrorMetrics
from .pack import PackedFrames, open_dataset


def covered_frames(frames: PackedFrames, elements: Sequence[int], skip: bool) -> tuple[np.ndarray, int]:
    """The frames (indices) whose elements the model covers, read from the packs'
    compositions; frames with other elements are an error naming them, or skipped and
    counted when `skip` is true."""
    covered = np.asarray(sorted(int(z) for z in elements), dtype=np.int64)
    composition = frames.composition()
    outside = ~np.isin(composition.element, covered)
    entries_outside = np.concatenate([[0], np.cumsum(outside)])
    kept = np.nonzero(entries_outside[composition.offset[1:]] == entries_outside[composition.offset[:-1]])[0]
    skipped = len(frames) - len(kept)
    if skipped and not skip:
        names = ", ".join(number_to_symbol(int(z)) for z in np.unique(composition.element[outside]))
        raise JanusInputError(f"{skipped} of {len(frames)} structures contain element(s) the model "
                              f"does not cover: {names} (the model covers "
                              f"{', '.join(number_to_symbol(int(z)) for z in covered)}); "
                              "pass --skip-unsupported to leave them out")
    return kept, skipped


def evaluate(model_path: str, data: Sequence[str], max_atoms_per_batch: int = 512, progress: bool = False,
             cache_dir: str | None = None, group_by: str = "source", skip_unsupported: bool = False,
             num_workers: int = 2, head: str | None = None) -> Dict[str, Any]:
    """Errors of the model per group, streaming the data (packed folders or plain files,
    packed on the way); with `skip_unsupported`, frames with elements the model does not
    cover are left out and counted under `skipped_frames` of the "all" group. `head`: the
    output head of a multi-head checkpoint to evaluate (default: its first)."""
    if head is not None:
        if is_torchscript_file(model_path):
            raise JanusInputError(f"--head {head}: {model_path!r} is an exported file, which holds one head")
        model = load_for_inference(load_model(model_path).select_head(head))
    else:
        model = load_for_inference(model_path)
    frames = open_dataset(list(data), cache_dir, progress, stream=sys.stderr)
    kept, skipped = covered_frames(frames, model.elements, skip_unsupported)
    samples = FrameSamples(frames, kept, model.cutoff, model.dtype)
    batches = atom_budget_batches(samples.sizes, max_atoms_per_batch, 0, 0, shuffle=False)
    metrics = ErrorMetrics(group_by)
    for batch_samples in sample_loader(samples, batches, min(worker_count(num_workers), len(batches)), 2):
        batch = collate(batch_samples)
        with torch.enable_grad():
            compute_virial = bool(batch.has_stress.any())
            graph = batch.graph
            prediction = evaluate_model(model.module, graph.species, graph.edge_index, graph.edge_vectors(),
                                        graph.batch, graph.num_graphs, True, compute_virial, False,
                                        graph.volumes() if compute_virial else None)
        metrics.update(prediction, batch)
    summary = metrics.summary()
    if skipped:
        summary.setdefault("all", {})["skipped_frames"] = skipped
    return summary


def _error_columns(errors: Dict[str, float] | None, scale: float, widths: tuple[int, int], digits: int) -> str:
    """The MAE and RMSE columns of one quantity, `-` where the group has no such labels."""
    if not errors:
        return f"{'-':>{widths[0]}} {'-':>{widths[1]}}"
    return f"{scale * errors['mae']:{widths[0]}.{digits}f} {scale * errors['rmse']:{widths[1]}.{digits}f}"


def _mae_column(errors: Dict[str, float] | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if not errors else f"{errors['mae']:{width}.{digits}f}"


def format_table(summary: Dict[str, Any]) -> str:
    """Errors per group; `F=0 MAE` is the force MAE of predicting zero forces on the same
    frames (a model must beat it)."""
    lines = [f"{'source':<28} {'E MAE meV/at':>13} {'E RMSE':>9} {'F MAE eV/A':>11} {'F RMSE':>9} "
             f"{'F=0 MAE':>8} {'S MAE GPa':>10} {'S RMSE':>9} {'frames':>7}"]
    for source, keys in summary.items():
        lines.append(
            f"{source:<28} {_error_columns(keys.get('energy_per_atom'), 1000, (13, 9), 1)} "
            f"{_error_columns(keys.get('forces'), 1, (11, 9), 4)} {_mae_column(keys.get('forces_zero'), 8, 4)} "
            f"{_error_columns(keys.get('stress_gpa'), 1, (10, 9), 3)} {keys.get('frames', 0):7d}"
        )
    return "\n".join(lines)
