"""Hybrid-parallel training through `janus train` under mpirun and torchrun equals one process.

Every layout and one process on the same global batches: parameters after 3 optimizer
steps agree to 1e-10 (float64) and 1e-5 relative (float32) -- dp=2, ep=2, dd=2, dp=2 x
ep=2 (4 ranks) under mpirun, dp=2 under torchrun; dp=2 and ep=2 checkpoints (full,
gathered state) resume on 1 rank and land on the same parameters. The unit tests of the
sampler and the config run without MPI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ase.io import write

from janus_potential.parallel.mesh import MeshError, ProcessMesh
from janus_potential.training.checkpoint import full_state
from janus_potential.training.config import TrainConfig
from janus_potential.training.distributed import split_by_atoms

from .conftest import flip_tensor_bytes
from .devices import DEVICES
from .test_training import labelled_structures

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")


GLOBAL_BATCH_ATOMS = 40  # atoms per global batch in every run of this file
# seconds before a `janus train` subprocess counts as hung: not a speed limit (a compiled
# expert-parallel run took over 300 s on the 2-core machine while other work ran)
HANG_GUARD_S = 900


def janus_train(config: Path, ranks: int, *overrides: str, layout: tuple = ()) -> None:
    """`janus train` on `ranks` processes (mpirun); `layout` = (dp, ep, dd), default (ranks, 1, 1)."""
    dp, ep, dd = layout or (ranks, 1, 1)
    flags = [o for o in overrides if o.startswith("--")]
    command = [str(BIN / "janus"), "train", str(config), *flags,
               *(f"--set={o}" for o in overrides if not o.startswith("--"))]
    if ranks > 1:
        # the budget is per data rank: the same global batches as the one-process run
        command = [str(BIN / "mpirun"), "-np", str(ranks), *command,
                   f"--set=parallel.dp={dp}", f"--set=parallel.ep={ep}", f"--set=parallel.dd={dd}",
                   f"--set=data.max_atoms_per_batch={GLOBAL_BATCH_ATOMS // (dp * ep)}"]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def parameters(output: Path) -> dict:
    return full_state(output / "checkpoint.pt")["model"]


def max_relative_difference(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-30)) for k in a
               if a[k].dtype.is_floating_point)


@pytest.fixture(scope="module")
def train_config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dp")
    frames = labelled_structures(10, seed=3)
    write(root / "train.xyz", frames, format="extxyz")
    config = root / "config.yaml"
    config.write_text(
        f"data: {{train: [{root / 'train.xyz'}], validation_fraction: 0.0, cache_dir: {root / 'cache'},"
        f" max_atoms_per_batch: {GLOBAL_BATCH_ATOMS}}}\n"
        "model: {preset: tiny}\n"
        "optim: {max_steps: 3, warmup_steps: 0, min_lr_ratio: 1.0, lr: 0.01}\n"
        "loss: {balance_weight: 0.5}\n"
        "run: {dtype: float64, progress: false, checkpoint_every: 1, log_every: 1}\n"
    )
    return config


def test_split_by_atoms_balances_and_keeps_every_structure():
    sizes = [50, 10, 30, 30, 20, 5, 40]
    parts = split_by_atoms(list(range(7)), sizes, 2)
    assert sorted(parts[0] + parts[1]) == list(range(7))
    loads = [sum(sizes[k] for k in p) for p in parts]
    assert abs(loads[0] - loads[1]) <= 5


def test_parallel_config_section_and_mesh_error():
    config = TrainConfig.load(None, ["parallel.dp=2", "parallel.bucket_mb=1"])
    assert config.parallel.dp == 2 and config.parallel.bucket_mb == 1.0
    with pytest.raises(ValueError, match="unknown config key parallel.nope"):
        TrainConfig.load(None, ["parallel.nope=1"])
    with pytest.raises(MeshError, match="does not match the 1 launched"):
        ProcessMesh.create(dp=2)
    # the compiled step takes data and expert parallelism, not domain decomposition
    assert TrainConfig.load(None, ["run.compile=true", "parallel.ep=2", "parallel.dp=2"]).run.compile
    with pytest.raises(ValueError, match="parallel.dd must be 1"):
        TrainConfig.load(None, ["run.compile=true", "parallel.dd=2"])


@pytest.mark.mpi
@pytest.mark.slow
def test_data_parallel_training_equals_one_process_and_resumes_on_other_rank_count(train_config, tmp_path):
    janus_train(train_config, 1, f"run.output={tmp_path / 'one'}")
    janus_train(train_config, 2, f"run.output={tmp_path / 'two'}")
    janus_train(train_config, 2, f"run.output={tmp_path / 'resumed'}", "optim.max_steps=2")
    subprocess.run([str(BIN / "janus"), "train", str(train_config), f"--set=run.output={tmp_path / 'resumed'}",
                    "--resume"], cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=HANG_GUARD_S)
    one = parameters(tmp_path / "one")
    assert full_state(tmp_path / "one" / "checkpoint.pt")["step"] == 3
    assert full_state(tmp_path / "two" / "checkpoint.pt")["step"] == 3
    assert max_relative_difference(parameters(tmp_path / "two"), one) < 1e-10
    assert max_relative_difference(parameters(tmp_path / "resumed"), one) < 1e-10


@pytest.mark.mpi
@pytest.mark.slow
def test_data_parallel_training_float32(train_config, tmp_path):
    janus_train(train_config, 1, f"run.output={tmp_path / 'one'}", "run.dtype=float32")
    janus_train(train_config, 2, f"run.output={tmp_path / 'two'}", "run.dtype=float32")
    assert max_relative_difference(parameters(tmp_path / "two"), parameters(tmp_path / "one")) < 1e-5


def final_state(output: Path) -> dict:
    checkpoint = full_state(output / "checkpoint.pt")
    assert checkpoint["step"] == 3
    return checkpoint


def assert_same_training_state(run: Path, reference: Path) -> None:
    """Model, EMA and AdamW moments (assembled from every rank's pieces) equal the one-process run's."""
    state, expected = final_state(run), final_state(reference)
    assert state["model"].keys() == expected["model"].keys() and state["ema"].keys() == expected["ema"].keys()
    assert max_relative_difference(state["model"], expected["model"]) < 1e-10
    assert max_relative_difference(state["ema"], expected["ema"]) < 1e-10
    moments = {f"{name}.{k}": v for name, values in state["optimizer"].items() for k, v in values.items()}
    expected_moments = {f"{name}.{k}": v for name, values in expected["optimizer"].items() for k, v in values.items()}
    assert moments.keys() == expected_moments.keys()
    assert max_relative_difference(moments, expected_moments) < 1e-10


@pytest.mark.mpi
@pytest.mark.slow
def test_expert_and_domain_parallel_training_equal_one_process(train_config, tmp_path):
    janus_train(train_config, 1, f"run.output={tmp_path / 'one'}")
    janus_train(train_config, 2, f"run.output={tmp_path / 'ep'}", layout=(1, 2, 1))
    assert_same_training_state(tmp_path / "ep", tmp_path / "one")
    janus_train(train_config, 2, f"run.output={tmp_path / 'dd'}", layout=(1, 1, 2))
    assert_same_training_state(tmp_path / "dd", tmp_path / "one")
    # per-frame force normalisation uses the whole frame's labels on every domain
    normalised = ("loss.forces_normalization=frame", "loss.forces_scale_floor=0.05", "loss.energy_per=structure")
    janus_train(train_config, 1, f"run.output={tmp_path / 'one-normalised'}", *normalised)
    janus_train(train_config, 2, f"run.output={tmp_path / 'dd-normalised'}", *normalised, layout=(1, 1, 2))
    assert_same_training_state(tmp_path / "dd-normalised", tmp_path / "one-normalised")
    assert max_relative_difference(parameters(tmp_path / "one-normalised"), parameters(tmp_path / "one")) > 1e-6
    # the ep=2 checkpoint holds the full model: it resumes on one process and exports
    janus_train(train_config, 2, f"run.output={tmp_path / 'resumed'}", "optim.max_steps=2", layout=(1, 2, 1))
    subprocess.run([str(BIN / "janus"), "train", str(train_config), f"--set=run.output={tmp_path / 'resumed'}",
                    "--resume"], cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=HANG_GUARD_S)
    assert max_relative_difference(parameters(tmp_path / "resumed"), parameters(tmp_path / "one")) < 1e-10
    assert (tmp_path / "ep" / "model.pt").exists() and (tmp_path / "resumed" / "model.pt").exists()


@pytest.mark.mpi
@pytest.mark.parametrize("device", [d for d in DEVICES if d.id == "cuda"])
def test_training_on_a_gpu_equals_one_cpu_process(train_config, tmp_path, device):
    """One process and dp=2, ep=2, dd=2 (two ranks sharing the GPU, NCCL for the device
    tensors) with `run.device=cuda` = one CPU process, float64 1e-10."""
    janus_train(train_config, 1, f"run.output={tmp_path / 'cpu'}", "run.device=cpu")
    janus_train(train_config, 1, f"run.output={tmp_path / 'one'}", f"run.device={device}")
    assert_same_training_state(tmp_path / "one", tmp_path / "cpu")
    for name, layout in (("dp", (2, 1, 1)), ("ep", (1, 2, 1)), ("dd", (1, 1, 2))):
        janus_train(train_config, 2, f"run.output={tmp_path / name}", f"run.device={device}", layout=layout)
        assert_same_training_state(tmp_path / name, tmp_path / "cpu")


@pytest.mark.mpi
@pytest.mark.slow
def test_data_times_expert_parallel_training_on_four_ranks_equals_one_process(train_config, tmp_path):
    janus_train(train_config, 1, f"run.output={tmp_path / 'one'}")
    janus_train(train_config, 4, f"run.output={tmp_path / 'dp_ep'}", layout=(2, 2, 1))
    assert_same_training_state(tmp_path / "dp_ep", tmp_path / "one")


@pytest.mark.mpi
@pytest.mark.slow
def test_sharded_optimizer_state_equals_one_process_and_resumes_unsharded(train_config, tmp_path):
    """parallel.shard=optimizer (AdamW moments split over the ranks) on dp=2 and on dp=2 x ep=2:
    the same model, EMA and moments as one process; its checkpoint resumes on one process."""
    janus_train(train_config, 1, f"run.output={tmp_path / 'one'}")
    janus_train(train_config, 2, f"run.output={tmp_path / 'dp'}", "parallel.shard=optimizer")
    assert_same_training_state(tmp_path / "dp", tmp_path / "one")
    janus_train(train_config, 4, f"run.output={tmp_path / 'dp_ep'}", "parallel.shard=optimizer", layout=(2, 2, 1))
    assert_same_training_state(tmp_path / "dp_ep", tmp_path / "one")
    janus_train(train_config, 4, f"run.output={tmp_path / 'resumed'}", "parallel.shard=optimizer", "optim.max_steps=2",
                layout=(2, 2, 1))
    subprocess.run([str(BIN / "janus"), "train", str(train_config), f"--set=run.output={tmp_path / 'resumed'}",
                    "--resume"], cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=HANG_GUARD_S)
    assert_same_training_state(tmp_path / "resumed", tmp_path / "one")


@pytest.fixture(scope="module")
def one_process_run(train_config, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("one") / "run"
    janus_train(train_config, 1, f"run.output={output}")
    return output


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("ranks,layout", [(2, (2, 1, 1)), (2, (1, 2, 1)), (2, (1, 1, 2)), (4, (2, 2, 1)), (4, (1, 2, 2))],
                         ids=["dp2", "ep2", "dd2", "dp2xep2", "ep2xdd2"])
def test_fully_sharded_training_equals_one_process(train_config, one_process_run, tmp_path, ranks, layout):
    """parallel.shard=full (dense parameters held by their owners between steps, AdamW
    moments and summed gradients sharded): model, EMA and moments equal one process after 3
    steps, and every rank wrote its own share of the checkpoint."""
    # small gradient buckets: every rank must cut the same buckets though it holds only its own weights
    janus_train(train_config, ranks, f"run.output={tmp_path}", "parallel.shard=full", "parallel.bucket_mb=0.002",
                layout=layout)
    assert_same_training_state(tmp_path, one_process_run)
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    dense = [key for key in payload["index"] if key.startswith("model/") and ".moe.w_" not in key
             and ".moe.b_" not in key]
    writers = {piece[0] for key in dense for piece in payload["index"][key]["pieces"]}
    assert len(writers) == ranks, writers  # dense weights sharded over all ranks (None = rank 0)
    assert len(payload["parts"]) == ranks - 1


@pytest.mark.mpi
@pytest.mark.slow
def test_fully_sharded_checkpoint_resumes_in_another_layout(train_config, one_process_run, tmp_path):
    """A checkpoint of dp=2 x ep=2, shard=full, after 2 steps resumes on 2 ranks (ep=2,
    shard=optimizer) and on 1 process, and lands on the one-process state."""
    janus_train(train_config, 4, f"run.output={tmp_path / 'a'}", "parallel.shard=full", "optim.max_steps=2",
                layout=(2, 2, 1))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    janus_train(train_config, 2, f"run.output={tmp_path / 'a'}", "parallel.shard=optimizer", "--resume",
                layout=(1, 2, 1))
    assert_same_training_state(tmp_path / "a", one_process_run)
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    janus_train(train_config, 1, f"run.output={tmp_path / 'b'}", "--resume")
    assert_same_training_state(tmp_path / "b", one_process_run)
    assert not [part for part in (tmp_path / "b" / "checkpoint.parts").iterdir()]  # the 4-rank parts are gone
    # a damaged part file is refused by name, not resumed from
    part = next((tmp_path / "c" / "checkpoint.parts").iterdir())
    flip_tensor_bytes(part)
    command = [str(BIN / "janus"), "train", str(train_config), f"--set=run.output={tmp_path / 'c'}", "--resume"]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 2 and f"{str(part)!r} is corrupt" in done.stderr, done.stderr[-2000:]


@pytest.mark.slow
def test_torchrun_data_parallel_training_equals_one_process(train_config, tmp_path):
    janus_train(train_config, 1, f"run.output={tmp_path / 'one'}")
    command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "janus_potential.training", "train",
               str(train_config), f"--set=run.output={tmp_path / 'two'}", "--set=parallel.dp=2",
               f"--set=data.max_atoms_per_batch={GLOBAL_BATCH_ATOMS // 2}"]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_same_training_state(tmp_path / "two", tmp_path / "one")


@pytest.fixture(scope="module")
def finetune_config(train_config, tmp_path_factory) -> Path:
    """Two configs: fine-tuning with LoRA adapters on a parent and replay data (config.yaml),
    and two output heads named in the data (heads.yaml; heads need a run from scratch)."""
    root = tmp_path_factory.mktemp("ft")
    write(root / "new.xyz", labelled_structures(8, seed=11), format="extxyz")
    write(root / "old.xyz", labelled_structures(6, seed=21), format="extxyz")
    from janus_potential import JanusPotential

    torch.manual_seed(5)
    JanusPotential.from_preset("tiny").to(torch.float64).save_checkpoint(root / "parent.ckpt")
    config = root / "config.yaml"
    config.write_text(
        f"data: {{train: [{root / 'new.xyz'}], replay: [{root / 'old.xyz'}], replay_fraction: 0.4,"
        f" validation_fraction: 0.0, cache_dir: {root / 'cache'}, max_atoms_per_batch: {GLOBAL_BATCH_ATOMS}}}\n"
        f"model: {{init_from: {root / 'parent.ckpt'}, lora_rank: 2}}\n"
        "optim: {max_steps: 3, warmup_steps: 0, min_lr_ratio: 1.0, lr: 0.01}\n"
        "run: {dtype: float64, progress: false, checkpoint_every: 1, log_every: 1}\n"
    )
    heads = root / "heads.yaml"
    heads.write_text(
        f"data: {{train: ['{root / 'new.xyz'}@pbe', '{root / 'old.xyz'}@scan'], validation_fraction: 0.0,"
        f" cache_dir: {root / 'cache'}, max_atoms_per_batch: {GLOBAL_BATCH_ATOMS}}}\n"
        "model: {preset: tiny}\n"
        "optim: {max_steps: 3, warmup_steps: 0, min_lr_ratio: 1.0, lr: 0.01}\n"
        "run: {dtype: float64, progress: false, checkpoint_every: 1, log_every: 1}\n"
    )
    return root


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("name", ["config.yaml", "heads.yaml"], ids=["lora+replay", "heads"])
def test_finetuning_and_heads_on_two_ranks_equal_one_process(finetune_config, tmp_path, name):
    """LoRA adapters with replay data, and output heads, trained data-parallel (dp=2, sharded
    optimizer) equal one process (adapters, EMA and moments, 1e-10 in float64)."""
    config = finetune_config / name
    janus_train(config, 1, f"run.output={tmp_path / 'one'}")
    janus_train(config, 2, f"run.output={tmp_path / 'two'}", "parallel.shard=optimizer")
    assert_same_training_state(tmp_path / "two", tmp_path / "one")


@pytest.mark.mpi
@pytest.mark.slow
def test_compiled_training_equals_eager_on_one_process_and_two_data_or_expert_ranks(train_config, tmp_path):
    """`run.compile: true` (training/compiled.py), one process, dp=2 and ep=2 under mpirun
    (ep: the experts' all-to-all exchanges and their first and second derivatives inside the
    compiled graph), against the eager one-process run: model, EMA and AdamW moments after 3
    steps (float64, 1e-10). Every run has a second loss stage from the third step on
    (`loss.stage_two_*`: other energy, force and stress weights; in the compiled step a factor
    on an input), and the eager run's logged loss is its terms weighted by the stage's
    weights, step by step."""
    stage = ["loss.stage_two_start=0.6", "loss.stage_two_energy_factor=3", "loss.stage_two_forces_factor=0.5",
             "loss.stage_two_stress_factor=2"]
    janus_train(train_config, 1, f"run.output={tmp_path / 'eager'}", *stage)
    janus_train(train_config, 1, f"run.output={tmp_path / 'compiled'}", "run.compile=true", *stage)
    janus_train(train_config, 2, f"run.output={tmp_path / 'compiled2'}", "run.compile=true", *stage)
    janus_train(train_config, 2, f"run.output={tmp_path / 'compiled_ep'}", "run.compile=true", *stage,
                layout=(1, 2, 1))
    records = [json.loads(line) for line in (tmp_path / "eager" / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "train_total" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    base = (1.0, 1.0, 0.1)  # energy, forces, stress weights of the config (LossConfig's defaults)
    for record in records:
        factors = (3.0, 0.5, 2.0) if (record["step"] - 1) / 3 >= 0.6 else (1.0, 1.0, 1.0)
        expected = sum(b * f * record[f"train_{name}"] for b, f, name in zip(base, factors, ("energy", "forces", "stress")))
        assert record["train_total"] == pytest.approx(expected, rel=1e-12), record
    assert_same_training_state(tmp_path / "compiled", tmp_path / "eager")
    assert_same_training_state(tmp_path / "compiled2", tmp_path / "eager")
    assert_same_training_state(tmp_path / "compiled_ep", tmp_path / "eager")
    log = [line for line in (tmp_path / "compiled" / "metrics.jsonl").read_text().splitlines() if "compiles" in line]
    assert log, "the compiled run logs its compile count"


def step_records(output: Path) -> list:
    return [r for r in map(json.loads, (output / "metrics.jsonl").read_text().splitlines()) if "train_total" in r]


@pytest.mark.mpi
@pytest.mark.slow
def test_spike_skipping_on_two_sharded_expert_ranks_equals_one_process(train_config, tmp_path):
    """optim.skip_spikes on ep=2 with parallel.shard=full: every rank skips the same steps (the
    gradient norm is summed over the world before the rule sees it), and model, EMA and AdamW
    moments equal the one-process run's, which skips the same step."""
    spikes = ("optim.skip_spikes=1.0", "optim.spike_window=1")  # skip a step whose norm exceeds the last one
    janus_train(train_config, 1, f"run.output={tmp_path / 'one'}", *spikes)
    janus_train(train_config, 2, f"run.output={tmp_path / 'ep'}", *spikes, "parallel.shard=full", layout=(1, 2, 1))
    one = step_records(tmp_path / "one")
    norms = [r["train_grad_norm"] for r in one]
    expected = [0] + [int(b > a) for a, b in zip(norms, norms[1:])]
    assert [r["train_skipped"] for r in one] == expected and sum(expected) == 1, norms
    assert [r["train_skipped"] for r in step_records(tmp_path / "ep")] == expected
    assert_same_training_state(tmp_path / "ep", tmp_path / "one")
