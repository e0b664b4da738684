"""`JanusPotential`: the invariant message-passing MoE potential.

The model is one TorchScript-compatible module with small methods that every front end
calls in the same order (DESIGN.md, one code path):

    geometry = model.prepare(species, edge_index, edge_vectors)  # basis, triplets, ZBL: once
    h = model.embed(species)
    for l in range(L): h = model.interaction(l, h, species, geometry); <halo exchange>
    atom_energy = model.readout(h[:n_owned], species[:n_owned], geometry)

One Python function runs that sequence for every Python front end, `run_layers` (with
`atom_energies` and `evaluate` around it), on an eager model or an exported one alike:
on a ghost-free graph (single process, periodic images carried by edge shifts) and on a
domain with ghosts (`parallel.DomainModel`, with its halo exchange). `evaluate` returns
energies, forces, virial and stress from ONE autograd pass of the energy with respect to
the edge vectors (`outputs_from_edge_gradient`). The LAMMPS plugin runs the same methods
from C++ with LAMMPS's communication between layers.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from .config import ModelConfig
from .errors import JanusInputError
from .integrity import save_payload
from .io import MODEL_CHECKPOINT_FORMAT, MODEL_CHECKPOINT_VERSION
from .nn.geometry import Geometry, GeometryBuilder
from .nn.autocast import autocast_readout
from .nn.interaction import InteractionLayer
from .nn.embedding import ElementEmbedding



DTYPES = {"float32": torch.float32, "float64": torch.float64}  # the one dtype table


def edge_vectors(positions: torch.Tensor, edge_index: torch.Tensor, shift_vectors: torch.Tensor) -> torch.Tensor:
    """r_ij = x_j - x_i + (periodic image shift, in Angstrom): every front end's edge vectors."""
    return positions.index_select(0, edge_index[1]) - positions.index_select(0, edge_index[0]) + shift_vectors


def forces_from_edge_gradient(
    edge_gradient: torch.Tensor, edge_index: torch.Tensor, num_nodes: int
) -> torch.Tensor:
    """F_i += dE/dr_ij and F_j -= dE/dr_ij for every edge (r_ij = x_j - x_i)."""
    forces = torch.zeros(num_nodes, 3, dtype=edge_gradient.dtype, device=edge_gradient.device)
    forces = forces.index_add(0, edge_index[0], edge_gradient)
    return forces.index_add(0, edge_index[1], -edge_gradient)


def virial_from_edge_gradient(
    edge_gradient: torch.Tensor, edge_vectors: torch.Tensor, edge_graph: torch.Tensor, num_graphs: int
) -> torch.Tensor:
    """W = -sum_edges r_ij (x) dE/dr_ij per graph, symmetrised ([G, 3, 3]); stress = -W / V."""
    outer = -(edge_vectors.unsqueeze(2) * edge_gradient.unsqueeze(1))
    virial = torch.zeros(num_graphs, 3, 3, dtype=edge_gradient.dtype, device=edge_gradient.device)
    virial = virial.index_add(0, edge_graph, outer)
    return 0.5 * (virial + virial.transpose(1, 2))


def stress_from_virial(virial: torch.Tensor, volumes: torch.Tensor) -> torch.Tensor:
    """Stress (ASE sign: positive is tensile, eV/A^3) = -W / V, for [G, 3, 3] or [3, 3]. A zero
    volume (a frame without a cell, whose stress is masked out) gives huge values, never
    inf: the gradient through a masked-out inf would be NaN."""
    return -virial / volumes.to(virial.dtype).clamp(min=1e-12).reshape(virial.shape[:-2] + (1, 1))


class Routing(NamedTuple):
    """What the MoE layers report for the trainer, per layer ([L, E] each): the sum over owned
    atoms of the router probabilities (differentiable) and the atom-slots routed to each
    expert (`nn.moe.balance_loss` turns them into the load-balancing loss)."""

    probability_sum: torch.Tensor
    expert_load: torch.Tensor


