"""Building blocks of hybrid-parallel training (dp x ep x dd; the trainer in
`training/trainer.py` explains the exactness argument): splitting a batch over the data
ranks, summing gradients in buckets overlapped with the backward pass, what one model
evaluation of a step carries, and the optimizer whose state is sharded over the ranks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

import torch
import torch.distributed as dist

from janus_potential.parallel.expert import is_expert_shard
from janus_potential.parallel.mesh import ProcessMesh

from .data import Batch


def split_by_atoms(batch: List[int], sizes: List[int], parts: int) -> List[List[int]]:
    """Split one batch into `parts` groups of about equal atom counts (largest first to
    the lightest part); each group keeps the batch order."""
    loads = [0] * parts
    groups: List[List[int]] = [[] for _ in range(parts)]
    for k in sorted(batch, key=lambda k: (-sizes[k], k)):
        part = min(range(parts), key=lambda p: (loads[p], p))
        loads[part] += sizes[k]
        groups[part].append(k)
    position = {k: n for n, k in enumerate(batch)}
    return [sorted(g, key=position.__getitem__) for g in groups]


class GradientReducer:
    """Sum gradients over `group` in buckets launched from post-accumulate-grad hooks.

    Buckets follow reverse registration order (the last layers' gradients are ready
    first) and are launched strictly in bucket order, so every rank issues the same
    collectives in the same order. Each bucket carries one presence flag per parameter:
    a parameter no rank produced a gradient for keeps `grad=None`, as in one process.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], group: Optional[dist.ProcessGroup],
                 bucket_bytes: int = 8 << 20) -> None:
        self.group = group
        params = [p for p in parameters if p.requires_grad][::-1]
        self.buckets: List[List[torch.nn.Parameter]] = [[]]
        size = 0
        for p in params:
            if self.buckets[-1] and size + p.numel() * p.element_size() > bucket_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
        self.bucket_of = {id(p): b for b, bucket in enumerate(self.buckets) for p in bucket}
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_grad)
        self.seconds = 0.0
        self.bytes = 0
        self.reset()

    def reset(self) -> None:
        self.pending = [len(bucket) for bucket in self.buckets]
        self.launched: List[tuple] = []

    def _on_grad(self, parameter: torch.Tensor) -> None:
        self.pending[self.bucket_of[id(parameter)]] -= 1
        while len(self.launched) < len(self.buckets) and self.pending[len(self.launched)] == 0:
            self._launch(len(self.launched))

    def _launch(self, index: int) -> None:
        start = time.perf_counter()
        bucket = self.buckets[index]
        reference = bucket[0]
        pieces = [p.grad.reshape(-1) if p.grad is not None else reference.new_zeros(p.numel()) for p in bucket]
        presence = torch.tensor([p.grad is not None for p in bucket], dtype=reference.dtype)
        flat = torch.cat(pieces + [presence])
        handle = dist.all_reduce(flat, group=self.group, async_op=True)
        self.launched.append((flat, handle))
        self.bytes += flat.numel() * flat.element_size()
        self.seconds += time.perf_counter() - start

    def finish(self) -> None:
        """Launch what backward did not, wait, and write the summed gradients back."""
        while len(self.launched) < len(self.buckets):
            self._launch(len(self.launched))
        start = time.perf_counter()
        for bucket, (flat, handle) in zip(self.buckets, self.launched):
            handle.wait()
            offset = 0
            presence = flat[-len(bucket):]
            for k, p in enumerate(bucket):
                n = p.numel()
                p.grad = flat[offset: offset + n].view_as(p).clone() if presence[k] > 0 else None
                offset += n
        self.seconds += time.perf_counter() - start
        self.reset()


@dataclass
class OwnedAtoms:
    """What `loss_terms` reads of a graph, for the owned atoms of one domain."""

    num_atoms: torch.Tensor  # [G] atoms of each whole structure (energy per atom)
    batch: torch.Tensor  # [n_owned] structure of each owned atom


