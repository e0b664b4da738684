"""The `janus` command: user mistakes end with one `janus: error:` line and exit status 2;
training output is plain lines in a log file; config paths, `--resume` and missing labels."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

from janus_potential import JanusPotential
from janus_potential.training.cli import main
from janus_potential.training.config import TrainConfig
from janus_potential.training.progress import TrainingProgress

ROOT = Path(__file__).resolve().parent.parent
ALKALI = ROOT / "examples" / "data" / "mpf-alkali-TP.xyz"


def janus(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m janus_potential.training.cli ARGS`, stdout and stderr captured (not a terminal)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    return subprocess.run([sys.executable, "-m", "janus_potential.training.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def assert_one_line_error(code: int, stderr: str, *fragments: str) -> None:
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("janus: error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.ckpt"
    JanusPotential.from_preset("tiny").save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def forces_only(tmp_path_factory) -> Path:
    """Twelve small frames of the example data with their forces and no energy or stress."""
    frames = []
    for atoms in read(ALKALI, ":12"):
        forces = atoms.get_forces()
        atoms.calc = SinglePointCalculator(atoms, forces=forces)
        frames.append(atoms)
    path = tmp_path_factory.mktemp("data") / "forces.xyz"
    write(path, frames)
    return path


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key optim.lrr"),
    ("nosuch.key=1", "unknown config section 'nosuch'"),
    ("optim.lr=abc", "config key optim.lr expects float, got 'abc'"),
    ("optim.lr=-1", "config key optim.lr must be positive"),
    ("optim.lr=0", "config key optim.lr must be positive"),
    ("model.preset=huge", "config key model.preset must be one of tiny, small, base, 1b, got 'huge'"),
    ("run.dtype=float16", "config key run.dtype must be one of float32, float64"),
    ("loss.kind=l1", "config key loss.kind must be one of huber, mse"),
    ("data.max_atoms_per_batch=0", "config key data.max_atoms_per_batch must be positive"),
    ("run.checkpoint_every=0", "config key run.checkpoint_every must be positive"),
    ("optim.max_steps=2.5", "config key optim.max_steps expects int"),
    ("run.progress=maybe", "config key run.progress expects bool"),
    ("model.overrides.nope=1", "config key model.overrides: unknown model option(s) ['nope']"),
    ("lr=1", "override 'lr=1' must look like section.key=value"),
])
def test_config_mistakes_are_one_line_errors(capsys, override, message):
    code = main(["train", "--set", override])
    assert_one_line_error(code, capsys.readouterr().err, message)


def test_config_file_mistakes_name_the_file(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    assert_one_line_error(main(["train", str(missing)]), capsys.readouterr().err, str(missing), "does not exist")
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: [lr: 1\n")
    assert_one_line_error(main(["train", str(broken)]), capsys.readouterr().err, str(broken), "not valid YAML")
    flat = tmp_path / "flat.yaml"
    flat.write_text("optim: 3\n")
    assert_one_line_error(main(["train", str(flat)]), capsys.readouterr().err, str(flat), "section optim")


def test_argparse_mistakes_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--set"])
    assert exit_info.value.code == 2
    assert "argument --set: expected one argument" in capsys.readouterr().err


def test_export_into_a_missing_folder(tmp_path, checkpoint, capsys):
    target = tmp_path / "nowhere" / "model.pt"
    code = main(["export", str(checkpoint), "-o", str(target)])
    assert_one_line_error(code, capsys.readouterr().err, str(target), "does not exist")
    assert not target.parent.exists()


def test_eval_on_files_without_structures_or_labels(tmp_path, checkpoint, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("energies are in eV\n")
    code = main(["eval", str(checkpoint), str(notes)])
    assert_one_line_error(code, capsys.readouterr().err, str(notes), "ASE can read")
    unlabelled = tmp_path / "unlabelled.xyz"
    atoms = read(ALKALI, "0")
    atoms.calc = None
    write(unlabelled, atoms)
    code = main(["eval", str(checkpoint), str(unlabelled)])
    assert_one_line_error(code, capsys.readouterr().err, str(unlabelled), "no frame has")


def test_module_entry_point_reports_errors():
    result = janus("train", "--set", "optim.lr=abc")
    assert_one_line_error(result.returncode, result.stderr, "optim.lr")


def test_config_file_data_paths_are_relative_to_the_file(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    config = folder / "train.yaml"
    config.write_text(f"data:\n  train: [../data/a.xyz, {tmp_path / 'b.xyz'}]\n  validation: v.xyz\n")
    monkeypatch.chdir(tmp_path / "configs")
    loaded = TrainConfig.load(config)
    assert loaded.data.train == [str(tmp_path / "data" / "a.xyz"), str(tmp_path / "b.xyz")]
    assert loaded.data.validation == [str(folder / "v.xyz")]
    monkeypatch.chdir(tmp_path)
    assert TrainConfig.load("configs/train.yaml").data.train[0] == str(tmp_path / "data" / "a.xyz")
    overridden = TrainConfig.load(config, ["data.train=[c.xyz]", "data.validation=w.xyz"])
    assert overridden.data.train == ["c.xyz"] and overridden.data.validation == ["w.xyz"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, forces_only) -> tuple[Path, str, str]:
    """(run folder, stdout, stderr) of `janus train CONFIG --resume` on forces-only data with
    stdout to a file, run from the config's parent folder (its data path is relative to the
    config's folder)."""
    root = tmp_path_factory.mktemp("run")
    (root / "configs").mkdir()
    config = root / "configs" / "tiny.yaml"
    config.write_text(
        f"data:\n  train: [{os.path.relpath(forces_only, config.parent)}]\n  validation_fraction: 0.25\n"
        f"  cache_dir: {root / 'cache'}\n  max_atoms_per_batch: 24\n"
        "model:\n  preset: tiny\n"
        "optim:\n  max_steps: 5\n  warmup_steps: 1\n"
        f"run:\n  output: {root / 'out'}\n  threads: 1\n  progress_every_s: 1.0e-6\n"
    )
    log = root / "stdout.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    with open(log, "w") as stdout:
        process = subprocess.run([sys.executable, "-m", "janus_potential.training.cli", "train", str(config),
                                  "--resume"], cwd=root, env=env, stdout=stdout,
                                 stderr=subprocess.PIPE, timeout=600)
    stderr = process.stderr.decode()  # read as bytes: text mode would turn carriage returns into newlines
    assert process.returncode == 0, stderr
    return root, log.read_bytes().decode(), stderr


