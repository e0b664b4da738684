"""Training checkpoints: everything needed to continue exactly, written atomically.

A checkpoint holds the model, optimizer, scheduler and EMA states, the RNG states, the
position in the epoch and the accumulated wall time; `write_checkpoint` writes to a
temporary file and renames it, so a run killed at any instant leaves the previous
checkpoint intact. Checkpoints hold tensors and plain values only (read with
`weights_only=True`, so a checkpoint cannot run code) and a SHA-256 content hash checked on
every read (`janus_potential.integrity`). Models are read from checkpoints by `janus_potential.io.load_model`.
"""

from __future__ import annotations

import os
import random
from typing import Any, Dict

import numpy as np
import torch

from janus_potential.errors import JanusInputError
from janus_potential.integrity import load_payload, save_payload
from janus_potential.io import TRAINING_CHECKPOINT_FORMAT as TRAINING_FORMAT
from janus_potential.io import TRAINING_CHECKPOINT_VERSION as TRAINING_VERSION


def rng_state() -> Dict[str, Any]:
    """The torch, numpy and Python RNG states as tensors and plain values."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
            "python": random.getstate()}


def restore_rng(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    random.setstate(state["python"])


def write_checkpoint(path: str | os.PathLike, payload: Dict[str, Any]) -> None:
    save_payload(dict(payload, format=TRAINING_FORMAT, version=TRAINING_VERSION), path)


def read_checkpoint(path: str | os.PathLike) -> Dict[str, Any]:
    payload = load_payload(path, "training checkpoint")
    if payload.get("format") != TRAINING_FORMAT:
        raise JanusInputError(f"{os.fspath(path)!r} is not a Janus training checkpoint")
    return payload


__all__ = ["read_checkpoint", "restore_rng", "rng_state", "write_checkpoint"]
