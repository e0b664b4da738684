"""AOTInductor export of a ghost-free model evaluation (`janus export --format aoti`, issue 11).

The package (`.pt2`) holds ONE compiled function of a whole structure, weights included:

    (species [N], edge_index [2, E], edge_vectors [E, 3], triplet_first [T], triplet_second [T])
        -> (atom energies [N], forces [N, 3], virial [3, 3])

made the way the compiled training step is (training/compiled.py): `make_fx` runs the eager
code (`model.atom_energies` and the edge-gradient outputs of `janus_potential.model`) with
`autograd.grad` inside, so the traced graph holds the force pass and no autograd; that graph
is exported with dynamic N, E and T (`torch.export`) and compiled ahead of time by
AOTInductor (`torch._inductor.aoti_compile_and_package`). The triplet list has
data-dependent size, so the caller computes it (`triplets`, from the edge lengths and the
three-body cutoff in the metadata) and passes it in; the MoE runs its shape-stable blocked
dispatch (`MixtureOfExperts.dispatch_block`, `EXPORT_DISPATCH_BLOCK` rows per block).

Loading needs torch and the fused operators' library (`janus_potential.ops`), no Python
model code. `AOTIPotential.evaluate` gives what `janus_potential.model.evaluate` gives
for one structure; `JanusCalculator` loads a `.pt2` by its file type (tests/test_aoti.py:
= the eager model, float64 1e-10, two structures of different sizes, one package).

What it does not do yet: domain decomposition (the parallel calculator) and LAMMPS, which
exchange ghost-atom features between layers and so need per-layer functions and their
vector-Jacobian products; those keep the TorchScript file (docs/model.md, "Compiled
inference").
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from . import ops
from .errors import JanusInputError
from .model import DTYPES, JanusPotential, atom_energies, forces_from_edge_gradient
from .nn.geometry import short_edge_triplets

AOTI_FORMAT_VERSION = 1
EXPORT_DISPATCH_BLOCK = 64  # rows per MoE block in the package (waste <= E * B rows per call)
METADATA_KEY = "janus"


def triplets(edge_index: torch.Tensor, edge_vectors: torch.Tensor, three_body_cutoff: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The triplet list of `GeometryBuilder.triplets`, without the model."""
    return short_edge_triplets(edge_index[0], torch.linalg.norm(edge_vectors.detach(), dim=1), three_body_cutoff)


class _Evaluation(nn.Module):
    """What the package computes (module docstring), with the weights as inputs for tracing."""

    def __init__(self, model: JanusPotential) -> None:
        super().__init__()
        self.model = model
        self.parameter_names = [name for name, _ in model.named_parameters()]
        self.buffer_names = [name for name, _ in model.named_buffers()]

    def forward(self, parameters: List[torch.Tensor], buffers: List[torch.Tensor], species: torch.Tensor,
                edge_index: torch.Tensor, edge_vectors: torch.Tensor, first: torch.Tensor,
                second: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model = self.model
        state = dict(zip(self.parameter_names, parameters))
        state.update(zip(self.buffer_names, buffers))
        geometry = model.geometry
        with torch.enable_grad(), torch.nn.utils.stateless._reparametrize_module(model, state):
            model.prepare = lambda s, ei, ev: geometry(s, ei, ev, (first, second))
            try:
                vectors = edge_vectors.detach().requires_grad_(True)
                energies, _ = atom_energies(model, species, edge_index, vectors)
                (gradient,) = torch.autograd.grad([energies.sum()], [vectors])
            finally:
                del model.prepare
        forces = forces_from_edge_gradient(gradient, edge_index, species.shape[0])
        # one structure: the virial is a sum over edges (no index_add into a [1, 3, 3] tensor)
        virial = -(vectors.detach().unsqueeze(2) * gradient.unsqueeze(1)).sum(dim=0)
        return energies.detach(), forces.detach(), (0.5 * (virial + virial.transpose(0, 1))).detach()


class _Packaged(nn.Module):
    """The traced graph with the weights as buffers: torch.export stores them in the package."""

    def __init__(self, graph: nn.Module, parameters: List[torch.Tensor], buffers: List[torch.Tensor]) -> None:
        super().__init__()
        self.graph = graph
        self.count = (len(parameters), len(buffers))
        for k, tensor in enumerate(list(parameters) + list(buffers)):
            self.register_buffer(f"w{k}", tensor.detach().clone())

    def forward(self, species: torch.Tensor, edge_index: torch.Tensor, edge_vectors: torch.Tensor, first: torch.Tensor,
                second: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weights = [getattr(self, f"w{k}") for k in range(sum(self.count))]
        return self.graph(weights[: self.count[0]], weights[self.count[0]:], species, edge_index, edge_vectors,
                          first, second)


def export_aoti(model: JanusPotential, path: str | os.PathLike, dtype: str = "float32",
                provenance: Optional[Dict[str, Any]] = None, head: Optional[str] = None,
                block: int = EXPORT_DISPATCH_BLOCK) -> Dict[str, Any]:
    """Compile `model` in `dtype` into an AOTInductor package at `path` (atomically); the
    metadata of a TorchScript export, with format "janus-aoti"."""
    from ase.build import bulk

    from .export import export_metadata, exported_copy
    from .graph import build_graph

    ops.available()
    model, exported = exported_copy(model, dtype, head)
    for layer in exported.layers:
        layer.moe.dispatch_block = block
    metadata = export_metadata(model, dtype, provenance)
    metadata.update(format="janus-aoti", format_version=AOTI_FORMAT_VERSION,
                    three_body_cutoff=exported.three_body_cutoff, dispatch_block=block)

    # an example structure for tracing: its sizes become symbols (2 or more of each)
    element = min(exported.supported_elements(), key=lambda z: abs(z - 14))
    example = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 2, 2))
    example.set_atomic_numbers([element] * len(example))
    graph = build_graph(example, exported.cutoff, dtype=DTYPES[dtype])
    vectors = graph.edge_vectors()
    first, second = exported.geometry.triplets(graph.edge_index, vectors)
    parameters = [p.detach() for p in exported.parameters()]
    buffers = [b for b in exported.buffers()]
    evaluation = _Evaluation(exported)
    from torch.fx.experimental.proxy_tensor import make_fx

    with torch.fx.experimental._config.patch(use_duck_shape=False):
        traced = make_fx(evaluation, tracing_mode="symbolic")(parameters, buffers, graph.species, graph.edge_index,
                                                             vectors, first, second)
    packaged = _Packaged(traced, parameters, buffers)
    atoms_dim, edges_dim, triplets_dim = (torch.export.Dim(name, min=2) for name in ("atoms", "edges", "triplets"))
    program = torch.export.export(
        packaged, (graph.species, graph.edge_index, vectors, first, second),
        dynamic_shapes=({0: atoms_dim}, {1: edges_dim}, {0: edges_dim}, {0: triplets_dim}, {0: triplets_dim}),
        strict=False)
    tmp = f"{os.fspath(path)}.tmp.pt2"
    torch._inductor.aoti_compile_and_package(
        program, package_path=tmp, inductor_configs={"aot_inductor.metadata": {METADATA_KEY: json.dumps(metadata)}})
    os.replace(tmp, path)
    return metadata


