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
    first) and are launched strictly in bucket order; with `owner_of` (sharded gradients)
    a bucket holds one owner's parameters and is reduced to that owner only, the other
    ranks dropping those gradients, so every rank issues the same
    collectives in the same order. Each bucket carries one presence flag per parameter:
    a parameter no rank produced a gradient for keeps `grad=None`, as in one process.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], group: Optional[dist.ProcessGroup],
                 bucket_bytes: int = 8 << 20, owner_of: Optional[Dict[int, int]] = None,
                 sizes: Optional[Dict[int, int]] = None) -> None:
        self.group = group
        self.owner_of = owner_of
        self.rank = dist.get_rank()
        params = [p for p in parameters if p.requires_grad][::-1]
        self.buckets: List[List[torch.nn.Parameter]] = [[]]
        size = 0
        # element counts from `sizes` where given: with `parallel.shard: full` a parameter's
        # data is empty between steps on the ranks that do not own it, and every rank must
        # cut the same buckets
        self.numel = {id(p): (sizes or {}).get(id(p), p.numel()) for p in params}
        for p in params:
            new_owner = owner_of is not None and self.buckets[-1] and owner_of[id(p)] != owner_of[id(self.buckets[-1][0])]
            if self.buckets[-1] and (size + self.numel[id(p)] * p.element_size() > bucket_bytes or new_owner):
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += self.numel[id(p)] * p.element_size()
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
        pieces = [p.grad.reshape(-1) if p.grad is not None else reference.new_zeros(self.numel[id(p)]) for p in bucket]
        presence = torch.tensor([p.grad is not None for p in bucket], dtype=reference.dtype, device=reference.device)
        flat = torch.cat(pieces + [presence])
        if self.owner_of is None:
            handle = dist.all_reduce(flat, group=self.group, async_op=True)
        else:  # sharded gradients: the sum goes to the bucket's owner only
            handle = dist.reduce(flat, dst=self.owner_of[id(reference)], group=self.group, async_op=True)
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
            if self.owner_of is not None and self.owner_of[id(bucket[0])] != self.rank:
                for p in bucket:
                    p.grad = None
                continue
            offset = 0
            presence = flat[-len(bucket):]
            for k, p in enumerate(bucket):
                n = self.numel[id(p)]
                p.grad = flat[offset: offset + n].view_as(p).clone() if presence[k] > 0 else None
                offset += n
        self.seconds += time.perf_counter() - start
        self.reset()


@dataclass
class OwnedAtoms:
    """What `loss_terms` reads of a graph, for the owned atoms of one domain."""

    num_atoms: torch.Tensor  # [G] atoms of each whole structure (energy per atom)
    batch: torch.Tensor  # [n_owned] structure of each owned atom

    def to(self, device: torch.device) -> "OwnedAtoms":
        return OwnedAtoms(self.num_atoms.to(device), self.batch.to(device))


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


def assign_owners(parameters: List[torch.nn.Parameter], groups: List[Optional[dist.ProcessGroup]]) -> List[int]:
    """One owner rank per parameter inside its gradient group: the parameters of a group, in
    model order, cut into contiguous blocks of about equal element counts (one block per
    member), so that owner-to-owner gradient buckets are few and large. The owner keeps the
    parameter's optimizer state, receives its summed gradient (`parallel.shard` optimizer
    and full), holds it at rest (full), and writes it to checkpoints (every mode)."""
    members_of: Dict[int, List[int]] = {}
    totals: Dict[int, int] = {}
    for p, group in zip(parameters, groups):
        if id(group) not in members_of:
            members_of[id(group)] = dist.get_process_group_ranks(group) if group is not None else [0]
        totals[id(group)] = totals.get(id(group), 0) + p.numel()
    before: Dict[int, int] = {}
    owners = []
    for p, group in zip(parameters, groups):
        members, total = members_of[id(group)], max(1, totals[id(group)])
        start = before.get(id(group), 0)
        before[id(group)] = start + p.numel()
        block = int(len(members) * (start + p.numel() / 2) / total)
        owners.append(members[min(len(members) - 1, block)])
    return owners


