"""Precision options of training and inference: `float32` (default), `tf32`, `bf16`.

- `float32` (or the model's own dtype, float64 for exactness tests): every matmul in that
  dtype.
- `tf32`: float32 tensors, but CUDA matmuls may use TF32 tensor cores
  (`torch.backends.cuda.matmul.allow_tf32`, cuDNN likewise); a process-wide switch. No effect
  on the CPU.
- `bf16`: bf16 autocast of the expert, shared-expert and readout MLPs (the bulk of the
  parameters and of the node-wise FLOPs); the edge work, the attention, the geometry, forces
  and stress stay in float32, and energies are still summed in float64 (`model.evaluate`).
  Eager models only: an exported TorchScript file always runs in its own dtype.

The options change speed and round-off, never the model: a checkpoint trained in one runs in
any other. `bench/gpu_check.py` measures their speed and their effect on held-out errors.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import JanusInputError

PRECISIONS = ("float32", "tf32", "bf16")


def apply_precision(model: nn.Module, precision: str) -> nn.Module:
    """Set `precision` for `model` (in place; returns it) and, for tf32, the process-wide
    CUDA matmul switch."""
    if precision not in PRECISIONS:
        raise JanusInputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    low = precision == "bf16"
    if low and isinstance(model, torch.jit.ScriptModule):
        raise JanusInputError("precision bf16 needs an eager model (a checkpoint), not an exported TorchScript file")
    for module in model.modules():
        if hasattr(module, "low_precision") and not isinstance(module, torch.jit.ScriptModule):
            module.low_precision = low
    return model
