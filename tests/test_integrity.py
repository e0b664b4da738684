"""Content hashes and safe loading: a flipped byte or a foreign pickle is an error naming the file.

Each file kind (exported model, model checkpoint, training checkpoint) is damaged inside a
weight tensor with `flip_tensor_bytes`: the zip archive stays valid, so only the content
hash can tell. Reading never runs code from a file (`weights_only=True`).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from ase.io import write

from janus_potential import JanusInputError, JanusPotential
from janus_potential.ase import JanusCalculator
from janus_potential.export import export_model

from .conftest import flip_tensor_bytes, make_model
from .test_training import labelled_structures


def janus(*args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    return subprocess.run([sys.executable, "-m", "janus_potential.training", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True)


def test_flipped_bytes_in_an_exported_model_are_refused(tiny_model, tmp_path):
    path = tmp_path / "model.pt"
    export_model(tiny_model, path, dtype="float64")
    JanusCalculator(str(path))  # intact: loads
    entry = flip_tensor_bytes(path)
    assert "/data/" in entry
    with pytest.raises(JanusInputError, match="model.pt' is corrupt"):
        JanusCalculator(str(path))
    data = tmp_path / "data.xyz"
    write(data, labelled_structures(2))
    result = janus("eval", path, data)
    assert result.returncode == 2 and "is corrupt" in result.stderr and "Traceback" not in result.stderr


def test_flipped_bytes_in_a_model_checkpoint_are_refused(tiny_model, tmp_path):
    path = tmp_path / "model.ckpt"
    tiny_model.save_checkpoint(path)
    assert torch.equal(JanusPotential.load(path).embedding.weight, tiny_model.embedding.weight)
    flip_tensor_bytes(path)
    with pytest.raises(JanusInputError, match="model.ckpt' is corrupt"):
        JanusPotential.load(path)
    result = janus("export", path, "-o", tmp_path / "out.pt")
    assert result.returncode == 2 and "is corrupt" in result.stderr and not (tmp_path / "out.pt").exists()


def write_config(tmp_path) -> str:
    data = tmp_path / "data.xyz"
    write(data, labelled_structures(6, seed=1))
    config = tmp_path / "config.yaml"
    config.write_text(
        f"data:\n  train: [{data}]\n  cache_dir: {tmp_path / 'cache'}\n  max_atoms_per_batch: 24\n"
        "model:\n  preset: tiny\n"
        f"optim:\n  max_steps: 4\n  warmup_steps: 1\nrun:\n  output: {tmp_path / 'run'}\n  progress: false\n"
        "  checkpoint_every: 2\n"
    )
    return str(config)


def test_damaged_training_checkpoints_do_not_resume(tmp_path):
    config = write_config(tmp_path)
    assert janus("train", config).returncode == 0
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    intact = checkpoint.read_bytes()

    flip_tensor_bytes(checkpoint)
    result = janus("train", config, "--resume")
    assert result.returncode == 2 and f"{str(checkpoint)!r} is corrupt" in result.stderr, result.stderr[-2000:]

    checkpoint.write_bytes(intact[: len(intact) // 2])
    result = janus("train", config, "--resume")
    assert result.returncode == 2 and str(checkpoint) in result.stderr and "truncated" in result.stderr
    assert "Traceback" not in result.stderr


class _RunsCode:
    """A pickle that would create a file when unpickled (what `weights_only=False` allows)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoints_cannot_run_code(tiny_model, tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    payload = {"format": "janus-checkpoint", "version": 1, "config": tiny_model.config.to_dict(),
               "state_dict": tiny_model.state_dict(), "provenance": _RunsCode(str(marker))}
    torch.save(payload, path)
    with pytest.raises(JanusInputError, match="evil.ckpt"):
        JanusPotential.load(path)
    with pytest.raises(JanusInputError, match="evil.ckpt"):
        JanusCalculator(str(path))
    assert not marker.exists()


def test_hash_is_checked_not_just_present(tmp_path):
    """A checkpoint written by this version round-trips; one whose weights were changed after
    hashing (same archive layout) is refused."""
    model = make_model("tiny")
    path = tmp_path / "model.ckpt"
    model.save_checkpoint(path)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["reference_energies"][3] += 1e-9
    torch.save(payload, path)
    with pytest.raises(JanusInputError, match="is corrupt"):
        JanusPotential.load(path)


def test_every_front_end_reads_a_training_checkpoint(tmp_path):
    """The calculator and `janus info` accept a training checkpoint (EMA weights), as their
    documentation says; a truncated exported file is reported as truncated or corrupt."""
    config = write_config(tmp_path)
    assert janus("train", config).returncode == 0
    checkpoint, exported = tmp_path / "run" / "checkpoint.pt", tmp_path / "run" / "model.pt"
    atoms = labelled_structures(1)[0]
    atoms.calc = JanusCalculator(str(checkpoint))
    energy = atoms.get_potential_energy()
    atoms.calc = JanusCalculator(str(exported))
    assert abs(atoms.get_potential_energy() - energy) < 1e-4 * max(1.0, abs(energy))  # float32 export
    info = janus("info", checkpoint)
    assert info.returncode == 0 and '"total_parameters"' in info.stdout and '"elements"' in info.stdout

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(exported.read_bytes()[:5000])
    with pytest.raises(JanusInputError, match="truncated.pt' is not a Janus model file or checkpoint, or it is "
                                              "truncated or corrupt"):
        JanusCalculator(str(truncated))
