"""Packed datasets and streaming input: exact round trip, append, checksums, the cache of
plain files, DataLoader workers, and training from a pack (same parameters, exact resume)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.db import connect
from ase.io import read, write

from janus_potential import JanusInputError, build_graph
from janus_potential.training import pack as pack_module
from janus_potential.training.config import TrainConfig
from janus_potential.training.data import FrameSamples, atom_budget_batches
from janus_potential.training.loader import sample_loader
from janus_potential.training.pack import PackedFrames, frame_labels, open_dataset, pack_files
from janus_potential.training.trainer import Trainer

from .test_training import labelled_structures


def varied_frames() -> list[Atoms]:
    """Labelled frames of every kind: all labels, forces missing, stress missing, energy
    only, a molecule (no cell), a weight and sources."""
    frames = labelled_structures(6, seed=7)
    frames[1].calc = SinglePointCalculator(frames[1], energy=frames[1].get_potential_energy(),
                                           stress=frames[1].get_stress())
    frames[2].calc = SinglePointCalculator(frames[2], energy=frames[2].get_potential_energy(),
                                           forces=frames[2].get_forces())
    frames[3].calc = SinglePointCalculator(frames[3], energy=-3.5)
    frames[4].info["weight"] = 2.5
    molecule = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    molecule.calc = SinglePointCalculator(molecule, energy=-14.2, forces=np.arange(9.0).reshape(3, 3) / 7)
    molecule.info["source"] = "molecules"
    return frames + [molecule]


def assert_same_frame(frame, atoms: Atoms, file: str) -> None:
    labels = frame_labels(atoms, file, 0)
    np.testing.assert_array_equal(frame.species, atoms.numbers)
    np.testing.assert_array_equal(frame.positions, atoms.positions)
    np.testing.assert_array_equal(frame.cell, atoms.cell.array)
    np.testing.assert_array_equal(frame.pbc, atoms.pbc)
    assert (frame.has_energy, frame.has_forces, frame.has_stress) == tuple(k in labels for k in
                                                                           ("energy", "forces", "stress"))
    assert frame.energy == labels["energy"] if frame.has_energy else np.isnan(frame.energy)
    np.testing.assert_array_equal(frame.forces, labels.get("forces", np.full((len(atoms), 3), np.nan)))
    np.testing.assert_array_equal(frame.stress, labels.get("stress", np.full((3, 3), np.nan)))
    assert frame.weight == atoms.info.get("weight", 1.0)
    assert frame.source == atoms.info.get("source", file) and frame.file == file


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "varied.xyz"
    write(path, varied_frames())
    return path


def test_pack_reads_back_the_source_frames_exactly(tmp_path, data_file):
    database = tmp_path / "more.db"
    with connect(database) as db:
        for atoms in labelled_structures(3, seed=20):
            db.write(atoms)
    manifest = pack_files([data_file, database], tmp_path / "pack", shard_atoms=20)  # several shards per file
    frames = PackedFrames([tmp_path / "pack"])
    sources = read(data_file, ":") + read(database, ":")
    assert len(frames) == len(sources) == manifest["frames"] == 10 and len(manifest["shards"]) > 2
    for k, atoms in enumerate(sources):
        assert_same_frame(frames.frame(k), atoms, "varied" if k < 7 else "more")

    forces = np.concatenate([a.calc.results["forces"] for a in sources if "forces" in a.calc.results])
    assert manifest["atoms"] == sum(len(a) for a in sources)
    assert manifest["statistics"]["force_atoms"] == len(forces)
    assert manifest["statistics"]["force_abs_mean"] == pytest.approx(np.abs(forces).mean(), rel=1e-12)
    assert manifest["statistics"]["energy_frames"] == 10 and manifest["statistics"]["stress_frames"] == 7
    assert set(manifest["elements"]) == {"H", "Li", "O", "Mg"} and manifest["elements"]["H"]["frames"] == 1
    assert {entry["name"]: entry["frames"] for entry in manifest["sources"]} == {
        "even": 3, "odd": 3, "molecules": 1, "more": 3}  # a database keeps no info["source"]: its name
    assert [entry["frames"] for entry in manifest["inputs"]] == [7, 3]
    composition = frames.composition()
    for k, atoms in enumerate(sources):
        z, n = np.unique(atoms.numbers, return_counts=True)
        rows = slice(composition.offset[k], composition.offset[k + 1])
        np.testing.assert_array_equal(composition.element[rows], z)
        np.testing.assert_array_equal(composition.count[rows], n)
    np.testing.assert_array_equal(frames.num_atoms(), [len(a) for a in sources])

    # samples: the graph build_graph makes of the source frame, labels in the training dtype
    samples = FrameSamples(frames, np.arange(len(frames)), 4.0, torch.float32)
    for k in (0, 3, 6):
        expected = build_graph(sources[k], 4.0, dtype=torch.float32)
        for name in ("species", "positions", "cell", "pbc", "edge_index", "edge_shift"):
            torch.testing.assert_close(getattr(samples[k].graph, name), getattr(expected, name), rtol=0, atol=0)
    assert not samples[6].has_stress  # a molecule has no stress label to train on


def test_append_adds_shards_and_leaves_the_old_ones_alone(tmp_path, data_file):
    pack = tmp_path / "pack"
    pack_files([data_file], pack)
    first_shard = (pack / "shard-000000.bin").read_bytes()
    extra = tmp_path / "extra.xyz"
    write(extra, labelled_structures(3, seed=30))
    done = subprocess.run([sys.executable, "-m", "janus_potential.training", "pack", str(extra), "-o", str(pack),
                           "--append"], capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    assert "appended to" in done.stdout and "10 frames" in done.stdout and "\r" not in done.stdout
    manifest = json.loads((pack / "manifest.json").read_text())
    assert manifest["frames"] == 10 and [entry["name"] for entry in manifest["inputs"]] == ["varied", "extra"]
    assert (pack / "shard-000000.bin").read_bytes() == first_shard
    frames = PackedFrames([pack])
    for k, atoms in enumerate(read(extra, ":")):
        assert_same_frame(frames.frame(7 + k), atoms, "extra")

    with pytest.raises(JanusInputError, match="is already in the pack"):
        pack_files([extra], pack, append=True)
    with pytest.raises(JanusInputError, match="already exists .pass --append"):
        pack_files([extra], pack)
    with pytest.raises(JanusInputError, match="is not a packed dataset"):
        pack_files([extra], tmp_path, append=True)


def test_a_flipped_byte_is_an_error_naming_the_shard(tmp_path, data_file):
    pack = tmp_path / "pack"
    pack_files([data_file], pack)
    shard = pack / "shard-000000.bin"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    shard.write_bytes(bytes(raw))
    with pytest.raises(JanusInputError, match=f"shard '{shard}' is corrupt"):
        PackedFrames([pack])
    shard.write_bytes(bytes(raw[:-8]))
    with pytest.raises(JanusInputError, match="truncated"):
        PackedFrames([pack])


def test_a_plain_file_is_packed_once_into_the_cache(tmp_path, data_file, monkeypatch):
    cache = tmp_path / "cache"
    first = open_dataset([data_file], cache)
    (packed,) = [p for p in cache.iterdir()]
    assert packed.name.startswith("varied-") and first.directories == [packed]

    def no_packing(*args, **kwargs):
        raise AssertionError("packed again")

    monkeypatch.setattr(pack_module, "pack_files", no_packing)
    again = open_dataset([data_file], cache)
    assert again.directories == [packed] and len(again) == 7
    monkeypatch.undo()
    write(data_file, varied_frames()[:3])  # new content: a new pack
    assert len(open_dataset([data_file], cache)) == 3 and len(list(cache.iterdir())) == 2
    without_cache = open_dataset([data_file], "")
    assert len(without_cache) == 3 and not str(without_cache.directories[0]).startswith(str(cache))


def old_atom_budget_batches(sizes, max_atoms, seed, epoch):
    """The batching of the in-memory trainer this one replaces (a greedy fill, kept here as the
    reference the compact version must reproduce)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(sizes))
    batches, current, atoms = [], [], 0
    for k in order:
        if current and atoms + sizes[k] > max_atoms:
            batches.append(current)
            current, atoms = [], 0
        current.append(int(k))
        atoms += sizes[k]
    return batches + [current] if current else batches


