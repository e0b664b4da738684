"""Fused edge operators (`lammps_plugin/janus_ops.cpp`, built into janus_potential/lib/janusops.so
by `lammps_plugin/build.sh`): issue 11's gather-multiply-scatter without [E, F] tensors.

    edge_scatter(value, weight, gather, scatter, n_out)[scatter[e], f] += value[gather[e], f] * weight[e, f // (F/G)]
    edge_dot(a, b, index_a, index_b, groups)[e, g] = sum_{f in group g} a[index_a[e], f] * b[index_b[e], f]

Both are registered with torch.library (`torch.ops.janus.*`) with their autograd in C++, each
one's backward made of the two operators again, so they are differentiable to any order in
eager Python, TorchScript and libtorch alike (tests/test_ops.py: gradcheck, gradgradcheck and
the composite torch expression they replace). CPU kernels only so far: on other devices the
interaction layer computes the same message with torch operations (docs/model.md, "Fused
edge operators").
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

LIBRARY = Path(__file__).resolve().parent / "lib" / "janusops.so"
_loaded = False


def available() -> bool:
    """Whether the operator library is built (and then loaded): the interaction layer uses the
    fused operators on the CPU when it is (`nn.interaction.InteractionLayer.fused`), unless
    JANUS_FUSED_OPS=0 (for comparisons: bench/train_step.py runs both)."""
    if not LIBRARY.is_file() or os.environ.get("JANUS_FUSED_OPS", "1") == "0":
        return False
    load()
    return True


def load() -> None:
    """Register `torch.ops.janus` (idempotent); a missing library is a FileNotFoundError naming
    the build step."""
    global _loaded
    if _loaded:
        return
    if not LIBRARY.is_file():
        raise FileNotFoundError(f"{LIBRARY} is missing: build it with `bash lammps_plugin/build.sh .venv/bin/python` "
                                "(make install does)")
    torch.ops.load_library(str(LIBRARY))
    _register_fake_kernels()
    _loaded = True


def _register_fake_kernels() -> None:
    """Shape functions of the operators, so that symbolic tracing (`make_fx`, the compiled
    training step of training/compiled.py) and torch.compile can run them on fake tensors.
    The number of output rows of edge_scatter is a SymInt in the schema: it stays a symbol."""

    @torch.library.register_fake("janus::edge_scatter")
    def _edge_scatter_shape(value, weight, gather, scatter, n_out):
        return value.new_empty(n_out, value.shape[1])

    @torch.library.register_fake("janus::edge_dot")
    def _edge_dot_shape(a, b, index_a, index_b, groups):
        return a.new_empty(index_a.shape[0], groups)


def edge_scatter(value: torch.Tensor, weight: torch.Tensor, gather: torch.Tensor, scatter: torch.Tensor,
                 n_out: int) -> torch.Tensor:
    load()
    return torch.ops.janus.edge_scatter(value, weight, gather, scatter, n_out)


def edge_dot(a: torch.Tensor, b: torch.Tensor, index_a: torch.Tensor, index_b: torch.Tensor,
             groups: int) -> torch.Tensor:
    load()
    return torch.ops.janus.edge_dot(a, b, index_a, index_b, groups)


def edge_scatter_reference(value: torch.Tensor, weight: torch.Tensor, gather: torch.Tensor, scatter: torch.Tensor,
                           n_out: int) -> torch.Tensor:
    """The composite torch expression `edge_scatter` replaces (what nn/interaction.py computes)."""
    expanded = weight.repeat_interleave(value.shape[1] // weight.shape[1], dim=1)
    message = value.index_select(0, gather) * expanded
    return torch.zeros(n_out, value.shape[1], dtype=value.dtype, device=value.device).index_add(0, scatter, message)
