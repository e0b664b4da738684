"""Janus: a Mixture-of-Experts universal machine-learning interatomic potential.

Names are imported on first use, so that light entry points (the LAMMPS plugin locator
`janus_potential.lammps`, run by every `lmp` start on every rank) do not pay for torch.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "PRESETS": ".config", "ModelConfig": ".config", "JanusInputError": ".errors", "AtomGraph": ".graph",
    "batch_graphs": ".graph", "build_graph": ".graph", "JanusPotential": ".model",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'janus_potential' has no attribute {name!r}")
