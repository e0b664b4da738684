"""Single-process trainer: AdamW, warm-up + cosine, clipping, EMA, checkpoints, exact resume.

The step order is fixed so that a resumed run repeats the uninterrupted one bit for bit:
batches of an epoch are a pure function of (seed, epoch); the checkpoint stores the
position in the epoch, the optimizer/EMA states, the step time spent and the RNG states.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from janus_potential.elements import MAX_ATOMIC_NUMBER
from janus_potential.errors import JanusInputError
from janus_potential.model import DTYPES, JanusPotential

from .checkpoint import read_checkpoint, restore_rng, rng_state, write_checkpoint
from .config import TrainConfig
from .data import Sample, atom_budget_batches, collate, load_dataset, split
from .loss import ErrorMetrics, loss_terms, predict
from .progress import TrainingProgress, stderr_bars
from .schedule import ExponentialMovingAverage, warmup_cosine



def fit_reference_energies(samples: list[Sample], huber_delta: float = 0.1, iterations: int = 20) -> torch.Tensor:
    """Per-element energies: a robust least-squares fit of energy per atom on composition.

    Rows are per atom (so large cells do not dominate) and reweighted as in a Huber fit
    (iteratively reweighted least squares), so that a few very high-energy structures (high
    pressure/temperature data) do not shift every element's reference. An exact composition
    model is recovered exactly.
    """
    labelled = [s for s in samples if s.has_energy]
    if not labelled:
        return torch.zeros(MAX_ATOMIC_NUMBER + 1, dtype=torch.float64)
    counts = np.zeros((len(labelled), MAX_ATOMIC_NUMBER + 1))
    for row, sample in enumerate(labelled):
        np.add.at(counts[row], sample.graph.species.numpy(), 1)
    n_atoms = counts.sum(axis=1, keepdims=True)
    present = counts.sum(axis=0) > 0
    design = counts[:, present] / n_atoms
    target = np.array([s.energy for s in labelled]) / n_atoms[:, 0]
    weights = np.ones(len(target))
    for _ in range(iterations):
        root = np.sqrt(weights)
        solution, *_ = np.linalg.lstsq(design * root[:, None], target * root, rcond=None)
        residual = np.abs(target - design @ solution)
        weights = np.where(residual < huber_delta, 1.0, huber_delta / np.maximum(residual, 1e-12))
    reference = np.zeros(MAX_ATOMIC_NUMBER + 1)
    reference[present] = solution
    return torch.as_tensor(reference)


def force_scale(samples: list[Sample]) -> float:
    """Mean absolute force component: the scale of the learned per-atom energy. The mean
    absolute value, not the RMS, so that a few structures with forces of tens of eV/A (high
    pressure data) do not inflate the scale for everything else."""
    forces = [s.forces for s in samples if s.has_forces]
    if not forces:
        return 1.0
    return float(torch.cat(forces).double().abs().mean().clamp(min=1e-3))


class Trainer:
    def __init__(self, config: TrainConfig, resume: bool = False) -> None:
        config.validate()
        self.config = config
        run = config.run
        if run.threads:
            torch.set_num_threads(run.threads)
        torch.manual_seed(run.seed)
        np.random.seed(run.seed)
        self.output = Path(run.output)
        self.output.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path = self.output / "checkpoint.pt"
        self.dtype = DTYPES[run.dtype]

        self.model = self._build_model()
        self._load_data()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.optim.lr,
                                           weight_decay=config.optim.weight_decay)
        self.total_steps = config.optim.max_steps
        if config.optim.epochs:
            self.total_steps = min(self.total_steps or math.inf, config.optim.epochs * len(self._epoch_batches(0)))
        self.lr_factor = warmup_cosine(config.optim.warmup_steps, config.optim.min_lr_ratio)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.elapsed = 0.0
        self.best_validation = math.inf
        self._last_validation_step = -1
        if resume and self.checkpoint_path.exists():
            self._restore(read_checkpoint(self.checkpoint_path))
        else:
            self._initialise_statistics()
            self.ema = ExponentialMovingAverage(self.model, config.optim.ema_decay)
            config.dump(self.output / "config.yaml")
        self.log_path = self.output / "metrics.jsonl"
        if resume:
            self._truncate_log()
        self.tensorboard = self._tensorboard() if run.tensorboard else None

    # ----------------------------------------------------------------- set-up
    def _build_model(self) -> JanusPotential:
        """The model to train (the distributed trainer shards its experts here, before the
        optimizer sees the parameters)."""
        return JanusPotential.from_preset(self.config.model.preset, **self.config.model.overrides).to(self.dtype)

    def _load_data(self) -> None:
        data = self.config.data
        cutoff = self.model.cutoff
        samples = load_dataset(data.train, cutoff, data.cache_dir, self.dtype,
                               progress=stderr_bars(self.config.run.progress))
        if data.max_structures:
            samples = samples[: data.max_structures]
        if data.validation:
            self.train_samples = samples
            self.validation_samples = load_dataset(data.validation, cutoff, data.cache_dir, self.dtype)
        else:
            self.train_samples, self.validation_samples = split(samples, data.validation_fraction, data.split_seed)
        if not self.train_samples:
            raise JanusInputError("the training set is empty")
        self.sizes = [s.num_atoms for s in self.train_samples]
        too_big = max(self.sizes)
        if too_big > data.max_atoms_per_batch:
            print(f"note: a structure of {too_big} atoms exceeds max_atoms_per_batch; it forms its own batch")

    def _initialise_statistics(self) -> None:
        with torch.no_grad():
            reference = fit_reference_energies(self.train_samples)
            self.model.reference_energies.copy_(reference.to(self.dtype))
            self.model.energy_scale.fill_(force_scale(self.train_samples))
            if self.config.model.restrict_elements:
                seen = torch.zeros_like(self.model.supported)
                for sample in self.train_samples + self.validation_samples:
                    seen[sample.graph.species] = True
                self.model.supported.copy_(seen)

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise JanusInputError("run.tensorboard is true but the tensorboard package is not installed") from exc
        return SummaryWriter(str(self.output / "tensorboard"))

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        return atom_budget_batches(self.sizes, self.config.data.max_atoms_per_batch, self.config.run.seed, epoch)

    # ----------------------------------------------------------------- checkpoints
    def state(self) -> Dict[str, Any]:
        return {
            "config": self.config.to_dict(), "model_config": self.model.config.to_dict(),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict(),
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "elapsed": self.elapsed, "best_validation": self.best_validation, "rng": rng_state(),
            "provenance": self.provenance(),
        }

    def provenance(self) -> Dict[str, Any]:
        return {"trainer": "janus_potential.training", "step": self.step, "epoch": self.epoch,
                "data": list(self.config.data.train), "preset": self.config.model.preset}

    def _restore(self, state: Dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema = ExponentialMovingAverage(self.model, self.config.optim.ema_decay)
        self.ema.load_state_dict(state["ema"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.elapsed, self.best_validation = state["elapsed"], state["best_validation"]
        restore_rng(state["rng"])

    def save(self) -> None:
        write_checkpoint(self.checkpoint_path, self.state())

    def ema_model(self) -> JanusPotential:
        model = JanusPotential(self.model.config).to(self.dtype)
        model.load_state_dict(self.ema.shadow)
        model.provenance = self.provenance()
        return model

    # ----------------------------------------------------------------- training
    def learning_rate(self) -> float:
        """Warm-up then cosine over the training budget: max_steps, or max_minutes of step
        time when that runs out first (then the schedule follows the clock)."""
        progress = self.step / max(1, self.total_steps)
        if self.config.run.max_minutes:
            progress = max(progress, self.elapsed / (60 * self.config.run.max_minutes))
        return self.config.optim.lr * self.lr_factor(self.step, progress)

    def train_step(self, samples: list[Sample]) -> Dict[str, float]:
        self.model.train()
        batch = collate(samples)
        prediction = predict(self.model, batch, create_graph=True)
        terms = loss_terms(prediction, batch, self.config.loss)
        balance = self.model.balance_loss()
        loss = terms["total"] + self.config.loss.balance_weight * balance
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip)
        self.optimizer.step()
        self.ema.update(self.model)
        out = {k: float(v.detach()) for k, v in terms.items()}
        out.update(balance=float(balance.detach()), grad_norm=float(grad_norm), atoms=int(batch.graph.num_atoms.sum()))
        return out

    def validate(self, model: Optional[JanusPotential] = None) -> Dict[str, Any]:
        model = model or self.ema_model()
        metrics = ErrorMetrics(group_by="file")
        for indices in self._validation_batches():
            batch = collate([self.validation_samples[k] for k in indices])
            metrics.update(predict(model, batch, create_graph=False), batch)
        return self._combine_metrics(metrics).summary()

    def _validation_batches(self) -> list[list[int]]:
        """The validation batches this process evaluates (all of them here)."""
        return atom_budget_batches([s.num_atoms for s in self.validation_samples],
                                   self.config.data.max_atoms_per_batch, 0, 0, shuffle=False)

    def _combine_metrics(self, metrics: ErrorMetrics) -> ErrorMetrics:
        """The metrics of the whole validation set from this process's share (its own here)."""
        return metrics

    def _truncate_log(self) -> None:
        """Drop log records written after the checkpoint we resume from (they are redone)."""
        if not self.log_path.exists():
            return
        kept = [line for line in self.log_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= self.step]
        self.log_path.write_text("".join(line + "\n" for line in kept))

    def _log(self, record: Dict[str, Any]) -> None:
        with open(self.log_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, self.step)

    def _finished(self) -> bool:
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
        window_atoms, window_time = 0, 0.0
        while not self._finished():
            batches = self._epoch_batches(self.epoch)
            while self.batch_in_epoch < len(batches) and not self._finished():
                start = time.perf_counter()
                record = self.train_step([self.train_samples[k] for k in batches[self.batch_in_epoch]])
                duration = time.perf_counter() - start
                self.elapsed += duration
                window_atoms += record["atoms"]
                window_time += duration
                self.step += 1
                self.batch_in_epoch += 1
                steps_this_call += 1
                lr = self.optimizer.param_groups[0]["lr"]
                progress.update(self.step, self.epoch, record["total"], lr, window_atoms / max(window_time, 1e-9),
                                self.elapsed)
                if self.step % run.log_every == 0:
                    self._log({"step": self.step, "epoch": self.epoch, "lr": lr,
                               "elapsed_s": self.elapsed, "atoms_per_s": window_atoms / max(window_time, 1e-9),
                               **{f"train_{k}": v for k, v in record.items()}})
                    window_atoms, window_time = 0, 0.0
                if self.step % run.checkpoint_every == 0:
                    self.save()
                if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                    progress.close()
                    return summary
            if self.batch_in_epoch >= len(batches):
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
