"""The trainer: AdamW, warm-up + cosine, clipping, EMA, checkpoints, exact resume, on one
process or a dp x ep x dd mesh of them (`mpirun -np N janus train CONFIG --set
parallel.dp=..`, or torchrun).

One process is a world of one: the same step runs everywhere, and every collective (the
label-count and expert-load sums, the gradient sums, the metric gathers, the barriers) is
skipped when the world has one rank. Exact equivalence with one process on the same
global batch:
- every rank draws the same global batch (`atom_budget_batches`, a pure function of seed
  and epoch); the dp x ep "data ranks" take parts balanced by atom count
  (`split_by_atoms`); the dd ranks of one domain group share their part and split every
  structure of it spatially (`DomainModel`: owned atoms plus a one-cutoff halo);
- expert parallel (ep): the experts of every MoE layer are sharded over the ep group
  (`shard_experts`); each rank trains and keeps AdamW/EMA state for its shard only;
- the label counts that normalise each loss term (energy frames, force atoms, stress
  frames, all weighted; per-structure counts as 1/dd shares, atoms as OWNED atoms) are
  summed over all ranks first, and each rank's *summed* loss is divided by those GLOBAL
  counts; the MoE balance loss comes from the routing sums the model returns, with the
  GLOBAL expert loads;
- gradients are SUMMED by `GradientReducer` (dense parameters over the world, expert
  shards over the ranks holding the same shard), overlapped with the backward pass; the
  clipping norm includes every shard.
Rank 0 writes logs; checkpoints are written in pieces by every rank, each tensor by its
owner (`training/checkpoint.py`), with only global progress, so a run resumes on any number
of ranks, in any layout and shard mode (`parallel.shard`, `ParameterShards`), and exports
like a one-process run.

The step order is fixed so that a resumed run repeats the uninterrupted one bit for bit:
batches of an epoch are a pure function of (seed, epoch); the checkpoint stores the
position in the epoch, the optimizer/EMA states, the step time spent and the RNG states.
Samples stream from packed data through DataLoader workers (`training/loader.py`) in that
order, from the checkpoint's batch on; the trainer itself holds only per-frame atom counts.
"""

from __future__ import annotations

import gc
import json
import math
import resource
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from janus_potential.devices import rank_device
from janus_potential.errors import JanusInputError
from janus_potential.lora import add_lora
from janus_potential.model import DTYPES, JanusPotential
from janus_potential.nn.moe import balance_loss
from janus_potential.parallel.domain import DomainModel
from janus_potential.parallel.expert import expert_shards, full_state_dict, shard_experts
from janus_potential.parallel.mesh import ProcessMesh, local_rank
from janus_potential.precision import apply_precision

from .compiled import CompiledStep, expert_loads
from .checkpoint import Piece, read_checkpoint, restore_rng, rng_state, write_checkpoint
from .config import TrainConfig, data_heads, split_head
from .data import (Batch, Batches, FrameSamples, ReplayedSamples, Sample, atom_budget_batches, collate, split_indices,
                   with_replay)
from .finetune import freeze, load_parent, new_element_references
from .distributed import (ForwardPass, OwnedAtoms, ParameterShards, ShardedAdamW, gradient_reducers,
                          split_by_atoms)
from .loader import FlaggedSamples, sample_loader, worker_count
from .loss import ErrorMetrics, loss_terms, predict
from .pack import open_dataset
from .progress import TrainingProgress
from .schedule import ExponentialMovingAverage, warmup_cosine
from .statistics import fit_reference_energies, force_scale


