"""A small DLRM (Naumov et al., 2019): embeddings for the ids, an MLP for the dense features,
pairwise dot products between all of those vectors, and an MLP on top that gives the logit.

Sized for FL: every round each sampled site downloads and uploads the whole model, so the
embeddings are 8-wide and the MLPs a few dozen units (about 50k parameters, 200 kB).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

import data

# A rough guess of the click rate: the output starts there, not at 50 %, so that the first
# round of FedAvg is not spent on learning the base rate (every site's first steps would all
# push the output down, and little else).
PRIOR_CLICK_RATE = 0.25


def mlp(sizes: Sequence[int], last_activation: bool, activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(fan_in, fan_out))
        if last_activation or i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    """Click logit from ``sparse`` ids (batch, len(cardinalities)) and ``dense`` features (batch, n_dense)."""

    def __init__(
        self,
        cardinalities: Sequence[int],
        n_dense: int,
        embedding_dim: int = 8,
        bottom_hidden: Sequence[int] = (16,),
        top_hidden: Sequence[int] = (32,),
        prior_click_rate: float = PRIOR_CLICK_RATE,
    ) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(n, embedding_dim) for n in cardinalities)
        for table in self.embeddings:
            # Small initial vectors: the dot products start near 0, not dominated by noise.
            nn.init.normal_(table.weight, std=0.05)
        # The bottom MLP maps the dense features into the embedding space, so that they can
        # take part in the dot products like one more embedded feature.
        self.bottom = mlp([n_dense, *bottom_hidden, embedding_dim], last_activation=True)
        n_vectors = len(cardinalities) + 1
        n_pairs = n_vectors * (n_vectors - 1) // 2
        # SiLU rather than DLRM's ReLU on top: in the first rounds the sites' updates are large and
        # disagree, and a ReLU unit that their average leaves below zero for every input never
        # comes back (a stalled model); a SiLU unit still passes a gradient.
        self.top = mlp([embedding_dim + n_pairs, *top_hidden, 1], last_activation=False, activation=nn.SiLU)
        nn.init.constant_(self.top[-1].bias, math.log(prior_click_rate / (1 - prior_click_rate)))
        pairs = torch.triu_indices(n_vectors, n_vectors, offset=1)
        self.register_buffer("pair_rows", pairs[0], persistent=False)
        self.register_buffer("pair_cols", pairs[1], persistent=False)

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        bottom = self.bottom(dense)
        vectors = torch.stack([bottom, *(table(sparse[:, i]) for i, table in enumerate(self.embeddings))], dim=1)
        dots = torch.bmm(vectors, vectors.transpose(1, 2))[:, self.pair_rows, self.pair_cols]
        return self.top(torch.cat([bottom, dots], dim=1)).squeeze(1)


def build_model() -> DLRM:
    """The example's model, for the features of data.py (the same on the server and every site)."""
    return DLRM(data.SPARSE_CARDINALITIES, len(data.DENSE_FEATURES))
