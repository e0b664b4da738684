"""The halo protocol of DESIGN.md as twice-differentiable autograd Functions.

A domain holds `n_owned` atoms followed by ghosts; ghost g is a copy of row
`owner_index[g]` on rank `owner_rank[g]` (possibly this rank: a periodic self-image).

- `halo_exchange` (forward): ghost rows := their owners' rows.
- `halo_reverse` (adjoint): ghost rows are summed into their owners' rows, then zeroed.

The two maps are each other's transpose, so `HaloForward.backward` is `HaloReverse.apply`
and `HaloReverse.backward` is `HaloForward.apply`: no raw collective ever runs inside a
backward, and `autograd.grad(..., create_graph=True)` followed by `loss.backward()` records
and replays the exchanges exactly (second derivatives across ranks are exact).

The same `HaloPlan` drives both backends: with `group=None` (one process) every message is
a self-message (a gather / index_add); with a process group the messages travel in one
`all_to_all_single` per exchange (`all_to_all_rows`: on the device where the group's
backend supports it -- NCCL for CUDA tensors --, else staged through host memory, so a
CUDA model works over gloo too).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import List, Optional

import torch
import torch.distributed as dist


def backend_handles(tensor: torch.Tensor, group: Optional[dist.ProcessGroup]) -> bool:
    """Whether `group`'s backend exchanges tensors of this device directly (CPU: always;
    CUDA: when the backend includes NCCL, e.g. "cpu:gloo,cuda:nccl")."""
    return tensor.device.type == "cpu" or "nccl" in str(dist.get_backend(group)).lower()


def all_to_all_rows(values: torch.Tensor, send_counts: List[int], recv_counts: List[int],
                    group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Rows of `values` in consecutive blocks of `send_counts` go to ranks 0..P-1 of `group`;
    blocks of `recv_counts` arrive, in rank order (through host memory when the backend does
    not handle the device; same values either way)."""
    staged = values if backend_handles(values, group) else values.cpu()
    received = staged.new_empty((sum(recv_counts),) + tuple(values.shape[1:]))
    dist.all_to_all_single(received, staged.contiguous(), recv_counts, send_counts, group=group)
    return received.to(values.device)


@dataclass
class HaloPlan:
    """Who sends which rows to whom, for one rank of a domain-decomposed structure.

    send_index: local owned rows sent, grouped by destination rank (rank order), in the
    order the destination lists its ghosts. recv_rows: local ghost rows filled, grouped by
    source rank (rank order). send_counts / recv_counts: message sizes per rank.
    """

    n_owned: int
    n_local: int
    send_index: torch.Tensor
    send_counts: List[int]
    recv_rows: torch.Tensor
    recv_counts: List[int]
    rank: int = 0
    group: Optional[dist.ProcessGroup] = None
    bytes_sent: List[int] = field(default_factory=lambda: [0])  # off-rank payload, all exchanges so far
    seconds: List[float] = field(default_factory=lambda: [0.0])  # wall time inside the exchanges

    @property
    def distributed(self) -> bool:
        return len(self.send_counts) > 1

    def _transfer(self, values: torch.Tensor, send_counts: List[int], recv_counts: List[int]) -> torch.Tensor:
        """Send consecutive blocks of `values` (sizes send_counts, one per rank) and
        receive blocks of sizes recv_counts, in rank order."""
        if not self.distributed:
            return values
        start = time.perf_counter()
        received = all_to_all_rows(values, send_counts, recv_counts, self.group)
        self.seconds[0] += time.perf_counter() - start
        row_bytes = values[0].numel() * values.element_size() if values.shape[0] else 0
        self.bytes_sent[0] += (values.shape[0] - send_counts[self.rank]) * row_bytes
        return received

    def to(self, device: torch.device) -> "HaloPlan":
        """The plan with its row indices on `device` (counters shared with this one)."""
        if self.send_index.device == torch.device(device):
            return self
        return replace(self, send_index=self.send_index.to(device), recv_rows=self.recv_rows.to(device))

    def forward_copy(self, h: torch.Tensor) -> torch.Tensor:
        received = self._transfer(h.index_select(0, self.send_index), self.send_counts, self.recv_counts)
        return h.index_copy(0, self.recv_rows, received)

    def reverse_sum(self, grad: torch.Tensor) -> torch.Tensor:
        received = self._transfer(grad.index_select(0, self.recv_rows), self.recv_counts, self.send_counts)
        out = grad.index_fill(0, self.recv_rows, 0.0)
        return out.index_add(0, self.send_index, received)


class HaloForward(torch.autograd.Function):
    """Ghost rows := owner rows. Backward: `HaloReverse.apply` (its transpose)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, plan: HaloPlan) -> torch.Tensor:  # type: ignore[override]
        ctx.plan = plan
        return plan.forward_copy(h)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return HaloReverse.apply(grad, ctx.plan), None


class HaloReverse(torch.autograd.Function):
    """Ghost rows summed into owner rows, ghost rows zeroed. Backward: `HaloForward.apply`."""

    @staticmethod
    def forward(ctx, grad: torch.Tensor, plan: HaloPlan) -> torch.Tensor:  # type: ignore[override]
        ctx.plan = plan
        return plan.reverse_sum(grad)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return HaloForward.apply(grad, ctx.plan), None


def halo_exchange(h: torch.Tensor, plan: HaloPlan) -> torch.Tensor:
    """Forward halo exchange (differentiable to any order)."""
    return HaloForward.apply(h, plan)


def halo_reverse(values: torch.Tensor, plan: HaloPlan) -> torch.Tensor:
    """Reverse halo sum, e.g. of ghost forces into their owners (differentiable to any order)."""
    return HaloReverse.apply(values, plan)


class AllReduceSum(torch.autograd.Function):
    """Sum over a group, result replicated. Its adjoint is again a sum (each rank's loss
    contributes), so backward is `AllReduceSum.apply`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        out = x.clone()
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            staged = out if backend_handles(out, group) else out.cpu()
            dist.all_reduce(staged, group=group)
            out = staged.to(x.device)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return AllReduceSum.apply(grad, ctx.group), None


def all_reduce_sum(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Differentiable (to any order) sum over the ranks of `group`."""
    return AllReduceSum.apply(x, group)
