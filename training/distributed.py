"""Data-parallel training: `mpirun -np N janus train CONFIG --set parallel.dp=N` (or torchrun).

Exact equivalence with one process on the same global batch:
- every rank draws the same global batch (`atom_budget_batches`, a pure function of seed
  and epoch) and takes its part, balanced by atom count (`split_by_atoms`);
- the label counts that normalise each loss term (energy frames, force atoms, stress
  frames, all weighted) are summed over ranks first, and each rank's *summed* loss is
  divided by those GLOBAL counts; the MoE balance loss is rebuilt from global expert loads;
- gradients are then SUMMED (not averaged) by `GradientReducer`: buckets of parameters
  whose gradients are complete are all-reduced asynchronously from post-accumulate-grad
  hooks while the backward pass goes on, in a fixed bucket order on every rank.
Rank 0 writes logs and checkpoints; a checkpoint holds only global state (the position in
the global epoch), so a run resumes on any number of ranks.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional

import torch
import torch.distributed as dist

from janus_potential.errors import JanusInputError
from janus_potential.parallel.mesh import ProcessMesh, init_distributed, launched_by_mpi

from .config import TrainConfig
from .data import Sample, collate
from .loss import loss_terms, predict
from .trainer import Trainer


@dataclass
class ParallelConfig:
    dp: int = 1  # data-parallel replicas
    ep: int = 1  # expert-parallel shards (library level: janus_potential.parallel.expert)
    dd: int = 1  # spatial domains (library level: janus_potential.parallel.domain)
    bucket_mb: float = 8.0  # gradient all-reduce bucket size


@dataclass
class DistributedTrainConfig(TrainConfig):
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


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


class DistributedTrainer(Trainer):
    """`Trainer` on `parallel.dp` data-parallel ranks (see the module docstring)."""

    def __init__(self, config: DistributedTrainConfig, resume: bool = False) -> None:
        parallel = config.parallel
        if parallel.ep != 1 or parallel.dd != 1:
            raise JanusInputError(
                "janus train runs parallel.dp; expert (ep) and domain (dd) parallelism are library-level "
                "(janus_potential.parallel.expert / .domain, see docs/parallel.md)"
            )
        self.mesh = ProcessMesh.create(parallel.dp, parallel.ep, parallel.dd)
        self.rank, self.world = self.mesh.rank, self.mesh.world_size
        if self.rank != 0:
            config.run.progress = False
        super().__init__(config, resume)
        self.reducer = None
        if self.world > 1:
            self.reducer = GradientReducer(self.model.parameters(), self.mesh.dense_grad_group,
                                           int(parallel.bucket_mb * (1 << 20)))
        self._moe_inputs: Dict[int, tuple] = {}
        for index, layer in enumerate(self.model.layers):
            layer.moe.register_forward_hook(self._remember_moe_input(index))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _remember_moe_input(self, index: int):
        def hook(module, inputs, output):
            self._moe_inputs[index] = inputs
        return hook

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    # ------------------------------------------------------------- rank-aware set-up and I/O
    def _load_data(self) -> None:
        if self.rank != 0:
            self._barrier()  # rank 0 fills the graph cache first
        super()._load_data()
        if self.rank == 0:
            self._barrier()

    def _epoch_batches(self, epoch: int) -> List[List[int]]:
        return [split_by_atoms(batch, self.sizes, self.world)[self.rank] for batch in super()._epoch_batches(epoch)]

    def save(self) -> None:
        if self.is_main:
            super().save()

    def _log(self, record: Dict[str, Any]) -> None:
        if self.is_main:
            super()._log(record)

    def _truncate_log(self) -> None:
        if self.is_main:
            super()._truncate_log()

    def _finished(self) -> bool:
        if self.world > 1 and self.config.run.max_minutes:
            elapsed = torch.tensor([self.elapsed], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            self.elapsed = float(elapsed)
        return super()._finished()

    # ------------------------------------------------------------- the step
    def train_step(self, samples: List[Sample]) -> Dict[str, float]:
        if self.world == 1:
            return super().train_step(samples)
        self.model.train()
        loss_config = self.config.loss
        self.optimizer.zero_grad(set_to_none=True)
        self._moe_inputs.clear()
        local = torch.zeros(5, dtype=torch.float64)  # energy frames, force atoms, stress frames, atoms, slots
        prediction = batch = None
        if samples:
            batch = collate(samples)
            prediction = predict(self.model, batch, create_graph=True)
            weight = batch.weight.to(torch.float64)
            local[0] = (weight * batch.has_energy).sum()
            local[1] = (weight[batch.graph.batch] * batch.has_forces).sum()
            local[2] = (weight * batch.has_stress).sum()
            local[3] = batch.graph.positions.shape[0]
        loads = torch.stack([
            layer.moe.last_expert_load.to(torch.float64) if samples else torch.zeros(layer.moe.num_experts, dtype=torch.float64)
            for layer in self.model.layers
        ])
        packed = torch.cat([local, loads.reshape(-1)])
        dist.all_reduce(packed, group=self.mesh.dp_group)
        total_counts, global_loads = packed[:5], packed[5:].view_as(loads)

        terms: Dict[str, torch.Tensor] = {}
        if samples:
            local_terms = loss_terms(prediction, batch, loss_config)
            scale = {"energy": 0, "forces": 1, "stress": 2}
            for name, k in scale.items():
                if name in local_terms:
                    ratio = (local[k] / total_counts[k].clamp(min=1e-12)).to(self.dtype)
                    terms[name] = local_terms[name] * ratio
            total = loss_config.energy_weight * terms["energy"] + loss_config.forces_weight * terms["forces"]
            if "stress" in terms:
                total = total + loss_config.stress_weight * terms["stress"]
            balance = self._balance_share(global_loads, float(total_counts[3]))
            loss = total + loss_config.balance_weight * balance
            terms["total"] = total
            loss.backward()
        else:
            balance = torch.zeros((), dtype=self.dtype)
        self.reducer.finish()
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip)
        self.optimizer.step()
        self.ema.update(self.model)

        names = ["energy", "forces", "stress", "total", "balance"]
        values = [terms.get(n, torch.zeros(())).detach().to(torch.float64) for n in names[:4]] + \
                 [balance.detach().to(torch.float64)]
        logged = torch.stack(values)
        dist.all_reduce(logged, group=self.mesh.dp_group)
        out = {n: float(v) for n, v in zip(names, logged)}
        if not bool(total_counts[2] > 0):
            out.pop("stress")
        out.update(grad_norm=float(grad_norm), atoms=int(total_counts[3]))
        return out

    def _balance_share(self, global_loads: torch.Tensor, global_atoms: float) -> torch.Tensor:
        """Switch balance loss E * sum_e f_e * P_e of the GLOBAL batch, split over ranks:
        f_e (global expert load fraction) is shared, P_e's atom sum is this rank's part."""
        shares = []
        for index, layer in enumerate(self.model.layers):
            moe = layer.moe
            x, element_embedding = self._moe_inputs[index]
            _, _, probabilities = moe.route(x, element_embedding)
            fraction = (global_loads[index] / global_loads[index].sum().clamp(min=1)).to(probabilities.dtype)
            shares.append(moe.num_experts * torch.sum(fraction * probabilities.sum(dim=0)) / global_atoms)
        return torch.stack(shares).sum()


def load_train_config(path: Optional[str], overrides: Optional[List[str]]) -> DistributedTrainConfig:
    return DistributedTrainConfig.load(path, overrides)


def make_trainer(config: DistributedTrainConfig, resume: bool = False) -> Trainer:
    """A plain `Trainer` for one process, a `DistributedTrainer` under a launcher or when
    the config asks for more than one rank."""
    parallel = config.parallel
    launched = launched_by_mpi() or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched or parallel.dp * parallel.ep * parallel.dd > 1:
        init_distributed()
        return DistributedTrainer(config, resume)
    return Trainer(config, resume)
