"""One loader for every kind of Janus file, with one set of clear errors.

Three kinds of file hold a model:

| kind | written by | holds |
| --- | --- | --- |
| exported model (`model.pt`) | `janus export`, `export_model` | TorchScript + `metadata.json` |
| model checkpoint (`model.ckpt`) | `JanusPotential.save` | config + weights |
| training checkpoint (`checkpoint.pt`) | `janus train` | config, weights, EMA, optimizer, ... |

`load_model` gives an eager `JanusPotential` from either checkpoint (EMA weights of a
training checkpoint by default); `load_for_inference` gives what a calculator needs from
any of the three. Every file's content hash is checked (`janus_potential.integrity`); the
training checkpoint's layout is read here so that the library needs nothing from the
training application (DESIGN.md's arrows).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

import torch

from .config import ModelConfig
from .errors import JanusInputError
from .integrity import DIGEST_KEY, load_payload
from .lora import has_lora, merge_lora_state

MODEL_CHECKPOINT_FORMAT = "janus-checkpoint"
MODEL_CHECKPOINT_VERSION = 1
TRAINING_CHECKPOINT_FORMAT = "janus-training-checkpoint"
TRAINING_CHECKPOINT_VERSION = 2
CHECKPOINT_PART_FORMAT = "janus-training-checkpoint-part"

PathLike = Union[str, "os.PathLike[str]"]


def is_torchscript_file(path: PathLike) -> bool:
    """A zip archive with TorchScript's entries (an exported model, possibly not Janus's)."""
    try:
        with zipfile.ZipFile(os.fspath(path)) as archive:
            return any(n.endswith("/constants.pkl") or n.endswith("/extra/metadata.json") for n in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_checkpoint_payload(path: PathLike) -> Dict[str, Any]:
    """The payload of a model or training checkpoint (hash checked, format and version known)."""
    name = os.fspath(path)
    if not os.path.exists(name):
        raise JanusInputError(f"model file {name!r} does not exist")
    if is_torchscript_file(name):
        raise JanusInputError(f"{name!r} is an exported model file (TorchScript), not a checkpoint; "
                              "training and export need the checkpoint it was exported from")
    payload = load_payload(name, "model file or checkpoint", mmap=True)
    versions = {MODEL_CHECKPOINT_FORMAT: MODEL_CHECKPOINT_VERSION, TRAINING_CHECKPOINT_FORMAT: TRAINING_CHECKPOINT_VERSION}
    kind = payload.get("format")
    if kind not in versions:
        raise JanusInputError(f"{name!r} is not a Janus model or training checkpoint")
    if payload.get("version") != versions[kind]:
        raise JanusInputError(f"{name!r} has {kind} version {payload.get('version')}, "
                              f"this Janus reads version {versions[kind]}")
    return payload


class CheckpointReader:
    """The tensors of a training checkpoint (version 2), written in pieces by their owners.

    `checkpoint.pt` holds the run's plain state, rank 0's tensors and an index of every
    tensor: its full shape and its pieces, each (part file or None for the checkpoint itself,
    first row along dimension 0). Other ranks' pieces are in part files beside it, each
    with its own content hash, recorded (and checked) in `checkpoint.pt`. Keys are
    `model/NAME`, `ema/NAME` and `optimizer/NAME/STATE`. `read(key, start, rows)` assembles
    rows [start, start + rows) of a tensor from whatever pieces hold them, so a rank of
    another layout reads only its shard; part files are memory-mapped and opened on demand.
    """

    def __init__(self, payload: Dict[str, Any], path: PathLike) -> None:
        self.payload = payload
        self.folder = os.path.dirname(os.path.abspath(os.fspath(path)))
        self.index: Dict[str, Dict[str, Any]] = payload["index"]
        self._parts: Dict[str, Dict[str, torch.Tensor]] = {}

    def keys(self, prefix: str) -> List[str]:
        return [key for key in self.index if key.startswith(prefix)]

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def _tensors(self, part: Any) -> Dict[str, torch.Tensor]:
        if part is None:
            return self.payload["tensors"]
        if part not in self._parts:
            name = os.path.join(self.folder, part)
            loaded = load_payload(name, "training checkpoint part", mmap=True)
            if loaded.get("format") != CHECKPOINT_PART_FORMAT or \
                    loaded.get(DIGEST_KEY) != self.payload["parts"].get(part):
                raise JanusInputError(f"{name!r} is not the part of {self.folder!r}'s checkpoint that it names "
                                      "(a part from another save, or a damaged checkpoint)")
            self._parts[part] = loaded["tensors"]
        return self._parts[part]

    def read(self, key: str, start: int = 0, rows: Optional[int] = None) -> torch.Tensor:
        """Rows [start, start + rows) of tensor `key` (all of it by default)."""
        entry = self.index[key]
        shape = list(entry["shape"])
        if not shape:
            part, _ = entry["pieces"][0]
            return self._tensors(part)[key].clone()
        rows = shape[0] - start if rows is None else rows
        out = torch.empty([rows] + shape[1:], dtype=getattr(torch, entry["dtype"]))
        covered = 0
        for part, first in entry["pieces"]:
            piece = self._tensors(part)[key]
            low, high = max(start, first), min(start + rows, first + piece.shape[0])
            if low < high:
                out[low - start: high - start] = piece[low - first: high - first]
                covered += high - low
        if covered != rows:
            raise JanusInputError(f"checkpoint in {self.folder!r} lacks rows of {key!r}: a part file is missing")
        return out

    def state_dict(self, prefix: str) -> Dict[str, torch.Tensor]:
        """Every tensor under `prefix` ("model/", "ema/"), whole, keyed without the prefix."""
        return {key[len(prefix):]: self.read(key) for key in self.keys(prefix)}


def load_weights(model: torch.nn.Module, state: Dict[str, Any], path: PathLike) -> None:
    """load_state_dict with a clear error when the checkpoint is from another model version."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        lines = str(exc).splitlines()
        first = lines[1].strip() if len(lines) > 1 else str(exc)
        raise JanusInputError(f"{os.fspath(path)!r} does not match this version of the Janus model ({first})") from exc


