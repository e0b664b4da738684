"""Data statistics the model starts from: per-element reference energies and the force scale.

Both come from per-frame numbers written by `janus pack` (the composition, the energy, the
sum of absolute force components), so they cost no pass over the frames however large the
training set.
"""

from __future__ import annotations

import numpy as np
import torch

from janus_potential.elements import MAX_ATOMIC_NUMBER

from .pack import Composition

CHUNK_FRAMES = 1 << 14  # rows of the dense design matrix built at a time


def _normal_equations(composition: Composition, columns: np.ndarray, fraction: np.ndarray, weights: np.ndarray,
                      target: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(D^T W D, D^T W t) of the design D (composition fractions), built in row chunks."""
    gram, rhs = np.zeros((width, width)), np.zeros(width)
    for first in range(0, composition.num_frames, CHUNK_FRAMES):
        last = min(first + CHUNK_FRAMES, composition.num_frames)
        begin, end = composition.offset[first], composition.offset[last]
        rows = np.repeat(np.arange(last - first), np.diff(composition.offset[first: last + 1]))
        design = np.zeros((last - first, width))
        design[rows, columns[begin:end]] = fraction[begin:end]
        weighted = design * weights[first:last, None]
        gram += weighted.T @ design
        rhs += weighted.T @ target[first:last]
    return gram, rhs


def fit_reference_energies(composition: Composition, energy: np.ndarray, huber_delta: float = 0.1,
                           iterations: int = 20) -> torch.Tensor:
    """Per-element energies: a robust least-squares fit of energy per atom on composition,
    over the frames of `composition` (all with an energy label, `energy[k]` for frame k).

    Rows are per atom (so large cells do not dominate) and reweighted as in a Huber fit
    (iteratively reweighted least squares), so that a few very high-energy structures (high
    pressure/temperature data) do not shift every element's reference. An exact composition
    model is recovered exactly. The least-squares problem is solved through its normal
    equations, accumulated in chunks of frames: memory does not grow with the data.
    """
    reference = np.zeros(MAX_ATOMIC_NUMBER + 1)
    if composition.num_frames == 0:
        return torch.as_tensor(reference)
    present = np.unique(composition.element)
    columns = np.searchsorted(present, composition.element)
    frame_of_entry = np.repeat(np.arange(composition.num_frames), np.diff(composition.offset))
    n_atoms = np.bincount(frame_of_entry, weights=composition.count, minlength=composition.num_frames)
    fraction = composition.count / n_atoms[frame_of_entry]
    target = np.asarray(energy, dtype=np.float64) / n_atoms
    weights = np.ones(composition.num_frames)
    for _ in range(iterations):
        gram, rhs = _normal_equations(composition, columns, fraction, weights, target, len(present))
        solution, *_ = np.linalg.lstsq(gram, rhs, rcond=None)
        predicted = np.bincount(frame_of_entry, weights=fraction * solution[columns], minlength=composition.num_frames)
        residual = np.abs(target - predicted)
        updated = np.where(residual < huber_delta, 1.0, huber_delta / np.maximum(residual, 1e-12))
        if np.array_equal(updated, weights):
            break  # the next solve would repeat this one
        weights = updated
    reference[present] = solution
    return torch.as_tensor(reference)


def force_scale(force_abs_sum: np.ndarray, force_atoms: np.ndarray) -> float:
    """Mean absolute force component over labelled atoms (per-frame sums of absolute
    components and atom counts of the frames with forces): the scale of the learned
    per-atom energy. The mean absolute value, not the RMS, so that a few structures with
    forces of tens of eV/A (high pressure data) do not inflate the scale for everything
    else."""
    components = 3 * int(np.sum(force_atoms))
    if not components:
        return 1.0
    return max(float(np.sum(force_abs_sum) / components), 1e-3)