def test_batches_are_those_of_the_in_memory_trainer():
    sizes = np.random.default_rng(3).integers(1, 90, size=2000)
    for max_atoms, epoch in ((64, 0), (256, 5), (50, 1)):
        batches = atom_budget_batches(sizes, max_atoms, seed=11, epoch=epoch)
        assert list(batches) == old_atom_budget_batches(sizes, max_atoms, 11, epoch)
        assert batches[-1] == list(batches)[-1] and batches[2:7:2] == list(batches)[2:7:2]


def test_workers_deliver_the_batches_of_the_main_process(tmp_path, data_file):
    frames = open_dataset([data_file], tmp_path / "cache")
    samples = FrameSamples(frames, np.array([6, 0, 5, 1, 4, 2, 3]), 5.0, torch.float64)
    batches = list(atom_budget_batches(samples.sizes, 20, seed=2, epoch=1))
    delivered = {workers: list(sample_loader(samples, batches, workers, 2)) for workers in (0, 2)}
    assert [len(b) for b in delivered[2]] == [len(b) for b in batches]
    for in_process, from_workers in zip(delivered[0], delivered[2]):
        for a, b in zip(in_process, from_workers):
            for name in ("species", "positions", "cell", "edge_index", "edge_shift"):
                assert torch.equal(getattr(a.graph, name), getattr(b.graph, name))
            assert torch.equal(a.forces.nan_to_num(7.0), b.forces.nan_to_num(7.0))
            assert (a.energy, a.has_stress, a.weight, a.source) == (b.energy, b.has_stress, b.weight, b.source)


