"""Labelled structures for training: reading, checking, graph caching, splitting, batching.

Any ASE-readable file works (extended XYZ, ASE databases). Labels are energy, forces,
stress and an optional per-frame weight (`info["weight"]`); a frame missing a label is
trained on the labels it has. Graphs are built once per (file content, cutoff) and cached
on disk, so later epochs and later runs do no neighbour search.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from ase.io import read
from tqdm import tqdm

from janus_potential.errors import JanusInputError
from janus_potential.graph import AtomGraph, batch_graphs, build_graph

CACHE_VERSION = 2


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

    @property
    def num_atoms(self) -> int:
        return int(self.graph.positions.shape[0])


def _labels(atoms, path: str, index: int) -> dict:
    results = dict(atoms.calc.results) if atoms.calc is not None else {}
    for key in ("energy", "forces", "stress"):
        if key not in results:
            source = atoms.info if key != "forces" else atoms.arrays
            for name in (key, f"REF_{key}", f"dft_{key}"):
                if name in source:
                    results[key] = source[name]
                    break
    labels = {}
    if "energy" in results:
        labels["energy"] = float(np.asarray(results["energy"]).reshape(-1)[0])
    if "forces" in results:
        labels["forces"] = np.asarray(results["forces"], dtype=np.float64).reshape(len(atoms), 3)
    if "stress" in results:
        stress = np.asarray(results["stress"], dtype=np.float64).reshape(-1)
        if stress.size == 6:
            xx, yy, zz, yz, xz, xy = stress
            stress = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
        labels["stress"] = stress.reshape(3, 3)
    for key, value in labels.items():
        if not np.all(np.isfinite(value)):
            raise JanusInputError(f"{path}: frame {index} has non-finite {key} labels")
    return labels


def read_samples(path: str | os.PathLike, cutoff: float, supported_elements: Iterable[int] | None = None,
                 dtype: torch.dtype = torch.float32, progress: bool = False) -> list[Sample]:
    """Read every frame of `path` and build its graph (with the checks of `build_graph`)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise JanusInputError(f"data file {path!r} does not exist")
    try:
        frames = read(path, ":")
    except Exception as exc:  # ASE's readers raise many types (UnknownFileTypeError, OSError, ValueError...)
        raise JanusInputError(f"data file {path!r} is not a structure file ASE can read: "
                              f"{type(exc).__name__}: {' '.join(str(exc).split())}") from exc
    samples = []
    any_label = False
    for index, atoms in enumerate(tqdm(frames, desc=f"graphs {Path(path).name}", disable=not progress, leave=False)):
        labels = _labels(atoms, path, index)
        any_label = any_label or bool(labels)
        try:
            graph = build_graph(atoms, cutoff, supported_elements, dtype=dtype)
        except JanusInputError as exc:
            raise JanusInputError(f"{path}: frame {index}: {exc}") from exc
        n = len(atoms)
        samples.append(Sample(
            graph=graph,
            energy=labels.get("energy", float("nan")),
            forces=torch.as_tensor(labels.get("forces", np.full((n, 3), np.nan)), dtype=dtype),
            stress=torch.as_tensor(labels.get("stress", np.full((3, 3), np.nan)), dtype=dtype),
            has_energy="energy" in labels, has_forces="forces" in labels,
            has_stress="stress" in labels and bool(np.all(atoms.get_pbc())),
            weight=float(atoms.info.get("weight", 1.0)),
            source=str(atoms.info.get("source", Path(path).stem)),
            file=Path(path).stem,
        ))
    if not any_label:
        raise JanusInputError(f"{path}: no frame has an energy, forces or stress label")
    return samples


def _cache_key(path: str, cutoff: float, dtype: torch.dtype) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    digest.update(f"{cutoff}:{dtype}:{CACHE_VERSION}".encode())
    return digest.hexdigest()[:16]


def load_dataset(paths: Sequence[str], cutoff: float, cache_dir: str | None, dtype: torch.dtype = torch.float32,
                 supported_elements: Iterable[int] | None = None, progress: bool = False) -> list[Sample]:
    """All samples of `paths`, through the on-disk graph cache when `cache_dir` is set."""
    samples: list[Sample] = []
    for path in paths:
        if not os.path.exists(path):
            raise JanusInputError(f"data file {path!r} does not exist")
        cache = None
        if cache_dir:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            cache = Path(cache_dir) / f"{Path(path).stem}-{_cache_key(path, cutoff, dtype)}.pt"
        if cache is not None and cache.exists():
            loaded = torch.load(cache, weights_only=False)
        else:
            loaded = read_samples(path, cutoff, None, dtype, progress)
            if cache is not None:
                tmp = cache.with_suffix(".tmp")
                torch.save(loaded, tmp)
                os.replace(tmp, cache)
        if supported_elements is not None:
            supported = set(int(z) for z in supported_elements)
            for k, sample in enumerate(loaded):
                missing = set(sample.graph.species.tolist()) - supported
                if missing:
                    raise JanusInputError(f"{path}: frame {k} has element(s) {sorted(missing)} the model does not cover")
        samples.extend(loaded)
    return samples


def split(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Deterministic train/validation split by seed."""
    order = np.random.default_rng(seed).permutation(len(samples))
    n_val = int(round(fraction * len(samples)))
    return [samples[k] for k in order[n_val:]], [samples[k] for k in order[:n_val]]


def atom_budget_batches(sizes: Sequence[int], max_atoms: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    """Shuffle (by seed and epoch) and fill each batch up to `max_atoms` atoms."""
    order = np.random.default_rng([seed, epoch]).permutation(len(sizes)) if shuffle else np.arange(len(sizes))
    batches: list[list[int]] = []
    current: list[int] = []
    atoms = 0
    for k in order:
        if current and atoms + sizes[k] > max_atoms:
            batches.append(current)
            current, atoms = [], 0
        current.append(int(k))
        atoms += sizes[k]
    if current:
        batches.append(current)
    return batches


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
    )
