"""Janus: a Mixture-of-Experts universal machine-learning interatomic potential."""

from .config import PRESETS, ModelConfig
from .errors import JanusInputError
from .graph import AtomGraph, batch_graphs, build_graph
from .model import JanusPotential

__all__ = ["PRESETS", "AtomGraph", "JanusInputError", "JanusPotential", "ModelConfig", "batch_graphs", "build_graph"]
__version__ = "0.1.0"
