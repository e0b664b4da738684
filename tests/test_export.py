"""Export metadata and the CLI. (Exported = eager for every model configuration, dtype and
structure is a check of the model suite: tests/model_suite.py.)"""

import subprocess
import sys

import torch

from janus_potential.ase import JanusCalculator
from janus_potential.export import export_model, load_exported, read_metadata
from janus_potential.testing import assert_calculators_match


def test_float32_export_of_a_float64_model(tiny_model, tmp_path):
    path = str(tmp_path / "m32.pt")
    export_model(tiny_model, path, dtype="float32")
    module, metadata = load_exported(path)
    assert metadata["dtype"] == "float32"
    assert module.embedding.weight.dtype == torch.float32


def test_metadata_contract(tiny_model, tmp_path):
    path = tmp_path / "m.pt"
    export_model(tiny_model, path, dtype="float64")
    metadata = read_metadata(path)
    assert metadata["format_version"] == 2 and len(metadata["weights_sha256"]) == 64
    assert metadata["cutoff"] == tiny_model.cutoff
    assert metadata["num_interactions"] == len(tiny_model.layers)
    assert metadata["features"] == tiny_model.embedding.weight.shape[1]
    assert metadata["elements"][0] == "H" and metadata["elements"][-1] == "Fm" and len(metadata["elements"]) == 100
    module = torch.jit.load(str(path))
    assert module.cutoff == tiny_model.cutoff and module.num_interactions == len(tiny_model.layers)


def test_cli_export_from_checkpoint(tiny_model, oxide, tmp_path):
    checkpoint = tmp_path / "ckpt.pt"
    tiny_model.save_checkpoint(checkpoint)
    output = tmp_path / "exported.pt"
    subprocess.run([sys.executable, "-m", "janus_potential", "export", str(checkpoint), "-o", str(output),
                    "--dtype", "float64"], check=True, capture_output=True)
    assert_calculators_match(JanusCalculator(tiny_model), JanusCalculator(str(output)), oxide, rtol=1e-10)
    assert_calculators_match(JanusCalculator(tiny_model), JanusCalculator(str(checkpoint)), oxide, rtol=1e-12)


def test_cli_reports_bad_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, "-m", "janus_potential", "export", str(tmp_path / "none.pt")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "does not exist" in result.stderr
