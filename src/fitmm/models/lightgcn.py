"""LightGCN (He et al., SIGIR'20): ID embeddings smoothed over the normalised user-item graph.

The final embedding is the mean of the layer outputs E^0..E^L, with E^{l+1} = Â E^l.
As the field's reference (MMRec `src/models/lightgcn.py`, `configs/model/LightGCN.yaml`):
xavier-uniform ID tables; BPR on the final embeddings; penalty = reg_weight * Frobenius norms (NOT
squared) of the batch's EGO user, positive and negative embeddings / batch
(`base.embedding_norm_penalty`); defaults n_layers 1, reg_weight 1e-2, the yaml's first values.
Lines checked at MMRec commit e775373: `src/models/lightgcn.py` 56-63, 65-101 and 115-154.
"""

from __future__ import annotations

import torch
from torch import nn

from ..graphs import normalized_adjacency, sparse_matmul, to_torch
from ..config import AT_LEAST_0, AT_LEAST_1
from .base import Recommender, bpr_loss, embedding_norm_penalty, register


def propagate(adjacency: torch.Tensor, x: torch.Tensor, n_layers: int) -> list[torch.Tensor]:
    """[x, Âx, Â²x, ...]: the outputs of `n_layers` LightGCN layers, layer 0 included (Â symmetric)."""
    layers = [x]
    for _ in range(n_layers):
        layers.append(sparse_matmul(adjacency, layers[-1]))
    return layers


@register
class LightGCN(Recommender):
    name = "lightgcn"
    defaults = {"embedding_size": 64, "lr": 1e-3, "epochs": 1000, "reg_weight": 1e-2, "n_layers": 1}
    bounds = {"embedding_size": AT_LEAST_1, "reg_weight": AT_LEAST_0, "n_layers": AT_LEAST_0}
    key_help = {
        "embedding_size": "embedding width",
        "reg_weight": "weight of the norm penalty (not squared) on the batch's ego embeddings",
        "n_layers": "propagation layers over the user-item graph (0 = matrix factorisation)",
    }
    # The reference's grid (MMRec configs/model/LightGCN.yaml); the defaults are its first values.
    search_space = {"n_layers": [1, 2, 3, 4], "reg_weight": [1e-2, 1e-3, 1e-4, 1e-5, 1e-6]}

    def __init__(self, dataset, config):
        super().__init__(dataset, config)
        d = config["embedding_size"]
        self.user_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_users, d)))
        self.item_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_items, d)))
        self.register_buffer("adjacency", to_torch(normalized_adjacency(dataset.train)), persistent=False)

    def forward(self):
        ego = torch.cat([self.user_emb, self.item_emb])
        out = torch.stack(propagate(self.adjacency, ego, self.config["n_layers"])).mean(0)
        return out[: self.n_users], out[self.n_users:]

    def loss(self, batch):
        users, items = self.forward()
        u = users[batch.users]
        rec = bpr_loss((u * items[batch.pos_items]).sum(1), (u * items[batch.neg_items]).sum(1))
        reg = self.config["reg_weight"] * embedding_norm_penalty(
            self.user_emb[batch.users], self.item_emb[batch.pos_items], self.item_emb[batch.neg_items]
        )
        return rec + reg, {"bpr": rec.item(), "reg": reg.item()}

    def embed(self):
        return self.forward()
