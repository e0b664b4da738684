"""`JanusPotential`: the invariant message-passing MoE potential.

The model is one TorchScript-compatible module with small methods that every front end
calls in the same order (DESIGN.md, one code path):

    geometry = model.prepare(edge_index, edge_vectors)      # radial basis, triplets: once
    h = model.embed(species)
    for l in range(L): h = model.interaction(l, h, species, geometry); <halo exchange>
    atom_energy = model.readout(h, species)

`forward` runs that sequence on a ghost-free graph (the single-process case, periodic
images carried by edge shifts) and returns energies, forces and the virial from ONE
autograd pass of the energy with respect to the edge vectors. LAMMPS and domain-parallel
front ends call the same methods with their own halo exchange between layers.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .config import ModelConfig
from .errors import JanusInputError
from .nn.geometry import Geometry, GeometryBuilder
from .nn.interaction import InteractionLayer

CHECKPOINT_FORMAT = "janus-checkpoint"
CHECKPOINT_VERSION = 1


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


class JanusPotential(nn.Module):
    def __init__(self, config: Optional[ModelConfig] = None) -> None:
        super().__init__()
        config = config or ModelConfig()
        self.config = config
        self.format_version = 1
        self.cutoff = float(config.cutoff)
        self.three_body_cutoff = float(config.three_body_cutoff)
        self.num_interactions = int(config.num_interactions)
        self.features = int(config.features)
        n_species = config.max_atomic_number + 1
        self.embedding = nn.Embedding(n_species, config.features)
        self.geometry = GeometryBuilder(
            config.cutoff, config.num_radial, config.three_body_cutoff, config.num_three_body_radial,
            config.angular_order,
        )
        three_body_basis = (config.angular_order + 1) * config.num_three_body_radial
        self.layers = nn.ModuleList(
            [
                InteractionLayer(
                    config.features, config.num_radial, config.three_body_features, three_body_basis, config.num_heads,
                    config.filter_groups,
                    config.num_experts, config.experts_per_atom, config.expert_hidden,
                    config.shared_expert_hidden, config.router_uses_features, config.logit_cap,
                )
                for _ in range(config.num_interactions)
            ]
        )
        self.readout_mlp = nn.Sequential(
            nn.LayerNorm(config.features), nn.Linear(config.features, config.readout_hidden), nn.SiLU(),
            nn.Linear(config.readout_hidden, 1),
        )
        self.register_buffer("reference_energies", torch.zeros(n_species))
        self.register_buffer("energy_scale", torch.ones(()))
        self.register_buffer("supported", torch.ones(n_species, dtype=torch.bool).index_fill(0, torch.tensor([0]), False))

    # ----------------------------------------------------------------- construction
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
    def prepare(self, edge_index: torch.Tensor, edge_vectors: torch.Tensor) -> Geometry:
        return self.geometry(edge_index, edge_vectors)

    @torch.jit.export
    def embed(self, species: torch.Tensor) -> torch.Tensor:
        return self.embedding(species)

    @torch.jit.export
    def interaction(
        self, index: int, h: torch.Tensor, species: torch.Tensor, geometry: Geometry, num_owned: int = -1
    ) -> torch.Tensor:
        """Layer `index`. Front ends with ghost atoms pass `num_owned` (owned rows first): ghost
        rows are then left for the halo exchange instead of being updated."""
        element_embedding = self.embedding(species)
        for i, layer in enumerate(self.layers):
            if i == index:
                h = layer(h, element_embedding, geometry, num_owned)
        return h

    @torch.jit.export
    def readout(self, h: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        learned = self.readout_mlp(h).squeeze(-1) * self.energy_scale
        return learned + self.reference_energies.index_select(0, species)

    @torch.jit.export
    def atomic_energies(self, species: torch.Tensor, edge_index: torch.Tensor, edge_vectors: torch.Tensor) -> torch.Tensor:
        """Per-atom energies of a ghost-free graph (no halo exchange needed)."""
        geometry = self.prepare(edge_index, edge_vectors)
        element_embedding = self.embedding(species)
        h = element_embedding
        for layer in self.layers:
            h = layer(h, element_embedding, geometry)
        return self.readout(h, species)

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
        """Energies [G] (float64), atom energies [N], forces [N, 3] and virial [G, 3, 3]."""
        if compute_forces or compute_virial:
            if not edge_vectors.requires_grad:
                edge_vectors = edge_vectors.detach().requires_grad_(True)
        atom_energy = self.atomic_energies(species, edge_index, edge_vectors)
        energy = torch.zeros(num_graphs, dtype=torch.float64, device=atom_energy.device)
        energy = energy.index_add(0, batch, atom_energy.to(torch.float64))
        result: Dict[str, torch.Tensor] = {"energy": energy, "atom_energies": atom_energy}
        if compute_forces or compute_virial:
            grads = torch.autograd.grad(
                [atom_energy.sum()], [edge_vectors], create_graph=create_graph, allow_unused=True
            )
            edge_gradient = grads[0]
            if edge_gradient is None:
                edge_gradient = torch.zeros_like(edge_vectors)
            if compute_forces:
                result["forces"] = forces_from_edge_gradient(edge_gradient, edge_index, species.shape[0])
            if compute_virial:
                result["virial"] = virial_from_edge_gradient(
                    edge_gradient, edge_vectors, batch.index_select(0, edge_index[0]), num_graphs
                )
        return result

    # ----------------------------------------------------------------- eager helpers
    @torch.jit.unused
    def balance_loss(self) -> torch.Tensor:
        """Sum over layers of the MoE load-balancing loss of the latest forward pass."""
        losses = [layer.moe.last_balance_loss for layer in self.layers if layer.moe.last_balance_loss is not None]
        if not losses:
            return torch.zeros((), dtype=self.embedding.weight.dtype)
        return torch.stack(losses).sum()

    @torch.jit.unused
    def expert_load(self) -> List[List[int]]:
        """Atom-slots routed to each expert, per layer, in the latest forward pass."""
        return [
            [] if layer.moe.last_expert_load is None else layer.moe.last_expert_load.tolist()
            for layer in self.layers
        ]

    @torch.jit.unused
    def compute(self, graph, compute_virial: bool = True, create_graph: bool = False) -> Dict[str, torch.Tensor]:
        """Energies, forces, virial and stress (ASE convention) of an `AtomGraph`."""
        edge_vectors = graph.edge_vectors()
        result = self(
            graph.species, graph.edge_index, edge_vectors, graph.batch, graph.num_graphs,
            True, compute_virial, create_graph,
        )
        if compute_virial:
            volume = graph.volumes().to(result["virial"].dtype)
            result["stress"] = -result["virial"] / volume.clamp(min=1e-12).view(-1, 1, 1)
        return result

    @torch.jit.unused
    def save(self, path: str | os.PathLike, provenance: Optional[Dict[str, Any]] = None) -> None:
        """Write a checkpoint (config + weights) atomically."""
        payload = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "state_dict": self.state_dict(),
            "provenance": provenance or {},
        }
        tmp = f"{os.fspath(path)}.tmp"
        torch.save(payload, tmp)
        os.replace(tmp, path)

    @classmethod
    @torch.jit.unused
    def load(cls, path: str | os.PathLike, map_location: str = "cpu") -> "JanusPotential":
        payload = load_checkpoint_payload(path, map_location)
        state = payload["state_dict"]
        model = cls(ModelConfig.from_dict(payload["config"])).to(state["embedding.weight"].dtype)
        load_weights(model, state, path)
        model.provenance = payload.get("provenance", {})
        return model


def load_weights(model: nn.Module, state: Dict[str, Any], path: str | os.PathLike) -> None:
    """load_state_dict with a clear error when the checkpoint is from another model version."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise JanusInputError(
            f"{os.fspath(path)!r} does not match this version of the Janus model ({first})"
        ) from exc


def load_checkpoint_payload(path: str | os.PathLike, map_location: str = "cpu") -> Dict[str, Any]:
    """Read a checkpoint file, with a clear error when it is not one."""
    if not os.path.exists(path):
        raise JanusInputError(f"model file {os.fspath(path)!r} does not exist")
    if zipfile.is_zipfile(path) and any(n.endswith("/constants.pkl") for n in zipfile.ZipFile(path).namelist()):
        raise JanusInputError(f"{os.fspath(path)!r} is a TorchScript file, not a Janus checkpoint")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises many types for foreign or corrupt files
        raise JanusInputError(f"{os.fspath(path)!r} is not a Janus checkpoint ({exc.__class__.__name__}: {exc})") from exc
    if isinstance(payload, dict) and payload.get("format") == "janus-training-checkpoint":
        raise JanusInputError(f"{os.fspath(path)!r} is a training checkpoint: read it with "
                              "janus_potential.training.checkpoint.load_model_for_export or `janus export`")
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise JanusInputError(f"{os.fspath(path)!r} is not a Janus checkpoint")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise JanusInputError(
            f"{os.fspath(path)!r} has checkpoint version {payload.get('version')}, this Janus reads {CHECKPOINT_VERSION}"
        )
    return payload
