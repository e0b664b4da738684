"""AOTInductor export with the per-layer structure of the halo protocol (`janus export
--format aoti`, issue 11; docs/model.md, "Compiled inference").

A `.pt2` package holds the model's layer sequence as separately compiled functions, weights
inside, so that every front end runs it with its own ghost exchange between layers, as it
runs the TorchScript file's methods (DESIGN.md's export contract: both formats expose the
same per-layer structure). With O owned atoms, G ghost atoms (owned rows first), E edges and
T triplets:

    prepare(species [N], edge_index [2, E], edge_vectors [E, 3], first [T], second [T])
        -> radial [E, R], envelope [E], triplet_basis [T, K], repulsion [E]
    prepare_vjp(the same inputs, cotangents of the four outputs) -> d/d(edge_vectors) [E, 3]
    layer_0(species_owned [O], species_ghost [G], centre, neighbour, radial, envelope,
            triplet_edge, triplet_neighbour, triplet_basis)
        -> node features [O + G, F], router probability sum [E_x], expert load [E_x]
    layer_l(h_owned [O, F], h_ghost [G, F], species_owned [O], <the same geometry>)   l >= 1
    layer_l_vjp(<the inputs of layer_l>, cotangent_owned [O, F], cotangent_ghost [G, F])
        -> (d/dh [O + G, F] for l >= 1), d/d radial, d/d envelope, d/d triplet_basis
    readout(h_owned [O, F], species_owned [O], centre [E], repulsion [E])
        -> atom energies [O], d(sum)/dh_owned [O, F], d(sum)/d repulsion [E]

plus `structure(<the inputs of prepare>) -> atom energies, forces, virial [3, 3], routing
sums`: a whole ghost-free structure in one function, the fast path of a one-process
evaluation (`janus_potential.model.evaluate` takes it for one structure without
`create_graph`), equal to the per-layer sequence with no exchange.
Layer 0 embeds the species itself (the embedding is not a separate function). A layer's
vector-Jacobian product recomputes its forward (rematerialisation: the package keeps no
activations between calls). The readout's Jacobian is block-diagonal (an atom's energy
depends on its own row and its own edges), so its gradient of the sum, scaled per atom by
the cotangent, is its VJP: one function for both. The owned/ghost split of the per-atom
inputs keeps every size an independent symbol (N = O + G is not expressible in
`torch.export`'s dims); a structure without ghosts (one process, periodic images carried by
edge shifts) gets two padding ghost rows that no edge touches.

Each function is made like the compiled training step (training/compiled.py): `make_fx`
runs the eager module code (with `autograd.grad` inside for the VJPs) into a graph without
autograd, `torch.export` makes every size dynamic (at least 2 of each), and AOTInductor
compiles it; `torch._inductor.package.package_aoti` puts the functions into one archive,
each under its name, with the Janus metadata (`aot_inductor.metadata["janus"]`) on every
one. The MoE runs its shape-stable blocked dispatch (`EXPORT_DISPATCH_BLOCK` rows per block).
The triplet list has a data-dependent size, so the caller builds it (`triplets` here, the
same rule in the LAMMPS plugin's C++).

`PackagedPotential` is a loaded package with the methods of an exported TorchScript module
(`prepare`, `embed`, `interaction`, `readout`, `num_interactions`): each call is an
`autograd.Function` whose backward is the package's VJP, so `janus_potential.model.evaluate`
(one process), `parallel.DomainModel` (the halo protocol on many ranks) and therefore both
ASE calculators run it unchanged, and the LAMMPS plugin calls the same functions from C++
(lammps_plugin/janus_model.cpp). The package is for inference: forces and stress (first
derivatives), not training. Loading needs torch and the fused operators' library
(`janus_potential.ops`), no Python model code.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from . import ops
from .errors import JanusInputError
from .model import DTYPES, JanusPotential, atom_energies, forces_from_edge_gradient, stress_from_virial
from .nn.geometry import Geometry, short_edge_triplets

AOTI_FORMAT_VERSION = 2
EXPORT_DISPATCH_BLOCK = 64  # rows per MoE block in the package (waste <= E * B rows per call)
METADATA_KEY = "janus"
MIN_SIZE = 2  # torch.export specialises sizes 0 and 1: every dynamic size is at least 2


def triplets(edge_index: torch.Tensor, edge_vectors: torch.Tensor, three_body_cutoff: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The triplet list of `GeometryBuilder.triplets`, without the model."""
    return short_edge_triplets(edge_index[0], torch.linalg.norm(edge_vectors.detach(), dim=1), three_body_cutoff)


