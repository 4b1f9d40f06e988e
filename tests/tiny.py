"""The 3-user, 4-item problem the hand-checkable and gradient tests share.

Training edges (the bipartite graph every graph model propagates over):

    u0 - i0, u0 - i1, u1 - i1, u2 - i2          (i3 has no training edge)

Degrees: u0 2, u1 1, u2 1; i0 1, i1 2, i2 1, i3 0.

Item features, chosen so that the cosine top-2 graphs (self included) are easy to read off:

    image (2-d): i0 (1, 0), i1 (1, .2), i2 (1, .5), i3 (0, 1)   angles 0, 11.3, 26.6, 90 degrees
        nearest other item: i0 -> i1, i1 -> i0 (11.3 < 15.3), i2 -> i1, i3 -> i2
        S_image rows (1/2 each): i0 {0, 1}, i1 {0, 1}, i2 {1, 2}, i3 {2, 3}   (NOT symmetric)
    text (3-d):  i0 (1, 0, 0), i1 (0, 1, 0), i2 (0, 1, 1), i3 (1, 0, 1)
        nearest other item: i0 -> i3, i1 -> i2, i2 -> i1 (.71 > .5), i3 -> i0 (.71 > .5)
        S_text rows (1/2 each): i0 {0, 3}, i1 {1, 2}, i2 {1, 2}, i3 {0, 3}    (symmetric)
"""

from __future__ import annotations

import numpy as np
import torch

from fitmm.config import resolve
from fitmm.data.dataset import Dataset, interaction_matrix
from fitmm.data.sampling import Batch, TrainSampler
from fitmm.models import model_class
from fitmm.models.base import Recommender

N_USERS, N_ITEMS = 3, 4
EDGES = [(0, 0), (0, 1), (1, 1), (2, 2)]

FEATURES = {
    "image": np.array([[1, 0], [1, 0.2], [1, 0.5], [0, 1]], dtype=np.float32),
    "text": np.array([[1, 0, 0], [0, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=np.float32),
}
S_IMAGE = np.array([[.5, .5, 0, 0], [.5, .5, 0, 0], [0, .5, .5, 0], [0, 0, .5, .5]])
S_TEXT = np.array([[.5, 0, 0, .5], [0, .5, .5, 0], [0, .5, .5, 0], [.5, 0, 0, .5]])

# R, the training interactions, written out.
R = np.array([[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], dtype=float)


def tiny_dataset(modalities=("image", "text")) -> Dataset:
    users, items = (np.array(c) for c in zip(*EDGES))
    train = interaction_matrix(users, items, N_USERS, N_ITEMS)
    empty = interaction_matrix(np.array([], int), np.array([], int), N_USERS, N_ITEMS)
    features = {name: FEATURES[name].copy() for name in modalities}
    return Dataset("tiny", N_USERS, N_ITEMS, train, empty, empty, features, source="tiny")


def build(name: str, dataset: Dataset | None = None, seed: int = 0, **overrides):
    """A model on `dataset` (default: the tiny one; no kNN cache on disk), after its own input checks."""
    dataset = dataset if dataset is not None else tiny_dataset()
    config = resolve([("test", {"model": name, "cache_dir": "none", **overrides})])
    model_class(name).check(dataset, config)
    torch.manual_seed(seed)
    return model_class(name)(dataset, config)


def batch(users, pos, neg=None) -> Batch:
    as_t = lambda v: None if v is None else torch.tensor(v, dtype=torch.int64)  # noqa: E731
    return Batch(as_t(users), as_t(pos), as_t(neg))


def first_batch(dataset: Dataset, size: int = 64) -> Batch:
    """The first training batch of `size` rows (sampler seed 0), negatives included."""
    return next(TrainSampler(dataset.train, seed=0).batches(size))


class FixedScores(Recommender):
    """Scores given as a dense users x items matrix (user vectors = rows, item vectors = one-hot),
    for evaluator tests."""

    name = "fixed"

    def __init__(self, dataset, scores):
        super().__init__(dataset, {})
        self.scores = torch.as_tensor(np.asarray(scores), dtype=torch.float32)

    def embed(self):
        return self.scores, torch.eye(self.n_items)