def model_from_payload(payload: Dict[str, Any], path: PathLike, use_ema: bool = True):
    """A `JanusPotential` from a checkpoint payload (EMA weights of a training checkpoint
    unless `use_ema` is false)."""
    from .model import JanusPotential

    if payload["format"] == TRAINING_CHECKPOINT_FORMAT:
        reader = CheckpointReader(payload, path)
        state = reader.state_dict("model/")
        if use_ema:  # without an EMA (optim.ema_decay 0) the EMA weights are the weights
            state.update(reader.state_dict("ema/"))
        if has_lora(state):  # a LoRA fine-tuning run: adapters merged into plain weights
            state = merge_lora_state(state)
        config = payload["model_config"]
    else:
        state, config = payload["state_dict"], payload["config"]
    model = JanusPotential(ModelConfig.from_dict(config)).to(state["embedding.weight"].dtype)
    load_weights(model, state, path)
    model.provenance = payload.get("provenance", {})
    return model


def load_model(path: PathLike, use_ema: bool = True):
    """An eager `JanusPotential` from a model checkpoint or a training checkpoint."""
    return model_from_payload(read_checkpoint_payload(path), path, use_ema)


@dataclass
class InferenceModel:
    """What a calculator needs: a module with the `JanusPotential.forward` signature (eager or
    TorchScript), its cutoff, the atomic numbers it covers, and its dtype."""

    module: Any
    cutoff: float
    elements: List[int]
    dtype: torch.dtype


def load_for_inference(model: Any) -> InferenceModel:
    """From an exported file, either checkpoint kind, or a `JanusPotential` instance."""
    from .export import load_exported
    from .model import DTYPES, JanusPotential

    if isinstance(model, (str, os.PathLike)):
        if not os.path.exists(model):
            raise JanusInputError(f"model file {os.fspath(model)!r} does not exist")
        from .aoti import PackagedPotential, is_aoti_file

        if is_aoti_file(model):  # an AOTInductor package (`janus export --format aoti`)
            package = PackagedPotential(model)
            return InferenceModel(package, package.cutoff, package.elements, package.dtype)
        if is_torchscript_file(model):
            from ase.data import atomic_numbers

            module, metadata = load_exported(model)
            return InferenceModel(module, float(metadata["cutoff"]), [atomic_numbers[s] for s in metadata["elements"]],
                                  DTYPES[metadata["dtype"]])
        model = load_model(model)
    if isinstance(model, JanusPotential):
        return InferenceModel(model.eval(), model.cutoff, model.supported_elements(), next(model.parameters()).dtype)
    raise TypeError(f"expected a model file or a JanusPotential, not {type(model).__name__}")