def training_config(tmp_path, data, output: str, **overrides) -> TrainConfig:
    values = {
        "data": {"train": [str(data)], "cache_dir": str(tmp_path / "cache"), "max_atoms_per_batch": 24,
                 "validation_fraction": 0.25},
        "model": {"preset": "tiny"},
        "optim": {"max_steps": 8, "warmup_steps": 2},
        "run": {"output": str(tmp_path / output), "dtype": "float64", "threads": 1, "checkpoint_every": 1,
                "progress": False},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        values[section][key] = value
    return TrainConfig.from_dict(values)


@pytest.fixture(scope="module")
def training_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    write(root / "data.xyz", labelled_structures(12, seed=5))
    pack_files([root / "data.xyz"], root / "pack")
    return root


def parameters(trainer: Trainer) -> dict:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def assert_same_parameters(a: dict, b: dict) -> None:
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=1e-14, msg=key)


def test_training_from_a_pack_equals_training_from_the_plain_file(training_data, tmp_path):
    from_file = Trainer(training_config(tmp_path, training_data / "data.xyz", "file"))
    from_file.fit()
    from_pack = Trainer(training_config(tmp_path, training_data / "pack", "pack", data__num_workers=0))
    from_pack.fit()
    assert from_file.step == from_pack.step == 8
    assert_same_parameters(parameters(from_pack), parameters(from_file))

    # the statistics the model starts from equal those of the frames themselves
    frames = read(training_data / "data.xyz", ":")
    train = [frames[k] for k in from_pack.train_samples.indices]
    fresh = Trainer(training_config(tmp_path, training_data / "pack", "fresh"))
    forces = np.concatenate([a.get_forces() for a in train])
    assert float(fresh.model.energy_scale) == pytest.approx(np.abs(forces).mean(), rel=1e-12)
    elements = sorted({int(z) for a in train for z in a.numbers})
    design = np.array([[np.sum(a.numbers == z) / len(a) for z in elements] for a in train])
    target = np.array([a.get_potential_energy() / len(a) for a in train])
    weights = np.ones(len(train))
    for _ in range(20):  # the dense IRLS fit of the in-memory trainer
        solution = np.linalg.lstsq(design * np.sqrt(weights)[:, None], target * np.sqrt(weights), rcond=None)[0]
        residual = np.abs(target - design @ solution)
        weights = np.where(residual < 0.1, 1.0, 0.1 / np.maximum(residual, 1e-12))
    np.testing.assert_allclose(fresh.model.reference_energies[elements].numpy(), solution, rtol=1e-9, atol=1e-12)
    assert fresh.model.supported_elements() == [3, 8, 12]


def test_resume_starts_at_the_exact_batch(training_data, tmp_path, monkeypatch):
    seen: dict[str, list] = {"whole": [], "resumed": []}
    original = Trainer.train_step

    def recording(run: str):
        def train_step(self, samples):
            seen[run].append([round(float(s.graph.positions.sum()), 9) for s, _ in samples])
            return original(self, samples)
        return train_step

    config = dict(optim__max_steps=11)  # 9 training frames in batches of <= 24 atoms: several epochs
    monkeypatch.setattr(Trainer, "train_step", recording("whole"))
    whole = Trainer(training_config(tmp_path, training_data / "pack", "whole", **config))
    whole.fit()
    monkeypatch.setattr(Trainer, "train_step", recording("resumed"))
    first = Trainer(training_config(tmp_path, training_data / "pack", "resumed", **config))
    first.fit(stop_after_steps=6)
    assert 0 < first.batch_in_epoch, "the run must stop inside an epoch"
    resumed = Trainer(training_config(tmp_path, training_data / "pack", "resumed", **config), resume=True)
    assert (resumed.step, resumed.batch_in_epoch) == (6, first.batch_in_epoch)
    resumed.fit()
    assert seen["resumed"] == seen["whole"] and len(seen["whole"]) == 11
    assert_same_parameters(parameters(resumed), parameters(whole))
