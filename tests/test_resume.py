"""A training run killed with SIGKILL and resumed ends with the same parameters."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from ase.io import write

from janus_potential.training.checkpoint import full_state

from .test_training import labelled_structures

pytestmark = pytest.mark.slow


def train_command(config, *extra):
    return [sys.executable, "-m", "janus_potential.training", "train", str(config), *extra]


def final_state(output):
    state = full_state(output / "checkpoint.pt")
    return state["step"], state["model"], state["ema"]


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    data = tmp_path / "data.xyz"
    write(data, labelled_structures(10, seed=3))
    config = tmp_path / "config.yaml"
    config.write_text(
        "data:\n"
        f"  train: [{data}]\n"
        f"  cache_dir: {tmp_path / 'cache'}\n"
        "  max_atoms_per_batch: 24\n"
        "  validation_fraction: 0.2\n"
        "model:\n  preset: tiny\n"
        "optim:\n  max_steps: 30\n  warmup_steps: 5\n"
        "run:\n  dtype: float64\n  threads: 1\n  checkpoint_every: 3\n  log_every: 1\n  progress: false\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    reference = tmp_path / "reference"
    subprocess.run(train_command(config, "--set", f"run.output={reference}"), check=True, env=env,
                   capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen(train_command(config, "--set", f"run.output={killed}"), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # generous: on a loaded machine start-up alone (imports, packing) can take minutes
    deadline = time.time() + 600
    checkpoint = killed / "checkpoint.pt"
    while not (checkpoint.exists() and torch.load(checkpoint, weights_only=True)["step"] >= 9):
        assert time.time() < deadline and process.poll() is None, "the run did not reach its step-9 checkpoint"
        time.sleep(0.01)
    time.sleep(0.013)  # land somewhere inside a later step
    process.send_signal(signal.SIGKILL)
    process.wait()
    step_at_kill = torch.load(checkpoint, weights_only=True)["step"]
    assert 9 <= step_at_kill < 30, "the run must be killed before it finished"

    subprocess.run(train_command(config, "--set", f"run.output={killed}", "--resume"), check=True, env=env,
                   capture_output=True)
    step_a, model_a, ema_a = final_state(reference)
    step_b, model_b, ema_b = final_state(killed)
    assert step_a == step_b == 30
    for key in model_a:
        torch.testing.assert_close(model_b[key], model_a[key], rtol=1e-12, atol=1e-14, msg=key)
        torch.testing.assert_close(ema_b[key], ema_a[key], rtol=1e-12, atol=1e-14, msg=key)
    steps_logged = [line for line in (killed / "metrics.jsonl").read_text().splitlines() if '"train_total"' in line]
    assert len(steps_logged) == 30  # no step lost, none logged twice
