"""The device parameter of every physics and parallel test: the CPU always, CUDA where a GPU
is visible. `pytest -m gpu` selects the CUDA cases; without a GPU they are reported as
skipped with the reason, so the CPU suite runs as before."""

from __future__ import annotations

import pytest
import torch

CUDA_VISIBLE = torch.cuda.is_available()
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not CUDA_VISIBLE, reason="no CUDA GPU visible (torch.cuda.is_available() is False)")]),
]
