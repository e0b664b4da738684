"""Expert parallelism: the experts of every MoE layer sharded over an `ep` group.

Rank p of the group holds experts [p*E/P, (p+1)*E/P) of each layer; the router and the
shared expert are replicated. Each atom-slot (atom, chosen expert) is dispatched to the
rank holding its expert with one `all_to_all_single`, runs there in that expert's dense
block, and comes back with the inverse all_to_all. The exchange is an operator
(`exchange`, a torch.library operator) whose backward is the same operator with the send and
receive sizes swapped (the adjoint of a permutation across ranks is its inverse), so forces
(first derivatives) and their parameter gradients (second derivatives) are exact through
the dispatch, and the compiled training step (training/compiled.py) traces it like any
other operator: its sizes come from an `ExpertPlan` computed before the step.
"""

from __future__ import annotations

import time
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from janus_potential.nn.moe import MixtureOfExperts, blocked_experts

from .halo import all_to_all_rows, backend_handles


class ExchangeStats:
    """Off-rank payload and seconds of every expert dispatch/combine so far (bench/scaling.py)."""

    bytes_sent = 0
    seconds = 0.0


_GROUPS: Dict[int, Optional[dist.ProcessGroup]] = {}


def _group_key(group: Optional[dist.ProcessGroup]) -> int:
    """An integer naming `group` (an operator argument cannot be a process group)."""
    for key, known in _GROUPS.items():
        if known is group:
            return key
    key = len(_GROUPS)
    _GROUPS[key] = group
    return key


