"""bf16 autocast paths of the MLPs (janus_potential.precision), eager only.

This file has no `from __future__ import annotations`: TorchScript reads the signatures of
these `@torch.jit.unused` methods when it scripts the modules that hold them (for export,
where they are never called), and it cannot resolve string annotations here.
"""

import torch
from torch.nn import functional as F


@torch.jit.unused
def autocast_expert(self, block: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor, w_out: torch.Tensor,
                    b_out: torch.Tensor) -> torch.Tensor:
    """One expert's MLP under bf16 autocast, the result back in the input's dtype."""
    with torch.autocast(block.device.type, dtype=torch.bfloat16):
        hidden = F.silu(torch.addmm(b_in, block, w_in))
        out = torch.addmm(b_out, hidden, w_out)
    return out.to(block.dtype)


@torch.jit.unused
def autocast_shared(self, x: torch.Tensor) -> torch.Tensor:
    """The shared expert under bf16 autocast, the result back in x's dtype."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        out = self.shared(x)
    return out.to(x.dtype)


@torch.jit.unused
def autocast_readout(self, h: torch.Tensor) -> torch.Tensor:
    """The readout MLP under bf16 autocast, the result back in h's dtype."""
    with torch.autocast(h.device.type, dtype=torch.bfloat16):
        out = self.readout_mlp(h)
    return out.to(h.dtype)