def function_names(num_interactions: int) -> List[str]:
    """The package's functions, in the order of one evaluation."""
    layers = [f"layer_{l}" for l in range(num_interactions)]
    return ["prepare", *layers, "readout", *[f"{name}_vjp" for name in reversed(layers)], "prepare_vjp", "structure"]


# ------------------------------------------------------------------- the traced functions
def _grads(outputs: List[torch.Tensor], inputs: List[torch.Tensor],
           cotangents: Optional[List[torch.Tensor]] = None) -> List[torch.Tensor]:
    """autograd.grad with zeros for inputs the outputs do not depend on."""
    pairs = [(o, c) for o, c in zip(outputs, cotangents or [None] * len(outputs)) if o.requires_grad]
    if not pairs:
        return [torch.zeros_like(x) for x in inputs]
    grads = torch.autograd.grad([o for o, _ in pairs], inputs,
                                None if cotangents is None else [c for _, c in pairs], allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def _leaf(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().requires_grad_(True)


def _layer_geometry(centre, neighbour, radial, envelope, triplet_edge, triplet_neighbour, triplet_basis) -> Geometry:
    return Geometry(centre=centre, neighbour=neighbour, radial=radial, envelope=envelope, triplet_edge=triplet_edge,
                    triplet_neighbour=triplet_neighbour, triplet_basis=triplet_basis,
                    repulsion=torch.zeros(0, dtype=radial.dtype, device=radial.device))


def _prepare(model: JanusPotential, species, edge_index, edge_vectors, first, second):
    g = model.geometry(species, edge_index, edge_vectors, (first, second))
    return g.radial, g.envelope, g.triplet_basis, g.repulsion


def _prepare_vjp(model: JanusPotential, species, edge_index, edge_vectors, first, second, *cotangents):
    vectors = _leaf(edge_vectors)
    (gradient,) = _grads(list(_prepare(model, species, edge_index, vectors, first, second)), [vectors],
                         list(cotangents))
    return (gradient,)  # every function returns a tuple


def _layer_inputs(model: JanusPotential, index: int, x_owned, x_ghost, species_owned, leaves: bool):
    """(node features [O + G, F], the differentiable inputs) of layer `index`."""
    if index == 0:  # layer 0 embeds the species
        return model.embedding(torch.cat([x_owned, x_ghost])), []
    if leaves:
        x_owned, x_ghost = _leaf(x_owned), _leaf(x_ghost)
    return torch.cat([x_owned, x_ghost]), [x_owned, x_ghost]


def _layer(index: int):
    def forward(model: JanusPotential, x_owned, x_ghost, species_owned, *geometry):
        h, _ = _layer_inputs(model, index, x_owned, x_ghost, species_owned, leaves=False)
        return model.layers[index](h, model.embedding(species_owned), _layer_geometry(*geometry), x_owned.shape[0])
    return forward


def _layer_vjp(index: int):
    def vjp(model: JanusPotential, x_owned, x_ghost, species_owned, centre, neighbour, radial, envelope, triplet_edge,
            triplet_neighbour, triplet_basis, cotangent_owned, cotangent_ghost):
        h, h_leaves = _layer_inputs(model, index, x_owned, x_ghost, species_owned, leaves=True)
        float_leaves = [_leaf(radial), _leaf(envelope), _leaf(triplet_basis)]
        geometry = _layer_geometry(centre, neighbour, float_leaves[0], float_leaves[1], triplet_edge,
                                   triplet_neighbour, float_leaves[2])
        out, _, _ = model.layers[index](h, model.embedding(species_owned), geometry, x_owned.shape[0])
        grads = _grads([out], h_leaves + float_leaves, [torch.cat([cotangent_owned, cotangent_ghost])])
        if index == 0:
            return tuple(grads)
        return (torch.cat(grads[:2]), *grads[2:])
    return vjp


def _readout(model: JanusPotential, h_owned, species_owned, centre, repulsion):
    h, rep = _leaf(h_owned), _leaf(repulsion)
    empty = torch.zeros(0, dtype=h.dtype, device=h.device)
    geometry = Geometry(centre=centre, neighbour=centre, radial=empty, envelope=empty, triplet_edge=centre,
                        triplet_neighbour=centre, triplet_basis=empty, repulsion=rep)
    energies = model.readout(h, species_owned, geometry)
    grad_h, grad_repulsion = _grads([energies.sum()], [h, rep])
    return energies.detach(), grad_h, grad_repulsion


def _structure(model: JanusPotential, species, edge_index, edge_vectors, first, second):
    """A whole ghost-free structure in one function (the fast path of one process)."""
    vectors = _leaf(edge_vectors)
    geometry = model.geometry
    model.prepare = lambda s, ei, ev: geometry(s, ei, ev, (first, second))
    try:
        energies, routing = atom_energies(model, species, edge_index, vectors)
    finally:
        del model.prepare
    (gradient,) = _grads([energies.sum()], [vectors])
    forces = forces_from_edge_gradient(gradient, edge_index, species.shape[0])
    # one structure: the virial is a sum over edges (no index_add into a [1, 3, 3] tensor)
    virial = -(vectors.detach().unsqueeze(2) * gradient.unsqueeze(1)).sum(dim=0)
    return (energies.detach(), forces, 0.5 * (virial + virial.transpose(0, 1)), routing.probability_sum.detach(),
            routing.expert_load.detach())


class _Traced(nn.Module):
    """`body(model, *inputs)` with the weights as inputs, for make_fx."""

    def __init__(self, model: JanusPotential, body: Callable) -> None:
        super().__init__()
        self.model, self.body = model, body
        self.names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]

    def forward(self, weights: List[torch.Tensor], *inputs: torch.Tensor):
        with torch.enable_grad(), torch.nn.utils.stateless._reparametrize_module(
                self.model, dict(zip(self.names, weights))):
            return self.body(self.model, *inputs)


class _Packaged(nn.Module):
    """A traced graph with the weights as buffers: torch.export stores them in the package."""

    def __init__(self, graph: nn.Module, weights: List[torch.Tensor]) -> None:
        super().__init__()
        self.graph = graph
        self.count = len(weights)
        for k, tensor in enumerate(weights):
            self.register_buffer(f"w{k}", tensor.detach().clone())

    def forward(self, *inputs: torch.Tensor):
        return self.graph([getattr(self, f"w{k}") for k in range(self.count)], *inputs)


def _compile(model: JanusPotential, body: Callable, inputs: Tuple[torch.Tensor, ...], dims: Tuple[Dict[int, Any], ...],
             options: Dict[str, Any]) -> List[Any]:
    """make_fx -> torch.export -> AOTInductor: the function's compiled files."""
    from torch.fx.experimental.proxy_tensor import make_fx

    weights = [p.detach() for p in model.parameters()] + list(model.buffers())
    with torch.fx.experimental._config.patch(use_duck_shape=False):
        traced = make_fx(_Traced(model, body), tracing_mode="symbolic")(weights, *inputs)
    program = torch.export.export(_Packaged(traced, weights), inputs, dynamic_shapes={"inputs": dims}, strict=False)
    files = torch._inductor.aot_compile(program.module(check_guards=False), inputs,
                                        options=dict(options, **{"aot_inductor.package": True}))
    return files


def _example(model: JanusPotential, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """A structure to trace with (its sizes become symbols): 64 atoms of diamond Si (the
    supported element nearest to Si), every atom owned, two padding ghosts."""
    from ase.build import bulk

    from .graph import build_graph

    element = min(model.supported_elements(), key=lambda z: abs(z - 14))
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 2, 2))
    atoms.set_atomic_numbers([element] * len(atoms))
    graph = build_graph(atoms, model.cutoff, dtype=dtype)
    vectors = graph.edge_vectors()
    first, second = model.geometry.triplets(graph.edge_index, vectors)
    return {"species": graph.species, "edge_index": graph.edge_index, "edge_vectors": vectors, "first": first,
            "second": second}


