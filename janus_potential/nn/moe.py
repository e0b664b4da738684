"""Sparse Mixture-of-Experts feed-forward block with element-aware routing.

Each atom is sent to the top-k of E experts (gates: softmax over the k chosen logits) and
to one always-on shared expert. By default the router sees only the atom's element
embedding, so routing is fixed for a given composition; `router_uses_features=True` adds
the current node features. Expert weights are stored stacked ([E, ...]) so that expert
parallelism can shard them along the first axis.

Atoms are grouped by expert once per call (one argsort) and each expert runs one dense
matmul on its contiguous block. The block sizes are data: the per-expert loop splits by them,
which symbolic tracing cannot follow, so with `dispatch_block = B > 0` (set by the compiled
training step, training/compiled.py) the blocks are laid out shape-stably instead: each
expert's slots padded to a multiple of B rows, at most S // B + E blocks of B rows for S
slots (a bound that depends on S only), one batched matmul over the blocks with each block's
expert weights gathered. No slot is ever dropped and padding rows are discarded, so the
result equals the loop's (tests/test_compiled.py). The forward returns, besides the update, what the trainer
needs for the Switch/GShard load-balancing loss: the sum over atoms of the router
probabilities ([E], differentiable) and the atom-slots routed to each expert ([E], the
load). Nothing is kept on the module between calls (`balance_loss` combines them).

Router steps (`router_scale`). With one expert per atom the gate is 1 whatever the logits, so
the router's only gradient is the balance loss's, which is small and noisy. Adam moves every
weight by about the learning rate per step whatever the size of its gradient, so the router's
weights random-walk at the model's learning rate and the argmax reshuffles elements between
experts all the time: measured on the accuracy study's eight-expert recipe (docs/training.md,
"Routing that never settles"), 14 to 26 of the 267 (element, layer) assignments changed at
every step, from the first steps on, against about one per step with the router frozen (the
remaining changes come from the element embedding, which the force loss moves). Each expert
then sees a different set of elements every few steps and none specialises. The router
computes `router_scale * W x` with W initialised at N(0, 0.02 / router_scale): the initial
logits are the same, and under Adam W's steps move the logits router_scale times as far,
which is a learning rate of router_scale times the model's for the router alone, kept inside
the model (one optimizer parameter group; the exported function is the same product).
`router_scale: 1` is the old behaviour and the default (checkpoints written before the
option load unchanged).
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .autocast import autocast_expert, autocast_shared


class MixtureOfExperts(nn.Module):
    def __init__(
        self,
        features: int,
        num_experts: int,
        experts_per_atom: int,
        expert_hidden: int,
        shared_hidden: int,
        router_uses_features: bool,
        router_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.experts_per_atom = experts_per_atom
        # bf16 autocast of the expert and shared MLPs (janus_potential.precision; eager only)
        self.low_precision = False
        # 0: one matmul per expert on its block (data-dependent split); B > 0: the shape-stable
        # blocked layout (module docstring), for symbolic tracing
        self.dispatch_block = 0
        self.router_uses_features = router_uses_features
        # logits = router_scale * router(input): the router's steps under Adam are router_scale
        # times the other weights' (module docstring, "Router steps"); the same initial logits
        self.router_scale = float(router_scale)
        self.router = nn.Linear(features, num_experts, bias=False)
        nn.init.normal_(self.router.weight, std=0.02 / self.router_scale)
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

    def route(self, x: torch.Tensor, element_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (expert index [N, k], gate [N, k], router probabilities [N, E])."""
        router_input = element_embedding
        if self.router_uses_features:
            router_input = router_input + x
        logits = self.router(router_input)
        if self.router_scale != 1.0:
            logits = logits * self.router_scale
        top_logits, top_index = torch.topk(logits, self.experts_per_atom, dim=-1)
        gates = torch.softmax(top_logits, dim=-1)
        return top_index, gates, torch.softmax(logits, dim=-1)

    # eager-only bf16 paths (janus_potential.precision), defined in nn/autocast.py
    expert_low_precision = autocast_expert
    shared_low_precision = autocast_shared

    def forward(self, x: torch.Tensor, element_embedding: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(update [N, F], router probability sum [E], expert load [E])."""
        expert_index, gates, probabilities = self.route(x, element_embedding)
        out = self.shared(x) if not self.low_precision else self.shared_low_precision(x)
        flat_expert = expert_index.reshape(-1)
        order = torch.argsort(flat_expert)
        atom_of_slot = torch.div(order, self.experts_per_atom, rounding_mode="floor")
        gate_of_slot = gates.reshape(-1)[order].unsqueeze(-1)
        # slots per expert, [E] whatever the data (bincount's length is data-dependent)
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=x.device).index_add_(
            0, flat_expert, torch.ones_like(flat_expert))
        routed = x.index_select(0, atom_of_slot)
        if self.dispatch_block > 0 and not self.low_precision:
            expert_out = self.blocked_experts(routed, flat_expert.index_select(0, order), counts) * gate_of_slot
            out = out.index_add(0, atom_of_slot, expert_out)
            return out, probabilities.sum(dim=0), counts.to(probabilities.dtype)
        pieces = []
        # block boundaries as a tensor (no .tolist()), so make_fx can trace the dispatch
        boundaries = torch.cumsum(counts, 0)[:-1].cpu()
        # unbind once: indexing `self.w_in[e]` per expert would give every expert's weight
        # gradient the size of ALL experts' weights (SelectBackward), O(E^2) memory traffic
        w_in, b_in, w_out, b_out = self.w_in.unbind(0), self.b_in.unbind(0), self.w_out.unbind(0), self.b_out.unbind(0)
        for e, block in enumerate(torch.tensor_split(routed, boundaries)):
            if self.low_precision:
                pieces.append(self.expert_low_precision(block, w_in[e], b_in[e], w_out[e], b_out[e]))
            else:
                hidden = F.silu(torch.addmm(b_in[e], block, w_in[e]))
                pieces.append(torch.addmm(b_out[e], hidden, w_out[e]))
        expert_out = torch.cat(pieces, dim=0) * gate_of_slot
        out = out.index_add(0, atom_of_slot, expert_out)
        return out, probabilities.sum(dim=0), counts.to(probabilities.dtype)

    def blocked_experts(self, routed: torch.Tensor, sorted_expert: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The experts' outputs for `routed` ([S, F], slots sorted by expert, `sorted_expert`
        [S]) through the shape-stable blocked layout (module docstring); [S, F]."""
        return blocked_experts(routed, sorted_expert, counts, self.w_in, self.b_in, self.w_out, self.b_out,
                               self.dispatch_block)


def blocked_experts(routed: torch.Tensor, sorted_expert: torch.Tensor, counts: torch.Tensor, w_in: torch.Tensor,
                    b_in: torch.Tensor, w_out: torch.Tensor, b_out: torch.Tensor, block: int) -> torch.Tensor:
    """Expert MLPs (stacked weights [E, ...]) of `routed` ([S, F], rows sorted by expert,
    `sorted_expert` [S], `counts` [E] rows per expert) in the shape-stable blocked layout
    (module docstring): every size depends on S and E only. Shared by `MixtureOfExperts`
    and the expert-parallel shard (parallel/expert.py), which runs it on the rows it receives."""
    experts = w_in.shape[0]
    slots = routed.shape[0]
    blocks = torch.div(counts + (block - 1), block, rounding_mode="floor")
    block_end = torch.cumsum(blocks, 0)
    # padded row of sorted slot s = s - (first slot of its expert) + (first padded row of its expert)
    shift = (block_end - blocks) * block - (torch.cumsum(counts, 0) - counts)
    row = torch.arange(slots, device=routed.device) + shift.index_select(0, sorted_expert)
    num_blocks = slots // block + experts  # sum_e ceil(c_e / B) <= S / B + E
    block_expert = torch.searchsorted(block_end, torch.arange(num_blocks, device=routed.device), right=True)
    block_expert = block_expert.clamp(max=experts - 1)  # the unused tail blocks: any expert, zero rows
    # (block, row in block) of each slot: a 3-D layout built and read by indexing, not by
    # reshaping a 2-D one (a reshape of a symbolic size asks for a divisibility proof)
    slot_block = torch.div(row, block, rounding_mode="floor")
    slot_row = row - slot_block * block
    padded = torch.zeros(num_blocks, block, routed.shape[1], dtype=routed.dtype, device=routed.device)
    padded = padded.index_put([slot_block, slot_row], routed)
    hidden = F.silu(torch.baddbmm(b_in.index_select(0, block_expert).unsqueeze(1), padded,
                                  w_in.index_select(0, block_expert)))
    out = torch.baddbmm(b_out.index_select(0, block_expert).unsqueeze(1), hidden, w_out.index_select(0, block_expert))
    return out[slot_block, slot_row]


def balance_loss(router_probability_sum: torch.Tensor, expert_load: torch.Tensor, num_atoms: float) -> torch.Tensor:
    """Switch/GShard load-balancing loss summed over layers, E * sum_e f_e P_e per layer, from
    the per-layer sums the model returns ([L, E] each): f_e the fraction of atom-slots routed
    to expert e (no gradient), P_e the mean router probability of e over `num_atoms` atoms.
    Equals 1 per layer for a perfectly balanced router."""
    num_experts = expert_load.shape[-1]
    fraction = expert_load.detach() / expert_load.detach().sum(dim=-1, keepdim=True).clamp(min=1)
    return num_experts * (fraction * router_probability_sum).sum() / max(float(num_atoms), 1.0)