def run_layers(model, h: torch.Tensor, species: torch.Tensor, geometry: Geometry, num_owned: int = -1,
               exchange: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Tuple[torch.Tensor, Routing]:
    """The layer sequence of every Python front end: interaction_l, then the halo exchange
    of the ghost rows after every layer but the last (the readout needs owned rows only).
    `model` is a `JanusPotential` or an exported (scripted) one; `exchange` is None for a
    ghost-free graph. The LAMMPS plugin's C++ loop follows the same rule."""
    probability_sums, loads = [], []
    for layer in range(model.num_interactions):
        h, probability_sum, load = model.interaction(layer, h, species, geometry, num_owned)
        probability_sums.append(probability_sum)
        loads.append(load)
        if exchange is not None and layer + 1 < model.num_interactions:
            h = exchange(h)
    return h, Routing(torch.stack(probability_sums), torch.stack(loads))


def atom_energies(model, species: torch.Tensor, edge_index: torch.Tensor, edge_vectors: torch.Tensor,
                  num_owned: int = -1,
                  exchange: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                  atom_head: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Routing]:
    """Energies of the owned atoms (all atoms of a ghost-free graph) and the MoE routing:
    prepare, embed, the layers, readout (per atom through `atom_head` in a multi-head model)."""
    geometry = model.prepare(species, edge_index, edge_vectors)
    h, routing = run_layers(model, model.embed(species), species, geometry, num_owned, exchange)
    owned = species.shape[0] if num_owned < 0 else num_owned
    if atom_head is not None:
        return model.readout_heads(h[:owned], species[:owned], geometry, atom_head[:owned]), routing
    return model.readout(h[:owned], species[:owned], geometry), routing


def outputs_from_edge_gradient(edge_gradient: torch.Tensor, edge_vectors: torch.Tensor, edge_index: torch.Tensor,
                               num_atoms: int, edge_graph: torch.Tensor, num_graphs: int,
                               volumes: Optional[torch.Tensor] = None, compute_forces: bool = True,
                               compute_virial: bool = True) -> Dict[str, torch.Tensor]:
    """Forces [num_atoms, 3], virial [G, 3, 3] and, given the cell volumes, stress: the one
    function from dE/d(edge vectors) to what every front end reports."""
    result: Dict[str, torch.Tensor] = {}
    if compute_forces:
        result["forces"] = forces_from_edge_gradient(edge_gradient, edge_index, num_atoms)
    if compute_virial:
        result["virial"] = virial_from_edge_gradient(edge_gradient, edge_vectors, edge_graph, num_graphs)
        if volumes is not None:
            result["stress"] = stress_from_virial(result["virial"], volumes)
    return result


def evaluate(model, species: torch.Tensor, edge_index: torch.Tensor, edge_vectors: torch.Tensor,
             batch: torch.Tensor, num_graphs: int, compute_forces: bool = True, compute_virial: bool = True,
             create_graph: bool = False, volumes: Optional[torch.Tensor] = None,
             head: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Energies [G] (float64), atom energies [N], forces [N, 3], virial [G, 3, 3] and (given
    the volumes) stress of a ghost-free graph, from ONE autograd pass of the energy with
    respect to the edge vectors, and the MoE routing sums ([L, E]: `router_probability_sum`,
    `expert_load`). `model`: a `JanusPotential` or an exported one; `head` [G]: the output
    head of each structure of a multi-head model (None: head 0)."""
    structure = getattr(model, "evaluate_structure", None)  # a compiled package's one-structure function
    if structure is not None and num_graphs == 1 and head is None and not create_graph:
        return structure(species, edge_index, edge_vectors, volumes)
    if (compute_forces or compute_virial) and not edge_vectors.requires_grad:
        edge_vectors = edge_vectors.detach().requires_grad_(True)
    atom_head = head.index_select(0, batch) if head is not None else None
    atom_energy, routing = atom_energies(model, species, edge_index, edge_vectors, atom_head=atom_head)
    energy = torch.zeros(num_graphs, dtype=torch.float64, device=atom_energy.device)
    energy = energy.index_add(0, batch, atom_energy.to(torch.float64))
    result = {"energy": energy, "atom_energies": atom_energy, "router_probability_sum": routing.probability_sum,
              "expert_load": routing.expert_load}
    if compute_forces or compute_virial:
        (edge_gradient,) = torch.autograd.grad([atom_energy.sum()], [edge_vectors], create_graph=create_graph,
                                               allow_unused=True)
        if edge_gradient is None:
            edge_gradient = torch.zeros_like(edge_vectors)
        result.update(outputs_from_edge_gradient(
            edge_gradient, edge_vectors, edge_index, species.shape[0], batch.index_select(0, edge_index[0]),
            num_graphs, volumes, compute_forces, compute_virial))
    return result


class JanusPotential(nn.Module):
    def __init__(self, config: Optional[ModelConfig] = None) -> None:
        super().__init__()
        config = config or ModelConfig()
        self.config = config
        self.cutoff = float(config.cutoff)
        self.three_body_cutoff = float(config.three_body_cutoff)
        self.num_interactions = int(config.num_interactions)
        self.features = int(config.features)
        n_species = config.max_atomic_number + 1
        self.embedding = (ElementEmbedding(n_species, config.features) if config.element_features
                          else nn.Embedding(n_species, config.features))
        self.geometry = GeometryBuilder(
            config.cutoff, config.num_radial, config.three_body_cutoff, config.num_three_body_radial,
            config.angular_order, config.zbl, (config.zbl_switch_on, config.zbl_switch_off), config.max_atomic_number,
        )
        three_body_basis = (config.angular_order + 1) * config.num_three_body_radial
        self.layers = nn.ModuleList(
            [
                InteractionLayer(
                    config.features, config.num_radial, config.three_body_features, three_body_basis, config.num_heads,
                    config.filter_groups,
                    config.num_experts, config.experts_per_atom, config.expert_hidden,
                    config.shared_expert_hidden, config.router_uses_features, config.logit_cap,
                    config.router_scale, config.attention_norm,
                )
                for _ in range(config.num_interactions)
            ]
        )
        self.readout_mlp = self._readout_mlp(config)
        self.low_precision = False  # bf16 autocast of the readout MLP (janus_potential.precision)
        self.register_buffer("reference_energies", torch.zeros(n_species))
        self.register_buffer("energy_scale", torch.ones(()))
        # heads 1.. of a multi-head model (head 0 is the readout above); `select_head` makes a
        # plain model of one head, which is what gets exported
        extra = max(0, len(config.output_heads) - 1)
        if extra:
            self.head_readout_mlps = nn.ModuleList([self._readout_mlp(config) for _ in range(extra)])
            self.register_buffer("head_reference_energies", torch.zeros(extra, n_species))
            self.register_buffer("head_energy_scale", torch.ones(extra))
        self.register_buffer("supported", torch.ones(n_species, dtype=torch.bool).index_fill(0, torch.tensor([0]), False))

    # ----------------------------------------------------------------- construction
    @staticmethod
    def _readout_mlp(config: ModelConfig) -> nn.Module:
        return nn.Sequential(
            nn.LayerNorm(config.features), nn.Linear(config.features, config.readout_hidden), nn.SiLU(),
            nn.Linear(config.readout_hidden, 1),
        )

    @torch.jit.unused
    def select_head(self, name: str) -> "JanusPotential":
        """A plain (one-head) model of output head `name`: the shared body with that head's
        readout, energy scale and reference energies. What `janus export --head` writes."""
        heads = list(self.config.output_heads)
        if name not in heads:
            raise JanusInputError(f"the model has no output head {name!r}; its heads: {', '.join(heads) or 'none'}")
        k = heads.index(name)
        plain = JanusPotential(dataclasses.replace(self.config, output_heads=())).to(self.embedding.weight.dtype)
        state = {key: value for key, value in self.state_dict().items() if not key.startswith("head_")}
        if k:
            for key, value in self.head_readout_mlps[k - 1].state_dict().items():
                state[f"readout_mlp.{key}"] = value
            state["reference_energies"] = self.head_reference_energies[k - 1]
            state["energy_scale"] = self.head_energy_scale[k - 1]
        plain.load_state_dict(state)
        plain.provenance = dict(getattr(self, "provenance", {}), head=name)
        return plain

    @classmethod
    def from_preset(cls, name: str = "small", **overrides: Any) -> "JanusPotential":
        return cls(ModelConfig.from_preset(name, **overrides))

    @torch.jit.unused
    def supported_elements(self) -> List[int]:
        return [int(z) for z in torch.nonzero(self.supported).reshape(-1).tolist()]

    @torch.jit.unused
    def parameter_report(self) -> Dict[str, int]:
        """Total parameters and parameters active for one atom (shared + top-k experts)."""
        total = sum(p.numel() for p in self.parameters())
        expert = 0
        for layer in self.layers:
            moe = layer.moe
            per_expert = (moe.w_in.numel() + moe.b_in.numel() + moe.w_out.numel() + moe.b_out.numel()) // moe.num_experts
            expert += per_expert * (moe.num_experts - moe.experts_per_atom)
        embedding_inactive = self.embedding.weight.numel() - self.embedding.weight.shape[1]
        return {"total_parameters": total, "active_parameters_per_atom": total - expert - embedding_inactive}

    # ----------------------------------------------------------------- the layer sequence
    @torch.jit.export
    def prepare(self, species: torch.Tensor, edge_index: torch.Tensor, edge_vectors: torch.Tensor) -> Geometry:
        return self.geometry(species, edge_index, edge_vectors)

    @torch.jit.export
    def embed(self, species: torch.Tensor) -> torch.Tensor:
        return self.embedding(species)

    @torch.jit.export
    def interaction(
        self, index: int, h: torch.Tensor, species: torch.Tensor, geometry: Geometry, num_owned: int = -1
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer `index`: (node features, router probability sum [E], expert load [E]). Front
        ends with ghost atoms pass `num_owned` (owned rows first): ghost rows are then left
        for the halo exchange instead of being updated. (TorchScript indexes a ModuleList by
        constants only, hence the loop.)"""
        element_embedding = self.embedding(species)
        result = (h, torch.zeros(0, dtype=h.dtype, device=h.device), torch.zeros(0, dtype=h.dtype, device=h.device))
        for i, layer in enumerate(self.layers):
            if i == index:
                result = layer(h, element_embedding, geometry, num_owned)
        return result

    @torch.jit.export
    def readout(self, h: torch.Tensor, species: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """Energies of the first `h.shape[0]` atoms (the owned ones: every edge is centred on
        an owned atom): learned + per-element reference + the ZBL prior of their edges."""
        out = self.readout_mlp(h) if not self.low_precision else self.readout_low_precision(h)
        learned = out.squeeze(-1) * self.energy_scale + self.reference_energies.index_select(0, species)
        return self._with_repulsion(learned, species, geometry)

    readout_low_precision = autocast_readout  # eager-only bf16 path (nn/autocast.py)

    def _with_repulsion(self, learned: torch.Tensor, species: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        repulsion = torch.zeros(learned.shape[0], dtype=geometry.repulsion.dtype, device=learned.device)
        repulsion = repulsion.index_add(0, geometry.centre, geometry.repulsion)
        energy = learned + repulsion.to(learned.dtype)
        # species 0 marks atoms this potential does not describe (LAMMPS NULL types under
        # pair_style hybrid): they carry no edges and no energy
        return torch.where(species > 0, energy, torch.zeros_like(energy))

    @torch.jit.unused
    def readout_heads(self, h: torch.Tensor, species: torch.Tensor, geometry: Geometry,
                      atom_head: torch.Tensor) -> torch.Tensor:
        """`readout` of a multi-head model, each atom through the head of its structure."""
        learned = self.readout_mlp(h).squeeze(-1) * self.energy_scale + self.reference_energies.index_select(0, species)
        for k, mlp in enumerate(self.head_readout_mlps):
            other = mlp(h).squeeze(-1) * self.head_energy_scale[k] + self.head_reference_energies[k].index_select(0, species)
            learned = torch.where(atom_head == k + 1, other, learned)
        return self._with_repulsion(learned, species, geometry)

    @torch.jit.unused
    def forward(
        self,
        species: torch.Tensor,
        edge_index: torch.Tensor,
        edge_vectors: torch.Tensor,
        batch: torch.Tensor,
        num_graphs: int,
        compute_forces: bool = True,
        compute_virial: bool = True,
        create_graph: bool = False,
    ) -> Dict[str, torch.Tensor]:
        """`evaluate(self, ...)`: energies, atom energies, forces and virial of a ghost-free graph.
        Not part of the exported file, whose users call the per-layer methods (Python front
        ends through `evaluate`, which accepts an exported model too)."""
        return evaluate(self, species, edge_index, edge_vectors, batch, num_graphs, compute_forces, compute_virial,
                        create_graph)

    # ----------------------------------------------------------------- eager helpers
    @torch.jit.unused
    def compute(self, graph, compute_virial: bool = True, create_graph: bool = False,
                head: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Energies, forces, virial and stress (ASE convention) of an `AtomGraph` (`head` [G]:
        each structure's output head in a multi-head model)."""
        if head is not None and not self.config.output_heads:
            head = None
        return evaluate(self, graph.species, graph.edge_index, graph.edge_vectors(), graph.batch, graph.num_graphs,
                        True, compute_virial, create_graph, graph.volumes() if compute_virial else None, head)

    @torch.jit.unused
    def save_checkpoint(self, path: str | os.PathLike, provenance: Optional[Dict[str, Any]] = None) -> None:
        """Write a checkpoint (config + weights) atomically."""
        save_payload({
            "format": MODEL_CHECKPOINT_FORMAT,
            "version": MODEL_CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "state_dict": self.state_dict(),
            "provenance": provenance or {},
        }, path)

    @classmethod
    @torch.jit.unused
    def load(cls, path: str | os.PathLike, use_ema: bool = True) -> "JanusPotential":
        """The model of a model checkpoint or a training checkpoint (`janus_potential.io`)."""
        from .io import load_model

        return load_model(path, use_ema)