def export_aoti(model: JanusPotential, path: str | os.PathLike, dtype: str = "float32",
                provenance: Optional[Dict[str, Any]] = None, head: Optional[str] = None,
                block: int = EXPORT_DISPATCH_BLOCK, progress: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Compile `model` in `dtype` into a per-layer AOTInductor package at `path` (atomically):
    the metadata of a TorchScript export with format "janus-aoti" and the function names."""
    from torch.export import Dim

    from .export import export_metadata, exported_copy

    ops.available()
    model, exported = exported_copy(model, dtype, head)
    for layer in exported.layers:
        layer.moe.dispatch_block = block
    metadata = export_metadata(model, dtype, provenance)
    names = function_names(exported.num_interactions)
    metadata.update(format="janus-aoti", format_version=AOTI_FORMAT_VERSION,
                    three_body_cutoff=exported.three_body_cutoff, dispatch_block=block, functions=names)
    options = {"aot_inductor.metadata": {METADATA_KEY: json.dumps(metadata)}}

    x = _example(exported, DTYPES[dtype])
    atoms, edges, trip, owned, ghosts = (Dim(n, min=MIN_SIZE) for n in ("atoms", "edges", "triplets", "owned", "ghosts"))
    with torch.no_grad():
        radial, envelope, triplet_basis, repulsion = _prepare(exported, x["species"], x["edge_index"],
                                                              x["edge_vectors"], x["first"], x["second"])
    centre, neighbour = x["edge_index"][0].clone(), x["edge_index"][1].clone()
    triplet_neighbour = neighbour.index_select(0, x["second"])
    geometry = (centre, neighbour, radial, envelope, x["first"], triplet_neighbour, triplet_basis)
    geometry_dims = ({0: edges}, {0: edges}, {0: edges}, {0: edges}, {0: trip}, {0: trip}, {0: trip})
    # every example input its own tensor: torch.export treats one tensor passed twice as one input
    species_owned, species_ghost = x["species"], torch.zeros(MIN_SIZE, dtype=torch.long)

    def rows(n: int) -> torch.Tensor:
        return torch.randn(n, exported.features, dtype=DTYPES[dtype])

    h_owned, h_ghost = rows(len(species_owned)), rows(MIN_SIZE)
    prepare_inputs = (x["species"], x["edge_index"], x["edge_vectors"], x["first"], x["second"])
    prepare_dims = ({0: atoms}, {1: edges}, {0: edges}, {0: trip}, {0: trip})
    cotangent_dims = ({0: edges}, {0: edges}, {0: trip}, {0: edges})
    work: Dict[str, Tuple[Callable, tuple, tuple]] = {
        "prepare": (_prepare, prepare_inputs, prepare_dims),
        "prepare_vjp": (_prepare_vjp, prepare_inputs + (radial, envelope, triplet_basis, repulsion),
                        prepare_dims + cotangent_dims),
        "structure": (_structure, prepare_inputs, prepare_dims),
        "readout": (_readout, (h_owned, species_owned, centre.clone(), repulsion),
                    ({0: owned}, {0: owned}, {0: edges}, {0: edges})),
    }
    for index in range(exported.num_interactions):
        first_inputs = (species_owned.clone(), species_ghost) if index == 0 else (h_owned, h_ghost)
        inputs = first_inputs + (species_owned,) + geometry
        dims = ({0: owned}, {0: ghosts}, {0: owned}) + geometry_dims
        work[f"layer_{index}"] = (_layer(index), inputs, dims)
        work[f"layer_{index}_vjp"] = (_layer_vjp(index), inputs + (rows(len(species_owned)), rows(MIN_SIZE)),
                                      dims + ({0: owned}, {0: ghosts}))

    from torch._inductor.package import package_aoti

    files: Dict[str, List[Any]] = {}
    for k, name in enumerate(names):
        if progress is not None:
            progress(f"compiling {name} ({k + 1}/{len(names)})")
        body, inputs, dims = work[name]
        files[name] = _compile(exported, body, inputs, dims, options)
    tmp = f"{os.fspath(path)}.tmp.pt2"
    package_aoti(tmp, files)
    os.replace(tmp, path)  # the compiled files stay in inductor's cache directory, which it manages
    return metadata


def is_aoti_file(path: str | os.PathLike) -> bool:
    """A zip archive with AOTInductor's entries."""
    try:
        with zipfile.ZipFile(os.fspath(path)) as archive:
            return any("/data/aotinductor/" in n for n in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


# ------------------------------------------------------------------- the loaded package
class _Function(torch.autograd.Function):
    """One compiled function with its VJP function as backward (first derivatives only)."""

    @staticmethod
    def forward(ctx, run, vjp, n_outputs: int, *tensors):
        """`run(*tensors)`'s first `n_outputs` outputs; `vjp(tensors, cotangents)` gives one
        gradient (or None) per tensor."""
        ctx.vjp, ctx.inputs = vjp, tensors
        return tuple(run(*tensors)[:n_outputs])

    @staticmethod
    def backward(ctx, *cotangents):
        return (None, None, None, *ctx.vjp(ctx.inputs, cotangents))


class PackagedPotential(nn.Module):
    """A loaded `.pt2` package with the methods of an exported TorchScript module (module
    docstring): `prepare`, `embed`, `interaction`, `readout`; `cutoff`, `three_body_cutoff`,
    `num_interactions`, `features`, `elements` (atomic numbers), `dtype`, `metadata`."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        from ase.data import atomic_numbers
        from torch._inductor.package import load_package

        path = os.fspath(path)
        if not is_aoti_file(path):
            raise JanusInputError(f"{path!r} is not an AOTInductor package (.pt2)")
        ops.available()  # the package calls the fused operators
        try:
            first = load_package(path, "prepare")
            metadata = json.loads(first.get_metadata()[METADATA_KEY])
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise JanusInputError(f"cannot load model package {path!r} (a package of an older format version "
                                  f"{AOTI_FORMAT_VERSION - 1}, or corrupt?): {reason}") from exc
        if metadata.get("format") != "janus-aoti" or metadata.get("format_version") != AOTI_FORMAT_VERSION:
            raise JanusInputError(f"{path!r} is not a Janus package of format version {AOTI_FORMAT_VERSION}; "
                                  "re-export it with this version")
        self.metadata = metadata
        self.cutoff = float(metadata["cutoff"])
        self.three_body_cutoff = float(metadata["three_body_cutoff"])
        self.num_interactions = int(metadata["num_interactions"])
        self.features = int(metadata["features"])
        self.elements = [atomic_numbers[s] for s in metadata["elements"]]
        self.dtype = DTYPES[metadata["dtype"]]
        self.functions = {name: (first if name == "prepare" else load_package(path, name))
                          for name in metadata["functions"]}
        self.register_buffer("_dtype", torch.zeros(0, dtype=self.dtype), persistent=False)  # devices.module_device

    def _run(self, name: str) -> Callable:
        function = self.functions[name]
        return lambda *inputs: function(*[t.contiguous() for t in inputs])

    @staticmethod
    def _check(sizes: Dict[str, int]) -> None:
        small = [f"{n} {name}" for name, n in sizes.items() if n < MIN_SIZE]
        if small:
            raise JanusInputError(f"the compiled package needs at least {MIN_SIZE} atoms, edges and triplets; this "
                                  f"structure has {', '.join(small)}: use the TorchScript export for it")

    def evaluate_structure(self, species: torch.Tensor, edge_index: torch.Tensor, edge_vectors: torch.Tensor,
                           volume: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """`janus_potential.model.evaluate` of one ghost-free structure in one call of the
        `structure` function (its fast path for packages): energy [1] (float64), atom
        energies, forces, virial [1, 3, 3], routing sums and, given the volume, stress."""
        first, second = triplets(edge_index, edge_vectors, self.three_body_cutoff)
        self._check({"atoms": species.shape[0], "edges": edge_index.shape[1], "triplets": first.shape[0]})
        energies, forces, virial, probability_sum, load = self._run("structure")(
            species, edge_index, edge_vectors.detach(), first, second)
        out = {"energy": energies.to(torch.float64).sum().reshape(1), "atom_energies": energies, "forces": forces,
               "virial": virial.unsqueeze(0), "router_probability_sum": probability_sum, "expert_load": load}
        if volume is not None:
            out["stress"] = stress_from_virial(out["virial"], volume)
        return out

    # the layer sequence of JanusPotential (model.py), on the package's functions
    def prepare(self, species: torch.Tensor, edge_index: torch.Tensor, edge_vectors: torch.Tensor) -> Geometry:
        first, second = triplets(edge_index, edge_vectors, self.three_body_cutoff)
        self._check({"atoms": species.shape[0], "edges": edge_index.shape[1], "triplets": first.shape[0]})
        prepare_vjp = self._run("prepare_vjp")

        def vjp(inputs, cotangents):
            zeros = [c if c is not None else torch.zeros_like(o) for c, o in zip(cotangents, out)]
            return (None, None, prepare_vjp(*inputs, *zeros)[0], None, None)

        out = _Function.apply(self._run("prepare"), vjp, 4, species, edge_index, edge_vectors, first, second)
        centre, neighbour = edge_index[0], edge_index[1]
        return Geometry(centre=centre, neighbour=neighbour, radial=out[0], envelope=out[1], triplet_edge=first,
                        triplet_neighbour=neighbour.index_select(0, second), triplet_basis=out[2], repulsion=out[3])

    def embed(self, species: torch.Tensor) -> torch.Tensor:
        return species  # layer 0 embeds (module docstring)

    def interaction(self, index: int, h: torch.Tensor, species: torch.Tensor, geometry: Geometry,
                    num_owned: int = -1) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n_all = h.shape[0]
        owned = n_all if num_owned < 0 else num_owned
        pad = max(0, MIN_SIZE - (n_all - owned))  # two padding ghosts no edge touches
        x_owned, x_ghost = h[:owned], h[owned:]
        if pad:
            x_ghost = torch.cat([x_ghost, torch.zeros((pad,) + tuple(h.shape[1:]), dtype=h.dtype, device=h.device)])
        self._check({"owned atoms": owned})
        g = geometry
        layer_geometry = (g.centre, g.neighbour, g.radial, g.envelope, g.triplet_edge, g.triplet_neighbour,
                          g.triplet_basis)
        layer_vjp = self._run(f"layer_{index}_vjp")

        def vjp(inputs, cotangents):
            cotangent = cotangents[0] if cotangents[0] is not None else torch.zeros(
                inputs[0].shape[0] + inputs[1].shape[0], self.features, dtype=self.dtype, device=h.device)
            grads = layer_vjp(*inputs, cotangent[:owned], cotangent[owned:])
            float_grads = grads[-3:]
            node = (None, None) if index == 0 else (grads[0][:owned], grads[0][owned:])
            return (*node, None, None, None, float_grads[0], float_grads[1], None, None, float_grads[2])

        out, probability_sum, load = _Function.apply(self._run(f"layer_{index}"), vjp, 3, x_owned, x_ghost,
                                                      species[:owned], *layer_geometry)
        return (out[:n_all] if pad else out), probability_sum, load

    def readout(self, h: torch.Tensor, species: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        readout = self._run("readout")
        centre = geometry.centre
        cached: Dict[str, torch.Tensor] = {}

        def run(*inputs):
            energies, cached["h"], cached["repulsion"] = readout(*inputs)
            return (energies,)

        def vjp(inputs, cotangents):  # block-diagonal Jacobian: the unit gradient scaled per atom
            g = cotangents[0]
            return (cached["h"] * g.unsqueeze(1), None, None, cached["repulsion"] * g.index_select(0, centre))

        (energies,) = _Function.apply(run, vjp, 1, h, species, centre, geometry.repulsion)
        return energies
