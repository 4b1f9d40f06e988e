"""BPR-MF (Rendle et al., UAI'09): user and item ID embeddings, BPR loss, L2 on the batch."""

from __future__ import annotations

import torch
from torch import nn

from ..config import AT_LEAST_0, AT_LEAST_1
from .base import Recommender, bpr_loss, l2_penalty, register


@register
class BPRMF(Recommender):
    name = "bpr"
    defaults = {"embedding_size": 64, "lr": 1e-3, "reg_weight": 1e-4}
    bounds = {"embedding_size": AT_LEAST_1, "reg_weight": AT_LEAST_0}
    key_help = {"embedding_size": "embedding width", "reg_weight": "weight of the batch L2 penalty"}

    def __init__(self, dataset, config):
        super().__init__(dataset, config)
        d = config["embedding_size"]
        self.user_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_users, d)))
        self.item_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_items, d)))

    def loss(self, batch):
        u = self.user_emb[batch.users]
        p, n = self.item_emb[batch.pos_items], self.item_emb[batch.neg_items]
        rec = bpr_loss((u * p).sum(1), (u * n).sum(1))
        reg = self.config["reg_weight"] * l2_penalty(u, p, n)
        return rec + reg, {"bpr": rec.item(), "reg": reg.item()}

    def embed(self):
        return self.user_emb, self.item_emb