class ParameterShards:
    """Which rank owns which parameter, and (`parallel.shard: full`) the parameters held by
    their owners only between steps.

    Every parameter has one owner in its gradient group (`assign_owners`; dense: the world,
    expert shards: the ranks holding that shard). With `full`, a rank keeps only the data of
    the parameters it owns at rest (dense ones, and expert shards replicated over dp);
    `gather()` broadcasts them from their owners at the start of a step (and for validation,
    with the EMA weights), `release()` drops the others after the optimizer step;
    checkpoints are written by the owners, so they need no gather.

    They are gathered for the whole step rather than layer by layer and freed after each
    layer's forward: force training differentiates the forces, whose graph keeps every
    layer's weights until the loss's backward ends, so a per-layer gather would have to
    re-gather inside the double backward (saved-tensor hooks) to free memory the step needs
    anyway; at rest (optimizer state, gradients, checkpoints) they are sharded. On one
    process, or with `none`/`optimizer`, gather and release do nothing.
    """

    def __init__(self, model: torch.nn.Module, mesh: ProcessMesh, mode: str) -> None:
        self.names = [name for name, _ in model.named_parameters()]
        self.parameters = [p for _, p in model.named_parameters()]
        self.groups = [None if mesh.world_size == 1 else
                       mesh.expert_grad_group if is_expert_shard(p) else mesh.dense_grad_group for p in self.parameters]
        self.owners = assign_owners(self.parameters, self.groups) if mesh.world_size > 1 else [0] * len(self.parameters)
        self.rank = mesh.rank
        self.mode = mode if mesh.world_size > 1 else "none"
        self.shapes = [p.shape for p in self.parameters]
        self.devices = [p.device for p in self.parameters]
        # parameters whose data this rank drops between steps (full: those owned by another rank)
        self.shared = [k for k, group in enumerate(self.groups) if group is not None and dist.get_world_size(group) > 1]
        self.released = [k for k in self.shared if self.mode == "full" and self.owners[k] != self.rank]
        self.released_set = set(self.released)
        self.held = True
        self.release()

    def owns(self, index: int) -> bool:
        return self.owners[index] == self.rank

    def is_held(self, index: int) -> bool:
        """Whether this rank holds parameter `index`'s data at rest."""
        return index not in self.released_set

    @torch.no_grad()
    def gather(self, values: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Give every rank every dense parameter (from its owner). With `values` (name ->
        tensor, e.g. EMA weights held by the owners), those are gathered into the parameters'
        data instead."""
        if not self.released or (self.held and values is None):
            return
        for k in self.shared:
            p = self.parameters[k]
            if self.owns(k):
                if values is not None:
                    p.data = values[self.names[k]].clone()
            else:
                p.data = torch.empty(self.shapes[k], dtype=p.dtype, device=self.devices[k])
            dist.broadcast(p.data, src=self.owners[k], group=self.groups[k])
        self.held = True

    def release(self) -> None:
        for k in self.released:
            p = self.parameters[k]
            p.data = torch.empty(0, dtype=p.dtype, device=self.devices[k])
        self.held = not self.released


def gradient_reducers(model: torch.nn.Module, mesh: ProcessMesh, bucket_mb: float,
                      shards: Optional[ParameterShards] = None) -> List[GradientReducer]:
    """The gradient sums of a step: dense parameters over the world, expert shards over the
    ranks holding the same shard (no reducer where that group is one rank). With sharded
    gradients (`parallel.shard` optimizer or full) each sum goes to the parameter's owner
    only (`dist.reduce`, ZeRO stage 2). None on one process."""
    if mesh.world_size == 1:
        return []
    bucket_bytes = int(bucket_mb * (1 << 20))
    owner_of, sizes = None, None
    if shards is not None:
        sizes = {id(p): shape.numel() for p, shape in zip(shards.parameters, shards.shapes)}
        if shards.mode in ("optimizer", "full"):
            owner_of = {id(p): owner for p, owner in zip(shards.parameters, shards.owners)}
    dense = [p for p in model.parameters() if not is_expert_shard(p)]
    experts = [p for p in model.parameters() if is_expert_shard(p)]
    reducers = [GradientReducer(dense, mesh.dense_grad_group, bucket_bytes, owner_of, sizes)]
    if experts and dist.get_world_size(mesh.expert_grad_group) > 1:
        reducers.append(GradientReducer(experts, mesh.expert_grad_group, bucket_bytes, owner_of, sizes))
    return reducers


class ShardedAdamW:
    """AdamW whose state is split over the ranks that share each parameter's gradient (ZeRO
    stages 1-2, `parallel.shard: optimizer`, and with the parameters themselves, `full`): only
    a parameter's owner (`ParameterShards`) keeps its moments, receives its summed gradient
    and updates it; with `optimizer` it then broadcasts the new values, with `full` the other
    ranks fetch them at the next step's `gather`. Exact, because AdamW is elementwise per
    parameter.

    Written here rather than taken from `torch.distributed.optim.ZeroRedundancyOptimizer` or
    `fully_shard`: the parameters live in two kinds of groups (dense over the world, expert
    shards over the ep replicas), FSDP's reshard-after-forward frees parameter storage that
    the force graph of force training still needs in the double backward, and checkpoints
    are written per owner (`training/checkpoint.py`) so that a run resumes in any layout.
    """

    def __init__(self, shards: ParameterShards, **adamw: float) -> None:
        self.shards = shards
        self.parameters = shards.parameters
        self.owned = [k for k in range(len(self.parameters)) if shards.owns(k)]
        # a rank that owns nothing (more ranks than parameters) steps an empty stand-in
        mine = [self.parameters[k] for k in self.owned] or [torch.nn.Parameter(torch.zeros(0))]
        self.optimizer = torch.optim.AdamW(mine, **adamw)

    @property
    def param_groups(self) -> list:
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.parameters:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.optimizer.step()
        if self.shards.mode == "full":  # the others fetch them at the next gather
            return
        for k in self.shards.shared:
            dist.broadcast(self.parameters[k].data, src=self.shards.owners[k], group=self.shards.groups[k])
