"""The one `device` option of every front end: "auto" (CUDA when visible, else the CPU),
"cpu", "cuda" or "cuda:N".

Graphs are built on the CPU (vesin) and moved to the device once per evaluation; the model
lives on the device; results come back to the CPU for ASE and LAMMPS. Multi-rank
collectives exchange CPU tensors (gloo), whatever the device. An unavailable device is a
clear error, never a silent fall-back to the CPU.
"""

from __future__ import annotations

import torch

from .errors import JanusInputError


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch device named by `spec` (see the module docstring)."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise JanusInputError(f"device {spec!r} is not one of auto, cpu, cuda, cuda:N") from exc
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise JanusInputError(f"device {spec!r} is not one of auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise JanusInputError(f"device {spec!r}: no CUDA GPU is visible to this process (torch "
                              f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'})")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise JanusInputError(f"device {spec!r}: this process sees {torch.cuda.device_count()} GPU(s)")
    return device
