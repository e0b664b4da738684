"""Fine-tuning: init from a parent, freezing, LoRA (merged at export), new elements, replay.

References are independent of the code under test: the parent model's own predictions
(step 0 of a child must reproduce them), the parent's weights (frozen parts must keep
them), the unmerged adapted model (the merged export must equal it), a least-squares fit
done here with numpy (new elements' reference energies).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

from janus_potential import JanusInputError, build_graph
from janus_potential.ase import JanusCalculator
from janus_potential.export import export_model
from janus_potential.io import load_model
from janus_potential.lora import add_lora, merge_lora, merge_lora_state
from janus_potential.testing import random_structure
from janus_potential.training.config import TrainConfig
from janus_potential.training.data import atom_budget_batches, with_replay
from janus_potential.training.finetune import file_sha256, new_element_references
from janus_potential.training.pack import Composition
from janus_potential.training.trainer import Trainer

from .model_suite import make_model


def labelled(elements, n, seed, reference):
    frames = []
    for k in range(n):
        atoms = random_structure(elements, 6 + k % 4, seed=seed + k)
        atoms.calc = reference
        energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces, stress=stress)
        frames.append(atoms)
    return frames


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    reference = JanusCalculator(make_model(seed=7))
    write(root / "old.xyz", labelled(["Li", "Mg", "O"], 10, 0, reference))
    write(root / "new.xyz", labelled(["Li", "O", "Al"], 8, 50, reference))
    parent = make_model(seed=3)
    with torch.no_grad():
        parent.supported.zero_()
        parent.supported[[3, 8, 12]] = True  # Li, O, Mg
    parent.save_checkpoint(root / "parent.ckpt")
    return root


def config(root, output, *overrides):
    base = [f"data.train=[{root / 'new.xyz'}]", f"data.cache_dir={root / 'cache'}", "data.validation_fraction=0",
            "data.max_atoms_per_batch=20", "data.num_workers=0", f"model.init_from={root / 'parent.ckpt'}",
            "optim.max_steps=2", "optim.warmup_steps=0", "optim.lr=0.01", "run.dtype=float64", "run.progress=false",
            f"run.output={output}", "run.log_every=1"]
    return TrainConfig.load(None, base + list(overrides))


def predictions(model, frames):
    graphs = [build_graph(atoms, model.cutoff, dtype=torch.float64) for atoms in frames]
    return [model.compute(graph) for graph in graphs]


def test_init_from_reproduces_the_parent_at_step_0_and_records_it(data, tmp_path):
    from ase.io import read

    trainer = Trainer(config(data, tmp_path / "run"))
    parent = load_model(data / "parent.ckpt")
    frames = read(data / "new.xyz", ":")
    assert trainer.model.supported[13] and not parent.supported[13]  # Al added
    keep = [atoms for atoms in frames if 13 not in atoms.numbers]
    for mine, theirs in zip(predictions(trainer.model, keep), predictions(parent, keep)):
        for key in ("energy", "forces", "stress"):
            torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=1e-12)
    assert trainer.provenance()["parent"]["sha256"] == file_sha256(data / "parent.ckpt")
    # the EMA starts at the parent too: validation-time weights are the parent's
    assert all(torch.equal(trainer.ema.shadow[name], value) for name, value in parent.state_dict().items()
               if name not in ("reference_energies", "supported"))


def test_new_element_reference_energies_follow_a_least_squares_fit():
    reference = torch.zeros(101, dtype=torch.float64)
    reference[[3, 8]] = torch.tensor([-2.0, -5.0], dtype=torch.float64)
    supported = torch.zeros(101, dtype=torch.bool)
    supported[[3, 8]] = True
    counts = [{3: 2, 8: 1}, {3: 1, 8: 1, 13: 2}, {13: 3, 8: 2}, {13: 1, 3: 3}]
    offset = np.cumsum([0] + [len(c) for c in counts])
    composition = Composition(offset, np.array([z for c in counts for z in sorted(c)]),
                              np.array([c[z] for c in counts for z in sorted(c)], dtype=np.int64))
    al = -3.25
    energy = np.array([sum(n * (al if z == 13 else float(reference[z])) for z, n in c.items()) for c in counts])
    updated, new = new_element_references(reference, supported, composition, energy, 100)
    assert new == [13] and abs(float(updated[13]) - al) < 1e-10
    assert torch.equal(updated[[3, 8]], reference[[3, 8]])
    with pytest.raises(JanusInputError, match="beyond the parent model's embedding"):
        new_element_references(reference, supported, composition, energy, 10)


def test_freeze_keeps_the_frozen_parameters(data, tmp_path):
    trainer = Trainer(config(data, tmp_path / "run", "model.freeze=[embedding, 'layers.0.*']"))
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.fit()
    changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])}
    assert not any(name.startswith(("embedding", "layers.0.")) for name in changed)
    assert any(name.startswith("layers.1.") for name in changed) and any(name.startswith("readout") for name in changed)
    with pytest.raises(JanusInputError, match="matches no parameter"):
        Trainer(config(data, tmp_path / "bad", "model.freeze=[layer.0]"))


def test_lora_merge_equals_the_adapted_model():
    model = make_model()
    add_lora(model, rank=2, alpha=4.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.normal_(std=0.05)
    atoms = random_structure(["Li", "Mg", "O"], 9, seed=1)
    adapted = predictions(model, [atoms])[0]
    plain = make_model()
    plain.load_state_dict(merge_lora_state(model.state_dict()))
    merged = predictions(plain, [atoms])[0]
    in_place = predictions(merge_lora(model), [atoms])[0]
    for key in ("energy", "forces", "stress"):
        torch.testing.assert_close(merged[key], adapted[key], rtol=0, atol=1e-10)
        torch.testing.assert_close(in_place[key], adapted[key], rtol=0, atol=1e-10)


def test_lora_training_keeps_the_base_weights_and_exports_merged(data, tmp_path):
    trainer = Trainer(config(data, tmp_path / "run", "model.lora_rank=2"))
    base = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if not p.requires_grad}
    trainer.fit()
    for name, p in trainer.model.named_parameters():
        if name in base:
            assert torch.equal(p, base[name]), name
    assert any(name.endswith(".B") and p.abs().max() > 0 for name, p in trainer.model.named_parameters())
    exported = tmp_path / "model.pt"
    merged = load_model(tmp_path / "run" / "checkpoint.pt")  # EMA weights, adapters merged
    assert not any("parametrizations" in name for name in merged.state_dict())
    export_model(merged, exported, dtype="float64")
    atoms = random_structure(["Li", "O", "Al"], 8, seed=5)
    graph = build_graph(atoms, merged.cutoff, dtype=torch.float64)
    with trainer._ema_weights():
        expected = trainer.model.compute(graph)
    got = merged.compute(graph)
    for key in ("energy", "forces"):
        torch.testing.assert_close(got[key], expected[key].detach(), rtol=0, atol=1e-10)
    calculator_atoms = atoms.copy()
    calculator_atoms.calc = JanusCalculator(str(exported))
    assert abs(calculator_atoms.get_potential_energy() - float(expected["energy"][0].detach())) < 1e-10


def test_replay_mixes_a_fraction_of_every_batch_and_logs_both_sources(data, tmp_path):
    sizes = np.array([5, 7, 6, 9, 8, 6])
    replay_sizes = np.array([4, 6, 5])
    batches = with_replay(atom_budget_batches(sizes, 14, 0, 0), len(sizes), replay_sizes, 6, 0, 0)
    assert len(batches) == len(atom_budget_batches(sizes, 14, 0, 0))
    for batch in batches:
        replayed = [k - len(sizes) for k in batch if k >= len(sizes)]
        assert replayed and (len(replayed) == 1 or replay_sizes[replayed].sum() <= 6)
    trainer = Trainer(config(data, tmp_path / "run", f"data.replay=[{data / 'old.xyz'}]", "data.replay_fraction=0.3"))
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train_total" in r]
    assert steps and all(r["train_forces_mae_replay"] > 0 and r["train_forces_mae_new"] > 0 for r in steps)
    assert trainer.provenance()["replay"] == [str(data / "old.xyz")]


def test_output_heads_fit_their_own_references_and_export_one_head(tmp_path):
    """Two datasets of the same structures whose energies differ by per-element shifts (two
    DFT settings): each head's reference energies are fitted from its own frames (they
    differ by exactly the shifts), and `export --head` writes the plain model of that head."""
    import subprocess
    import sys

    from ase.io import read

    reference = JanusCalculator(make_model(seed=7))
    frames = labelled(["Li", "Mg", "O"], 10, 0, reference)
    shift = {3: 0.5, 12: -1.25, 8: 2.0}
    write(tmp_path / "pbe.xyz", frames)
    shifted = []
    for atoms in frames:
        copy = atoms.copy()
        results = dict(atoms.calc.results)
        results["energy"] = results["energy"] + sum(shift[z] for z in atoms.numbers)
        copy.calc = SinglePointCalculator(copy, **results)
        shifted.append(copy)
    write(tmp_path / "scan.xyz", shifted)
    run = tmp_path / "run"
    trainer = Trainer(TrainConfig.load(None, [
        f"data.train=[{tmp_path / 'pbe.xyz'}@pbe, {tmp_path / 'scan.xyz'}@scan]", f"data.cache_dir={tmp_path / 'cache'}",
        "data.validation_fraction=0", "data.max_atoms_per_batch=30", "data.num_workers=0", "model.preset=tiny",
        "optim.max_steps=2", "optim.warmup_steps=0", "run.dtype=float64", "run.progress=false", f"run.output={run}"]))
    model = trainer.model
    assert list(model.config.output_heads) == ["pbe", "scan"]
    difference = model.head_reference_energies[0] - model.reference_energies
    for z, value in shift.items():
        assert abs(float(difference[z]) - value) < 1e-8
    trainer.fit()
    model = load_model(run / "checkpoint.pt")
    atoms = read(tmp_path / "scan.xyz", "3")
    graph = build_graph(atoms, model.cutoff, dtype=torch.float64)
    both = {name: model.compute(graph, head=torch.tensor([k])) for k, name in enumerate(["pbe", "scan"])}
    assert abs(float((both["scan"]["energy"][0] - both["pbe"]["energy"][0]).detach())) > 1e-3  # the heads differ
    for name in ("pbe", "scan"):
        exported = tmp_path / f"{name}.pt"
        subprocess.run([sys.executable, "-m", "janus_potential.training", "export", str(run / "checkpoint.pt"),
                        "-o", str(exported), "--dtype", "float64", "--head", name], check=True, capture_output=True)
        atoms.calc = JanusCalculator(str(exported))
        assert abs(atoms.get_potential_energy() - float(both[name]["energy"][0].detach())) < 1e-9
        np.testing.assert_allclose(atoms.get_forces(), both[name]["forces"].detach().numpy(), atol=1e-10)
    with pytest.raises(JanusInputError, match="no output head"):
        model.select_head("hse")
    # janus eval --head scores the chosen head: its data fits it better than the other head
    errors = {}
    for name in ("pbe", "scan"):
        done = subprocess.run([sys.executable, "-m", "janus_potential.training", "eval", str(run / "checkpoint.pt"),
                               str(tmp_path / "scan.xyz"), "--json", "--head", name], check=True, capture_output=True,
                              text=True)
        errors[name] = json.loads(done.stdout)["all"]["energy_per_atom"]["mae"]
    assert errors["scan"] < errors["pbe"]