@torch.library.custom_op("janus_parallel::all_to_all_rows", mutates_args=())
def _exchange_op(x: torch.Tensor, token: torch.Tensor, send_counts: torch.Tensor, recv_counts: torch.Tensor,
                 group: int, rows: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows of `x` in consecutive blocks of `send_counts` ([P] integers) go to ranks 0..P-1 of
    group `group` (`_group_key`); `rows` = sum(recv_counts) rows arrive, blocks in rank order.
    Also returns a new `token` (see `exchange`)."""
    start = time.perf_counter()
    send, recv = send_counts.tolist(), recv_counts.tolist()
    group_object = _GROUPS[group]
    out = all_to_all_rows(x, send, recv, group_object)
    if x.shape[0]:
        ExchangeStats.bytes_sent += (x.shape[0] - send[dist.get_rank(group_object)]) * x[0].numel() * x.element_size()
    ExchangeStats.seconds += time.perf_counter() - start
    return out, token + 1


@_exchange_op.register_fake
def _exchange_shape(x, token, send_counts, recv_counts, group, rows):
    return x.new_empty((rows,) + tuple(x.shape[1:])), torch.empty_like(token)


def _exchange_setup(ctx, inputs, output) -> None:
    x, _, send_counts, recv_counts, group, _ = inputs
    ctx.exchange = (send_counts, recv_counts, group, x.shape[0])


def _exchange_backward(ctx, grad: torch.Tensor, _token_grad: Optional[torch.Tensor]):
    """The adjoint of a permutation across ranks is its inverse: the same exchange with the
    counts swapped, itself differentiable (forces' parameter gradients are second order)."""
    send_counts, recv_counts, group, rows = ctx.exchange
    return exchange(grad, recv_counts, send_counts, group, rows), None, None, None, None, None


_exchange_op.register_autograd(_exchange_backward, setup_context=_exchange_setup)

# The token that orders the exchanges of a traced graph (`ordered_exchanges`); None: eager.
_ORDER: List[Optional[torch.Tensor]] = [None]


def exchange(x: torch.Tensor, send_counts: torch.Tensor, recv_counts: torch.Tensor, group: int,
             rows: int) -> torch.Tensor:
    """All-to-all of rows (`_exchange_op`), differentiable to any order. An operator, not a
    Python function, so that the compiled training step can trace it: its shape function
    needs only `rows`, a size of the step's inputs (`ExpertPlan.row_expert`).

    Every rank must run the exchanges in the same order, but a compiler orders a graph's
    operators by their data dependencies only (and a rank that receives no rows has an
    exchange that depends on nothing). Inside `ordered_exchanges` each exchange therefore
    takes the token the previous one returned: a chain in the order of tracing, which is the
    order of the program on every rank."""
    token = _ORDER[0]
    if token is None:
        return _exchange_op(x, torch.zeros(1), send_counts, recv_counts, group, rows)[0]
    out, _ORDER[0] = _exchange_op(x, token, send_counts, recv_counts, group, rows)
    return out


class ordered_exchanges:
    """`with ordered_exchanges(token) as order:` chains every `exchange` inside (see there);
    `order.token` is the last one's token afterwards (an output of the traced graph, so that
    no exchange is dead code)."""

    def __init__(self, token: torch.Tensor) -> None:
        self.token = token

    def __enter__(self) -> "ordered_exchanges":
        _ORDER[0] = self.token
        return self

    def __exit__(self, *exc) -> None:
        self.token = _ORDER[0]
        _ORDER[0] = None


class ExpertPlan(NamedTuple):
    """Who sends which atom-slots where, for one MoE layer on one rank (integers only).

    expert_index [N, k]: each atom's experts; send_counts / recv_counts [P] (CPU): slots sent
    to / received from each rank; row_expert [R]: the local expert of each received row, in
    arrival order; local_counts [E/P]: rows per local expert."""

    expert_index: torch.Tensor
    send_counts: torch.Tensor
    recv_counts: torch.Tensor
    row_expert: torch.Tensor
    local_counts: torch.Tensor


class ExpertParallelMoE(nn.Module):
    """Drop-in replacement of a `MixtureOfExperts` with its experts sharded over `group`."""

    def __init__(self, moe: MixtureOfExperts, group: Optional[dist.ProcessGroup]) -> None:
        super().__init__()
        self.group = group
        self.group_key = _group_key(group)
        self.group_size = dist.get_world_size(group)
        self.group_rank = dist.get_rank(group)
        self.num_experts = moe.num_experts
        if self.num_experts % self.group_size:
            raise ValueError(f"{self.num_experts} experts cannot be split evenly over {self.group_size} ranks")
        self.local_experts = self.num_experts // self.group_size
        self.first_expert = self.group_rank * self.local_experts
        self.experts_per_atom = moe.experts_per_atom
        self.router_uses_features = moe.router_uses_features
        self.router_scale = moe.router_scale
        self.low_precision = moe.low_precision
        # as in MixtureOfExperts: 0 = one matmul per local expert, B > 0 = the blocked layout
        self.dispatch_block = moe.dispatch_block
        # set by the compiled training step while it traces (training/compiled.py): the
        # layer's ExpertPlan, computed before the step, as inputs of the traced graph
        self.plan: Optional[ExpertPlan] = None
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

    def make_plan(self, expert_index: torch.Tensor) -> ExpertPlan:
        """The plan of `expert_index` [N, k] (collective over the group: every rank sends its
        counts per expert to the expert's rank; exchanged on the CPU, where the split sizes
        are needed anyway)."""
        flat = expert_index.reshape(-1)
        counts = torch.zeros(self.num_experts, dtype=torch.long).index_add_(
            0, flat.cpu(), torch.ones(flat.shape[0], dtype=torch.long))
        ranks, local = self.group_size, self.local_experts
        # counts_from[s, e]: slots rank s sends to my local expert e
        counts_from = torch.empty(ranks, local, dtype=torch.long)
        dist.all_to_all_single(counts_from, counts.view(ranks, local).contiguous(), group=self.group)
        row_expert = torch.arange(local).repeat(ranks).repeat_interleave(counts_from.reshape(-1))
        return ExpertPlan(expert_index, counts.view(ranks, local).sum(1), counts_from.sum(1),
                          row_expert.to(expert_index.device), counts_from.sum(0).to(expert_index.device))

    def forward(self, x: torch.Tensor, element_embedding: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(update, router probability sum [E], expert load [E]) of this rank's rows, as
        `MixtureOfExperts.forward` returns them. Eager: routes and exchanges the counts here;
        traced (`self.plan` set): takes the experts and counts from the plan, so that every
        size of the step is an input's."""
        expert_index, gates, probabilities = self.route(x, element_embedding)
        plan = self.plan
        if plan is None:
            plan = self.make_plan(expert_index)
        else:  # the plan's experts; their gates (softmax over the chosen logits) from the probabilities
            expert_index = plan.expert_index
            chosen = probabilities.gather(1, expert_index)
            gates = chosen / chosen.sum(dim=1, keepdim=True)
        out = self.shared(x) if not self.low_precision else self.shared_low_precision(x)
        flat_expert = expert_index.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        atom_of_slot = torch.div(order, self.experts_per_atom, rounding_mode="floor")
        gate_of_slot = gates.reshape(-1)[order].unsqueeze(-1)
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=x.device).index_add_(
            0, flat_expert, torch.ones_like(flat_expert))
        key = self.group_key
        sent = x.index_select(0, atom_of_slot)
        received = exchange(sent, plan.send_counts, plan.recv_counts, key, plan.row_expert.shape[0])
        # `received` is one block per (source rank, local expert): regroup by expert, so that
        # each expert runs one matmul (computing the blocks where they lie needs ranks x more
        # per-block weight gradients in the backward: +0.7 GiB per rank for `1b`, measured)
        by_expert = torch.argsort(plan.row_expert, stable=True)
        grouped = received.index_select(0, by_expert)
        if self.dispatch_block > 0 and not self.low_precision:
            computed = blocked_experts(grouped, plan.row_expert.index_select(0, by_expert), plan.local_counts,
                                       self.w_in, self.b_in, self.w_out, self.b_out, self.dispatch_block)
        else:
            # unbind once (see MixtureOfExperts.forward: per-expert indexing costs O(E^2) in backward)
            w_in, b_in, w_out, b_out = self.w_in.unbind(0), self.b_in.unbind(0), self.w_out.unbind(0), self.b_out.unbind(0)
            pieces = []
            for e, block in enumerate(torch.split(grouped, plan.local_counts.tolist())):
                if self.low_precision:
                    pieces.append(self.expert_low_precision(block, w_in[e], b_in[e], w_out[e], b_out[e]))
                else:
                    hidden = F.silu(torch.addmm(b_in[e], block, w_in[e]))
                    pieces.append(torch.addmm(b_out[e], hidden, w_out[e]))
            computed = torch.cat(pieces, dim=0)
        computed = computed.index_select(0, torch.argsort(by_expert))
        returned = exchange(computed, plan.recv_counts, plan.send_counts, key, sent.shape[0])
        out = out.index_add(0, atom_of_slot, returned * gate_of_slot)
        return out, probabilities.sum(dim=0), counts.to(probabilities.dtype)


def expert_plans(model: nn.Module, species: torch.Tensor) -> List[ExpertPlan]:
    """The plan of every expert-parallel layer for a batch of `species`, from the species alone
    (element-only routing: the experts of an atom are its element's), before the compiled step
    (collective over each layer's group); [] when the experts are not sharded."""
    plans = []
    with torch.no_grad():
        element_embedding = model.embedding(species)
        for layer in model.layers:
            moe = layer.moe
            if isinstance(moe, ExpertParallelMoE):
                expert_index, _, _ = moe.route(element_embedding, element_embedding)
                plans.append(moe.make_plan(expert_index))
    return plans


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
    device = shard.device
    shard = shard.detach().contiguous()
    if not backend_handles(shard, moe.group):
        shard = shard.cpu()
    pieces = [torch.empty_like(shard) for _ in range(moe.group_size)]
    dist.all_gather(pieces, shard, group=moe.group)
    return torch.cat(pieces).to(device)


def full_state_dict(model: nn.Module, state: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """The unsharded version of `state` (default: the model's state dict), keyed like the
    model's state dict: expert shards all-gathered (collective over the ep groups, in a
    fixed order on every rank)."""
    state = dict(model.state_dict() if state is None else state)
    for name, moe in expert_shards(model).items():
        state[name] = gather_shard(state[name], moe)
    return state
