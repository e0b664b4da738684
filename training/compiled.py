"""The compiled training step (`run.compile: true`, issue 11).

Force training differentiates twice (forces are dE/dr; the loss on them is differentiated
again for the parameter gradient), and torch.compile's autograd cannot compile a double
backward. So the WHOLE step of one evaluation is traced into one graph that has no autograd
left in it:

    (parameters, buffers, batch tensors, triplets, loss ratios, balance coefficients)
        -> (loss terms, router probability sums, forces, parameter gradients)

by `make_fx(tracing_mode="symbolic")`, running the eager code itself (`model.compute`,
`training.loss.loss_terms`), and that graph is compiled with `torch.compile(dynamic=True)`.
What stays outside the graph is what has data-dependent sizes or needs the other ranks:

* the triplet list (`GeometryBuilder.triplets`, integer indices computed from the edge
  lengths before the step; the traced geometry takes them as an input),
* the MoE dispatch of the traced graph uses the shape-stable blocked layout
  (`MixtureOfExperts.dispatch_block`), whose sizes depend on the number of atoms only,
* the expert loads of the load-balancing loss: routing depends on the element only
  (`router_uses_features: false`, the default), so the trainer computes the loads from the
  species before the step (`expert_loads`), sums them over the ranks, and passes the
  balance loss's coefficients E * f_e / atoms as an input (the loss is linear in the router
  probabilities),
* the loss ratios of the data-parallel split (label counts summed over the ranks), times
  the weight factors of the loss's stage (`LossConfig.factors`: a second stage is no new graph),
* with expert parallelism, each sharded layer's dispatch plan (`parallel.expert.ExpertPlan`:
  every atom's experts, the slots sent to and received from each rank, the local expert of
  each received row), made from the species before the step by exchanging the counts; the
  exchange of the rows themselves is an operator (`parallel.expert.exchange`) inside the graph,
  its backward the same exchange reversed, so the graph holds the dispatch, the combine and
  their first and second derivatives. The exchanges are chained by a token in the order of
  tracing (`ordered_exchanges`: a compiler orders operators by data dependence alone, and on a
  rank that receives no rows the combine does not depend on the dispatch). Every rank traces
  and compiles its own graph (no collective runs while tracing: the operator's shape function
  only reads the plan's sizes).

Sizes (atoms, edges, triplets, structures) stay symbols: a new batch shape reuses the
graph. `make_fx` records what it assumed about the symbols (the ShapeEnv's guards, e.g.
a size specialised because it was 0 or 1 in the traced batch); every call checks them and
traces again when they fail, so a graph is never run outside what it was traced for. The
compiled graphs are counted (`CompiledStep.compiles`, `compile_seconds`) and the trainer logs
them.

Exactness: tests/test_compiled.py checks compiled = eager for energies, forces, stress and
every parameter gradient (float64 1e-10), and a compiled `janus train` run (one process and
dp=2 and ep=2) against the eager one. Domain decomposition stays eager: its halo exchange
sits between the layers of a per-structure decomposition whose sizes are built inside the
model; `run.compile` refuses `parallel.dd > 1` with a clear error.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from janus_potential.errors import JanusInputError
from janus_potential.graph import AtomGraph
from janus_potential.parallel.expert import ExpertParallelMoE, ExpertPlan, expert_plans, ordered_exchanges

from .config import LossConfig
from .data import Batch
from .loss import loss_terms

DISPATCH_BLOCK = 32  # rows per block of the traced MoE dispatch (nn/moe.py)
GRAPH_FIELDS = ("species", "positions", "cell", "pbc", "edge_index", "edge_shift", "batch", "num_atoms")
LABEL_FIELDS = ("energy", "forces", "stress", "has_energy", "has_forces", "has_stress", "weight")
OPTIONAL_FIELDS = ("replay", "head", "force_rms")


def check_compilable(model: nn.Module) -> None:
    """A clear error for models the compiled step cannot trace."""
    for layer in getattr(model, "layers", []):
        moe = layer.moe
        if moe.router_uses_features:
            raise JanusInputError("run.compile needs element-only routing (model router_uses_features: false): "
                                  "set run.compile: false")


def expert_loads(model: nn.Module, species: torch.Tensor) -> torch.Tensor:
    """[L, E] atom-slots routed to each expert of each layer, as the MoE layers report them
    (`Routing.expert_load`), from the species alone (element-only routing)."""
    with torch.no_grad():
        element_embedding = model.embedding(species)
        loads = []
        for layer in model.layers:
            moe = layer.moe
            expert_index, _, _ = moe.route(element_embedding, element_embedding)
            flat = expert_index.reshape(-1)
            loads.append(torch.zeros(moe.num_experts, dtype=torch.float64, device=flat.device).index_add_(
                0, flat, torch.ones(flat.shape[0], dtype=torch.float64, device=flat.device)))
        return torch.stack(loads)


def _flatten(batch: Batch) -> Dict[str, torch.Tensor]:
    tensors = {f"graph.{name}": getattr(batch.graph, name) for name in GRAPH_FIELDS}
    tensors.update({name: getattr(batch, name) for name in LABEL_FIELDS})
    tensors.update({name: getattr(batch, name) for name in OPTIONAL_FIELDS if getattr(batch, name) is not None})
    return tensors


def _unflatten(tensors: Dict[str, torch.Tensor]) -> Batch:
    graph = AtomGraph(**{name: tensors[f"graph.{name}"] for name in GRAPH_FIELDS})
    return Batch(graph=graph, sources=[], files=[], **{name: tensors[name] for name in LABEL_FIELDS},
                 **{name: tensors.get(name) for name in OPTIONAL_FIELDS})


class _Step(nn.Module):
    """The traced function: one evaluation's loss and its parameter gradients."""

    def __init__(self, model: nn.Module, config: LossConfig, compute_virial: bool, trainable: List[str]) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.compute_virial = compute_virial
        self.trainable = trainable
        self.unused: List[bool] = []  # parameters without a gradient (found while tracing)

    def forward(self, params: List[torch.Tensor], buffers: List[torch.Tensor], tensors: Dict[str, torch.Tensor],
                triplets: Tuple[torch.Tensor, torch.Tensor], ratios: torch.Tensor,
                coefficients: torch.Tensor, plans: List[Tuple[torch.Tensor, ...]],
                token: torch.Tensor) -> Tuple[Any, ...]:
        model, config = self.model, self.config
        names = self.trainable
        params = [p.detach().requires_grad_(True) for p in params]
        state = dict(zip(names, params))
        state.update(zip([n for n, _ in model.named_buffers()], buffers))
        batch = _unflatten(tensors)
        geometry = model.geometry
        with torch.enable_grad(), torch.nn.utils.stateless._reparametrize_module(model, state):
            # the geometry of the traced graph takes the triplets computed outside it
            model.prepare = lambda species, edge_index, edge_vectors: geometry(species, edge_index, edge_vectors,
                                                                               triplets)
            # expert parallelism: each sharded layer takes its dispatch plan from the inputs
            sharded = [layer.moe for layer in model.layers if isinstance(layer.moe, ExpertParallelMoE)]
            for moe, plan in zip(sharded, plans):
                moe.plan = ExpertPlan(*plan)
            # every exchange of the step (forward, force pass, parameter gradient) in one chain
            with ordered_exchanges(token) as order:
                try:
                    prediction = model.compute(batch.graph, compute_virial=self.compute_virial, create_graph=True,
                                               head=batch.head)
                finally:
                    del model.prepare
                    for moe in sharded:
                        moe.plan = None
                terms = loss_terms(prediction, batch, config)
                total = (ratios[0] * config.energy_weight * terms["energy"]
                         + ratios[1] * config.forces_weight * terms["forces"])
                if "stress" in terms:
                    total = total + ratios[2] * config.stress_weight * terms["stress"]
                probability_sum = prediction["router_probability_sum"]
                balance = (coefficients.to(probability_sum.dtype) * probability_sum).sum()
                grads = torch.autograd.grad(total + config.balance_weight * balance, params, allow_unused=True)
        self.unused = [g is None for g in grads]
        values = torch.stack([terms["energy"], terms["forces"], terms.get("stress", torch.zeros_like(terms["energy"])),
                              balance.to(terms["energy"].dtype)]).detach()
        return (values, probability_sum.detach(), prediction["forces"].detach(),
                [g for g in grads if g is not None], order.token)


