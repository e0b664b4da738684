"""Batches of samples from DataLoader workers, in a fixed order, prefetched.

The order of batches is given (the trainer's plan: a pure function of seed and epoch,
starting at any batch for an exact resume); workers only build the samples' graphs, so the
result does not depend on their number. `num_workers=0` builds them in the calling process.
"""

from __future__ import annotations

import os
from typing import Iterable, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from .data import FrameSamples, Sample


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_count(requested: int) -> int:
    """`requested` loader workers, but no more than the cores this process may use."""
    return min(requested, available_cores())


def sample_loader(samples: FrameSamples, batches: Iterable[list[int]], num_workers: int,
                  prefetch_factor: int) -> DataLoader:
    """Yields `[samples[k] for k in batch]` for each batch of `batches`, in order, built by
    `num_workers` processes that keep `prefetch_factor` batches each ready ahead."""
    return DataLoader(
        samples, batch_sampler=batches, num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers else None,
        collate_fn=list,  # the step collates (the distributed trainer first splits the samples)
        # its own generator: drawing the workers' base seed must not move the global torch RNG
        # (a resumed run must see the RNG state of the uninterrupted one)
        generator=torch.Generator().manual_seed(0),
    )


class FlaggedSamples(Dataset):
    """`samples` looked up by (frame index, flag) keys: yields (Sample, flag). The trainer's
    plan marks each structure of a rank's share as counted or as padding (see
    `Trainer._planned_batches`)."""

    def __init__(self, samples: FrameSamples) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: Tuple[int, bool]) -> Tuple[Sample, bool]:
        index, flag = key
        return self.samples[index], flag

