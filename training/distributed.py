"""Building blocks of hybrid-parallel training (dp x ep x dd; the trainer in
`training/trainer.py` explains the exactness argument): splitting a batch over the data
ranks, summing gradients in buckets overlapped with the backward pass, and what one model
evaluation of a step carries.
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