class CompiledStep:
    """Traced and compiled evaluation + loss + parameter gradient of the training step
    (module docstring). `compile=False` runs the traced graph without compiling it (tests)."""

    def __init__(self, model: nn.Module, config: LossConfig, compile: bool = True,
                 block: int = DISPATCH_BLOCK, announce: Optional[Callable[[str], None]] = None) -> None:
        check_compilable(model)
        self.announce = announce  # told why each graph is traced (a pause of a minute or more follows)
        self.reasons: List[str] = []
        self.model = model
        self.config = config
        self.compile = compile
        for layer in model.layers:
            layer.moe.dispatch_block = block
        self.graphs: List[Dict[str, Any]] = []
        self.compiles = 0
        self.compile_seconds = 0.0

    def _trainable(self) -> List[Tuple[str, nn.Parameter]]:
        return [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]

    def _arguments(self, batch: Batch, ratios: torch.Tensor, coefficients: torch.Tensor) -> tuple:
        graph = batch.graph
        triplets = self.model.geometry.triplets(graph.edge_index, graph.edge_vectors().detach())
        params = [p.detach() for _, p in self._trainable()]
        buffers = [b for _, b in self.model.named_buffers()]
        plans = [tuple(plan) for plan in expert_plans(self.model, graph.species)]
        return (params, buffers, _flatten(batch), triplets, ratios, coefficients, plans, torch.zeros(1))

    def _key(self, batch: Batch, compute_virial: bool) -> tuple:
        return (compute_virial, tuple(sorted(_flatten(batch))), tuple(name for name, _ in self._trainable()),
                batch.graph.positions.dtype, batch.graph.positions.device.type)

    def _find(self, key: tuple, args: tuple) -> Optional[Dict[str, Any]]:
        flat = torch.utils._pytree.tree_leaves(args)
        for entry in self.graphs:
            if entry["key"] == key and entry["shape_env"].evaluate_guards_for_args(
                    entry["placeholders"], flat, ignore_static=False):
                return entry
        return None

    def _reason(self, key: tuple, batch: Batch) -> str:
        if not self.graphs:
            return "first step"
        if all(entry["key"] != key for entry in self.graphs):
            return "a batch of another kind (labels, fields or trainable parameters)"
        sizes = (f"{batch.graph.num_graphs} structures, {batch.graph.species.shape[0]} atoms, "
                 f"{batch.graph.edge_index.shape[1]} edges")
        return f"a batch outside the traced graphs' assumptions ({sizes})"

    def _trace(self, key: tuple, args: tuple, compute_virial: bool) -> Dict[str, Any]:
        start = time.perf_counter()
        step = _Step(self.model, self.config, compute_virial, [name for name, _ in self._trainable()])
        # no duck sizing: two sizes equal by chance in the traced batch stay two symbols
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            graph_module = make_fx(step, tracing_mode="symbolic")(*args)
        placeholders = [node.meta["val"] for node in graph_module.graph.nodes if node.op == "placeholder"]
        shape_env = next(v.fake_mode.shape_env for v in placeholders if isinstance(v, torch.Tensor))
        function = torch.compile(graph_module, dynamic=True) if self.compile else graph_module
        entry = {"key": key, "placeholders": placeholders, "shape_env": shape_env, "function": function,
                 "graph_module": graph_module,
                 "unused": list(step.unused), "compiled": False, "trace_seconds": time.perf_counter() - start}
        self.graphs.append(entry)
        return entry

    def _first_call(self, entry: Dict[str, Any], args: tuple) -> Any:
        """The first call compiles the graph. Inductor's CPU code generator fails on some
        graphs (torch 2.13: a float64 scatter-add into a one-element tensor, which a batch of
        ONE structure traces, asserts in its vectorised store); such a graph is compiled
        again without vectorisation, and failing that runs as traced (exact, uncompiled)."""
        if not self.compile:
            return entry["function"](*args)
        try:
            return entry["function"](*args)
        except Exception as exc:  # inductor's failures come as several exception types
            first = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else exc.__class__.__name__
        if self.announce is not None:
            self.announce(f"the compiler failed on graph {len(self.graphs)} ({first}); compiling it without "
                          "vectorisation")
        entry["function"] = torch.compile(entry["graph_module"], dynamic=True, options={"cpp.simdlen": 1})
        try:
            return entry["function"](*args)
        except Exception as exc:
            if self.announce is not None:
                self.announce(f"the compiler failed again ({exc.__class__.__name__}); graph {len(self.graphs)} "
                              "runs uncompiled")
        entry["function"] = entry["graph_module"]
        return entry["function"](*args)

    def __call__(self, batch: Batch, compute_virial: bool, ratios: torch.Tensor,
                 coefficients: torch.Tensor) -> Dict[str, Any]:
        """Loss terms (energy, forces, stress; unweighted, as `loss_terms` gives them), the
        balance term sum(coefficients * P), the router probability sums P [L, E], the
        forces, and each trainable parameter's gradient of
        sum_k ratios[k] * weight_k * term_k + balance_weight * balance (None where unused)."""
        args = self._arguments(batch, ratios, coefficients)
        key = self._key(batch, compute_virial)
        entry = self._find(key, args)
        if entry is None:
            reason = self._reason(key, batch)
            self.reasons.append(reason)
            if self.announce is not None:
                self.announce(f"compiling the training step, graph {len(self.graphs) + 1} ({reason})")
            entry = self._trace(key, args, compute_virial)
        start = time.perf_counter()
        if entry["compiled"]:
            values, probability_sum, forces, grads, _ = entry["function"](*args)
        else:
            values, probability_sum, forces, grads, _ = self._first_call(entry, args)
        if not entry["compiled"]:  # the first call of a graph compiles it
            entry["compiled"] = True
            self.compiles += 1
            self.compile_seconds += entry["trace_seconds"] + time.perf_counter() - start
        grads = iter(grads)
        gradients = [None if unused else next(grads) for unused in entry["unused"]]
        return {"energy": values[0], "forces": values[1], "stress": values[2], "balance": values[3],
                "router_probability_sum": probability_sum, "forces_prediction": forces,
                "gradients": dict(zip([name for name, _ in self._trainable()], gradients))}
