"""One interaction layer: three-body bond update, attention over neighbours, MoE node update.

Locality rule (DESIGN.md): the update of centre atom i uses only edges centred at i (the
two-body edges i->j and the angles j-i-k between them) and the node features of i's
neighbours. Bond states are directed and owned by their centre atom and are rebuilt in
every layer from the edge geometry, so node features are the only state that crosses a
domain boundary.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from .. import ops

from .geometry import Geometry
from .moe import MixtureOfExperts


def _expansion(groups: int, width: int) -> torch.Tensor:
    """[groups, width] one-hot matrix sending group g to its width // groups consecutive columns."""
    return torch.repeat_interleave(torch.eye(groups), width // groups, dim=1)


class InteractionLayer(nn.Module):
    __constants__ = ["fused"]

    def __init__(
        self,
        features: int,
        num_radial: int,
        three_body_features: int,
        three_body_basis: int,
        num_heads: int,
        filter_groups: int,
        num_experts: int,
        experts_per_atom: int,
        expert_hidden: int,
        shared_hidden: int,
        router_uses_features: bool,
        logit_cap: float,
        router_scale: float = 1.0,
        attention_norm: bool = False,
    ) -> None:
        super().__init__()
        if features % filter_groups or filter_groups % num_heads:
            raise ValueError("features must be divisible by filter_groups, and filter_groups by num_heads")
        self.features = features
        self.num_heads = num_heads
        self.filter_groups = filter_groups
        # the fused gather-multiply-scatter (janus_potential.ops) for the message on the CPU, when
        # its library is built; a TorchScript constant, so a model scripted without the library
        # never references the operator
        self.fused = ops.available()
        # One-hot maps head -> its groups and group -> its channels: broadcasting by a matmul
        # keeps every edge-wise product between same-shaped contiguous tensors (the backward
        # of a broadcast multiply reduces over strided views and was the slowest op).
        self.register_buffer("head_to_group", _expansion(num_heads, filter_groups), persistent=False)
        self.register_buffer("group_to_channel", _expansion(filter_groups, features), persistent=False)
        self.logit_cap = float(logit_cap)
        # Three-body: neighbour projection and the weights of the triplet basis.
        self.three_body_neighbour = nn.Linear(features, three_body_features, bias=False)
        self.three_body_basis = nn.Linear(three_body_basis, three_body_features, bias=False)
        # Edge filter (G channel groups) and edge attention logits (H heads). The filter acts on
        # groups of F/G channels so that the only [E, F] tensor kept for the backward pass is the
        # gathered neighbour value (memory per atom matters for 100k-atom MD). Separate
        # matmuls, not one sliced output: a slice's backward zero-fills the whole tensor.
        self.edge_filter = nn.Linear(num_radial + three_body_features, filter_groups, bias=False)
        self.edge_logit = nn.Linear(num_radial + three_body_features, num_heads, bias=False)
        # Node projections: value (F) and key (H) of neighbours, query (H) of the centre.
        self.value = nn.Linear(features, features)
        self.query_key = nn.Linear(features, 2 * num_heads)
        self.message_out = nn.Linear(features, features, bias=False)
        # attention_norm: a LayerNorm of the node features before the three-body, value and
        # query/key projections (pre-norm, as before the MoE), so that their inputs, and the
        # gradients of their weights, which are proportional to them, do not grow with the
        # residual stream (docs/model.md; the accuracy study's blow-ups, docs/training.md)
        self.input_norm = nn.LayerNorm(features) if attention_norm else nn.Identity()
        self.norm = nn.LayerNorm(features)
        self.moe = MixtureOfExperts(
            features, num_experts, experts_per_atom, expert_hidden, shared_hidden, router_uses_features,
            router_scale,
        )

    def forward(
        self, h: torch.Tensor, element_embedding: torch.Tensor, geometry: Geometry, num_owned: int = -1
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Updated node features, and the MoE's router probability sum and expert load of the
        owned rows. With `num_owned` >= 0, rows from `num_owned` on are ghosts: they are
        returned unchanged (their halo exchange overwrites them) and skip the MoE."""
        centre = geometry.centre
        neighbour = geometry.neighbour
        n_edges = centre.shape[0]
        n_nodes = h.shape[0]
        heads = self.num_heads

        x = self.input_norm(h)
        # Three-body: bond state b_ij = sum_k T(j,i,k) * W x_k over short edges i->j, i->k.
        neighbour_proj = self.three_body_neighbour(x)
        triplet = self.three_body_basis(geometry.triplet_basis) * neighbour_proj.index_select(
            0, geometry.triplet_neighbour
        )
        bond = torch.zeros(n_edges, triplet.shape[1], dtype=h.dtype, device=h.device)
        bond = bond.index_add(0, geometry.triplet_edge, triplet)

        edge_input = torch.cat([geometry.radial, bond], dim=1)
        query_key = self.query_key(x)
        value = self.value(x)

        # Attention over neighbours, normalised per head at the centre atom. The weights
        # carry the cutoff envelope and the "1 +" in the denominator, so a neighbour
        # entering or leaving the cutoff changes the message continuously.
        logits = (
            self.edge_logit(edge_input)
            + query_key[:, heads:].index_select(0, neighbour)
            + query_key[:, :heads].index_select(0, centre)
        )
        logits = self.logit_cap * torch.tanh(logits / self.logit_cap)
        weights = torch.exp(logits) * geometry.envelope.unsqueeze(-1)
        norm = torch.ones(n_nodes, heads, dtype=h.dtype, device=h.device).index_add(0, centre, weights)
        attention = weights / norm.index_select(0, centre)
        edge_weight = self.edge_filter(edge_input) * (attention @ self.head_to_group)
        if self.fused and h.device.type == "cpu":
            # message[c] = sum over edges c->j of value[j] * weight expanded to channels, no [E, F] tensor
            message = torch.ops.janus.edge_scatter(value, edge_weight, neighbour, centre, n_nodes)
        else:
            edge_message = value.index_select(0, neighbour) * (edge_weight @ self.group_to_channel)
            message = torch.zeros_like(h).index_add(0, centre, edge_message)

        h = h + self.message_out(message)
        if 0 <= num_owned < h.shape[0]:
            owned = h[:num_owned]
            update, probability_sum, load = self.moe(self.norm(owned), element_embedding[:num_owned])
            return torch.cat([owned + update, h[num_owned:]], dim=0), probability_sum, load
        update, probability_sum, load = self.moe(self.norm(h), element_embedding)
        return h + update, probability_sum, load