def test_progress_is_plain_lines_without_a_terminal(tiny_run):
    _, stdout, stderr = tiny_run
    assert "\r" not in stdout and "\r" not in stderr
    lines = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == [f"{k}/5" for k in range(1, 6)]
    for line in lines:
        for field in ("epoch", "loss", "lr", "atoms/s", "ETA"):
            assert f" {field} " in line, line


def test_resume_without_checkpoint_says_so(tiny_run):
    root, stdout, _ = tiny_run
    assert f"no checkpoint found at {root / 'out' / 'checkpoint.pt'}: training starts from scratch" in stdout


def test_summary_without_energy_labels_has_no_nan(tiny_run, forces_only):
    root, stdout, _ = tiny_run
    table = stdout[stdout.index("source"):]
    assert "nan" not in table.lower()
    assert "forces" in table and " - " in table
    result = janus("eval", str(root / "out" / "model.pt"), str(forces_only))
    assert result.returncode == 0, result.stderr
    assert "nan" not in result.stdout.lower()
    row = result.stdout.splitlines()[-1].split()  # all  -  -  F MAE  F RMSE  F=0 MAE  -  -  frames
    assert row[0] == "all" and row[1:3] == ["-", "-"] and row[6:8] == ["-", "-"] and row[8] == "12"


def test_progress_lines_every_interval_and_none_when_disabled():
    stream = io.StringIO()  # not a terminal
    progress = TrainingProgress(True, first_step=0, total_steps=100, max_seconds=0.0, every_s=3600.0, stream=stream)
    for step in range(1, 4):
        progress.update(step, 0, 0.5, 1e-3, 1000.0, float(step))
    progress.close()
    lines = stream.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["1/100", "3/100"]  # the first step, then the last at close
    silent = io.StringIO()
    progress = TrainingProgress(False, first_step=0, total_steps=100, max_seconds=0.0, every_s=0.0, stream=silent)
    progress.update(1, 0, 0.5, 1e-3, 1000.0, 1.0)
    progress.close()
    assert silent.getvalue() == ""
