"""Hybrid-parallel training: `mpirun -np N janus train CONFIG --set parallel.dp=.. --set
parallel.ep=.. --set parallel.dd=..` (or torchrun), world = dp x ep x dd.

Exact equivalence with one process on the same global batch:
- every rank draws the same global batch (`atom_budget_batches`, a pure function of seed
  and epoch); the dp x ep "data ranks" take parts balanced by atom count
  (`split_by_atoms`); the dd ranks of one domain group share their part and split every
  structure of it spatially (`DomainModel`: owned atoms plus a one-cutoff halo);
- expert parallel (ep): the experts of every MoE layer are sharded over the ep group
  (`shard_experts`); each rank trains and keeps AdamW/EMA state for its shard only;
- the label counts that normalise each loss term (energy frames, force atoms, stress
  frames, all weighted; per-structure counts as 1/dd shares, atoms as OWNED atoms) are
  summed over all ranks first, and each rank's *summed* loss is divided by those GLOBAL
  counts; the MoE balance loss is rebuilt from global expert loads of owned atoms;
- gradients are then SUMMED (not averaged) by `GradientReducer`: dense parameters over
  the world, expert shards over the ranks holding the same shard; buckets whose gradients
  are complete are all-reduced asynchronously from post-accumulate-grad hooks while the
  backward pass goes on, in a fixed bucket order on every rank; the clipping norm includes
  every shard.
Rank 0 writes logs and checkpoints; a checkpoint holds the FULL (gathered) model, EMA and
optimizer state and only global progress, so a run resumes on any number of ranks and in
any layout, and exports like a one-process run.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Iterable, List, Optional

import torch
import torch.distributed as dist

from janus_potential.errors import JanusInputError
from janus_potential.model import JanusPotential
from janus_potential.parallel.domain import DomainModel
from janus_potential.parallel.expert import (expert_shards, full_state_dict, gather_shard, is_expert_shard,
                                             local_shard, shard_experts, sharded_state_dict)
from janus_potential.parallel.mesh import ProcessMesh, init_distributed, launched_by_mpi

from .checkpoint import write_checkpoint
from .config import TrainConfig
from .data import Batch, Sample, collate
from .loss import ErrorMetrics, loss_terms
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


@dataclass
class OwnedAtoms:
    """What `loss_terms` reads of a graph, for the owned atoms of one domain."""

    num_atoms: torch.Tensor  # [G] atoms of each whole structure (energy per atom)
    batch: torch.Tensor  # [n_owned] structure of each owned atom


@dataclass
class ForwardPass:
    """One model evaluation of a step: its prediction, the labels it is compared with,
    its label counts (energy frames, force atoms, stress frames, atoms; zero for a padding
    pass) and, per MoE layer, the router inputs and expert loads of its atoms."""

    prediction: Dict[str, torch.Tensor]
    target: Batch
    counted: bool
    counts: torch.Tensor
    moe_inputs: List[tuple] = field(default_factory=list)
    expert_loads: List[torch.Tensor] = field(default_factory=list)


class DistributedTrainer(Trainer):
    """`Trainer` on a dp x ep x dd process mesh (see the module docstring)."""

    def __init__(self, config: DistributedTrainConfig, resume: bool = False) -> None:
        parallel = config.parallel
        self.mesh = ProcessMesh.create(parallel.dp, parallel.ep, parallel.dd)
        self.rank, self.world = self.mesh.rank, self.mesh.world_size
        self.data_rank = self.mesh.dp_index * self.mesh.ep + self.mesh.ep_index
        self.data_ranks = self.mesh.dp * self.mesh.ep
        self._domains: Dict[int, DomainModel] = {}
        if self.rank != 0:
            config.run.progress = False
        super().__init__(config, resume)
        self.reducers: List[GradientReducer] = []
        if self.world > 1:
            bucket_bytes = int(parallel.bucket_mb * (1 << 20))
            dense = [p for p in self.model.parameters() if not is_expert_shard(p)]
            experts = [p for p in self.model.parameters() if is_expert_shard(p)]
            self.reducers.append(GradientReducer(dense, self.mesh.dense_grad_group, bucket_bytes))
            if experts:
                self.reducers.append(GradientReducer(experts, self.mesh.expert_grad_group, bucket_bytes))
        self._moe_calls: List[tuple] = []
        for index, layer in enumerate(self.model.layers):
            layer.moe.register_forward_hook(self._remember_moe_call(index))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.mesh.ep > 1

    def _build_model(self) -> JanusPotential:
        model = super()._build_model()
        ep = self.config.parallel.ep
        if model.config.num_experts % ep:
            raise JanusInputError(f"parallel.ep={ep} does not divide the {model.config.num_experts} experts per layer "
                                  f"of preset {self.config.model.preset!r}")
        names = [name for name, _ in model.named_parameters()]
        model = shard_experts(model, self.mesh.ep_group)
        # checkpoints index optimizer state by parameter position: the shards keep the order
        assert [name for name, _ in model.named_parameters()] == names
        return model

    def _remember_moe_call(self, index: int):
        def hook(module, inputs, output):
            self._moe_calls.append((index, inputs, module.last_expert_load))
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

    # ------------------------------------------------------------- full state <-> shards
    def _optimizer_state(self, state: Dict[str, Any], convert) -> Dict[str, Any]:
        """The optimizer state dict with every expert-shard tensor passed through
        `convert(tensor, moe)` (gather to full, or cut to this rank's shard)."""
        shards = expert_shards(self.model)
        names = [name for name, _ in self.model.named_parameters()]
        converted = {}
        for index, values in state["state"].items():
            moe = shards.get(names[index])
            converted[index] = {key: convert(value, moe) if moe is not None and torch.is_tensor(value)
                                and value.dim() > 0 else value for key, value in values.items()}
        return {"state": converted, "param_groups": state["param_groups"]}

    def state(self) -> Dict[str, Any]:
        """The FULL training state (collective when experts are sharded)."""
        state = super().state()
        if self.sharded:
            state["model"] = full_state_dict(self.model)
            state["ema"] = dict(state["ema"], shadow=full_state_dict(self.model, state["ema"]["shadow"]))
            state["optimizer"] = self._optimizer_state(state["optimizer"], gather_shard)
        return state

    def _restore(self, state: Dict[str, Any]) -> None:
        if self.sharded:
            state = dict(state, model=sharded_state_dict(self.model, state["model"]),
                         optimizer=self._optimizer_state(state["optimizer"], local_shard))
            state["ema"] = dict(state["ema"], shadow=sharded_state_dict(self.model, state["ema"]["shadow"]))
        super()._restore(state)

    def save(self) -> None:
        state = self.state()  # every rank: gathering the shards is collective
        if self.is_main:
            write_checkpoint(self.checkpoint_path, state)

    def ema_model(self) -> JanusPotential:
        """The full EMA model on every rank (collective when experts are sharded)."""
        model = JanusPotential(self.model.config).to(self.dtype)
        model.load_state_dict(full_state_dict(self.model, self.ema.shadow) if self.sharded else self.ema.shadow)
        model.provenance = self.provenance()
        return model

    def _validation_batches(self) -> List[List[int]]:
        return super()._validation_batches()[self.rank::self.world]

    def _combine_metrics(self, metrics: ErrorMetrics) -> ErrorMetrics:
        if self.world == 1:
            return metrics
        every: List[Any] = [None] * self.world
        dist.all_gather_object(every, metrics.plain_sums())
        combined = ErrorMetrics(group_by=metrics.group_by)
        for sums in every:
            combined.add_sums(sums)
        return combined

    # ------------------------------------------------------------- the step
    def _passes(self, samples: List[Sample]) -> List[tuple]:
        """(samples, counted) for every model evaluation of this rank in this step.

        Without dd, one evaluation of the rank's part; with dd, one per structure of it. With
        ep > 1 every rank of an ep group must run the same number of evaluations (the expert
        dispatch is collective), so short parts are padded with the batch's first structure
        at loss weight zero."""
        parts = split_by_atoms(list(range(len(samples))), [s.num_atoms for s in samples], self.data_ranks)
        dd = self.mesh.dd

        def evaluations(part: List[int]) -> List[List[Sample]]:
            if not part:
                return []
            return [[samples[k]] for k in part] if dd > 1 else [[samples[k] for k in part]]

        passes = [(group, True) for group in evaluations(parts[self.data_rank])]
        if self.sharded:
            needed = max(len(evaluations(part)) for part in parts)
            passes += [([samples[0]], False)] * (needed - len(passes))
        return passes

    def _domain_model(self, sample: Sample) -> DomainModel:
        key = id(sample)
        if key not in self._domains:
            try:
                self._domains[key] = DomainModel.build(self.model, sample.graph, self.mesh.dd_group)
            except ValueError as exc:
                raise JanusInputError(f"parallel.dd={self.mesh.dd}: {exc} (a structure from {sample.source})") from exc
        return self._domains[key]

    def _evaluate(self, samples: List[Sample], counted: bool, compute_virial: bool) -> ForwardPass:
        self._moe_calls = []
        if self.mesh.dd > 1:
            (sample,) = samples
            domain_model = self._domain_model(sample)
            out = domain_model(sample.graph.positions, sample.graph.cell[0], compute_virial, create_graph=True)
            owned = domain_model.domain.owned
            prediction = {"energy": out["energy"].reshape(1), "forces": out["forces"]}
            if compute_virial:
                prediction["stress"] = out["stress"].unsqueeze(0)
            whole = collate([sample])
            target = replace(whole, graph=OwnedAtoms(whole.graph.num_atoms, torch.zeros(owned.numel(), dtype=torch.long)),
                             forces=whole.forces[owned], has_forces=whole.has_forces[owned])
        else:
            target = collate(samples)
            prediction = self.model.compute(target.graph, compute_virial=compute_virial, create_graph=True)
        weight = target.weight.to(torch.float64)
        share = 1.0 / self.mesh.dd  # every dd rank holds the per-structure terms
        counts = torch.stack([
            (weight * target.has_energy).sum() * share,
            (weight[target.graph.batch] * target.has_forces).sum(),
            (weight * target.has_stress).sum() * share,
            torch.tensor(float(target.forces.shape[0]), dtype=torch.float64),
        ]) * float(counted)
        evaluation = ForwardPass(prediction, target, counted, counts)
        for index, inputs, load in sorted(self._moe_calls, key=lambda call: call[0]):
            evaluation.moe_inputs.append(inputs)
            evaluation.expert_loads.append(load.to(torch.float64) * float(counted))
        return evaluation

    def train_step(self, samples: List[Sample]) -> Dict[str, float]:
        if self.world == 1:
            return super().train_step(samples)
        self.model.train()
        loss_config = self.config.loss
        self.optimizer.zero_grad(set_to_none=True)
        compute_virial = any(s.has_stress for s in samples)
        evaluations = [self._evaluate(group, counted, compute_virial) for group, counted in self._passes(samples)]

        n_layers = len(self.model.layers)
        local = torch.zeros(4, dtype=torch.float64)  # energy frames, force atoms, stress frames, atoms
        loads = torch.zeros(n_layers, self.model.layers[0].moe.num_experts, dtype=torch.float64)
        for evaluation in evaluations:
            local += evaluation.counts
            loads += torch.stack(evaluation.expert_loads)
        packed = torch.cat([local, loads.reshape(-1)])
        dist.all_reduce(packed)
        total_counts, global_loads = packed[:4], packed[4:].view_as(loads)

        names = ["energy", "forces", "stress"]
        terms: Dict[str, torch.Tensor] = {}
        balance = torch.zeros((), dtype=self.dtype)
        if evaluations:
            for evaluation in evaluations:
                pass_terms = loss_terms(evaluation.prediction, evaluation.target, loss_config)
                for k, name in enumerate(names):
                    if name in pass_terms:
                        ratio = (evaluation.counts[k] / total_counts[k].clamp(min=1e-12)).to(self.dtype)
                        terms[name] = terms.get(name, 0.0) + pass_terms[name] * ratio
            total = loss_config.energy_weight * terms["energy"] + loss_config.forces_weight * terms["forces"]
            if "stress" in terms:
                total = total + loss_config.stress_weight * terms["stress"]
            balance = self._balance_share(evaluations, global_loads, float(total_counts[3]))
            terms["total"] = total
            (total + loss_config.balance_weight * balance).backward()
        for reducer in self.reducers:
            reducer.finish()
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate()
        grad_norm = self._clip_gradients()
        self.optimizer.step()
        self.ema.update(self.model)

        logged = torch.stack([terms.get(n, torch.zeros(())).detach().to(torch.float64)
                              for n in names + ["total"]] + [balance.detach().to(torch.float64)])
        dist.all_reduce(logged)
        out = {n: float(v) for n, v in zip(names + ["total", "balance"], logged)}
        if not bool(total_counts[2] > 0):
            out.pop("stress")
        out.update(grad_norm=float(grad_norm), atoms=int(round(float(total_counts[3]))))
        return out

    def _balance_share(self, evaluations: List[ForwardPass], global_loads: torch.Tensor,
                       global_atoms: float) -> torch.Tensor:
        """Switch balance loss E * sum_e f_e * P_e of the GLOBAL batch, split over ranks:
        f_e (global expert load fraction) is shared, P_e's atom sum is this rank's part (its
        owned atoms: the MoE of a domain only sees owned rows)."""
        shares = []
        for index, layer in enumerate(self.model.layers):
            moe = layer.moe
            probability_sum = 0.0
            for evaluation in evaluations:
                x, element_embedding = evaluation.moe_inputs[index]
                _, _, probabilities = moe.route(x, element_embedding)
                probability_sum = probability_sum + probabilities.sum(dim=0) * float(evaluation.counted)
            fraction = (global_loads[index] / global_loads[index].sum().clamp(min=1)).to(self.dtype)
            shares.append(moe.num_experts * torch.sum(fraction * probability_sum) / global_atoms)
        return torch.stack(shares).sum()

    def _clip_gradients(self) -> torch.Tensor:
        """`clip_grad_norm_` over the FULL parameter set (every expert shard counted once)."""
        max_norm = self.config.optim.grad_clip
        if not self.sharded:
            return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        dense = [p.grad for p in self.model.parameters() if p.grad is not None and not is_expert_shard(p)]
        experts = [p.grad for p in self.model.parameters() if p.grad is not None and is_expert_shard(p)]
        squares = torch.zeros(2, dtype=torch.float64)
        for k, group in enumerate((dense, experts)):
            if group:
                squares[k] = torch.stack([torch.linalg.vector_norm(g).to(torch.float64) ** 2 for g in group]).sum()
        expert_squares = squares[1:].clone()
        dist.all_reduce(expert_squares, group=self.mesh.ep_group)
        total_norm = (squares[0] + expert_squares[0]).sqrt().to(self.dtype)
        coefficient = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coefficient)
        return total_norm


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
