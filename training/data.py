"""Training samples from packed frames: graphs built on demand, splitting, batching.

`FrameSamples` is the training or validation set: frame indices into packed data
(`training/pack.py`) and, in memory, only their atom counts. Indexing it builds one
`Sample` (the graph by `build_graph`), so no edge list of the whole dataset ever exists;
DataLoader workers do that work (`training/loader.py`). The split is a pure function of a
seed over frame indices, and the batches of an epoch a pure function of (seed, epoch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np
import torch

from janus_potential.graph import AtomGraph, batch_graphs, build_graph

from .pack import Composition, PackedFrames


@dataclass
class Sample:
    """One structure: its graph and labels (NaN where a label is missing)."""

    graph: AtomGraph
    energy: float
    forces: torch.Tensor  # [N, 3]
    stress: torch.Tensor  # [3, 3], ASE sign, eV/A^3
    has_energy: bool
    has_forces: bool
    has_stress: bool
    weight: float
    source: str  # info["source"] of the frame (the file name when absent)
    file: str  # the data file's name without extension
    replay: bool = False  # a frame of `data.replay` (fine-tuning)
    head: int = 0  # output head (index into the model's output_heads) of its data entry

    @property
    def num_atoms(self) -> int:
        return int(self.graph.positions.shape[0])

    def __reduce__(self) -> tuple:
        """Pickled with numpy arrays in place of tensors: from a DataLoader worker, each tensor
        would otherwise travel through a shared-memory file of its own, which costs the
        training process about 0.3 ms per tensor (ten per sample)."""
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        values["graph"] = {field.name: getattr(self.graph, field.name).numpy()
                           for field in dataclasses.fields(self.graph)}
        values["forces"], values["stress"] = self.forces.numpy(), self.stress.numpy()
        return _unpickle_sample, (values,)


def _unpickle_sample(values: dict[str, Any]) -> Sample:
    graph = AtomGraph(**{name: torch.from_numpy(array) for name, array in values.pop("graph").items()})
    return Sample(graph=graph, forces=torch.from_numpy(values.pop("forces")),
                  stress=torch.from_numpy(values.pop("stress")), **values)


class FrameSamples(Sequence):
    """Samples of the packed frames `indices`, built when indexed (graph within `cutoff`,
    floating point tensors in `dtype`). Stress labels count only for fully periodic frames
    (no stress without a volume)."""

    def __init__(self, frames: PackedFrames, indices: np.ndarray, cutoff: float, dtype: torch.dtype,
                 heads: np.ndarray | None = None) -> None:
        self.frames = frames
        self.heads = heads  # output head of every packed frame (None: head 0)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.cutoff = cutoff
        self.dtype = dtype
        self.sizes = frames.num_atoms()[self.indices]
        self.file_weights: dict[str, float] = {}  # loss weight factor per input file (`balance_files`)

    def __len__(self) -> int:
        return len(self.indices)

    @overload
    def __getitem__(self, position: int) -> Sample: ...

    @overload
    def __getitem__(self, position: slice) -> list[Sample]: ...

    def __getitem__(self, position: Any) -> Any:
        if isinstance(position, slice):
            return [self[k] for k in range(*position.indices(len(self)))]
        if not -len(self) <= position < len(self):
            raise IndexError(f"sample {position} of {len(self)}")
        frame = self.frames.frame(int(self.indices[position]))
        return Sample(
            graph=build_graph(frame.atoms(), self.cutoff, dtype=self.dtype),
            energy=frame.energy,
            forces=torch.as_tensor(frame.forces, dtype=self.dtype),
            stress=torch.as_tensor(frame.stress, dtype=self.dtype),
            has_energy=frame.has_energy, has_forces=frame.has_forces,
            has_stress=frame.has_stress and bool(frame.pbc.all()),
            weight=frame.weight * self.file_weights.get(frame.file, 1.0), source=frame.source, file=frame.file,
            head=int(self.heads[self.indices[position]]) if self.heads is not None else 0,
        )

    def column(self, name: str) -> np.ndarray:
        """A per-frame array of the pack (`training/pack.py`'s ARRAYS) for these frames."""
        return self.frames.column(name)[self.indices]

    def composition(self) -> Composition:
        return self.frames.composition().rows(self.indices)

    def balance_files(self, by: str) -> dict[str, float]:
        """Set loss weight factors that give every input file the same total weight: by frame
        count (`by="frames"`) or atom count (`"atoms"`) over these frames; returns them."""
        files = self.frames.frame_files()[self.indices]
        amounts = self.sizes if by == "atoms" else np.ones(len(files))
        names = sorted(set(files.tolist()))
        totals = {name: float(amounts[files == name].sum()) for name in names}
        self.file_weights = {name: float(amounts.sum()) / (len(names) * total) for name, total in totals.items()}
        return self.file_weights

    def elements(self) -> np.ndarray:
        """The atomic numbers present in these frames."""
        composition = self.frames.composition()
        chosen = np.zeros(composition.num_frames, dtype=bool)
        chosen[self.indices] = True
        return np.unique(composition.element[np.repeat(chosen, np.diff(composition.offset))])


class ReplayedSamples(Sequence):
    """The training samples followed by the replay samples (fine-tuning): index k <
    len(train) is train[k], the rest replay[k - len(train)], marked `replay`."""

    def __init__(self, train: FrameSamples, replay: FrameSamples) -> None:
        self.train, self.replay = train, replay
        self.sizes = np.concatenate([train.sizes, replay.sizes])

    def __len__(self) -> int:
        return len(self.train) + len(self.replay)

    def __getitem__(self, position: Any) -> Any:
        if position < len(self.train):
            return self.train[position]
        return dataclasses.replace(self.replay[position - len(self.train)], replay=True)


def with_replay(batches: Batches, train_count: int, replay_sizes: np.ndarray, replay_atoms: int, seed: int,
                epoch: int) -> Batches:
    """`batches` (of training frames) with replay frames appended to each: at least one and
    up to `replay_atoms` atoms, drawn in a (seed, epoch) permutation of the replay frames
    that wraps around. Replay indices are offset by `train_count` (`ReplayedSamples`)."""
    order = np.random.default_rng([seed, epoch, 1]).permutation(len(replay_sizes))
    position = 0
    merged: list[np.ndarray] = []
    ends = []
    total = 0
    for b in range(len(batches)):
        picked, atoms = [], 0
        while not picked or atoms + replay_sizes[order[position % len(order)]] <= replay_atoms:
            k = order[position % len(order)]
            picked.append(train_count + int(k))
            atoms += int(replay_sizes[k])
            position += 1
            if len(picked) >= len(order):
                break
        batch = np.asarray(batches[b] + picked, dtype=np.int64)
        merged.append(batch)
        total += len(batch)
        ends.append(total)
    return Batches(np.concatenate(merged) if merged else np.zeros(0, dtype=np.int64), np.asarray(ends, dtype=np.int64))


def split_indices(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/validation split of frames 0..count-1 by seed."""
    order = np.random.default_rng(seed).permutation(count)
    n_val = int(round(fraction * count))
    return order[n_val:], order[:n_val]


class Batches(Sequence):
    """Batches of sample indices, compact (8 bytes per sample, not a Python list per
    batch): batch b is `order[ends[b-1]:ends[b]]`."""

    def __init__(self, order: np.ndarray, ends: np.ndarray) -> None:
        self.order = order
        self.ends = ends

    def __len__(self) -> int:
        return len(self.ends)

    @overload
    def __getitem__(self, b: int) -> list[int]: ...

    @overload
    def __getitem__(self, b: slice) -> list[list[int]]: ...

    def __getitem__(self, b: Any) -> Any:
        if isinstance(b, slice):
            return [self[k] for k in range(*b.indices(len(self)))]
        if not -len(self) <= b < len(self):
            raise IndexError(f"batch {b} of {len(self)}")
        b %= len(self)
        start = int(self.ends[b - 1]) if b else 0
        return self.order[start: int(self.ends[b])].tolist()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(
            list(mine) == list(theirs) for mine, theirs in zip(self, other))

    __hash__ = None  # type: ignore[assignment]


def atom_budget_batches(sizes: Sequence[int] | np.ndarray, max_atoms: int, seed: int, epoch: int,
                        shuffle: bool = True) -> Batches:
    """Shuffle (by seed and epoch) and fill each batch up to `max_atoms` atoms; a sample
    larger than that forms its own batch."""
    order = np.random.default_rng([seed, epoch]).permutation(len(sizes)) if shuffle else np.arange(len(sizes))
    totals = np.concatenate([[0], np.cumsum(np.asarray(sizes, dtype=np.int64)[order])])
    ends = []
    start = 0
    while start < len(order):
        # the longest run from `start` within the budget, and at least one sample
        end = max(start + 1, int(np.searchsorted(totals, totals[start] + max_atoms, side="right")) - 1)
        ends.append(end)
        start = end
    return Batches(order, np.array(ends, dtype=np.int64))


@dataclass
class Batch:
    graph: AtomGraph
    energy: torch.Tensor  # [G] float64
    forces: torch.Tensor  # [N, 3]
    stress: torch.Tensor  # [G, 3, 3]
    has_energy: torch.Tensor  # [G] bool
    has_forces: torch.Tensor  # [N] bool
    has_stress: torch.Tensor  # [G] bool
    weight: torch.Tensor  # [G]
    sources: list[str]
    files: list[str]
    replay: torch.Tensor | None = None  # [G] bool: frames of `data.replay`
    head: torch.Tensor | None = None  # [G] output head of each structure
    force_rms: torch.Tensor | None = None  # [G] RMS of each frame's force label components (0: none)

    def to(self, device: torch.device) -> "Batch":
        """The batch on `device` (its graph and labels; the names stay)."""
        if self.energy.device == torch.device(device):
            return self

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return dataclasses.replace(
            self, graph=self.graph.to(device=device), energy=move(self.energy), forces=move(self.forces),
            stress=move(self.stress), has_energy=move(self.has_energy), has_forces=move(self.has_forces),
            has_stress=move(self.has_stress), weight=move(self.weight), replay=move(self.replay), head=move(self.head),
            force_rms=move(self.force_rms))


def collate(samples: Sequence[Sample]) -> Batch:
    return Batch(
        graph=batch_graphs([s.graph for s in samples]),
        energy=torch.tensor([s.energy for s in samples], dtype=torch.float64),
        forces=torch.cat([s.forces for s in samples]),
        stress=torch.stack([s.stress for s in samples]),
        has_energy=torch.tensor([s.has_energy for s in samples]),
        has_forces=torch.cat([torch.full((s.num_atoms,), s.has_forces) for s in samples]),
        has_stress=torch.tensor([s.has_stress for s in samples]),
        weight=torch.tensor([s.weight for s in samples]),
        sources=[s.source for s in samples],
        files=[s.file for s in samples],
        replay=torch.tensor([s.replay for s in samples]),
        head=torch.tensor([s.head for s in samples], dtype=torch.long),
        force_rms=torch.tensor([float(s.forces.to(torch.float64).square().mean().sqrt()) if s.has_forces else 0.0
                                for s in samples], dtype=torch.float64),
    )