class Trainer:
    def __init__(self, config: TrainConfig, resume: bool = False) -> None:
        config.validate()
        self.config = config
        parallel = config.parallel
        self.device = self._choose_device(config.run.device)
        self.mesh = ProcessMesh.create(parallel.dp, parallel.ep, parallel.dd, device=self.device)
        self.rank, self.world = self.mesh.rank, self.mesh.world_size
        self.data_rank = self.mesh.dp_index * self.mesh.ep + self.mesh.ep_index
        self.data_ranks = self.mesh.dp * self.mesh.ep
        if not self.is_main:
            config.run.progress = False
        run = config.run
        if run.threads:
            torch.set_num_threads(run.threads)
        torch.manual_seed(run.seed)
        np.random.seed(run.seed)
        self.output = Path(run.output)
        self.output.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path = self.output / "checkpoint.pt"
        self.dtype = DTYPES[run.dtype]

        self.model = apply_precision(self._build_model(), run.precision)
        self.shards = ParameterShards(self.model, self.mesh, parallel.shard)
        self._load_data()
        self.optimizer = self._build_optimizer()
        self.total_steps = config.optim.max_steps
        if config.optim.epochs:
            self.total_steps = min(self.total_steps or math.inf, config.optim.epochs * len(self._epoch_batches(0)))
        self.lr_factor = warmup_cosine(config.optim.warmup_steps, config.optim.min_lr_ratio)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.elapsed = 0.0
        self.best_validation = math.inf
        self.spike_norms: List[float] = []  # the last optim.spike_window gradient norms (`_is_spike`)
        self._last_validation_step = -1
        self._routing_elements: Optional[torch.Tensor] = None  # training elements (`_routing_table`)
        self._routing_previous: Optional[torch.Tensor] = None  # the table at the last log record
        if resume and self.checkpoint_path.exists():
            self._restore(*read_checkpoint(self.checkpoint_path))
        else:
            self._initialise_statistics()
            self.ema = self._new_ema()
            config.dump(self.output / "config.yaml")
        self.log_path = self.output / "metrics.jsonl"
        if resume:
            self._truncate_log()
        self.tensorboard = self._tensorboard() if run.tensorboard and self.is_main else None
        self.reducers = gradient_reducers(self.model, self.mesh, parallel.bucket_mb, self.shards)
        # run.compile: each evaluation's loss and parameter gradient through one traced and
        # compiled graph (training/compiled.py); dd stays eager (the config refuses it)
        announce = (lambda line: print(line, flush=True)) if self.is_main else None
        self.compiled = CompiledStep(self.model, config.loss, announce=announce) if run.compile else None

    @staticmethod
    def _choose_device(spec: str) -> torch.device:
        """The training device of this rank (`run.device`; "auto": CUDA when visible): the
        model, its optimizer and EMA state and every batch live there, each rank on the GPU of
        its node-local rank. The process group's backend follows it (gloo on the CPU,
        "cpu:gloo,cuda:nccl" on GPUs); label counts, logs and checkpoint bookkeeping stay on
        the CPU. Halo and expert exchanges run on the device (NCCL) or through host memory."""
        return rank_device(spec, local_rank())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.mesh.ep > 1

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    # ----------------------------------------------------------------- set-up
    def _build_model(self) -> JanusPotential:
        """The model to train (a preset, or the parent of a fine-tuning run with its adapters
        and frozen parts), its experts sharded over the ep group before the optimizer sees the
        parameters."""
        section = self.config.model
        self.parent: Optional[Dict[str, str]] = None
        if section.init_from:
            parent, self.parent = load_parent(section.init_from)
            model = JanusPotential(parent.config).to(self.dtype)
            model.load_state_dict(parent.state_dict())
            del parent
        else:
            overrides = dict(section.overrides)
            self.heads = data_heads(self.config.data.train)
            if self.heads:
                overrides["output_heads"] = tuple(self.heads)
            model = JanusPotential.from_preset(section.preset, **overrides).to(self.dtype)
        self.heads = list(model.config.output_heads)
        if section.lora_rank:
            adapters = add_lora(model, section.lora_rank, section.lora_alpha)
            if self.is_main:
                print(f"LoRA rank {section.lora_rank}: {adapters:,} adapter parameters trained, the rest frozen")
        ep = self.mesh.ep
        if model.config.num_experts % ep:
            raise JanusInputError(f"parallel.ep={ep} does not divide the {model.config.num_experts} experts per layer "
                                  f"of preset {self.config.model.preset!r}")
        names = [name for name, _ in model.named_parameters()]
        model = shard_experts(model, self.mesh.ep_group)
        # checkpoints index optimizer state by parameter position: the shards keep the order
        assert [name for name, _ in model.named_parameters()] == names
        if section.freeze:
            frozen = freeze(model, section.freeze)
            if self.is_main:
                print(f"model.freeze: {frozen} parameter tensors frozen")
        return model.to(self.device)

    def _build_optimizer(self):
        """AdamW; with `parallel.shard: optimizer|full` on several ranks its moments (and the
        summed gradients) are split over the ranks that share each parameter's gradient
        (`ShardedAdamW`)."""
        optim = self.config.optim
        if self.shards.mode != "none":
            return ShardedAdamW(self.shards, lr=optim.lr, weight_decay=optim.weight_decay, betas=(0.9, optim.beta2))
        return torch.optim.AdamW(self.model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay,
                                 betas=(0.9, optim.beta2))

    def _new_ema(self) -> ExponentialMovingAverage:
        """The EMA of the weights this rank holds at rest (the model's state-dict keys)."""
        names = {name: k for k, name in enumerate(self.shards.names)}
        return ExponentialMovingAverage(self.model, self.config.optim.ema_decay,
                                        keep=lambda key: key not in names or self.shards.is_held(names[key]))

    def _load_data(self) -> None:
        """The training and validation sets as frame indices into packed data (plain files
        are packed into `data.cache_dir` on first use, by rank 0 before the others look)."""
        if self.rank != 0:
            self._barrier()
        self._open_data()
        if self.rank == 0:
            self._barrier()

    def _open_data(self) -> None:
        data, run = self.config.data, self.config.run
        cutoff = self.model.cutoff
        frames, heads = self._open_with_heads(data.train)
        count = min(len(frames), data.max_structures) if data.max_structures else len(frames)
        if data.validation:
            train = np.arange(count)
            validation_frames, validation_heads = self._open_with_heads(data.validation)
            validation = np.arange(len(validation_frames))
        else:
            train, validation = split_indices(count, data.validation_fraction, data.split_seed)
            validation_frames, validation_heads = frames, heads
        self.train_samples = FrameSamples(frames, train, cutoff, self.dtype, heads)
        self.validation_samples = FrameSamples(validation_frames, validation, cutoff, self.dtype, validation_heads)
        if not len(self.train_samples):
            raise JanusInputError("the training set is empty")
        if self.config.loss.file_balance != "none":
            factors = self.train_samples.balance_files(self.config.loss.file_balance)
            if self.is_main:
                print("loss weight per data file: " + ", ".join(f"{Path(name).name} {factor:.2f}"
                                                                 for name, factor in factors.items()))
        self.samples = self.train_samples  # what the loader indexes: training frames, then replay frames
        if data.replay:
            replay_frames = open_dataset(data.replay, data.cache_dir, run.progress, run.progress_every_s)
            self.replay_samples = FrameSamples(replay_frames, np.arange(len(replay_frames)), cutoff, self.dtype)
            if not len(self.replay_samples):
                raise JanusInputError("data.replay holds no frames")
            self.samples = ReplayedSamples(self.train_samples, self.replay_samples)
        self.sizes = self.samples.sizes
        self._batch_cache: Dict[int, Batches] = {}
        self.num_workers = worker_count(data.num_workers)
        too_big = int(self.sizes.max())
        if too_big > data.max_atoms_per_batch:
            print(f"note: a structure of {too_big} atoms exceeds max_atoms_per_batch; it forms its own batch")

    def _open_with_heads(self, entries: List[str]):
        """The frames of data entries (`PATH` or `PATH@HEAD`) and, for a multi-head model, the
        output head of every frame (None otherwise)."""
        data, run = self.config.data, self.config.run
        paths = [split_head(entry)[0] for entry in entries]
        frames = open_dataset(paths, data.cache_dir, run.progress, run.progress_every_s)
        if not self.heads:
            return frames, None
        counts = [len(open_dataset([path], data.cache_dir)) for path in paths]
        names = [split_head(entry)[1] or "default" for entry in entries]
        return frames, np.repeat([self.heads.index(name) for name in names], counts).astype(np.int64)

    def _initialise_statistics(self) -> None:
        """Reference energies, energy scale and element coverage from the packs' per-frame
        statistics (no pass over the frames)."""
        samples = self.train_samples
        if self.parent is not None:
            self._extend_parent()
            return
        has_labels = samples.column("has_labels")
        frame_heads = samples.heads[samples.indices] if samples.heads is not None else np.zeros(len(samples), int)
        with torch.no_grad():
            for k in range(max(1, len(self.heads))):  # every output head from its own frames
                mine = frame_heads == k
                with_energy = np.nonzero(has_labels[:, 0] & mine)[0]
                with_forces = has_labels[:, 1] & mine
                reference = fit_reference_energies(samples.composition().rows(with_energy),
                                                   samples.column("energy")[with_energy]).to(self.dtype)
                scale = force_scale(samples.column("force_abs_sum")[with_forces], samples.sizes[with_forces])
                if k == 0:
                    self.model.reference_energies.copy_(reference)
                    self.model.energy_scale.fill_(scale)
                else:
                    self.model.head_reference_energies[k - 1].copy_(reference)
                    self.model.head_energy_scale[k - 1].fill_(scale)
            if self.config.model.restrict_elements:
                seen = torch.zeros_like(self.model.supported)
                elements = np.union1d(samples.elements(), self.validation_samples.elements())
                seen[torch.as_tensor(elements, dtype=torch.long)] = True
                self.model.supported.copy_(seen)

    def _extend_parent(self) -> None:
        """A fine-tuning run keeps the parent's reference energies, energy scale and elements
        (so step 0 predicts what the parent predicts); elements of the new data (training,
        validation and replay) it does not cover are added with fitted reference energies."""
        samples = self.train_samples
        with_energy = np.nonzero(samples.column("has_labels")[:, 0])[0]
        with torch.no_grad():
            reference, new = new_element_references(
                self.model.reference_energies, self.model.supported, samples.composition().rows(with_energy),
                samples.column("energy")[with_energy], self.model.config.max_atomic_number)
            elements = [samples.elements(), self.validation_samples.elements()]
            if self.config.data.replay:
                elements.append(self.replay_samples.elements())
            missing = np.setdiff1d(np.concatenate(elements), np.nonzero(self.model.supported.numpy())[0])
            unfitted = sorted(set(missing.tolist()) - set(new))
            if unfitted:
                raise JanusInputError(f"elements {unfitted} are new to the parent model but have no labelled energy "
                                      "in the training data, so they get no reference energy")
            self.model.reference_energies.copy_(reference)
            if new:
                self.model.supported[torch.as_tensor(new)] = True
                if self.is_main:
                    from ase.data import chemical_symbols
                    print(f"elements new to the parent model: {', '.join(chemical_symbols[z] for z in new)} "
                          "(reference energies fitted, embeddings trained from scratch)")

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise JanusInputError("run.tensorboard is true but the tensorboard package is not installed") from exc
        return SummaryWriter(str(self.output / "tensorboard"))

    def _epoch_batches(self, epoch: int) -> Batches:
        """The global batches of an epoch: `data.max_atoms_per_batch` is per data rank, so the
        global budget is that times the dp x ep data ranks (one process: the same). With
        replay data, `data.replay_fraction` of the budget goes to replay frames."""
        if epoch in self._batch_cache:
            return self._batch_cache[epoch]
        data, seed = self.config.data, self.config.run.seed
        budget = data.max_atoms_per_batch * self.data_ranks
        count = len(self.train_samples)
        if data.replay:
            replay_atoms = max(1, int(round(data.replay_fraction * budget)))
            batches = with_replay(atom_budget_batches(self.sizes[:count], max(1, budget - replay_atoms), seed, epoch),
                                  count, self.sizes[count:], replay_atoms, seed, epoch)
        else:
            batches = atom_budget_batches(self.sizes, budget, seed, epoch)
        self._batch_cache = {e: b for e, b in self._batch_cache.items() if e >= epoch - 1}
        self._batch_cache[epoch] = batches
        return batches

    def _share(self, batch: List[int]) -> List[tuple]:
        """This rank's part of a global batch as (frame, counted) keys: the structures it
        evaluates, then (with ep > 1, where every rank of an ep group must run as many
        evaluations, the expert dispatch being collective) padding evaluations of the batch's
        first structure at loss weight zero. Only these frames' graphs are built here."""
        parts = split_by_atoms(batch, self.sizes, self.data_ranks)
        mine = parts[self.data_rank]
        keys = [(k, True) for k in mine]
        if self.sharded:
            needed = max(self._evaluation_count(len(part)) for part in parts)
            keys += [(batch[0], False)] * (needed - self._evaluation_count(len(mine)))
        return keys

    def _evaluation_count(self, structures: int) -> int:
        """Model evaluations of a part: one per structure with dd, else one for the part."""
        return structures if self.mesh.dd > 1 else min(structures, 1)

    def _planned_batches(self) -> Iterator[List[tuple]]:
        """This rank's share of every batch from the current position on: the rest of this
        epoch, then the next epochs (the loader prefetches across an epoch's end)."""
        epoch, start = self.epoch, self.batch_in_epoch
        while True:
            batches = self._epoch_batches(epoch)
            for b in range(start, len(batches)):
                yield self._share(batches[b])
            epoch, start = epoch + 1, 0

    # ----------------------------------------------------------------- checkpoints
    def _torch_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer.optimizer if isinstance(self.optimizer, ShardedAdamW) else self.optimizer

    def _optimized(self) -> List[int]:
        """Indices (model order) of the parameters this rank's AdamW steps and keeps moments of."""
        if isinstance(self.optimizer, ShardedAdamW):
            return self.optimizer.owned
        return list(range(len(self.shards.parameters)))

    def _piece(self, name: str, tensor: torch.Tensor) -> Piece:
        """A tensor of parameter `name` as a piece of the full tensor (expert shards: rows
        [first, first + E/P) of [E, ...]; scalars and other tensors: whole)."""
        moe = expert_shards(self.model).get(name)
        if moe is None or tensor.dim() == 0:
            return tensor, list(tensor.shape), 0
        return tensor, [moe.num_experts] + list(tensor.shape[1:]), moe.first_expert

    def pieces(self) -> Dict[str, Piece]:
        """What this rank writes to a checkpoint: the weights, EMA and AdamW moments of the
        parameters it owns, and (rank 0) the buffers and their EMA."""
        pieces: Dict[str, Piece] = {}
        names = self.shards.names
        for k, (name, p) in enumerate(zip(names, self.shards.parameters)):
            if self.shards.owns(k):
                pieces[f"model/{name}"] = self._piece(name, p.data)
                if name in self.ema.shadow:
                    pieces[f"ema/{name}"] = self._piece(name, self.ema.shadow[name])
        torch_optimizer = self._torch_optimizer()
        for k in self._optimized():
            if not self.shards.owns(k):
                continue
            for item, value in torch_optimizer.state.get(self.shards.parameters[k], {}).items():
                pieces[f"optimizer/{names[k]}/{item}"] = self._piece(names[k], value)
        if self.is_main:
            for name, buffer in self._buffers():
                pieces[f"model/{name}"] = (buffer, list(buffer.shape), 0)
                if name in self.ema.shadow:
                    pieces[f"ema/{name}"] = (self.ema.shadow[name], list(buffer.shape), 0)
        return pieces

    def _buffers(self) -> List[tuple]:
        """(state-dict name, tensor) of the model's persistent buffers, every name of a shared one."""
        parameters = set(self.shards.names)
        return [(name, value) for name, value in self.model.state_dict(keep_vars=True).items() if name not in parameters]

    def state(self) -> Dict[str, Any]:
        """The plain (non-tensor-piece) state of the run, the same on every rank."""
        groups = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        return {
            "config": self.config.to_dict(), "model_config": self.model.config.to_dict(),
            "optimizer": {"param_groups": groups}, "ema": {"decay": self.ema.decay, "updates": self.ema.updates},
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "elapsed": self.elapsed, "best_validation": self.best_validation, "rng": rng_state(),
            "spike_norms": list(self.spike_norms),
            "provenance": self.provenance(),
        }

    def provenance(self) -> Dict[str, Any]:
        record = {"trainer": "janus_potential.training", "step": self.step, "epoch": self.epoch,
                  "data": list(self.config.data.train), "preset": self.config.model.preset}
        if self.parent is not None:
            record["parent"] = self.parent
        if self.config.data.replay:
            record["replay"] = list(self.config.data.replay)
        return record

    def _read_piece(self, reader, key: str, name: str) -> torch.Tensor:
        """This rank's rows of checkpoint tensor `key` (of parameter `name`), whatever layout wrote it."""
        moe = expert_shards(self.model).get(name)
        if moe is None or not reader.index[key]["shape"]:
            return reader.read(key)
        return reader.read(key, moe.first_expert, moe.local_experts)

    def _restore(self, state: Dict[str, Any], reader) -> None:
        names = self.shards.names
        with torch.no_grad():
            for k, (name, p) in enumerate(zip(names, self.shards.parameters)):
                if self.shards.is_held(k):
                    p.data = self._read_piece(reader, f"model/{name}", name).to(self.device)
            for name, buffer in self._buffers():
                buffer.copy_(reader.read(f"model/{name}"))
        self.ema = self._new_ema()
        self.ema.updates = state["ema"]["updates"]
        for key in list(self.ema.shadow):
            source = f"ema/{key}" if f"ema/{key}" in reader else f"model/{key}"  # a run without EMA
            self.ema.shadow[key] = self._read_piece(reader, source, key).to(self.device)
        torch_optimizer = self._torch_optimizer()
        optimized = self._optimized()
        moments: Dict[int, Dict[str, torch.Tensor]] = {}
        for local, k in enumerate(optimized):
            for key in reader.keys(f"optimizer/{names[k]}/"):
                moments.setdefault(local, {})[key.rsplit("/", 1)[1]] = self._read_piece(reader, key, names[k])
        groups = [dict(group, params=list(range(len(torch_optimizer.param_groups[0]["params"]))))
                  for group in state["optimizer"]["param_groups"]]
        torch_optimizer.load_state_dict({"state": moments, "param_groups": groups})
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.elapsed, self.best_validation = state["elapsed"], state["best_validation"]
        self.spike_norms = list(state.get("spike_norms", []))  # absent in checkpoints before optim.skip_spikes
        restore_rng(state["rng"])

    def save(self) -> None:
        """Write the checkpoint (collective: every rank writes what it owns)."""
        write_checkpoint(self.checkpoint_path, self.state(), self.pieces(), distributed=self.world > 1)

    def _ema_weights(self):
        """Context: the model holds the EMA weights (every dense parameter gathered on every
        rank), then its own again."""
        return _SwappedWeights(self)

    def ema_model(self) -> JanusPotential:
        """The full EMA model on every rank (collective when experts are sharded; for models
        that fit a rank twice: `janus train` exports from the checkpoint instead)."""
        with self._ema_weights():
            state = full_state_dict(self.model) if self.sharded else self.model.state_dict()
            state = {k: v.detach().clone() for k, v in state.items()}
        model = JanusPotential(self.model.config).to(self.dtype)
        model.load_state_dict(state)
        model.provenance = self.provenance()
        return model

    def close(self) -> None:
        """Drop the training state (after the final checkpoint), so that rank 0 can read the
        final model from the checkpoint within the same memory."""
        for reducer in self.reducers:
            reducer.buckets = []
        self.reducers = []
        del self.optimizer, self.ema, self.model, self.shards
        gc.collect()

    # ----------------------------------------------------------------- training
    def progress(self) -> float:
        """The fraction of the training budget used: of max_steps, or of max_minutes of step
        time when that runs out first (then the schedules follow the clock). Checkpointed
        through the step and the elapsed time, so a resumed run continues it exactly."""
        progress = self.step / max(1, self.total_steps)
        if self.config.run.max_minutes:
            progress = max(progress, self.elapsed / (60 * self.config.run.max_minutes))
        return progress

    def learning_rate(self) -> float:
        """Warm-up then cosine over the training budget (`progress`)."""
        return self.config.optim.lr * self.lr_factor(self.step, self.progress())

    def _passes(self, share: List[tuple]) -> List[tuple]:
        """(samples, counted) for every model evaluation of this rank's share of a step:
        without dd one evaluation of the counted structures, with dd one per structure; then
        the padding evaluations (see `_share`)."""
        counted = [sample for sample, flag in share if flag]
        padding = [sample for sample, flag in share if not flag]
        groups = [[sample] for sample in counted] if self.mesh.dd > 1 else ([counted] if counted else [])
        return [(group, True) for group in groups] + [([sample], False) for sample in padding]

    def _domain_model(self, sample: Sample) -> DomainModel:
        """The decomposition of `sample` over the dd group, built for this step: samples are
        streamed (a new object every step, so no identity to cache by), and a cache per
        structure would hold edge lists of the whole dataset."""
        try:
            return DomainModel.build(self.model, sample.graph, self.mesh.dd_group)
        except ValueError as exc:
            raise JanusInputError(f"parallel.dd={self.mesh.dd}: {exc} (a structure from {sample.source})") from exc

    def _label_counts(self, target: Batch, counted: bool) -> torch.Tensor:
        """(energy frames, force atoms, stress frames, atoms) of one evaluation, weighted, on
        the CPU; zeros for a padding pass. Every dd rank holds the per-structure terms, so
        those count 1/dd per rank."""
        weight = target.weight.to(torch.float64)
        share = 1.0 / self.mesh.dd
        return torch.stack([
            (weight * target.has_energy).sum() * share,
            (weight[target.graph.batch] * target.has_forces).sum(),
            (weight * target.has_stress).sum() * share,
            torch.tensor(float(target.forces.shape[0]), dtype=torch.float64),
        ]) * float(counted)

    def _evaluate(self, samples: List[Sample], counted: bool, compute_virial: bool) -> ForwardPass:
        if self.mesh.dd > 1:
            (sample,) = samples
            domain_model = self._domain_model(sample)
            out = domain_model(sample.graph.positions.to(self.device), sample.graph.cell[0].to(self.device),
                               compute_virial, create_graph=True)
            routing = out
            owned = domain_model.domain.owned.cpu()
            prediction = {"energy": out["energy"].reshape(1), "forces": out["forces"]}
            if compute_virial:
                prediction["stress"] = out["stress"].unsqueeze(0)
            whole = collate([sample])
            target = replace(whole, graph=OwnedAtoms(whole.graph.num_atoms, torch.zeros(owned.numel(), dtype=torch.long)),
                             forces=whole.forces[owned], has_forces=whole.has_forces[owned])
        else:
            target = collate(samples)
        counts = self._label_counts(target, counted)
        target = target.to(self.device)
        if self.mesh.dd == 1:
            prediction = routing = self.model.compute(target.graph, compute_virial=compute_virial, create_graph=True,
                                                      head=target.head)
        return ForwardPass(prediction, target, counted, counts, routing["router_probability_sum"] * float(counted),
                           routing["expert_load"].detach().to(torch.float64).cpu() * float(counted))

    def train_step(self, share: List[tuple]) -> Dict[str, float]:
        """One optimizer step on this rank's share of a global batch ((Sample, counted) pairs,
        `_share`); every rank of the mesh calls it for the same step."""
        self.model.train()
        loss_config = self.config.loss
        self.shards.gather()
        self.optimizer.zero_grad(set_to_none=True)
        compute_virial = any(sample.has_stress for sample, _ in share)
        names = ["energy", "forces", "stress"]
        if self.compiled is not None:
            terms, balance, evaluations, total_counts = self._compiled_passes(share, compute_virial)
        else:
            evaluations = [self._evaluate(group, counted, compute_virial) for group, counted in self._passes(share)]

            n_layers = len(self.model.layers)
            local = torch.zeros(4, dtype=torch.float64)  # energy frames, force atoms, stress frames, atoms
            loads = torch.zeros(n_layers, self.model.layers[0].moe.num_experts, dtype=torch.float64)
            for evaluation in evaluations:
                local += evaluation.counts
                loads += evaluation.expert_load
            packed = torch.cat([local, loads.reshape(-1)])
            if self.world > 1:
                dist.all_reduce(packed)
            total_counts, global_loads = packed[:4], packed[4:].view_as(loads)

            terms: Dict[str, torch.Tensor] = {}
            balance = torch.zeros((), dtype=self.dtype)
            if evaluations:
                for evaluation in evaluations:
                    pass_terms = loss_terms(evaluation.prediction, evaluation.target, loss_config)
                    for k, name in enumerate(names):
                        if name in pass_terms:
                            ratio = (evaluation.counts[k] / total_counts[k].clamp(min=1e-12)).to(self.dtype)
                            terms[name] = terms.get(name, 0.0) + pass_terms[name] * ratio
                weights = loss_config.weights(self.progress())
                total = weights[0] * terms["energy"] + weights[1] * terms["forces"]
                if "stress" in terms:
                    total = total + weights[2] * terms["stress"]
                balance = self._balance_share(evaluations, global_loads, float(total_counts[3]))
                terms["total"] = total
                (total + loss_config.balance_weight * balance).backward()
        for reducer in self.reducers:
            reducer.finish()
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate()
        grad_norm = self._clip_gradients()
        skipped = self._is_spike(float(grad_norm))
        if not skipped:
            self.optimizer.step()
            self.ema.update(self.model)
        self.shards.release()

        logged = torch.stack([terms.get(n, torch.zeros(())).detach().to(torch.float64).cpu()
                              for n in names + ["total"]] + [balance.detach().to(torch.float64).cpu()])
        logged = torch.cat([logged, self._force_errors_by_source(evaluations)])
        if self.world > 1:
            dist.all_reduce(logged)
        out = {n: float(v) for n, v in zip(names + ["total", "balance"], logged)}
        if self.config.data.replay:  # the mix in effect: force MAE of the new and the replayed frames
            sums = logged[5:]
            out["forces_mae_new"] = float(sums[0] / sums[1].clamp(min=1))
            out["forces_mae_replay"] = float(sums[2] / sums[3].clamp(min=1))
        if not bool(total_counts[2] > 0):
            out.pop("stress")
        out.update(grad_norm=float(grad_norm), atoms=int(round(float(total_counts[3]))), skipped=int(skipped))
        return out

    def _is_spike(self, norm: float) -> bool:
        """Whether this step's gradient norm (the same on every rank: summed over the world)
        exceeds `optim.skip_spikes` times the median of the last `optim.spike_window` norms;
        the norm joins that window either way. Off (never a spike) with skip_spikes 0 or
        until the window is full. The window is checkpointed, so a resumed run skips the
        same steps."""
        optim = self.config.optim
        window = self.spike_norms
        spike = bool(optim.skip_spikes) and len(window) >= optim.spike_window and \
            norm > optim.skip_spikes * statistics.median(window)
        window.append(norm)
        del window[:-optim.spike_window]
        return spike

    def _compiled_passes(self, share: List[tuple], compute_virial: bool) -> tuple:
        """`train_step`'s evaluations, loss and backward through the compiled step: the label
        counts and the expert loads (from the species: element-only routing) are summed over
        the ranks BEFORE the evaluations, so each pass's loss ratios and balance-loss
        coefficients are inputs of its graph; the gradients are accumulated into `.grad` as
        the eager backward would. Returns (terms, balance, evaluations, total_counts)."""
        loss_config = self.config.loss
        passes = []
        for group, counted in self._passes(share):
            target = collate(group)
            counts = self._label_counts(target, counted)
            target = target.to(self.device)
            loads = expert_loads(self.model, target.graph.species).cpu() * float(counted)
            passes.append((target, counted, counts, loads))
        n_layers = len(self.model.layers)
        experts = self.model.layers[0].moe.num_experts
        local = torch.zeros(4, dtype=torch.float64)
        loads = torch.zeros(n_layers, experts, dtype=torch.float64)
        for _, _, counts, load in passes:
            local += counts
            loads += load
        packed = torch.cat([local, loads.reshape(-1)])
        if self.world > 1:
            dist.all_reduce(packed)
        total_counts, global_loads = packed[:4], packed[4:].view_as(loads)
        # balance_loss = E * sum(f * P) / atoms, linear in each pass's router probability sums P
        fraction = global_loads / global_loads.sum(dim=-1, keepdim=True).clamp(min=1)
        coefficients = (experts * fraction / max(float(total_counts[3]), 1.0)).to(self.device)

        terms: Dict[str, torch.Tensor] = {}
        balance = torch.zeros((), dtype=self.dtype)
        evaluations = []
        parameters = dict(self.model.named_parameters())
        factors = torch.tensor(loss_config.factors(self.progress()), device=self.device, dtype=self.dtype)
        for target, counted, counts, load in passes:
            ratios = (counts[:3] / total_counts[:3].clamp(min=1e-12)).to(device=self.device, dtype=self.dtype)
            # the graph weighs each term by its ratio times the configured weight: the stage's
            # factor rides on the ratio (an input), so stage two needs no second graph
            out = self.compiled(target, compute_virial, ratios * factors, coefficients * float(counted))
            for k, name in enumerate(["energy", "forces", "stress"][:3 if compute_virial else 2]):
                terms[name] = terms.get(name, 0.0) + out[name] * ratios[k]
            balance = balance + out["balance"].to(balance.device)
            for name, grad in out["gradients"].items():
                if grad is not None:
                    p = parameters[name]
                    p.grad = grad if p.grad is None else p.grad + grad
            evaluations.append(ForwardPass({"forces": out["forces_prediction"]}, target, counted, counts,
                                           out["router_probability_sum"] * float(counted), load))
        if evaluations:
            weights = loss_config.weights(self.progress())
            terms["total"] = weights[0] * terms["energy"] + weights[1] * terms["forces"]
            if "stress" in terms:
                terms["total"] = terms["total"] + weights[2] * terms["stress"]
        return terms, balance, evaluations, total_counts

    def _force_errors_by_source(self, evaluations: List[ForwardPass]) -> torch.Tensor:
        """(sum of |force error| components, components) for the training frames and for the
        replay frames of this rank's counted evaluations (zeros without replay data)."""
        sums = torch.zeros(4, dtype=torch.float64)
        if not self.config.data.replay:
            return sums
        for evaluation in evaluations:
            target = evaluation.target
            if not evaluation.counted or target.replay is None:
                continue
            replayed = target.replay[target.graph.batch] & target.has_forces
            fresh = ~target.replay[target.graph.batch] & target.has_forces
            error = (evaluation.prediction["forces"].detach() - torch.nan_to_num(target.forces)).abs().to(torch.float64)
            for k, mask in enumerate((fresh, replayed)):
                sums[2 * k] += float(error[mask].sum())
                sums[2 * k + 1] += 3 * int(mask.sum())
        return sums

    def _balance_share(self, evaluations: List[ForwardPass], global_loads: torch.Tensor,
                       global_atoms: float) -> torch.Tensor:
        """Switch balance loss E * sum_e f_e * P_e of the GLOBAL batch, split over ranks:
        f_e (global expert load fraction) is shared, P_e's atom sum is this rank's part (its
        owned atoms: the MoE of a domain only sees owned rows)."""
        probability_sum = torch.stack([evaluation.router_probability_sum for evaluation in evaluations]).sum(dim=0)
        return balance_loss(probability_sum, global_loads.to(probability_sum), global_atoms)

    def _clip_gradients(self) -> torch.Tensor:
        """`clip_grad_norm_` over the FULL parameter set: each gradient counted once, by its
        parameter's owner (replicas and expert shards alike), the squares summed over the world."""
        max_norm = self.config.optim.grad_clip
        squares = torch.zeros(1, dtype=torch.float64)
        counted = [p.grad for k, p in enumerate(self.shards.parameters) if p.grad is not None and self.shards.owns(k)]
        if counted:
            squares[0] = float(torch.stack([torch.linalg.vector_norm(g).to(torch.float64) ** 2 for g in counted]).sum())
        if self.world > 1:
            dist.all_reduce(squares)
        total_norm = squares[0].sqrt().to(self.dtype)
        coefficient = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
        for p in self.shards.parameters:
            if p.grad is not None:
                p.grad.mul_(coefficient)
        return total_norm

    def validate(self) -> Dict[str, Any]:
        """Errors of the EMA weights on the validation set, every rank evaluating every
        world-th batch with the (sharded) training model itself: no rank builds a full copy."""
        metrics = ErrorMetrics(group_by="file")
        batches, counted = self._validation_batches()
        workers = min(self.num_workers, len(batches))
        self.model.eval()
        with self._ema_weights():
            loader = sample_loader(self.validation_samples, batches, workers, self.config.data.prefetch_factor)
            for samples, count in zip(loader, counted):
                batch = collate(samples)
                prediction = predict(self.model, batch.to(self.device), create_graph=False)
                if count:
                    metrics.update({key: value.detach().cpu() for key, value in prediction.items()}, batch,
                                   None if self.heads else self.model.reference_energies)
        self.model.train()
        return self._combine_metrics(metrics).summary()

    def _validation_batches(self) -> tuple:
        """The validation batches this rank evaluates (every world-th one) and whether each
        counts: with experts sharded every rank of an ep group must evaluate as often (the
        dispatch is collective), so the short ranks repeat a batch that does not count."""
        every = atom_budget_batches(self.validation_samples.sizes, self.config.data.max_atoms_per_batch, 0, 0,
                                    shuffle=False)
        mine = every[self.rank::self.world]
        counted = [True] * len(mine)
        if self.sharded:
            needed = -(-len(every) // self.world)
            mine += [every[0]] * (needed - len(mine))
            counted += [False] * (needed - len(counted))
        return mine, counted

    def _combine_metrics(self, metrics: ErrorMetrics) -> ErrorMetrics:
        """The metrics of the whole validation set from every rank's share."""
        if self.world == 1:
            return metrics
        every: List[Any] = [None] * self.world
        dist.all_gather_object(every, metrics.plain_sums())
        combined = ErrorMetrics(group_by=metrics.group_by)
        for sums in every:
            combined.add_sums(sums)
        return combined

    def _truncate_log(self) -> None:
        """Drop log records written after the checkpoint we resume from (they are redone)."""
        if not self.is_main or not self.log_path.exists():
            return
        kept = [line for line in self.log_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= self.step]
        self.log_path.write_text("".join(line + "\n" for line in kept))

    def _peak_rss(self) -> List[float]:
        """Peak resident memory of every rank so far, GiB (collective)."""
        mine = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
        if self.world == 1:
            return [mine]
        every: List[Any] = [None] * self.world
        dist.all_gather_object(every, mine)
        return every

    def _routing_table(self) -> Optional[torch.Tensor]:
        """[L, Z, k] experts of every training element in every layer (sorted), or None where
        routing depends on more than the element (router_uses_features) or there is one expert,
        and under `parallel.shard: full`, where a rank holds its own share of the weights only
        between steps (the log would need an all-gather of them)."""
        moe = self.model.layers[0].moe
        if moe.router_uses_features or moe.num_experts == 1 or self.shards.mode == "full":
            return None
        if self._routing_elements is None:
            self._routing_elements = torch.as_tensor(self.train_samples.elements(), dtype=torch.long,
                                                     device=self.device)
        with torch.no_grad():
            embedding = self.model.embedding(self._routing_elements)
            # router_scale > 0 multiplies the logits and leaves their order, so it is left out
            tables = [torch.topk(layer.moe.router(embedding.to(layer.moe.router.weight.dtype)),
                                 layer.moe.experts_per_atom, dim=-1).indices.sort(dim=-1).values
                      for layer in self.model.layers]
        return torch.stack(tables).cpu()

    def _routing_record(self) -> Dict[str, Any]:
        """`routing_changes`: (layer, element) pairs whose experts changed since the last log
        record, of `routing_pairs` (nn/moe.py, "Router steps": a router that never settles
        reshuffles elements between experts at every step)."""
        table = self._routing_table()
        if table is None:
            return {}
        previous, self._routing_previous = self._routing_previous, table
        if previous is None:
            return {}
        changed = (table != previous).any(dim=-1)
        return {"routing_changes": int(changed.sum()), "routing_pairs": int(changed.numel())}

    def _compile_record(self) -> Dict[str, Any]:
        """Compiled graphs so far and the seconds they took (trace + compile), with run.compile."""
        if self.compiled is None:
            return {}
        return {"compiles": self.compiled.compiles, "compile_s": round(self.compiled.compile_seconds, 3)}

    def _log(self, record: Dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.log_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, self.step)

    def _finished(self) -> bool:
        if self.world > 1 and self.config.run.max_minutes:  # every rank stops at the same step
            elapsed = torch.tensor([self.elapsed], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            self.elapsed = float(elapsed)
        if self.step >= self.total_steps:
            return True
        limit = self.config.run.max_minutes
        return bool(limit) and self.elapsed >= 60 * limit

    def fit(self, stop_after_steps: Optional[int] = None) -> Dict[str, Any]:
        """Train until max_steps / epochs / max_minutes; returns the last validation summary."""
        run = self.config.run
        summary: Dict[str, Any] = {}
        steps_this_call = 0
        progress = TrainingProgress(run.progress, self.step, self.total_steps, 60 * run.max_minutes,
                                    run.progress_every_s)
        window_atoms, window_time, window_wait = 0, 0.0, 0.0
        # the largest gradient norm since the last record and the steps clipped: a record holds
        # its own step's norm only, and a blow-up starts between records (docs/training.md)
        window_norm_max, window_clipped, window_skipped = 0.0, 0, 0
        stream = iter(sample_loader(FlaggedSamples(self.samples), self._planned_batches(), self.num_workers,
                                    self.config.data.prefetch_factor))
        while not self._finished():
            epoch_size = len(self._epoch_batches(self.epoch))
            while self.batch_in_epoch < epoch_size and not self._finished():
                waiting = time.perf_counter()
                samples = next(stream)
                start = time.perf_counter()
                window_wait += start - waiting
                record = self.train_step(samples)
                duration = time.perf_counter() - start
                self.elapsed += duration
                window_atoms += record["atoms"]
                window_time += duration
                window_norm_max = max(window_norm_max, record["grad_norm"])
                window_clipped += int(record["grad_norm"] > self.config.optim.grad_clip)
                window_skipped += record["skipped"]
                self.step += 1
                self.batch_in_epoch += 1
                steps_this_call += 1
                lr = self.optimizer.param_groups[0]["lr"]
                progress.update(self.step, self.epoch, record["total"], lr, window_atoms / max(window_time, 1e-9),
                                self.elapsed)
                if self.step % run.log_every == 0:
                    self._log({"step": self.step, "epoch": self.epoch, "lr": lr, "peak_rss_gib": self._peak_rss(),
                               "elapsed_s": self.elapsed, "atoms_per_s": window_atoms / max(window_time, 1e-9),
                               "data_wait_s": window_wait, **{f"train_{k}": v for k, v in record.items()},
                               "train_grad_norm_max": window_norm_max, "train_clipped_steps": window_clipped,
                               "train_skipped_steps": window_skipped,
                               **self._routing_record(), **self._compile_record()})
                    window_atoms, window_time, window_wait = 0, 0.0, 0.0
                    window_norm_max, window_clipped, window_skipped = 0.0, 0, 0
                if self.step % run.checkpoint_every == 0:
                    self.save()
                if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                    progress.close()
                    return summary
            if self.batch_in_epoch >= epoch_size:
                summary = self._end_epoch()
        progress.close()
        if self._last_validation_step != self.step:
            summary = self._end_epoch(final=True)
        return summary

    def _end_epoch(self, final: bool = False) -> Dict[str, Any]:
        self._last_validation_step = self.step
        summary = self.validate() if self.validation_samples else {}
        if summary:
            overall = summary["all"]
            self._log({"step": self.step, "epoch": self.epoch, "elapsed_s": self.elapsed, "validation": summary})
            score = overall.get("forces", {}).get("mae", 0.0) + overall.get("energy_per_atom", {}).get("mae", 0.0)
            self.best_validation = min(self.best_validation, score)
        if not final:
            self.epoch += 1
            self.batch_in_epoch = 0
        self.save()
        return summary


class _SwappedWeights:
    """`Trainer._ema_weights`: swap the EMA weights into the model's parameters and buffers
    (dense parameters gathered from their owners with `parallel.shard: full`), and back."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def __enter__(self) -> None:
        trainer = self.trainer
        shadow = trainer.ema.shadow
        self.live = [p.data for p in trainer.shards.parameters]
        self.buffers = [(b, b.data) for _, b in trainer._buffers()]
        for name, p in zip(trainer.shards.names, trainer.shards.parameters):
            if name in shadow:
                p.data = shadow[name]
        for name, b in trainer._buffers():
            if name in shadow:
                b.data = shadow[name]
        trainer.shards.gather(values=shadow if trainer.ema.enabled else None)

    def __exit__(self, *exc) -> None:
        for p, data in zip(self.trainer.shards.parameters, self.live):
            p.data = data
        for b, data in self.buffers:
            b.data = data
        self.trainer.shards.release()
