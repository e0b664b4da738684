"""The one `device` option of every front end: "auto" (CUDA when visible, else the CPU),
"cpu", "cuda" or "cuda:N".

Graphs are built on the CPU (vesin) and moved to the device once per evaluation; the model
lives on the device; results come back to the CPU for ASE and LAMMPS. With several ranks
each takes the GPU of its node-local rank (`rank_device`); the process group's backend
follows the device (`janus_potential.parallel.mesh`: gloo for the CPU, "cpu:gloo,cuda:nccl"
for CUDA, gloo alone when ranks share a GPU, which NCCL refuses), and halo and expert exchanges of CUDA tensors over a gloo-only group go through
host memory. An unavailable device is a clear error, never a silent fall-back to the CPU.
"""

from __future__ import annotations

import torch

from .errors import JanusInputError


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch device named by `spec` (see the module docstring)."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise JanusInputError(f"device {spec!r} is not one of auto, cpu, cuda, cuda:N") from exc
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise JanusInputError(f"device {spec!r} is not one of auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise JanusInputError(f"device {spec!r}: no CUDA GPU is visible to this process (torch "
                              f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'})")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise JanusInputError(f"device {spec!r}: this process sees {torch.cuda.device_count()} GPU(s)")
    return device


def module_device(module) -> torch.device:
    """The device of a model's first parameter or buffer (nn.Module or TorchScript module;
    the CPU for None or a module without tensors)."""
    if module is None:
        return torch.device("cpu")
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


def rank_device(spec: str | torch.device | None, local_rank: int) -> torch.device:
    """`resolve_device(spec)` for one rank of a job: a CUDA device without an index becomes
    the GPU of the node-local rank (several ranks share a GPU when there are more ranks than
    GPUs)."""
    device = resolve_device(spec)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def on_device(module, device: torch.device):
    """`module` on `device`: itself when it is there already, else a copy moved there (a
    caller's model is never moved behind its back)."""
    if module_device(module) == torch.device(device):
        return module
    import copy

    return copy.deepcopy(module).to(device)


OWN_MALLOC_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Keep freed memory in the process's heap (glibc: no mmap for large blocks, never trim),
    so that an evaluation's large temporaries reuse pages instead of faulting in fresh zeroed
    pages from the kernel at every step. Measured on this project's machine (10,976 atoms,
    `small`, one thread): half of each MD step was system time, and the step ran 1.6x (ASE)
    to 1.8x (LAMMPS) faster with it (docs/benchmarks.md). The CPU allocator of torch caches
    nothing, and glibc maps blocks above 32 MB with mmap however its threshold is set.

    Process-wide, so done once by the front ends that run big structures (`JanusCalculator`,
    the LAMMPS plugin's `keep_freed_memory` in C++, the same rule); the price is that the
    process keeps its peak memory until it exits. Skipped when `JANUS_MALLOC=system` or when
    the user set glibc's own variables (`MALLOC_MMAP_MAX_`, `MALLOC_MMAP_THRESHOLD_`,
    `MALLOC_TRIM_THRESHOLD_`), and off glibc. Returns whether it changed the settings."""
    import ctypes
    import os
    import platform

    if os.environ.get("JANUS_MALLOC") == "system" or any(v in os.environ for v in OWN_MALLOC_VARIABLES):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>; a trim threshold of -1 is SIZE_MAX: never trim
    return libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, -1) == 1
