"""Fine-tuning: start from a trained model, freeze parts of it, extend it to new elements.

- `load_parent(path)`: the EMA weights of a model or training checkpoint, and the file's
  SHA-256 for the run's provenance. The child takes the parent's architecture, weights,
  reference energies, energy scale and element coverage, so step 0 predicts exactly what
  the parent predicts (tests/test_finetune.py); the optimizer and schedule start fresh.
- `freeze(model, patterns)`: parameters whose names match a pattern (fnmatch, or a module
  prefix such as `embedding` or `layers.0`) get no gradient and stay as they are.
- `new_element_references`: elements of the new data that the parent does not cover get
  reference energies fitted to what the parent's references leave unexplained, the other
  elements keep theirs; their embedding rows (present in every model, up to
  `max_atomic_number`) are trained from their random start.
LoRA adapters are in `janus_potential.lora` (the library merges them on load and export).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from typing import Dict, List, Tuple

import numpy as np
import torch

from janus_potential.errors import JanusInputError

from .pack import Composition
from .statistics import fit_reference_energies


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def load_parent(path: str) -> Tuple[torch.nn.Module, Dict[str, str]]:
    """The parent model (EMA weights of a training checkpoint) and its provenance record."""
    from janus_potential.io import load_model

    if os.path.isdir(path):
        raise JanusInputError(f"model.init_from {path!r} is a folder: name a model.ckpt or checkpoint.pt")
    model = load_model(path)
    return model, {"path": os.path.abspath(path), "sha256": file_sha256(path)}


def freeze(model: torch.nn.Module, patterns: List[str]) -> int:
    """Freeze the parameters matching `patterns`; returns how many tensors were frozen. A
    pattern that matches nothing is an error (a typo would silently train everything)."""
    names = [name for name, _ in model.named_parameters()]
    frozen = 0
    for pattern in patterns:
        matched = [name for name in names if fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern + ".")]
        if not matched:
            prefixes = sorted({name.split(".")[0] for name in names})
            raise JanusInputError(f"model.freeze pattern {pattern!r} matches no parameter (top-level names: "
                                  f"{', '.join(prefixes)}; e.g. 'embedding', 'layers.0.*', 'layers.*.moe.*')")
        for name, p in model.named_parameters():
            if name in matched and p.requires_grad:
                p.requires_grad_(False)
                frozen += 1
    return frozen


def _only(composition: Composition, elements: np.ndarray) -> Composition:
    """`composition` with the entries of `elements` only."""
    keep = np.isin(composition.element, elements)
    rows = np.repeat(np.arange(composition.num_frames), np.diff(composition.offset))
    per_frame = np.bincount(rows[keep], minlength=composition.num_frames)
    offset = np.concatenate([[0], np.cumsum(per_frame)]).astype(np.int64)
    return Composition(offset, composition.element[keep], composition.count[keep])


def new_element_references(reference: torch.Tensor, supported: torch.Tensor, composition: Composition,
                           energy: np.ndarray, max_atomic_number: int) -> Tuple[torch.Tensor, List[int]]:
    """Reference energies with the data's new elements added (fitted to the energy the
    parent's references leave unexplained), and the new elements."""
    present = np.unique(composition.element).astype(np.int64)
    too_heavy = present[present > max_atomic_number]
    if too_heavy.size:
        raise JanusInputError(f"the data has elements with Z = {too_heavy.tolist()}, beyond the parent model's "
                              f"embedding (Z <= {max_atomic_number}): the parent cannot be extended to them")
    covered = supported.numpy()
    new = present[~covered[present]]
    if not new.size:
        return reference, []
    old_reference = reference.to(torch.float64).numpy()
    rows = np.repeat(np.arange(composition.num_frames), np.diff(composition.offset))
    explained = np.bincount(rows, weights=composition.count * np.where(covered[composition.element],
                                                                         old_reference[composition.element], 0.0),
                            minlength=composition.num_frames)
    has_new = np.bincount(rows, weights=np.isin(composition.element, new), minlength=composition.num_frames) > 0
    frames = np.nonzero(has_new)[0]
    fitted = fit_reference_energies(_only(composition.rows(frames), new), (energy - explained)[frames])
    updated = reference.clone()
    updated[torch.as_tensor(new)] = fitted[torch.as_tensor(new)].to(reference.dtype)
    return updated, [int(z) for z in new]