def is_aoti_file(path: str | os.PathLike) -> bool:
    """A zip archive with AOTInductor's entries."""
    try:
        with zipfile.ZipFile(os.fspath(path)) as archive:
            return any("/data/aotinductor/" in n for n in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


class AOTIPotential:
    """A loaded `.pt2` package: `evaluate` as `janus_potential.model.evaluate` for one
    ghost-free structure; `cutoff`, `elements` (atomic numbers), `dtype`, `metadata`."""

    def __init__(self, path: str | os.PathLike) -> None:
        from ase.data import atomic_numbers

        path = os.fspath(path)
        if not is_aoti_file(path):
            raise JanusInputError(f"{path!r} is not an AOTInductor package (.pt2)")
        ops.available()  # the package calls the fused operators
        try:
            self.package = torch._inductor.aoti_load_package(path)
            metadata = json.loads(self.package.get_metadata()[METADATA_KEY])
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise JanusInputError(f"cannot load model package {path!r}: {reason}") from exc
        if metadata.get("format") != "janus-aoti" or metadata.get("format_version") != AOTI_FORMAT_VERSION:
            raise JanusInputError(f"{path!r} is not a Janus package of format version {AOTI_FORMAT_VERSION}")
        self.metadata = metadata
        self.cutoff = float(metadata["cutoff"])
        self.three_body_cutoff = float(metadata["three_body_cutoff"])
        self.elements = [atomic_numbers[s] for s in metadata["elements"]]
        self.dtype = DTYPES[metadata["dtype"]]

    def evaluate(self, species: torch.Tensor, edge_index: torch.Tensor, edge_vectors: torch.Tensor,
                 volume: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """energy [1] (float64), atom_energies [N], forces [N, 3], virial [1, 3, 3] and, given
        the cell volume ([1]), stress [1, 3, 3]."""
        first, second = triplets(edge_index, edge_vectors, self.three_body_cutoff)
        sizes = {"atoms": species.shape[0], "edges": edge_index.shape[1], "triplets": first.shape[0]}
        small = [f"{n} {name}" for name, n in sizes.items() if n < 2]
        if small:
            raise JanusInputError(f"the compiled package needs at least 2 atoms, edges and triplets; this structure "
                                  f"has {', '.join(small)}: use the TorchScript export for it")
        energies, forces, virial = self.package(species, edge_index, edge_vectors.to(self.dtype), first, second)
        out = {"energy": energies.to(torch.float64).sum().reshape(1), "atom_energies": energies, "forces": forces,
               "virial": virial.unsqueeze(0)}
        if volume is not None:
            from .model import stress_from_virial

            out["stress"] = stress_from_virial(out["virial"], volume)
        return out
