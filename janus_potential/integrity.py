"""Content hashes of model files and checkpoints, and safe reading of checkpoint files.

A flipped byte inside a tensor of a file must never give a silently wrong energy. Every
file Janus writes therefore carries a SHA-256 of its content, checked on every load:

- exported TorchScript files: `weights_sha256` in `metadata.json`, the digest of
  `module_digest` (for every parameter and buffer, sorted by name: the UTF-8 name, a NUL
  byte, the tensor's raw bytes). The LAMMPS plugin computes the same
  digest in C++ on the loaded module (`lammps_plugin/pair_janus.cpp`).
- checkpoints (model and training): `content_sha256` in the payload, the digest of
  `payload_digest` over everything else in the payload (a canonical walk of dicts, lists,
  tensors and plain values), so a flip that changes any value after unpickling is caught.

Checkpoints are read with `torch.load(weights_only=True)`: a checkpoint from elsewhere can
carry tensors and plain containers only, never code to run.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from typing import Any, Dict, Iterable, Tuple

import torch

from .errors import JanusInputError

DIGEST_KEY = "content_sha256"


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor, without a copy where it is contiguous on the CPU (the
    tensors of a large checkpoint are hashed one at a time, never copied whole)."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1)
    if data.numel() == 0:
        return memoryview(b"")
    return memoryview(data.view(torch.uint8).numpy())


def module_digest(named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over (name, NUL, raw bytes) of each tensor, sorted by name."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def scripted_digest(module: torch.nn.Module) -> str:
    """`module_digest` of a (scripted) module's parameters and buffers."""
    return module_digest([*module.named_parameters(), *module.named_buffers()])


def _walk(value: Any, digest: "hashlib._Hash") -> None:
    if isinstance(value, torch.Tensor):
        digest.update(f"T{value.dtype}{tuple(value.shape)}".encode())
        digest.update(_tensor_bytes(value))
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}".encode())
        for key, item in value.items():
            digest.update(repr(key).encode())
            _walk(item, digest)
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}".encode())
        for item in value:
            _walk(item, digest)
    else:
        digest.update(f"V{value!r}".encode())


def payload_digest(payload: Dict[str, Any]) -> str:
    """SHA-256 of a checkpoint payload, leaving out the digest entry itself."""
    digest = hashlib.sha256()
    _walk({k: v for k, v in payload.items() if k != DIGEST_KEY}, digest)
    return digest.hexdigest()


def save_payload(payload: Dict[str, Any], path: str | os.PathLike) -> str:
    """Write `payload` with its content digest, atomically (temporary file, fsync, rename);
    returns the digest."""
    payload = dict(payload)
    payload[DIGEST_KEY] = payload_digest(payload)
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return payload[DIGEST_KEY]


def _reason(exc: Exception) -> str:
    """The first line of an exception from torch.load, without torch's advice to load the file
    with weights_only=False (which would run code from it)."""
    if isinstance(exc, pickle.UnpicklingError):
        return "not a file of tensors and plain values that can be read safely"
    lines = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {lines[0][:160]}" if lines else exc.__class__.__name__


def load_payload(path: str | os.PathLike, what: str = "checkpoint", map_location: str = "cpu",
                 mmap: bool = False) -> Dict[str, Any]:
    """Read a payload written by `save_payload`: tensors and plain values only
    (`weights_only=True`), and its content digest verified. With `mmap` the tensors stay in
    the file's pages (read when touched), for the parts of large sharded checkpoints. Every
    failure is a `JanusInputError` naming the file."""
    name = os.fspath(path)
    if not os.path.exists(name):
        raise JanusInputError(f"{what} {name!r} does not exist")
    try:
        payload = torch.load(name, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # truncated, garbage, foreign pickles: torch raises many types
        raise JanusInputError(f"{name!r} is not a Janus {what}, or it is truncated or corrupt "
                              f"({_reason(exc)})") from exc
    if not isinstance(payload, dict):
        raise JanusInputError(f"{name!r} is not a Janus {what}")
    expected = payload.get(DIGEST_KEY)
    if expected is None:
        raise JanusInputError(f"{name!r} has no content hash: it was not written by this version of Janus")
    if payload_digest(payload) != expected:
        raise JanusInputError(f"{name!r} is corrupt: its content does not match its SHA-256 content hash")
    return payload
