"""Training configuration: YAML file + `--set section.key=value` overrides, defaults for all.

Sections are small dataclasses (one concern each); `TrainConfig.load(path, overrides)`
merges file values and overrides onto the defaults, rejects unknown keys by name and checks
every value (`TrainConfig.validate`), so a mistake is one `JanusInputError` naming the file
or key before any data is read. Data paths in a config file are relative to the file's
folder (the file then works from any folder); paths given by `--set` are relative to the
current folder, as on any command line.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from janus_potential.config import PRESETS, ModelConfig
from janus_potential.errors import JanusInputError

DATA_PATH_KEYS = ("train", "validation", "replay")  # the data section's file lists


def _boolean(value: Any) -> bool:
    """A bool from YAML's booleans or their usual spellings; anything else is a mistake."""
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def _integer(value: Any) -> int:
    """An int, also from a whole number written as a float (YAML reads `1e3` as a string)."""
    if isinstance(value, int):
        return value
    number = float(value)
    if not number.is_integer():
        raise ValueError(value)
    return int(number)


def _coerce(name: str, default: Any, value: Any) -> Any:
    """`value` with the type of the default (YAML reads `1e-3` as a string); a value with no
    such reading is an error naming the key."""
    try:
        if isinstance(default, bool):
            return _boolean(value)
        if not isinstance(value, bool):
            if isinstance(default, float):
                return float(value)
            if isinstance(default, int):
                return _integer(value)
            if isinstance(default, str) and isinstance(value, (str, int, float)):
                return str(value)
        if isinstance(default, list) and isinstance(value, str):
            return [value]
        if isinstance(default, list) and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        if isinstance(default, dict) and isinstance(value, dict):
            return value
    except (TypeError, ValueError):
        pass
    raise JanusInputError(f"config key {name} expects {type(default).__name__}, got {value!r}")


def _relative_to(folder: Path, paths: Any) -> Any:
    """Relative data paths of a config file, taken from the file's folder and made absolute
    (so that the run's config.yaml, written elsewhere, names the same files)."""
    if isinstance(paths, list):
        return [_relative_to(folder, path) for path in paths]
    if isinstance(paths, str) and not os.path.isabs(paths):
        return os.path.abspath(folder / paths)
    return paths


HEAD_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")


def split_head(entry: str) -> tuple[str, str | None]:
    """A data entry `PATH` or `PATH@HEAD` (the output head its frames train, multi-fidelity
    data): (path, head or None)."""
    if "@" in entry and not os.path.exists(entry):
        path, head = entry.rsplit("@", 1)
        if HEAD_NAME.match(head):
            return path, head
    return entry, None


def data_heads(entries: list[str]) -> list[str]:
    """The output heads the data entries name, in order of appearance; entries without a head
    train the head `default`. No named head: [] (a one-head model)."""
    named = [split_head(entry)[1] for entry in entries]
    if not any(named):
        return []
    heads: list[str] = []
    for head in named:
        head = head or "default"
        if head not in heads:
            heads.append(head)
    return heads


