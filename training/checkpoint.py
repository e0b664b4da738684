"""Training checkpoints: everything needed to continue exactly, written atomically, in
pieces by the ranks that own them.

A checkpoint holds the model, optimizer and EMA states, the RNG states, the position in
the epoch and the accumulated wall time. Every tensor is written by ONE rank, its owner
(`ParameterShards`: the owner of a parameter writes its weights, EMA and AdamW moments;
an expert shard is a piece of rows of the full [experts, ...] tensor), so no rank ever
gathers the whole state: the `1b` preset's 13 GB of weights and moments would not fit
twice. `checkpoint.pt` (rank 0) holds the plain state, rank 0's pieces and an index of
every piece; the other ranks' pieces go to `checkpoint.parts/<save>-rank-<r>.pt`, whose
content hashes `checkpoint.pt` records. One process writes `checkpoint.pt` alone.

Atomic at any instant of a kill: the parts of a save get fresh names, `checkpoint.pt` is
replaced (temporary file, fsync, rename) only after every part is on disk, and the parts
of the previous save are deleted only after that. Keys are layout-free (`model/NAME`,
`ema/NAME`, `optimizer/NAME/STATE`, full shapes), so a run resumes on any number of ranks
and in any layout (`CheckpointReader.read` assembles any rows of any tensor), and
`janus export`/`load_model` read the EMA weights the same way. Checkpoints hold tensors
and plain values only (`weights_only=True`) and SHA-256 content hashes checked on read
(`janus_potential.integrity`).
"""

from __future__ import annotations

import os
import random
import uuid
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.distributed as dist

from janus_potential.errors import JanusInputError
from janus_potential.integrity import DIGEST_KEY, load_payload, save_payload
from janus_potential.io import CHECKPOINT_PART_FORMAT as PART_FORMAT
from janus_potential.io import TRAINING_CHECKPOINT_FORMAT as TRAINING_FORMAT
from janus_potential.io import TRAINING_CHECKPOINT_VERSION as TRAINING_VERSION
from janus_potential.io import CheckpointReader

PARTS = "checkpoint.parts"

# one piece of a tensor: (the piece, the full tensor's shape, its first row in the full tensor)
Piece = Tuple[torch.Tensor, List[int], int]


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


def write_checkpoint(path: str | os.PathLike, state: Dict[str, Any], pieces: Dict[str, Piece],
                     distributed: bool = False) -> None:
    """Write a checkpoint: `state` (plain values, rank 0's) and this rank's `pieces`.
    Collective when `distributed`: every rank calls it with its own pieces."""
    path = Path(path)
    rank = dist.get_rank() if distributed else 0
    token = [uuid.uuid4().hex[:12] if rank == 0 else None]
    if distributed:
        dist.broadcast_object_list(token, src=0)
    part = None
    tensors = {key: piece.detach().contiguous() for key, (piece, _, _) in pieces.items()}
    digest = None
    if rank > 0 and tensors:
        part = f"{PARTS}/{token[0]}-rank-{rank:05d}.pt"
        (path.parent / PARTS).mkdir(exist_ok=True)
        digest = save_payload({"format": PART_FORMAT, "tensors": tensors}, path.parent / part)
    entries = {key: {"shape": list(shape), "dtype": str(piece.dtype).replace("torch.", ""), "first": first,
                     "part": part} for key, (piece, shape, first) in pieces.items()}
    every: List[Any] = [(entries, part, digest)]
    if distributed:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, (entries, part, digest))
    if rank == 0:
        index: Dict[str, Dict[str, Any]] = {}
        parts: Dict[str, str] = {}
        for rank_entries, rank_part, rank_digest in every:
            if rank_part is not None:
                parts[rank_part] = rank_digest
            for key, entry in rank_entries.items():
                record = index.setdefault(key, {"shape": entry["shape"], "dtype": entry["dtype"], "pieces": []})
                record["pieces"].append([entry["part"], entry["first"]])
        for record in index.values():
            record["pieces"].sort(key=lambda piece: piece[1])
        save_payload(dict(state, format=TRAINING_FORMAT, version=TRAINING_VERSION, tensors=tensors, index=index,
                          parts=parts), path)
        _remove_stale_parts(path.parent, set(parts))
    if distributed:
        dist.barrier()


def _remove_stale_parts(folder: Path, keep: set) -> None:
    """Delete the parts of earlier saves (the new checkpoint.pt no longer names them)."""
    if not (folder / PARTS).is_dir():
        return
    for stale in (folder / PARTS).iterdir():
        if f"{PARTS}/{stale.name}" not in keep:
            stale.unlink(missing_ok=True)


def read_checkpoint(path: str | os.PathLike) -> Tuple[Dict[str, Any], CheckpointReader]:
    """The plain state of a training checkpoint and a reader of its tensors."""
    payload = load_payload(path, "training checkpoint", mmap=True)
    if payload.get("format") != TRAINING_FORMAT:
        raise JanusInputError(f"{os.fspath(path)!r} is not a Janus training checkpoint")
    if payload.get("version") != TRAINING_VERSION:
        raise JanusInputError(f"{os.fspath(path)!r} is a training checkpoint of version {payload.get('version')}; "
                              f"this Janus resumes version {TRAINING_VERSION}")
    return payload, CheckpointReader(payload, path)


def full_state(path: str | os.PathLike) -> Dict[str, Any]:
    """The whole checkpoint in one process (tests, inspection): the plain state plus
    `model`, `ema` and `optimizer` as full tensors keyed by name."""
    payload, reader = read_checkpoint(path)
    state = {k: v for k, v in payload.items() if k not in ("tensors", "index", "parts", DIGEST_KEY)}
    optimizer: Dict[str, Dict[str, torch.Tensor]] = {}
    for key in reader.keys("optimizer/"):
        name, item = key[len("optimizer/"):].rsplit("/", 1)
        optimizer.setdefault(name, {})[item] = reader.read(key)
    return dict(state, model=reader.state_dict("model/"), ema=reader.state_dict("ema/"), optimizer=optimizer)


__all__ = ["full_state", "read_checkpoint", "restore_rng", "rng_state", "write_checkpoint", "Piece"]