@dataclass
class ForwardPass:
    """One model evaluation of a step: its prediction, the labels it is compared with,
    its label counts (energy frames, force atoms, stress frames, atoms; zero for a padding
    pass) and, per MoE layer, the router probability sums and expert loads of its owned
    atoms (zero for a padding pass), as the model returned them."""

    prediction: Dict[str, torch.Tensor]
    target: Batch
    counted: bool
    counts: torch.Tensor
    router_probability_sum: torch.Tensor
    expert_load: torch.Tensor


def gradient_reducers(model: torch.nn.Module, mesh: ProcessMesh, bucket_mb: float) -> List[GradientReducer]:
    """The gradient sums of a step: dense parameters over the world, expert shards over the
    ranks holding the same shard. None on one process."""
    if mesh.world_size == 1:
        return []
    bucket_bytes = int(bucket_mb * (1 << 20))
    dense = [p for p in model.parameters() if not is_expert_shard(p)]
    experts = [p for p in model.parameters() if is_expert_shard(p)]
    reducers = [GradientReducer(dense, mesh.dense_grad_group, bucket_bytes)]
    if experts:
        reducers.append(GradientReducer(experts, mesh.expert_grad_group, bucket_bytes))
    return reducers


class ShardedAdamW:
    """AdamW whose state is split over the ranks that share each parameter's gradient (ZeRO
    stage 1, `parallel.shard: optimizer`): every parameter has one owner rank in its group
    (dense parameters: the world; expert shards: the ranks holding that shard), chosen to
    balance the element counts; only the owner keeps its moments and updates it, then
    broadcasts the new values. Exact, because AdamW is elementwise per parameter.

    Written here rather than taken from `torch.distributed.optim.ZeroRedundancyOptimizer`
    because the parameters live in two kinds of groups (dense over the world, expert shards
    over the ep replicas) and checkpoints must stay in the plain one-process AdamW format
    (`state_dict` assembles it; `load_state_dict` takes it), so that a run resumes in any
    layout. Gradients stay all-reduced (summed) on every rank: their sharding (stage 2) is
    not done.
    """

    def __init__(self, parameters: List[torch.nn.Parameter], groups: List[Optional[dist.ProcessGroup]],
                 **adamw: float) -> None:
        self.parameters = parameters
        self.owner: List[int] = []  # global rank of each parameter's owner
        loads: Dict[int, Dict[int, int]] = {}
        for p, group in zip(parameters, groups):
            members = dist.get_process_group_ranks(group) if group is not None else [dist.get_rank()]
            load = loads.setdefault(id(group), {r: 0 for r in members})
            owner = min(members, key=lambda r: (load[r], r))
            load[owner] += p.numel()
            self.owner.append(owner)
        self.groups = groups
        rank = dist.get_rank()
        self.owned = [k for k, owner in enumerate(self.owner) if owner == rank]
        # a rank that owns nothing (more ranks than parameters) steps an empty stand-in
        mine = [parameters[k] for k in self.owned] or [torch.nn.Parameter(torch.zeros(0))]
        self.optimizer = torch.optim.AdamW(mine, **adamw)

    @property
    def param_groups(self) -> list:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.parameters:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.optimizer.step()
        for p, owner, group in zip(self.parameters, self.owner, self.groups):
            if group is not None:
                dist.broadcast(p.data, src=owner, group=group)

    def state_dict(self) -> Dict[str, object]:
        """The plain AdamW state dict over all `parameters` (collective: every owner
        broadcasts its parameters' moments)."""
        local = self.optimizer.state_dict()
        mine = {self.owned[i]: values for i, values in local["state"].items()}
        state: Dict[int, Dict[str, torch.Tensor]] = {}
        for k, (p, owner, group) in enumerate(zip(self.parameters, self.owner, self.groups)):
            values = [mine.get(k)]
            if group is not None:
                dist.broadcast_object_list(values, src=owner, group=group)
            if values[0] is not None:
                state[k] = values[0]
        groups = [dict(g, params=list(range(len(self.parameters)))) for g in local["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Take this rank's parameters' moments from a plain AdamW state dict."""
        owned = {k: i for i, k in enumerate(self.owned)}
        groups = [dict(g, params=list(range(len(self.owned)))) for g in state["param_groups"]]
        self.optimizer.load_state_dict({"state": {owned[k]: v for k, v in state["state"].items() if k in owned},
                                        "param_groups": groups})
