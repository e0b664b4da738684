"""Low-rank adapters (LoRA) for fine-tuning, and their merge into plain weights.

`add_lora(model, rank, alpha)` adapts every weight matrix of the interaction layers and the
readout -- `nn.Linear` weights [out, in] and the experts' stacked weights [E, in, out] -- as

    W_effective = W + (alpha / rank) * A @ B,   A [..., m, rank], B [..., rank, n]

with `torch.nn.utils.parametrize`: W is kept (frozen, like every other parameter of the
model), A is random and B starts at zero, so the adapted model equals its parent exactly at
step 0. The embedding, biases, norms and reference energies stay as they are. In a state
dict an adapted weight appears as `<module>.parametrizations.<name>.original`, `....0.A`
and `....0.B`; `merge_lora_state` turns such a state dict into the plain model's (what
`janus export` and `load_model` read), `merge_lora` does it in place on a module.
"""

from __future__ import annotations

import math
from typing import Dict

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import JanusInputError

SUFFIX = ".original"


class LowRankDelta(nn.Module):
    """The parametrization W -> W + scale * A @ B of one weight."""

    def __init__(self, shape: torch.Size, rank: int, scale: float, dtype: torch.dtype) -> None:
        super().__init__()
        *batch, m, n = shape
        self.register_buffer("scale", torch.tensor(scale, dtype=dtype))
        a = torch.empty(*batch, m, rank, dtype=dtype)
        nn.init.normal_(a, std=1.0 / math.sqrt(m))
        self.A = nn.Parameter(a)
        self.B = nn.Parameter(torch.zeros(*batch, rank, n, dtype=dtype))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * torch.matmul(self.A, self.B)


def adapted_weights(model: nn.Module):
    """(module, attribute name) of every weight LoRA adapts."""
    for name, module in model.named_modules():
        if not (name.startswith("layers.") or name.startswith("readout")):
            continue
        if isinstance(module, nn.Linear):
            yield module, "weight"
        elif hasattr(module, "w_in") and hasattr(module, "w_out") and isinstance(getattr(module, "w_in"), torch.Tensor):
            yield module, "w_in"
            yield module, "w_out"


def add_lora(model: nn.Module, rank: int, alpha: float = 0.0) -> int:
    """Freeze every parameter of `model` and adapt its weight matrices with rank-`rank`
    adapters (scale alpha / rank; alpha 0 means alpha = rank). Returns the number of
    trainable adapter parameters."""
    if rank < 1:
        raise JanusInputError(f"model.lora_rank must be a positive integer, got {rank}")
    scale = (alpha or rank) / rank
    for p in model.parameters():
        p.requires_grad_(False)
    targets = list(adapted_weights(model))
    for module, name in targets:
        weight = getattr(module, name)
        if weight.dim() < 2 or min(weight.shape[-2:]) <= rank:
            continue  # a rank-r update of a matrix this thin is no cheaper than the matrix
        parametrize.register_parametrization(module, name, LowRankDelta(weight.shape, rank, scale, weight.dtype))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def has_lora(state: Dict[str, torch.Tensor]) -> bool:
    return any(".parametrizations." in key for key in state)


def merge_lora_state(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The plain state dict of an adapted model's state dict: every adapted weight replaced by
    W + scale * A @ B under its plain name."""
    merged: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".parametrizations." not in key:
            merged[key] = value
            continue
        if not key.endswith(SUFFIX):
            continue
        prefix = key[: -len(SUFFIX)]
        module, name = prefix.split(".parametrizations.")
        a, b, scale = state[f"{prefix}.0.A"], state[f"{prefix}.0.B"], state[f"{prefix}.0.scale"]
        merged[f"{module}.{name}"] = value + scale * torch.matmul(a, b)
    return merged


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every adapter of `model` by its merged plain weight (in place)."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return model
