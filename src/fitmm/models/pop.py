"""Most-popular ranking: every user gets the items with the most training interactions."""

from __future__ import annotations

import numpy as np
import torch

from .base import Recommender, register


@register
class MostPopular(Recommender):
    name = "pop"
    defaults = {"epochs": 0}
    trainable = False

    def __init__(self, dataset, config):
        super().__init__(dataset, config)
        counts = np.asarray(dataset.train.sum(axis=0), dtype=np.float32).ravel()
        self.register_buffer("popularity", torch.from_numpy(counts))

    def embed(self):
        # A one-dimensional embedding: score(u, i) = 1 * popularity(i).
        return torch.ones(self.n_users, 1, device=self.popularity.device), self.popularity[:, None]
