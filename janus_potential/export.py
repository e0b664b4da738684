"""Export a trained model to one TorchScript file (DESIGN.md's export contract).

The file holds the scripted `JanusPotential` (methods `prepare`, `embed`, `interaction`,
`readout`, `forward`) and an extra file `metadata.json` with the format version, cutoff,
number of interaction layers, node feature width, supported elements, dtype, training
provenance and `weights_sha256`, the content hash of every parameter and buffer
(`janus_potential.integrity.module_digest`), checked by `load_exported` and by the LAMMPS
plugin on every load. Format 2 added the ZBL prior: `prepare(species, edge_index,
edge_vectors)` and `readout(h, species, geometry)`. C++ reads the metadata through `torch::jit::load(path, device, extra_files)`;
Python through `load_exported`.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any, Dict, Tuple

import torch

from . import ops
from .elements import number_to_symbol
from .errors import JanusInputError
from .integrity import scripted_digest
from .model import DTYPES, JanusPotential

EXPORT_FORMAT_VERSION = 2
METADATA_FILE = "metadata.json"


def export_metadata(model: JanusPotential, dtype: str, provenance: Dict[str, Any] | None = None) -> Dict[str, Any]:
    return {
        "format": "janus-torchscript",
        "format_version": EXPORT_FORMAT_VERSION,
        "cutoff": model.cutoff,
        "num_interactions": model.num_interactions,
        "features": model.features,
        "elements": [number_to_symbol(z) for z in model.supported_elements()],
        "dtype": dtype,
        "zbl": bool(model.config.zbl),
        "config": model.config.to_dict(),
        "parameters": model.parameter_report(),
        "provenance": provenance if provenance is not None else getattr(model, "provenance", {}),
    }


def exported_copy(model: JanusPotential, dtype: str, head: str | None) -> Tuple[JanusPotential, JanusPotential]:
    """(the plain model of `head`, its copy in `dtype` in eval mode): what every export format
    writes. A multi-head model gives the plain model of one head (default its first)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    if model.config.output_heads:
        model = model.select_head(head or model.config.output_heads[0])
    elif head is not None:
        raise JanusInputError(f"--head {head}: the model has a single output head")
    exported = JanusPotential(model.config).to(DTYPES[dtype])
    exported.load_state_dict(model.state_dict())
    return model, exported.eval()


def export_model(model: JanusPotential, path: str | os.PathLike, dtype: str = "float32",
                 provenance: Dict[str, Any] | None = None, head: str | None = None) -> Dict[str, Any]:
    """Script `model` in `dtype` and write it with its metadata to `path` (atomically). A
    multi-head model is exported as the plain model of one head (`head`, default its first):
    the file, the calculator and the LAMMPS plugin then know nothing of heads."""
    model, exported = exported_copy(model, dtype, head)
    metadata = export_metadata(model, dtype, provenance)
    scripted = torch.jit.script(exported)
    metadata["weights_sha256"] = scripted_digest(scripted)
    tmp = f"{os.fspath(path)}.tmp"
    scripted.save(tmp, _extra_files={METADATA_FILE: json.dumps(metadata, indent=1)})
    os.replace(tmp, path)
    return metadata


def read_metadata(path: str | os.PathLike) -> Dict[str, Any]:
    """Metadata of an exported file, with a clear error for anything else."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise JanusInputError(f"model file {path!r} does not exist")
    if not zipfile.is_zipfile(path):
        raise JanusInputError(f"{path!r} is not a Janus model file (not a TorchScript archive)")
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(f"extra/{METADATA_FILE}")]
            if not names:
                raise JanusInputError(f"{path!r} is not a Janus model file (no {METADATA_FILE})")
            metadata = json.loads(archive.read(names[0]))
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        if isinstance(exc, JanusInputError):
            raise
        raise JanusInputError(f"model file {path!r} is corrupt ({exc.__class__.__name__}: {exc})") from exc
    if metadata.get("format") != "janus-torchscript":
        raise JanusInputError(f"{path!r} is not a Janus model file")
    if metadata.get("format_version") != EXPORT_FORMAT_VERSION:
        raise JanusInputError(
            f"{path!r} has format version {metadata.get('format_version')}, "
            f"this Janus reads version {EXPORT_FORMAT_VERSION}; re-export it with this version"
        )
    return metadata


def load_exported(path: str | os.PathLike) -> Tuple[torch.jit.ScriptModule, Dict[str, Any]]:
    """Load an exported TorchScript file and its metadata."""
    metadata = read_metadata(path)
    ops.available()  # a file scripted with the fused operators needs them registered
    try:
        module = torch.jit.load(os.fspath(path), map_location="cpu")
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise JanusInputError(f"cannot load model file {os.fspath(path)!r} (corrupt?): {reason}") from exc
    if scripted_digest(module) != metadata.get("weights_sha256"):
        raise JanusInputError(f"model file {os.fspath(path)!r} is corrupt: its weights do not match the "
                              "SHA-256 content hash in its metadata")
    return module, metadata
