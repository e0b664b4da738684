"""Shared fixtures: a small float64 model and a structure (`make_model` lives in the model suite)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from janus_potential import JanusPotential  # noqa: E402
from janus_potential.testing import random_structure  # noqa: E402

from .devices import CUDA_VISIBLE, DEVICES  # noqa: E402, F401  (the device parameter of the tests)
from .model_suite import make_model  # noqa: E402  (shared with the model suite)


@pytest.fixture(scope="session")
def tiny_model() -> JanusPotential:
    return make_model()


@pytest.fixture
def oxide():
    """A random triclinic multi-element periodic structure (24 atoms)."""
    return random_structure(["Mg", "Al", "O", "O"], 24, seed=1)


def flip_tensor_bytes(path, entry_prefix: str = "data/") -> str:
    """Flip 16 bytes in the middle of the largest tensor entry of a zip-format torch file
    (TorchScript or torch.save); returns the entry's name. The archive stays readable: only a
    content hash can tell."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        entries = [i for i in archive.infolist() if entry_prefix in i.filename and "/extra/" not in i.filename]
        info = max(entries, key=lambda i: i.file_size)
    raw = bytearray(open(path, "rb").read())
    name_length = int.from_bytes(raw[info.header_offset + 26: info.header_offset + 28], "little")
    extra_length = int.from_bytes(raw[info.header_offset + 28: info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_length + extra_length + info.file_size // 2
    for k in range(start, start + 16):
        raw[k] ^= 0x5A
    open(path, "wb").write(bytes(raw))
    return info.filename