def _read_file(path: Path) -> dict[str, Any]:
    """The sections of a YAML config file, with its data paths relative to its folder."""
    if not path.is_file():
        raise JanusInputError(f"config file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise JanusInputError(f"config file {str(path)!r} is not valid YAML: {' '.join(str(exc).split())}") from exc
    if not isinstance(values, dict):
        raise JanusInputError(f"config file {str(path)!r} must map sections to keys, got {values!r}")
    for section, entries in values.items():
        if entries is not None and not isinstance(entries, dict):
            raise JanusInputError(f"config file {str(path)!r}: section {section} must map keys to values, "
                                  f"got {entries!r}")
    data = values.get("data") or {}
    for key in DATA_PATH_KEYS:
        if key in data:
            data[key] = _relative_to(path.parent, data[key])
    model = values.get("model") or {}
    if model.get("init_from"):
        model["init_from"] = _relative_to(path.parent, model["init_from"])
    return values


def _apply_override(values: dict[str, Any], item: str) -> None:
    """Put one `section.key=value` (or `section.key.sub=value` for a dict key) into `values`."""
    dotted, equals, raw = item.partition("=")
    if not equals or "." not in dotted:
        raise JanusInputError(f"override {item!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise JanusInputError(f"override {item!r}: the value is not valid YAML") from exc
    section, key = dotted.split(".", 1)
    entries = values[section] = values.get(section) or {}
    if "." in key:  # e.g. model.overrides.features=32
        key, sub = key.split(".", 1)
        nested = entries.get(key)
        entries[key] = dict(nested, **{sub: value}) if isinstance(nested, dict) else {sub: value}
    else:
        entries[key] = value


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=lambda: ["examples/data/mptrj-random-1k.xyz"])
    validation: list[str] = field(default_factory=list)  # empty: split off `validation_fraction`
    validation_fraction: float = 0.1
    split_seed: int = 0
    cache_dir: str = "runs/cache"  # packs of plain data files (empty: a temporary folder per run)
    max_atoms_per_batch: int = 256
    max_structures: int = 0  # 0: all
    num_workers: int = 2  # DataLoader processes building graphs (at most the cores; 0: the training process)
    prefetch_factor: int = 2  # batches each worker keeps ready
    # fine-tuning: frames of earlier training data (files or packs) mixed into every batch,
    # `replay_fraction` of each batch's atom budget (docs/training.md, "Fine-tuning")
    replay: list[str] = field(default_factory=list)
    replay_fraction: float = 0.0


@dataclass
class ModelSection:
    preset: str = "small"
    overrides: dict[str, Any] = field(default_factory=dict)
    restrict_elements: bool = True  # the exported model covers the elements seen in training
    # fine-tuning (docs/training.md, "Fine-tuning"): start from a trained model (a model or
    # training checkpoint; its architecture replaces preset/overrides), freeze parameters by
    # name pattern, or train rank-r adapters (LoRA) of the weight matrices only
    init_from: str = ""
    freeze: list[str] = field(default_factory=list)
    lora_rank: int = 0
    lora_alpha: float = 0.0  # adapter scale alpha / rank; 0: alpha = rank


@dataclass
class LossConfig:
    kind: str = "huber"  # "mse" or "huber"
    huber_delta: float = 0.1
    # per quantity (0: `huber_delta`); the force delta applies to the normalised error when
    # `forces_normalization` is "frame"
    energy_huber_delta: float = 0.0
    forces_huber_delta: float = 0.0
    stress_huber_delta: float = 0.0
    energy_per: str = "atom"  # "atom": error of E/N (eV/atom); "structure": error of E (eV)
    # "frame": each frame's force errors divided by (its label RMS + forces_scale_floor) times
    # forces_scale_floor, so near-equilibrium frames weigh as much as hot ones (docs/training.md)
    forces_normalization: str = "none"
    forces_scale_floor: float = 0.1  # eV/A
    # equal total loss weight per data file: "frames" (by frame count), "atoms" (by atom count), "none"
    file_balance: str = "none"
    energy_weight: float = 1.0  # on energy per atom (eV/atom)
    forces_weight: float = 1.0  # on force components (eV/A)
    stress_weight: float = 0.1  # on stress components (GPa)
    balance_weight: float = 0.01  # MoE load-balancing loss
    # a second stage, as in MACE's last stage: from this fraction of the training budget on
    # (of max_steps, or of max_minutes when the clock runs out first, as the learning rate's
    # cosine; 0: no second stage) the energy, force and stress weights are multiplied by these
    # factors (docs/training.md, "Loss")
    stage_two_start: float = 0.0
    stage_two_energy_factor: float = 1.0
    stage_two_forces_factor: float = 1.0
    stage_two_stress_factor: float = 1.0

    def factors(self, progress: float) -> tuple[float, float, float]:
        """(energy, forces, stress) weight factors at `progress` (the fraction of the budget
        used): the stage-two factors from `stage_two_start` on, else ones."""
        if self.stage_two_start and progress >= self.stage_two_start:
            return (self.stage_two_energy_factor, self.stage_two_forces_factor, self.stage_two_stress_factor)
        return (1.0, 1.0, 1.0)

    def weights(self, progress: float) -> tuple[float, float, float]:
        """(energy, forces, stress) weights at `progress`."""
        factors = self.factors(progress)
        return (self.energy_weight * factors[0], self.forces_weight * factors[1], self.stress_weight * factors[2])


@dataclass
class OptimConfig:
    lr: float = 2e-3
    weight_decay: float = 1e-5
    warmup_steps: int = 100
    min_lr_ratio: float = 0.02
    grad_clip: float = 1.0  # with lr 2e-3: the accuracy study's best (docs/training.md)
    # AdamW's second-moment decay (the first's is 0.9): lower follows a sudden change of the
    # gradients' scale sooner
    beta2: float = 0.999
    # skip a step (no AdamW or EMA update) whose gradient norm exceeds skip_spikes x the median
    # norm of the previous spike_window steps (skipped ones included, so a lasting change of
    # scale is followed); 0: never skip. The count per log record is train_skipped_steps
    skip_spikes: float = 0.0
    spike_window: int = 100
    ema_decay: float = 0.995
    max_steps: int = 1000
    epochs: int = 0  # 0: as many as max_steps needs


@dataclass
class RunConfig:
    output: str = "runs/train"
    seed: int = 0
    dtype: str = "float32"
    threads: int = 0  # 0: torch's default
    # "auto" (CUDA when visible; the CPU for expert or domain parallel runs, whose exchanges
    # are CPU tensors), "cpu", "cuda" or "cuda:N" (janus_potential.devices)
    device: str = "auto"
    # "float32", "tf32" (CUDA matmuls on TF32 tensor cores) or "bf16" (bf16 autocast of the
    # expert and readout MLPs); janus_potential.precision. tf32/bf16 need dtype float32
    precision: str = "float32"
    # the compiled training step (training/compiled.py): evaluation, loss and parameter gradient
    # traced into one graph and compiled; data and expert parallelism (dd stays eager)
    compile: bool = False
    log_every: int = 10
    checkpoint_every: int = 100
    max_minutes: float = 0.0  # 0: no time limit
    tensorboard: bool = False
    progress: bool = True  # a bar on a terminal, else a plain line every `progress_every_s`
    progress_every_s: float = 30.0


@dataclass
class ParallelConfig:
    """The dp x ep x dd process mesh (docs/parallel.md); all 1 on one process."""

    dp: int = 1  # data-parallel replicas
    ep: int = 1  # expert-parallel shards (janus_potential.parallel.expert)
    dd: int = 1  # spatial domains (janus_potential.parallel.domain)
    bucket_mb: float = 8.0  # gradient all-reduce bucket size
    # "optimizer": AdamW moments and summed gradients split over the ranks sharing each gradient
    # (ZeRO-1/2); "full": the dense parameters too, held by their owners between steps (ZeRO-3)
    shard: str = "none"


# (requirement, test, keys): the numeric keys that must pass `test`
RANGES: tuple[tuple[str, Callable[[float], bool], tuple[str, ...]], ...] = (
    ("positive", lambda value: value > 0,
     ("data.max_atoms_per_batch", "data.prefetch_factor", "optim.lr", "optim.grad_clip", "optim.spike_window",
      "loss.huber_delta", "loss.forces_scale_floor", "run.log_every", "run.checkpoint_every", "run.progress_every_s",
      "parallel.dp", "parallel.ep", "parallel.dd", "parallel.bucket_mb")),
    ("zero or positive", lambda value: value >= 0,
     ("data.max_structures", "data.num_workers", "optim.weight_decay", "optim.skip_spikes", "optim.warmup_steps",
      "optim.max_steps", "optim.epochs", "loss.energy_huber_delta", "loss.forces_huber_delta", "loss.stress_huber_delta",
      "loss.energy_weight", "loss.forces_weight", "loss.stress_weight", "loss.balance_weight",
      "loss.stage_two_energy_factor", "loss.stage_two_forces_factor", "loss.stage_two_stress_factor",
      "run.threads", "run.max_minutes", "model.lora_rank", "model.lora_alpha")),
    ("between 0 and 1", lambda value: 0 <= value <= 1,
     ("data.validation_fraction", "optim.min_lr_ratio", "optim.ema_decay", "optim.beta2",
      "loss.stage_two_start")),
)
CHOICES: dict[str, tuple[str, ...]] = {
    "model.preset": tuple(PRESETS), "run.dtype": ("float32", "float64"), "run.precision": ("float32", "tf32", "bf16"),
    "loss.kind": ("huber", "mse"),
    "loss.energy_per": ("atom", "structure"), "loss.forces_normalization": ("none", "frame"),
    "loss.file_balance": ("none", "frames", "atoms"),
    "parallel.shard": ("none", "optimizer", "full"),
}


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def value(self, key: str) -> Any:
        """The value of `section.key`."""
        section, name = key.split(".")
        return getattr(getattr(self, section), name)

    def validate(self) -> None:
        """Reject values the trainer cannot use (a zero learning rate, an unknown dtype or
        preset...) with an error naming the key, before any data is read."""
        for requirement, test, keys in RANGES:
            for key in keys:
                if not test(self.value(key)):
                    raise JanusInputError(f"config key {key} must be {requirement}, got {self.value(key)!r}")
        for key, choices in CHOICES.items():
            if self.value(key) not in choices:
                raise JanusInputError(f"config key {key} must be one of {', '.join(choices)}, got {self.value(key)!r}")
        if not 0 <= self.data.replay_fraction < 1:
            raise JanusInputError(f"config key data.replay_fraction must be at least 0 and below 1, "
                                  f"got {self.data.replay_fraction!r}")
        if bool(self.data.replay) != bool(self.data.replay_fraction):
            raise JanusInputError("config keys data.replay and data.replay_fraction go together: replay data "
                                  "needs a fraction of each batch above 0, and a fraction needs replay data")
        if self.model.lora_rank and self.parallel.ep > 1:
            raise JanusInputError("model.lora_rank: LoRA adapters are not supported with expert parallelism "
                                  "(parallel.ep > 1) yet")
        heads = data_heads(self.data.train + self.data.validation)
        if heads and self.model.init_from:
            raise JanusInputError("data entries name output heads (PATH@HEAD), which a run from model.init_from "
                                  "does not support yet: heads are set up when a model is trained from scratch")
        if heads and self.parallel.dd > 1:
            raise JanusInputError("output heads (PATH@HEAD data entries) are not supported with parallel.dd > 1")
        unknown = [h for h in data_heads(self.data.validation) if h not in data_heads(self.data.train)]
        if unknown:
            raise JanusInputError(f"data.validation names output heads {unknown} that no data.train entry trains")
        if self.model.lora_rank and self.model.freeze:
            raise JanusInputError("model.lora_rank freezes every original weight already; leave model.freeze empty")
        if self.run.precision != "float32" and self.run.dtype != "float32":
            raise JanusInputError(f"config key run.precision={self.run.precision} needs run.dtype float32 "
                                  f"(got {self.run.dtype})")
        if self.run.compile:
            if self.parallel.dd > 1:
                raise JanusInputError("run.compile works with data and expert parallelism, not with domain "
                                      "decomposition: parallel.dd must be 1 (set run.compile: false)")
            if self.run.precision != "float32":
                raise JanusInputError(f"run.compile needs run.precision float32 (got {self.run.precision})")
        if not (self.optim.max_steps or self.optim.epochs):
            raise JanusInputError("config keys optim.max_steps and optim.epochs are both 0: set one of them")
        if not self.optim.beta2 < 1:
            raise JanusInputError(f"config key optim.beta2 must be below 1 (AdamW), got {self.optim.beta2}")
        try:
            ModelConfig.from_preset(self.model.preset, **self.model.overrides)
        except (TypeError, ValueError) as exc:
            raise JanusInputError(f"config key model.overrides: {exc}") from exc

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """The defaults with `values` ({section: {key: value}}) put in, checked."""
        config = cls()
        sections = [f.name for f in dataclasses.fields(config)]
        for section, entries in (values or {}).items():
            if section not in sections:
                raise JanusInputError(f"unknown config section {section!r} (sections: {', '.join(sections)})")
            target = getattr(config, section)
            keys = [f.name for f in dataclasses.fields(target)]
            for key, value in (entries or {}).items():
                if key not in keys:
                    raise JanusInputError(f"unknown config key {section}.{key} (keys of {section}: {', '.join(keys)})")
                setattr(target, key, _coerce(f"{section}.{key}", getattr(target, key), value))
        config.validate()
        return config

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> "TrainConfig":
        """The config of a YAML file (or the defaults) with `section.key=value` overrides."""
        values = _read_file(Path(path)) if path is not None else {}
        for item in overrides or []:
            _apply_override(values, item)
        return cls.from_dict(values)

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
