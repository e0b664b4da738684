"""Training checkpoints: everything needed to continue exactly, written atomically.

A checkpoint holds the model, optimizer, scheduler and EMA states, the RNG states, the
position in the epoch and the accumulated wall time; `write_checkpoint` writes to a
temporary file and renames it, so a run killed at any instant leaves the previous
checkpoint intact. `load_model_for_export` returns a `JanusPotential` with the EMA weights
(or the weights of a plain model checkpoint).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

from janus_potential.config import ModelConfig
from janus_potential.errors import JanusInputError
from janus_potential.model import JanusPotential, load_checkpoint_payload, load_weights

TRAINING_FORMAT = "janus-training-checkpoint"
TRAINING_VERSION = 1


def rng_state() -> Dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def restore_rng(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def write_checkpoint(path: str | os.PathLike, payload: Dict[str, Any]) -> None:
    payload = dict(payload, format=TRAINING_FORMAT, version=TRAINING_VERSION)
    tmp = Path(f"{os.fspath(path)}.tmp")
    with open(tmp, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_checkpoint(path: str | os.PathLike) -> Dict[str, Any]:
    if not os.path.exists(path):
        raise JanusInputError(f"checkpoint {os.fspath(path)!r} does not exist")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != TRAINING_FORMAT:
        raise JanusInputError(f"{os.fspath(path)!r} is not a Janus training checkpoint")
    return payload


def load_model_for_export(path: str | os.PathLike, use_ema: bool = True) -> JanusPotential:
    """A model from a training checkpoint (EMA weights by default) or a model checkpoint."""
    if not os.path.exists(path):
        raise JanusInputError(f"model file {os.fspath(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:
        payload = None
    if not isinstance(payload, dict) or payload.get("format") != TRAINING_FORMAT:
        return JanusPotential.load(path)
    state = payload["ema"]["shadow"] if use_ema else payload["model"]
    model = JanusPotential(ModelConfig.from_dict(payload["model_config"])).to(state["embedding.weight"].dtype)
    load_weights(model, state, path)
    model.provenance = payload.get("provenance", {})
    return model


__all__ = ["load_checkpoint_payload", "load_model_for_export", "read_checkpoint", "restore_rng", "rng_state",
           "write_checkpoint"]
