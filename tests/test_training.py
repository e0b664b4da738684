"""Training: second-order loss gradients, data handling, reference energies, eval, config."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

from janus_potential import JanusInputError, build_graph
from janus_potential.ase import JanusCalculator
from janus_potential.testing import random_structure
from janus_potential.training.config import LossConfig, TrainConfig
from janus_potential.training.data import FrameSamples, Sample, atom_budget_batches, collate
from janus_potential.training.loss import loss_terms, predict
from janus_potential.training.pack import Composition, PackedFrames, pack_files
from janus_potential.training.statistics import fit_reference_energies

from .conftest import make_model


def labelled_structures(n: int = 4, seed: int = 0, **label_noise):
    """Random structures labelled with a different (reference) model, so errors are nonzero."""
    reference = JanusCalculator(make_model(seed=seed + 100))
    frames = []
    for k in range(n):
        atoms = random_structure(["Li", "Mg", "O"], 6 + k, seed=seed + k)
        atoms.calc = reference
        energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces, stress=stress)
        atoms.info["source"] = "odd" if k % 2 else "even"
        frames.append(atoms)
    return frames


def samples_of(frames, model, dtype=torch.float64):
    path_free = []
    for atoms in frames:
        results = atoms.calc.results
        n = len(atoms)
        stress = results.get("stress")
        if stress is not None:
            xx, yy, zz, yz, xz, xy = stress
            stress = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
        path_free.append(Sample(
            graph=build_graph(atoms, model.cutoff, dtype=dtype),
            energy=results.get("energy", float("nan")),
            forces=torch.as_tensor(results.get("forces", np.full((n, 3), np.nan)), dtype=dtype),
            stress=torch.as_tensor(stress if stress is not None else np.full((3, 3), np.nan), dtype=dtype),
            has_energy="energy" in results, has_forces="forces" in results, has_stress="stress" in results,
            weight=float(atoms.info.get("weight", 1.0)), source=atoms.info.get("source", "x"), file="memory",
        ))
    return path_free


def test_loss_gradient_matches_finite_differences_second_order():
    model = make_model()
    batch = collate(samples_of(labelled_structures(3), model))
    config = LossConfig(kind="mse", energy_weight=1.0, forces_weight=10.0, stress_weight=1.0)

    def loss() -> torch.Tensor:
        return loss_terms(predict(model, batch, create_graph=True), batch, config)["total"]

    model.zero_grad()
    loss().backward()
    checked = 0
    for name, parameter in model.named_parameters():
        if parameter.grad is None or not any(k in name for k in ("edge_filter", "value", "w_in", "three_body_basis")):
            continue
        flat = parameter.data.view(-1)
        for index in torch.argsort(parameter.grad.view(-1).abs(), descending=True)[:2].tolist():
            original = flat[index].item()
            h = 1e-6
            flat[index] = original + h
            plus = loss().item()
            flat[index] = original - h
            minus = loss().item()
            flat[index] = original
            numeric = (plus - minus) / (2 * h)
            analytic = parameter.grad.view(-1)[index].item()
            assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9), name
            checked += 1
    assert checked >= 8


def test_force_loss_gradient_needs_create_graph():
    model = make_model()
    batch = collate(samples_of(labelled_structures(2), model))
    config = LossConfig(kind="mse", energy_weight=0.0, forces_weight=1.0, stress_weight=0.0)
    terms = loss_terms(predict(model, batch, create_graph=True), batch, config)
    grads = torch.autograd.grad(terms["total"], [model.layers[0].edge_filter.weight])
    assert grads[0].abs().max() > 0
    detached = loss_terms(predict(model, batch, create_graph=False), batch, config)
    assert not detached["forces"].requires_grad  # without create_graph no parameter gradient


def test_missing_labels_are_masked():
    model = make_model()
    frames = labelled_structures(3)
    complete = samples_of(frames, model)
    partial = samples_of(frames, model)
    partial[1].has_forces = False
    partial[1].forces = torch.full_like(partial[1].forces, float("nan"))
    partial[2].has_energy = False
    partial[2].energy = float("nan")
    config = LossConfig(kind="mse")
    prediction = predict(model, collate(partial), create_graph=False)
    terms = loss_terms(prediction, collate(partial), config)
    assert all(torch.isfinite(v) for v in terms.values())
    ref_forces = loss_terms(predict(model, collate([complete[0], complete[2]]), False),
                            collate([complete[0], complete[2]]), config)["forces"]
    ref_energy = loss_terms(predict(model, collate(complete[:2]), False), collate(complete[:2]), config)["energy"]
    torch.testing.assert_close(terms["forces"], ref_forces)
    torch.testing.assert_close(terms["energy"], ref_energy)


def test_reference_energies_recover_a_composition_model():
    model = make_model()
    true = {3: -1.9, 12: -1.5, 8: -4.9}
    samples = samples_of(labelled_structures(5), model)
    counts = [np.unique(sample.graph.species.numpy(), return_counts=True) for sample in samples]
    composition = Composition(np.cumsum([0] + [len(z) for z, _ in counts]), np.concatenate([z for z, _ in counts]),
                              np.concatenate([n for _, n in counts]))
    energy = np.array([sum(true[int(z)] for z in sample.graph.species) for sample in samples])
    reference = fit_reference_energies(composition, energy)
    for z, value in true.items():
        assert reference[z].item() == pytest.approx(value, abs=1e-9)


def _huber(x: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(x)
    return np.where(a <= delta, 0.5 * x * x, delta * (a - 0.5 * delta))


def test_loss_options_match_their_definitions():
    """Per-frame force normalisation, per-structure energy and per-quantity Huber deltas,
    against the formulas written out here with numpy."""
    model = make_model()
    frames = labelled_structures(3)
    frames[1].calc.results["forces"] = frames[1].calc.results["forces"] * 40.0  # a "hot" frame
    samples = samples_of(frames, model)
    batch = collate(samples)
    prediction = {k: v.detach() for k, v in predict(model, batch, create_graph=False).items()}
    config = LossConfig(kind="huber", huber_delta=0.3, energy_huber_delta=0.05, forces_huber_delta=0.02,
                        energy_per="structure", forces_normalization="frame", forces_scale_floor=0.07)
    terms = loss_terms(prediction, batch, config)

    energy_error = prediction["energy"].numpy() - np.array([s.energy for s in samples])
    assert float(terms["energy"]) == pytest.approx(_huber(energy_error, 0.05).mean(), rel=1e-12)
    per_atom = []
    for g, sample in enumerate(samples):
        labels = sample.forces.numpy()
        factor = 0.07 / (np.sqrt(np.mean(labels**2)) + 0.07)
        error = (prediction["forces"].numpy()[batch.graph.batch.numpy() == g] - labels) * factor
        per_atom.append(_huber(error, 0.02).mean(axis=1))
    assert float(terms["forces"]) == pytest.approx(np.concatenate(per_atom).mean(), rel=1e-12)
    # the hot frame's errors are scaled down by ~floor / RMS, the others barely
    assert np.sqrt(np.mean(samples[1].forces.numpy() ** 2)) > 30 * np.sqrt(np.mean(samples[0].forces.numpy() ** 2))


def test_file_balance_gives_every_file_the_same_weight(tmp_path):
    model = make_model()
    write(tmp_path / "a.xyz", labelled_structures(2, seed=1), format="extxyz")
    write(tmp_path / "b.xyz", labelled_structures(5, seed=2), format="extxyz")
    paths = [tmp_path / "a.xyz", tmp_path / "b.xyz"]
    for name in ("a", "b"):
        pack_files([tmp_path / f"{name}.xyz"], tmp_path / f"{name}.pack")
    frames = PackedFrames([tmp_path / "a.pack", tmp_path / "b.pack"])
    samples = FrameSamples(frames, np.arange(len(frames)), model.cutoff, torch.float64)
    for by in ("frames", "atoms"):
        samples.balance_files(by)
        totals = {}
        for k in range(len(samples)):
            sample = samples[k]
            amount = sample.num_atoms if by == "atoms" else 1
            totals[sample.file] = totals.get(sample.file, 0.0) + sample.weight * amount
        assert len(totals) == len(paths)
        first, second = totals.values()
        assert first == pytest.approx(second, rel=1e-12)
        assert sum(totals.values()) == pytest.approx(sum(samples.sizes) if by == "atoms" else len(samples), rel=1e-12)


def test_atom_budget_batches_cover_every_structure_once():
    sizes = [5, 50, 3, 120, 7, 7, 200, 1, 60]
    batches = atom_budget_batches(sizes, 128, seed=1, epoch=3)
    assert sorted(k for b in batches for k in b) == list(range(len(sizes)))
    for b in batches:
        assert len(b) == 1 or sum(sizes[k] for k in b) <= 128
    assert batches == atom_budget_batches(sizes, 128, seed=1, epoch=3)
    assert batches != atom_budget_batches(sizes, 128, seed=1, epoch=4)


def test_data_errors(tmp_path):
    frames = labelled_structures(2)
    unlabelled = tmp_path / "unlabelled.xyz"
    write(unlabelled, [a.copy() for a in frames])
    with pytest.raises(JanusInputError, match="no frame has an energy"):
        pack_files([unlabelled], tmp_path / "a")
    bad = frames[0].copy()
    bad.calc = SinglePointCalculator(bad, energy=float("nan"), forces=frames[0].get_forces())
    nonfinite = tmp_path / "nonfinite.xyz"
    write(nonfinite, [frames[1], bad])
    with pytest.raises(JanusInputError, match="nonfinite.xyz: frame 1 has non-finite energy"):
        pack_files([nonfinite], tmp_path / "b")
    with pytest.raises(JanusInputError, match="does not exist"):
        pack_files([tmp_path / "missing.xyz"], tmp_path / "c")
    strange = frames[0].copy()
    strange.numbers[0] = 0
    strange.calc = SinglePointCalculator(strange, energy=1.0)
    unknown = tmp_path / "unknown.xyz"
    write(unknown, [strange])
    with pytest.raises(JanusInputError, match="unknown element"):
        pack_files([unknown], tmp_path / "d")
    overlapping = frames[0].copy()
    overlapping.positions[1] = overlapping.positions[0] + 0.05
    overlapping.calc = SinglePointCalculator(overlapping, energy=1.0)
    close = tmp_path / "close.xyz"
    write(close, [overlapping])
    with pytest.raises(JanusInputError, match="close.xyz: frame 0: overlapping atoms: atoms 0 and 1"):
        pack_files([close], tmp_path / "e")
    assert not any((tmp_path / name).exists() for name in "abcde")  # a failed pack leaves nothing


def test_frames_missing_labels_are_read(tmp_path):
    frames = labelled_structures(2)
    only_energy = frames[1].copy()
    only_energy.calc = SinglePointCalculator(only_energy, energy=frames[1].get_potential_energy())
    path = tmp_path / "mixed.xyz"
    write(path, [frames[0], only_energy])
    pack_files([path], tmp_path / "pack")
    samples = FrameSamples(PackedFrames([tmp_path / "pack"]), np.arange(2), 4.0, torch.float64)
    assert samples[0].has_forces and samples[0].has_stress
    assert samples[1].has_energy and not samples[1].has_forces and not samples[1].has_stress
    assert torch.isnan(samples[1].forces).all() and torch.isnan(samples[1].stress).all()


def test_eval_reports_known_errors(tmp_path):
    model = make_model()
    checkpoint = tmp_path / "model.ckpt"
    model.save_checkpoint(checkpoint)
    frames = labelled_structures(4)
    shift = 0.25  # eV/atom added to every label: the energy MAE must be exactly this
    calculator = JanusCalculator(model)
    for atoms in frames:
        atoms.calc = calculator
        e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        atoms.calc = SinglePointCalculator(atoms, energy=e + shift * len(atoms), forces=f + 0.1, stress=s)
    data = tmp_path / "data.xyz"
    write(data, frames)
    result = subprocess.run([sys.executable, "-m", "janus_potential.training", "eval", str(checkpoint), str(data), "--json"],
                            check=True, capture_output=True, text=True)
    summary = json.loads(result.stdout)
    assert summary["all"]["energy_per_atom"]["mae"] == pytest.approx(shift, abs=1e-9)
    assert summary["all"]["forces"]["mae"] == pytest.approx(0.1, abs=1e-9)
    assert summary["all"]["stress_gpa"]["mae"] == pytest.approx(0.0, abs=1e-8)
    assert set(summary) == {"all", "even", "odd"}
    assert summary["odd"]["energy_per_atom"]["count"] == 2
    labels = np.concatenate([atoms.calc.results["forces"] for atoms in frames])
    assert summary["all"]["forces_zero"]["mae"] == pytest.approx(np.abs(labels).mean(), abs=1e-8)  # file precision
    table = subprocess.run([sys.executable, "-m", "janus_potential.training", "eval", str(checkpoint), str(data)],
                           check=True, capture_output=True, text=True).stdout
    assert "F=0 MAE" in table.splitlines()[0]


def test_eval_refuses_elements_the_model_does_not_cover(tmp_path):
    """The element rule of ASE and LAMMPS holds in `janus eval` too; --skip-unsupported counts."""
    model = make_model()
    with torch.no_grad():
        model.supported.zero_()
        model.supported[[3, 8]] = True  # Li and O, not Mg
    checkpoint = tmp_path / "model.ckpt"
    model.save_checkpoint(checkpoint)
    frames = labelled_structures(4)  # Li, Mg, O
    frames.append(frames[0][[a.symbol != "Mg" for a in frames[0]]])
    frames[-1].calc = SinglePointCalculator(frames[-1], energy=-1.0)
    data = tmp_path / "data.xyz"
    write(data, frames)
    command = [sys.executable, "-m", "janus_potential.training", "eval", str(checkpoint), str(data)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2 and "4 of 5 structures contain element(s) the model does not cover: Mg" in result.stderr
    assert "covers Li, O" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run(command + ["--skip-unsupported", "--json"], check=True, capture_output=True, text=True)
    summary = json.loads(result.stdout)
    assert summary["all"]["skipped_frames"] == 4 and summary["all"]["frames"] == 1


def test_config_overrides_and_unknown_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.01\nmodel:\n  preset: tiny\n")
    config = TrainConfig.load(path, ["optim.lr=1e-3", "model.overrides.features=32", "data.train=[a.xyz, b.xyz]"])
    assert config.optim.lr == 1e-3 and config.model.preset == "tiny"
    assert config.model.overrides == {"features": 32} and config.data.train == ["a.xyz", "b.xyz"]
    assert config.loss.kind == "huber"  # default kept
    with pytest.raises(ValueError, match="unknown config key optim.lrr"):
        TrainConfig.load(None, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="section.key=value"):
        TrainConfig.load(None, ["lr=1"])


def test_run_device_is_checked(tmp_path):
    """run.device: an unknown device or a missing GPU is a clear error before training."""
    from janus_potential.training.trainer import Trainer

    write(tmp_path / "data.xyz", labelled_structures(3))
    base = [f"data.train=[{tmp_path / 'data.xyz'}]", f"data.cache_dir={tmp_path / 'cache'}", "model.preset=tiny",
            "run.progress=false", f"run.output={tmp_path / 'run'}", "data.validation_fraction=0"]
    with pytest.raises(JanusInputError, match="not one of auto, cpu, cuda"):
        Trainer(TrainConfig.load(None, base + ["run.device=tpu"]))
    if not torch.cuda.is_available():
        with pytest.raises(JanusInputError, match="no CUDA GPU is visible"):
            Trainer(TrainConfig.load(None, base + ["run.device=cuda"]))
    assert Trainer(TrainConfig.load(None, base + ["run.device=cpu"])).device == torch.device("cpu")


def tiny_float64_run(tmp_path, output, *sets):
    """A `tiny` float64 run on tmp_path/train.xyz, no validation, no checkpoints, plus `sets`."""
    return TrainConfig.load(None, [
        f"data.train=[{tmp_path / 'train.xyz'}]", f"data.cache_dir={tmp_path / 'cache'}", "data.validation_fraction=0",
        "data.max_atoms_per_batch=16", "data.num_workers=0", "model.preset=tiny", "optim.warmup_steps=0",
        "run.dtype=float64", "run.progress=false", f"run.output={output}", "run.checkpoint_every=1000", *sets])


def test_training_log_counts_routing_changes(tmp_path):
    """`routing_changes` in metrics.jsonl is the number of (layer, element) pairs whose
    expert changed since the last record, recomputed here from the router and embedding
    before and after every step; with the router's steps at the model's learning rate
    (router_scale 1) top-1 routing changes more often than with them 1,000x smaller (what
    changes then comes from the element embedding, which the loss moves)."""
    from janus_potential.training.trainer import Trainer

    write(tmp_path / "train.xyz", labelled_structures(6))
    species = torch.tensor([3, 8, 12])  # Li, O, Mg

    def table(model):
        with torch.no_grad():
            return torch.stack([layer.moe.router(model.embedding(species)).argmax(dim=-1) for layer in model.layers])

    changes = {}
    for scale in (1.0, 0.001):
        output = tmp_path / f"scale{scale}"
        config = tiny_float64_run(tmp_path, output, f"model.overrides={{num_experts: 4, router_scale: {scale}}}",
                                  "optim.max_steps=8", "optim.lr=0.05", "run.log_every=1")
        trainer = Trainer(config)
        tables = [table(trainer.model)]
        for _ in range(8):
            trainer.fit(stop_after_steps=1)
            tables.append(table(trainer.model))
        records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        logged = {r["step"]: r for r in records if "train_total" in r}
        assert "routing_changes" not in logged[1]  # nothing to compare the first record with
        expected = [int((tables[step] != tables[step - 1]).sum()) for step in range(2, 9)]
        assert [logged[step]["routing_changes"] for step in range(2, 9)] == expected
        assert all(logged[step]["routing_pairs"] == 3 * len(trainer.model.layers) for step in range(2, 9))
        changes[scale] = sum(expected)
    assert changes[1.0] > changes[0.001], changes


def test_training_log_records_the_largest_gradient_norm_and_the_clipped_steps_between_records(tmp_path):
    """`train_grad_norm_max` and `train_clipped_steps` of a record logged every 3 steps are the
    largest gradient norm and the count of norms above optim.grad_clip over its 3 steps, as
    the same run logged at every step records them one by one (one process, float64: the two
    runs take the same steps)."""
    from janus_potential.training.trainer import Trainer

    write(tmp_path / "train.xyz", labelled_structures(6))
    clip = 0.015  # between this run's gradient norms (0.01-0.03)
    logs = {}
    for every in (1, 3):
        output = tmp_path / f"every{every}"
        config = tiny_float64_run(tmp_path, output, "optim.max_steps=9", "optim.lr=0.02", f"optim.grad_clip={clip}",
                                  f"run.log_every={every}")
        Trainer(config).fit()
        records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        logs[every] = {r["step"]: r for r in records if "train_total" in r}
    norms = [logs[1][step]["train_grad_norm"] for step in range(1, 10)]
    assert [logs[1][step]["train_grad_norm_max"] for step in range(1, 10)] == norms
    assert [logs[1][step]["train_clipped_steps"] for step in range(1, 10)] == [int(n > clip) for n in norms]
    assert 0 < sum(n > clip for n in norms) < 9, norms  # the threshold splits the steps
    for end in (3, 6, 9):
        window = norms[end - 3:end]
        assert logs[3][end]["train_grad_norm_max"] == pytest.approx(max(window), rel=1e-12)
        assert logs[3][end]["train_clipped_steps"] == sum(n > clip for n in window)


def test_spike_skipping_leaves_weights_moments_and_ema_and_resumes_with_its_window(tmp_path):
    """optim.skip_spikes: a step is skipped exactly where its gradient norm exceeds k times the
    median of the previous `spike_window` norms (recomputed here from the logged norms with
    numpy); a skipped step leaves the weights, AdamW's moments and the EMA as they were and a
    step that is not skipped moves them; a run killed after step 5 and resumed from its
    checkpoint skips the same steps and ends with the same weights as the run that was not."""
    from janus_potential.training.trainer import Trainer

    write(tmp_path / "train.xyz", labelled_structures(6))
    sets = ["optim.max_steps=10", "optim.lr=0.02", "optim.skip_spikes=1.0", "optim.spike_window=3", "run.log_every=1"]

    def snapshot(trainer):
        moments = [value.clone() for state in trainer.optimizer.state.values() for value in state.values()]
        return ([p.detach().clone() for p in trainer.model.parameters()], moments,
                {k: v.clone() for k, v in trainer.ema.shadow.items()})

    def same(a, b):
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))

    output = tmp_path / "whole"
    trainer = Trainer(tiny_float64_run(tmp_path, output, *sets))
    before = snapshot(trainer)
    for _ in range(10):
        trainer.fit(stop_after_steps=1)
        after = snapshot(trainer)
        record = json.loads((output / "metrics.jsonl").read_text().splitlines()[-1])
        unchanged = [same(before[0], after[0]), same(before[1], after[1]),
                     same(list(before[2].values()), list(after[2].values()))]
        assert unchanged == [bool(record["train_skipped"])] * 3, (record["step"], unchanged)
        before = after
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in records if "train_total" in r}
    norms = np.array([logged[step]["train_grad_norm"] for step in range(1, 11)])
    expected = [int(t >= 3 and norms[t] > np.median(norms[t - 3:t])) for t in range(10)]
    assert [logged[step]["train_skipped"] for step in range(1, 11)] == expected
    assert [logged[step]["train_skipped_steps"] for step in range(1, 11)] == expected
    assert 0 < sum(expected) < 7, norms  # the rule splits the steps after the window fills

    resumed = tmp_path / "resumed"
    Trainer(tiny_float64_run(tmp_path, resumed, *sets, "run.checkpoint_every=5")).fit(stop_after_steps=5)
    final = Trainer(tiny_float64_run(tmp_path, resumed, *sets, "run.checkpoint_every=5"), resume=True)
    final.fit()
    again = {r["step"]: r for r in map(json.loads, (resumed / "metrics.jsonl").read_text().splitlines())
             if "train_total" in r}
    assert [again[step]["train_skipped"] for step in range(1, 11)] == expected
    for p, q in zip(final.model.parameters(), trainer.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_adam_beta2_reaches_the_optimizer_and_a_resumed_run(tmp_path):
    """optim.beta2 is AdamW's second-moment decay: one step of the trainer's AdamW equals
    torch.optim.AdamW with betas (0.9, beta2) on the same gradients, and a resumed run keeps it."""
    from janus_potential.training.trainer import Trainer

    write(tmp_path / "train.xyz", labelled_structures(6))
    output = tmp_path / "beta2"
    sets = ["optim.max_steps=2", "optim.beta2=0.9", "optim.weight_decay=0", "run.checkpoint_every=1"]
    trainer = Trainer(tiny_float64_run(tmp_path, output, *sets))
    trainer.fit(stop_after_steps=1)
    assert trainer.optimizer.param_groups[0]["betas"] == (0.9, 0.9)
    state = trainer.optimizer.state[next(trainer.model.parameters())]
    grad = state["exp_avg"] / (1 - 0.9)  # the first step's moment is (1 - beta1) g
    torch.testing.assert_close(state["exp_avg_sq"], (1 - 0.9) * grad ** 2, rtol=1e-10, atol=0)
    resumed = Trainer(tiny_float64_run(tmp_path, output, *sets), resume=True)
    assert resumed.optimizer.param_groups[0]["betas"] == (0.9, 0.9)
    with pytest.raises(JanusInputError, match="optim.beta2 must be below 1"):
        tiny_float64_run(tmp_path, output, "optim.beta2=1").validate()
