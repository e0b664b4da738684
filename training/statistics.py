"""Data statistics the model starts from: per-element reference energies and the force scale.

Both come from per-frame numbers written by `janus pack` (the composition, the energy, the
sum of absolute force components), so they cost no pass over the frames however large the
training set.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from janus_potential.elements import MAX_ATOMIC_NUMBER

from .pack import Composition

CHUNK_FRAMES = 1 << 14  # frames whose rows of the design matrix are built at a time


def _designs(composition: Composition, present: np.ndarray) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """(frames, design, atoms) per chunk of frames: the rows of the design matrix (the
    fraction of each element of `present` in each frame) and the frames' atom counts."""
    for first in range(0, composition.num_frames, CHUNK_FRAMES):
        last = min(first + CHUNK_FRAMES, composition.num_frames)
        begin, end = composition.offset[first], composition.offset[last]
        rows = np.repeat(np.arange(last - first), np.diff(composition.offset[first: last + 1]))
        counts = composition.count[begin:end]
        atoms = np.bincount(rows, weights=counts, minlength=last - first)
        design = np.zeros((last - first, len(present)))
        design[rows, np.searchsorted(present, composition.element[begin:end])] = counts / atoms[rows]
        yield slice(first, last), design, atoms


def fit_reference_energies(composition: Composition, energy: np.ndarray, huber_delta: float = 0.1,
                           iterations: int = 20) -> torch.Tensor:
    """Per-element energies: a robust least-squares fit of energy per atom on composition,
    over the frames of `composition` (all with an energy label, `energy[k]` for frame k).

    Rows are per atom (so large cells do not dominate) and reweighted as in a Huber fit
    (iteratively reweighted least squares), so that a few very high-energy structures (high
    pressure/temperature data) do not shift every element's reference. An exact composition
    model is recovered exactly. The least-squares problem is solved through its normal
    equations, accumulated over chunks of frames, so that memory holds two numbers per
    frame (target and weight) besides the composition, whatever the number of frames.
    """
    reference = np.zeros(MAX_ATOMIC_NUMBER + 1)
    if composition.num_frames == 0:
        return torch.as_tensor(reference)
    present = np.unique(composition.element)
    target = np.empty(composition.num_frames)  # energy per atom
    weights = np.ones(composition.num_frames)
    gram, rhs = np.zeros((len(present), len(present))), np.zeros(len(present))
    for frames, design, atoms in _designs(composition, present):
        target[frames] = energy[frames] / atoms
        gram += design.T @ design
        rhs += design.T @ target[frames]
    for _ in range(iterations):
        solution, *_ = np.linalg.lstsq(gram, rhs, rcond=None)
        # one pass: this solution's residuals give the next weights and their normal equations
        updated = np.empty_like(weights)
        gram, rhs = np.zeros_like(gram), np.zeros_like(rhs)
        for frames, design, _ in _designs(composition, present):
            residual = np.abs(target[frames] - design @ solution)
            updated[frames] = np.where(residual < huber_delta, 1.0, huber_delta / np.maximum(residual, 1e-12))
            weighted = design * updated[frames, None]
            gram += weighted.T @ design
            rhs += weighted.T @ target[frames]
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
