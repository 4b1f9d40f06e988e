"""Training batches: shuffled (user, positive item) pairs with uniform negatives, vectorised."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import scipy.sparse as sp
import torch

from ..errors import InputError


@dataclass
class Batch:
    users: torch.Tensor
    pos_items: torch.Tensor
    neg_items: torch.Tensor | None  # None for models that use no negatives


class TrainSampler:
    """Each epoch visits every training interaction once, in a random order.

    Negatives are drawn uniformly from `negative_pool` (default: the items that occur in the
    training split, as MMRec's sampler does: an item seen only in validation or test is never
    a negative) minus the items the user has trained on, by rejection: draw for everyone at
    once, redraw only the rows that hit a training item. Membership is a binary search over the
    sorted keys user * n_items + item, so no Python loop per sample.
    """

    def __init__(self, train: sp.csr_matrix, seed: int, negative_pool: np.ndarray | None = None):
        coo = train.tocoo()
        self.n_items = train.shape[1]
        self.users = coo.row.astype(np.int64)
        self.items = coo.col.astype(np.int64)
        self.keys = np.sort(self.users * self.n_items + self.items)
        self.pool = np.unique(self.items) if negative_pool is None else np.unique(np.asarray(negative_pool, np.int64))
        # A user's training items are all in the default pool; count those of an explicit pool.
        in_pool = sp.csr_matrix(train)[:, self.pool] if negative_pool is not None else train
        full = np.flatnonzero(np.diff(sp.csr_matrix(in_pool).indptr) >= len(self.pool))
        if full.size:
            raise InputError(
                f"user {full[0]} has trained on every item that can be a negative, so none can be "
                f"drawn; drop that user from the training split"
            )
        self.rng = np.random.default_rng(seed)

    def negatives(self, users: np.ndarray) -> np.ndarray:
        neg = self.pool[self.rng.integers(len(self.pool), size=len(users))]
        todo = np.arange(len(users))
        while todo.size:
            keys = users[todo] * self.n_items + neg[todo]
            pos = np.searchsorted(self.keys, keys)
            hit = self.keys[np.minimum(pos, len(self.keys) - 1)] == keys
            todo = todo[hit]
            neg[todo] = self.pool[self.rng.integers(len(self.pool), size=todo.size)]
        return neg

    def batches(self, batch_size: int, negatives: bool = True, device="cpu") -> Iterator[Batch]:
        order = self.rng.permutation(len(self.users))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            users, pos = self.users[rows], self.items[rows]
            neg = torch.from_numpy(self.negatives(users)).to(device) if negatives else None
            yield Batch(torch.from_numpy(users).to(device), torch.from_numpy(pos).to(device), neg)

    def __len__(self) -> int:
        return len(self.users)

    # The sampler's random state is part of a resumable checkpoint.
    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
