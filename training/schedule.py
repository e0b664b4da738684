"""Learning-rate schedule (linear warm-up, then cosine decay) and the EMA of the weights."""

from __future__ import annotations

import math

import torch


def warmup_cosine(warmup_steps: int, min_ratio: float):
    """factor(step, progress): linear warm-up over `warmup_steps`, then cosine from 1 to
    `min_ratio` as `progress` (the fraction of the training budget used) goes from 0 to 1."""

    def factor(step: int, progress: float) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, max(0.0, progress))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class ExponentialMovingAverage:
    """EMA of the floating-point state (parameters and buffers), with the usual warm start
    decay = min(decay, (1 + n) / (10 + n))."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                self.shadow[key].mul_(decay).add_(value.detach(), alpha=1 - decay)
            else:
                self.shadow[key].copy_(value)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.updates = state["updates"]
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}
