"""Sparse Mixture-of-Experts feed-forward block with element-aware routing.

Each atom is sent to the top-k of E experts (gates: softmax over the k chosen logits) and
to one always-on shared expert. By default the router sees only the atom's element
embedding, so routing is fixed for a given composition; `router_uses_features=True` adds
the current node features. Expert weights are stored stacked ([E, ...]) so that expert
parallelism can shard them along the first axis.

Atoms are grouped by expert once per call (one argsort) and each expert runs one dense
matmul on its contiguous block. The Switch/GShard load-balancing loss and the per-expert
load of the latest eager call are kept in `last_balance_loss` / `last_expert_load` for the
trainer.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import nn
from torch.nn import functional as F


class MixtureOfExperts(nn.Module):
    def __init__(
        self,
        features: int,
        num_experts: int,
        experts_per_atom: int,
        expert_hidden: int,
        shared_hidden: int,
        router_uses_features: bool,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.experts_per_atom = experts_per_atom
        self.router_uses_features = router_uses_features
        self.router = nn.Linear(features, num_experts, bias=False)
        nn.init.normal_(self.router.weight, std=0.02)
        self.w_in = nn.Parameter(torch.empty(num_experts, features, expert_hidden))
        self.b_in = nn.Parameter(torch.zeros(num_experts, expert_hidden))
        self.w_out = nn.Parameter(torch.empty(num_experts, expert_hidden, features))
        self.b_out = nn.Parameter(torch.zeros(num_experts, features))
        with torch.no_grad():
            self.w_in.normal_(0.0, 1.0 / math.sqrt(features))
            self.w_out.normal_(0.0, 1.0 / math.sqrt(expert_hidden))
        self.shared = nn.Sequential(
            nn.Linear(features, shared_hidden), nn.SiLU(), nn.Linear(shared_hidden, features)
        )
        self.last_balance_loss: Optional[torch.Tensor] = None
        self.last_expert_load: Optional[torch.Tensor] = None

    def route(self, x: torch.Tensor, element_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (expert index [N, k], gate [N, k], router probabilities [N, E])."""
        router_input = element_embedding
        if self.router_uses_features:
            router_input = router_input + x
        logits = self.router(router_input)
        top_logits, top_index = torch.topk(logits, self.experts_per_atom, dim=-1)
        gates = torch.softmax(top_logits, dim=-1)
        return top_index, gates, torch.softmax(logits, dim=-1)

    def forward(self, x: torch.Tensor, element_embedding: torch.Tensor) -> torch.Tensor:
        expert_index, gates, probabilities = self.route(x, element_embedding)
        out = self.shared(x)
        flat_expert = expert_index.reshape(-1)
        order = torch.argsort(flat_expert)
        atom_of_slot = torch.div(order, self.experts_per_atom, rounding_mode="floor")
        gate_of_slot = gates.reshape(-1)[order].unsqueeze(-1)
        counts = torch.bincount(flat_expert, minlength=self.num_experts)
        routed = x.index_select(0, atom_of_slot)
        pieces = []
        split_sizes: List[int] = counts.tolist()
        for e, block in enumerate(torch.split(routed, split_sizes)):
            hidden = F.silu(torch.addmm(self.b_in[e], block, self.w_in[e]))
            pieces.append(torch.addmm(self.b_out[e], hidden, self.w_out[e]))
        expert_out = torch.cat(pieces, dim=0) * gate_of_slot
        out = out.index_add(0, atom_of_slot, expert_out)
        if not torch.jit.is_scripting():
            self._record_balance(counts, probabilities)
        return out

    @torch.jit.unused
    def _record_balance(self, counts: torch.Tensor, probabilities: torch.Tensor) -> None:
        slots = counts.sum().clamp(min=1)
        fraction = counts.to(probabilities.dtype) / slots
        mean_probability = probabilities.mean(dim=0)
        self.last_balance_loss = self.num_experts * torch.sum(fraction * mean_probability)
        self.last_expert_load = counts.detach()
