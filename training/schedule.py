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
    decay = min(decay, (1 + n) / (10 + n)).

    `keep(name)` selects the entries this rank averages (with `parallel.shard: full` a rank
    keeps the EMA of the dense parameters it owns only). `decay` 0 keeps no copy at all
    (the average of decay 0 is the weights themselves): `shadow` is then empty and readers
    of the EMA weights fall back to the weights (what the `1b` preset needs to fit).
    """

    def __init__(self, model: torch.nn.Module, decay: float, keep=None) -> None:
        self.decay = decay
        self.updates = 0
        keep = keep or (lambda name: True)
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if keep(k)} if decay > 0 else {}

    @property
    def enabled(self) -> bool:
        return self.decay > 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        if not self.shadow:
            return
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for key, value in model.state_dict().items():
            if key not in self.shadow:
                continue
            if value.dtype.is_floating_point:
                self.shadow[key].mul_(decay).add_(value.detach(), alpha=1 - decay)
            else:
                self.shadow[key].copy_(value)
