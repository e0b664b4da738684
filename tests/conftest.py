"""Shared fixtures: small float64 models and structures for the model test suites."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from janus_potential import JanusPotential  # noqa: E402
from janus_potential.testing import random_structure  # noqa: E402


def make_model(preset: str = "tiny", dtype: torch.dtype = torch.float64, seed: int = 0, **overrides) -> JanusPotential:
    """A randomly initialised model with non-trivial reference energies and energy scale."""
    torch.manual_seed(seed)
    model = JanusPotential.from_preset(preset, **overrides).to(dtype)
    with torch.no_grad():
        model.reference_energies.uniform_(-5.0, -1.0)
        model.energy_scale.fill_(2.0)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model() -> JanusPotential:
    return make_model()


@pytest.fixture
def oxide():
    """A random triclinic multi-element periodic structure (24 atoms)."""
    return random_structure(["Mg", "Al", "O", "O"], 24, seed=1)
