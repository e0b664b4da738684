"""The model test suite (`tests/model_suite.py`) on each model configuration."""

from .model_suite import ModelTests


class TestTiny(ModelTests):
    preset = "tiny"


class TestSmall(ModelTests):
    preset = "small"


class TestMixtureOfExperts(ModelTests):
    """Several experts per atom, routed on the atom's features as well as its element, the
    router's steps scaled (`router_scale`, nn/moe.py)."""

    preset = "tiny"
    overrides = {"num_experts": 6, "experts_per_atom": 3, "router_uses_features": True, "router_scale": 0.05}


class TestElementFeatures(ModelTests):
    """The element embedding with chemical descriptors (nn/embedding.py)."""

    preset = "tiny"
    overrides = {"element_features": True}


class TestAttentionNorm(ModelTests):
    """A LayerNorm before each layer's three-body, value and query/key projections
    (`attention_norm`, nn/interaction.py)."""

    preset = "tiny"
    overrides = {"attention_norm": True}
