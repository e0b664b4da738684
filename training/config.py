"""Training configuration: YAML file + `--set section.key=value` overrides, defaults for all.

Sections are small dataclasses (one concern each); `TrainConfig.load(path, overrides)`
merges file values and overrides onto the defaults and rejects unknown keys by name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


def _coerce(name: str, default: Any, value: Any) -> Any:
    """Give `value` the type of the default (YAML reads `1e-3` as a string)."""
    try:
        if isinstance(default, bool):
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
        if isinstance(default, float) and not isinstance(value, bool):
            return float(value)
        if isinstance(default, int) and not isinstance(value, bool):
            return int(value)
        if isinstance(default, list) and isinstance(value, str):
            return [value]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config key {name} expects {type(default).__name__}, got {value!r}") from exc
    return value


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=lambda: ["examples/data/mptrj-random-1k.xyz"])
    validation: list[str] = field(default_factory=list)  # empty: split off `validation_fraction`
    validation_fraction: float = 0.1
    split_seed: int = 0
    cache_dir: str = "runs/cache"
    max_atoms_per_batch: int = 256
    max_structures: int = 0  # 0: all


@dataclass
class ModelSection:
    preset: str = "small"
    overrides: dict[str, Any] = field(default_factory=dict)
    restrict_elements: bool = True  # the exported model covers the elements seen in training


@dataclass
class LossConfig:
    kind: str = "huber"  # "mse" or "huber"
    huber_delta: float = 0.1
    energy_weight: float = 1.0  # on energy per atom (eV/atom)
    forces_weight: float = 1.0  # on force components (eV/A)
    stress_weight: float = 0.1  # on stress components (GPa)
    balance_weight: float = 0.01  # MoE load-balancing loss


@dataclass
class OptimConfig:
    lr: float = 2e-3
    weight_decay: float = 1e-5
    warmup_steps: int = 100
    min_lr_ratio: float = 0.02
    grad_clip: float = 10.0
    ema_decay: float = 0.995
    max_steps: int = 1000
    epochs: int = 0  # 0: as many as max_steps needs


@dataclass
class RunConfig:
    output: str = "runs/train"
    seed: int = 0
    dtype: str = "float32"
    threads: int = 0  # 0: torch's default
    log_every: int = 10
    checkpoint_every: int = 100
    max_minutes: float = 0.0  # 0: no time limit
    tensorboard: bool = False
    progress: bool = True


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        config = cls()
        for section, entries in (values or {}).items():
            if not hasattr(config, section):
                raise ValueError(f"unknown config section {section!r}")
            target = getattr(config, section)
            for key, value in (entries or {}).items():
                if key not in {f.name for f in dataclasses.fields(target)}:
                    raise ValueError(f"unknown config key {section}.{key}")
                setattr(target, key, _coerce(f"{section}.{key}", getattr(target, key), value))
        return config

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> "TrainConfig":
        values: dict[str, Any] = {}
        if path is not None:
            values = yaml.safe_load(Path(path).read_text()) or {}
        for item in overrides or []:
            if "=" not in item or "." not in item.split("=", 1)[0]:
                raise ValueError(f"override {item!r} must look like section.key=value")
            dotted, raw = item.split("=", 1)
            section, key = dotted.split(".", 1)
            values.setdefault(section, {})
            if "." in key:  # e.g. model.overrides.features=32
                key, sub = key.split(".", 1)
                values[section].setdefault(key, {})[sub] = yaml.safe_load(raw)
            else:
                values[section][key] = yaml.safe_load(raw)
        return cls.from_dict(values)

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
