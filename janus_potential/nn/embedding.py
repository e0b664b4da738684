"""The element embedding with chemical descriptors (model option `element_features`).

`nn.Embedding` gives every element its own learned row: an element learns only from the
frames it appears in, and with 89 elements in a few thousand frames (dft-89: 58 to 1,552
frames per element) each row is fitted to a few hundred atoms. `ElementEmbedding` adds a
learned linear map of fixed descriptors (`janus_potential.elements.element_descriptors`:
period, group, block, electronegativity, covalent radius, mass, valence electrons), shared
by all elements, to that per-element row:

    embedding(Z) = weight[Z] + descriptors[Z] @ projection

so that chemically similar elements start close and what is learned from one moves its
neighbours in the periodic table. The per-element rows start small (0.1 of nn.Embedding's
N(0, 1)) and learn what the descriptors miss. Same state-dict key `embedding.weight` as
nn.Embedding, plus `embedding.descriptors` (a buffer, so the exported file carries it) and
`embedding.projection`. The router sees this embedding too (nn/moe.py): routing by element
becomes routing by chemistry. Off by default (checkpoints without the option load as before).
"""

from __future__ import annotations

import torch
from torch import nn

from ..elements import element_descriptors


class ElementEmbedding(nn.Module):
    def __init__(self, num_species: int, features: int) -> None:
        super().__init__()
        descriptors = element_descriptors(num_species - 1)
        self.weight = nn.Parameter(0.1 * torch.randn(num_species, features))
        self.register_buffer("descriptors", descriptors.to(torch.get_default_dtype()))
        # unit-variance output at the start, as nn.Embedding's rows
        self.projection = nn.Parameter(torch.randn(descriptors.shape[1], features) / descriptors.shape[1] ** 0.5)

    def table(self) -> torch.Tensor:
        """[num_species, features]: the embedding of every element."""
        return self.weight + self.descriptors @ self.projection

    def forward(self, species: torch.Tensor) -> torch.Tensor:
        return self.table().index_select(0, species)
