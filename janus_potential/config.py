"""Model hyper-parameters and the named presets (`tiny`, `small`, `base`, `1b`).

A preset is a plain `ModelConfig`; `ModelConfig.from_preset(name, **overrides)` applies
keyword overrides on top of it. Parameter counts (total and active per atom) are reported
by `JanusPotential.parameter_report()`, which counts the real tensors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import JanusInputError


@dataclass
class ModelConfig:
    """Hyper-parameters of a Janus model; every field has a default (the `small` preset)."""

    cutoff: float = 5.0
    three_body_cutoff: float = 2.9
    num_interactions: int = 3
    features: int = 64
    num_radial: int = 8
    num_three_body_radial: int = 4
    angular_order: int = 3
    three_body_features: int = 16
    num_heads: int = 4
    filter_groups: int = 16
    num_experts: int = 8
    experts_per_atom: int = 1
    expert_hidden: int = 128
    shared_expert_hidden: int = 128
    router_uses_features: bool = False
    # router logits = router_scale * W x: the router's Adam steps scaled (nn/moe.py, "Router
    # steps"); below 1 the element-to-expert assignment settles instead of reshuffling each step
    router_scale: float = 1.0
    readout_hidden: int = 64
    max_atomic_number: int = 100
    logit_cap: float = 5.0
    # a LayerNorm of the node features before each layer's three-body, value and query/key
    # projections (nn/interaction.py); off: the raw residual stream feeds them
    attention_norm: bool = False
    zbl: bool = True  # ZBL short-range repulsion prior (nn/repulsion.py)
    # element embedding = a learned row per element + a learned map of fixed chemical
    # descriptors (period, group, block, electronegativity, radius, ...): nn/embedding.py
    element_features: bool = False
    zbl_switch_on: float = 0.25  # ZBL fully on below this fraction of the covalent-radius sum
    zbl_switch_off: float = 0.5  # and off above this one
    # output heads (multi-fidelity): datasets of different DFT settings share the body and
    # get their own readout, energy scale and reference energies; empty: one head
    output_heads: tuple = ()

    def __post_init__(self) -> None:
        if self.three_body_cutoff > self.cutoff:
            raise ValueError("three_body_cutoff must not exceed cutoff")
        if not 1 <= self.experts_per_atom <= self.num_experts:
            raise ValueError("experts_per_atom must be between 1 and num_experts")
        if self.cutoff <= 0 or self.three_body_cutoff <= 0:
            raise ValueError("cutoffs must be positive")
        if not self.router_scale > 0:
            raise ValueError(f"router_scale must be positive, got {self.router_scale}")
        self.output_heads = tuple(self.output_heads)
        if len(set(self.output_heads)) != len(self.output_heads):
            raise ValueError(f"output head names must be unique, got {list(self.output_heads)}")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        values = dataclasses.asdict(PRESETS[name])
        unknown = set(overrides) - set(values)
        if unknown:
            raise ValueError(f"unknown model option(s) {sorted(unknown)}")
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        """The config stored in a checkpoint; options this version does not know are an error
        (the file is from another version of Janus)."""
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise JanusInputError(f"model option(s) {unknown} are unknown to this version of Janus")
        return cls(**values)


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        cutoff=4.0, three_body_cutoff=3.0, num_interactions=2, features=16, num_radial=6,
        num_three_body_radial=3, angular_order=2, three_body_features=8, num_heads=2, filter_groups=4, num_experts=4,
        experts_per_atom=1, expert_hidden=32, shared_expert_hidden=32, readout_hidden=16,
    ),
    "small": ModelConfig(),
    "base": ModelConfig(
        cutoff=6.0, three_body_cutoff=4.5, num_interactions=4, features=128, num_radial=8,
        num_three_body_radial=6, angular_order=4, three_body_features=32, num_heads=8, filter_groups=32, num_experts=16,
        experts_per_atom=2, expert_hidden=256, shared_expert_hidden=256, readout_hidden=128,
    ),
    "1b": ModelConfig(
        cutoff=6.0, three_body_cutoff=4.5, num_interactions=4, features=512, num_radial=8,
        num_three_body_radial=6, angular_order=4, three_body_features=32, num_heads=16, filter_groups=64, num_experts=128,
        experts_per_atom=2, expert_hidden=2048, shared_expert_hidden=2048, readout_hidden=256,
    ),
}
