"""Expert parallelism: the experts of every MoE layer sharded over an `ep` group.

Rank p of the group holds experts [p*E/P, (p+1)*E/P) of each layer; the router and the
shared expert are replicated. Each atom-slot (atom, chosen expert) is dispatched to the
rank holding its expert with one `all_to_all_single`, runs there in that expert's dense
block, and comes back with the inverse all_to_all. `AllToAll` is an autograd Function
whose backward is `AllToAll.apply` with the send and receive sizes swapped (the adjoint of
a permutation across ranks is its inverse), so forces (first derivatives) and their
parameter gradients (second derivatives) are exact through the dispatch.
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from janus_potential.nn.moe import MixtureOfExperts

from .halo import all_to_all_rows


class AllToAll(torch.autograd.Function):
    """Rows in consecutive blocks of `send_counts` go to ranks 0..P-1; blocks of
    `recv_counts` arrive. Backward: the same Function with the counts swapped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send_counts: List[int], recv_counts: List[int],  # type: ignore[override]
                group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        ctx.counts = (send_counts, recv_counts, group)
        start = time.perf_counter()
        out = all_to_all_rows(x, send_counts, recv_counts, group)
        AllToAll.bytes_sent += (x.shape[0] - send_counts[dist.get_rank(group)]) * x[0].numel() * x.element_size() \
            if x.shape[0] else 0
        AllToAll.seconds += time.perf_counter() - start
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        send_counts, recv_counts, group = ctx.counts
        return AllToAll.apply(grad, recv_counts, send_counts, group), None, None, None

    bytes_sent = 0  # off-rank payload of every dispatch/combine so far
    seconds = 0.0


class ExpertParallelMoE(nn.Module):
    """Drop-in replacement of a `MixtureOfExperts` with its experts sharded over `group`."""

    def __init__(self, moe: MixtureOfExperts, group: Optional[dist.ProcessGroup]) -> None:
        super().__init__()
        self.group = group
        self.group_size = dist.get_world_size(group)
        self.group_rank = dist.get_rank(group)
        self.num_experts = moe.num_experts
        if self.num_experts % self.group_size:
            raise ValueError(f"{self.num_experts} experts cannot be split evenly over {self.group_size} ranks")
        self.local_experts = self.num_experts // self.group_size
        self.first_expert = self.group_rank * self.local_experts
        self.experts_per_atom = moe.experts_per_atom
        self.router_uses_features = moe.router_uses_features
        self.low_precision = moe.low_precision
        self.router = moe.router
        self.shared = moe.shared
        shard = slice(self.first_expert, self.first_expert + self.local_experts)
        for name in ("w_in", "b_in", "w_out", "b_out"):
            weight = nn.Parameter(getattr(moe, name).detach()[shard].clone())
            weight.expert_shard = True
            setattr(self, name, weight)

    route = MixtureOfExperts.route
    expert_low_precision = MixtureOfExperts.expert_low_precision
    shared_low_precision = MixtureOfExperts.shared_low_precision

    def forward(self, x: torch.Tensor, element_embedding: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(update, router probability sum [E], expert load [E]) of this rank's rows, as
        `MixtureOfExperts.forward` returns them."""
        expert_index, gates, probabilities = self.route(x, element_embedding)
        out = self.shared(x) if not self.low_precision else self.shared_low_precision(x)
        flat_expert = expert_index.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        atom_of_slot = torch.div(order, self.experts_per_atom, rounding_mode="floor")
        gate_of_slot = gates.reshape(-1)[order].unsqueeze(-1)
        counts = torch.bincount(flat_expert, minlength=self.num_experts)
        ranks, local = self.group_size, self.local_experts
        # counts_from[s, e]: slots rank s sends to my local expert e (integers, no autograd).
        # (the counts are exchanged on the CPU: they become Python ints for the split anyway)
        counts_cpu = counts.cpu()
        counts_from = torch.empty(ranks, local, dtype=counts.dtype)
        dist.all_to_all_single(counts_from, counts_cpu.view(ranks, local).contiguous(), group=self.group)
        send_counts = counts_cpu.view(ranks, local).sum(1).tolist()
        recv_counts = counts_from.sum(1).tolist()

        received = AllToAll.apply(x.index_select(0, atom_of_slot), send_counts, recv_counts, self.group)
        # `received` is one block per (source rank, local expert): regroup by expert, so that
        # each expert runs one matmul (computing the blocks where they lie needs ranks x more
        # per-block weight gradients in the backward: +0.7 GiB per rank for `1b`, measured)
        expert_of_row = torch.arange(local).repeat(ranks).repeat_interleave(counts_from.reshape(-1)).to(x.device)
        by_expert = torch.argsort(expert_of_row, stable=True)
        grouped = received.index_select(0, by_expert)
        # unbind once (see MixtureOfExperts.forward: per-expert indexing costs O(E^2) in backward)
        w_in, b_in, w_out, b_out = self.w_in.unbind(0), self.b_in.unbind(0), self.w_out.unbind(0), self.b_out.unbind(0)
        pieces = []
        for e, block in enumerate(torch.split(grouped, counts_from.sum(0).tolist())):
            if self.low_precision:
                pieces.append(self.expert_low_precision(block, w_in[e], b_in[e], w_out[e], b_out[e]))
            else:
                hidden = F.silu(torch.addmm(b_in[e], block, w_in[e]))
                pieces.append(torch.addmm(b_out[e], hidden, w_out[e]))
        computed = torch.cat(pieces, dim=0).index_select(0, torch.argsort(by_expert))
        returned = AllToAll.apply(computed, recv_counts, send_counts, self.group)
        out = out.index_add(0, atom_of_slot, returned * gate_of_slot)
        return out, probabilities.sum(dim=0), counts.to(probabilities.dtype)


def shard_experts(model: nn.Module, group: Optional[dist.ProcessGroup]) -> nn.Module:
    """Replace every layer's MoE by its expert-parallel shard (in place; returns `model`)."""
    if group is None or dist.get_world_size(group) == 1:
        return model
    for layer in model.layers:
        layer.moe = ExpertParallelMoE(layer.moe, group)
    return model


def is_expert_shard(parameter: torch.Tensor) -> bool:
    return bool(getattr(parameter, "expert_shard", False))


def expert_shards(model: nn.Module) -> Dict[str, ExpertParallelMoE]:
    """State-dict name of every expert-shard tensor -> the sharded MoE that holds it."""
    shards: Dict[str, ExpertParallelMoE] = {}
    for index, layer in enumerate(model.layers):
        if isinstance(layer.moe, ExpertParallelMoE):
            for name in ("w_in", "b_in", "w_out", "b_out"):
                shards[f"layers.{index}.moe.{name}"] = layer.moe
    return shards


def gather_shard(shard: torch.Tensor, moe: ExpertParallelMoE) -> torch.Tensor:
    """The full [E, ...] tensor from every rank's [E/P, ...] shard (collective over the ep group)."""
    shard = shard.detach().contiguous()
    pieces = [torch.empty_like(shard) for _ in range(moe.group_size)]
    dist.all_gather(pieces, shard, group=moe.group)
    return torch.cat(pieces)


def full_state_dict(model: nn.Module, state: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """The unsharded version of `state` (default: the model's state dict), keyed like the
    model's state dict: expert shards all-gathered (collective over the ep groups, in a
    fixed order on every rank)."""
    state = dict(model.state_dict() if state is None else state)
    for name, moe in expert_shards(model).items():
        state[name] = gather_shard(state[name], moe)
    return state
