"""Full-ranking evaluation: every evaluated user against ALL items, training items masked.

Users are scored in chunks, so no dense users x items matrix exists beyond one chunk. A user is
evaluated on a split when it has at least one held-out item there and at least one training item
(protocol.md: users absent from training are dropped).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from .data.dataset import Dataset
from .metrics import mean_metrics, ranking_metrics
from .models.base import Recommender


def evaluated_users(dataset: Dataset, split: str) -> np.ndarray:
    held_out = np.diff(dataset.split(split).indptr) > 0
    trained = np.diff(dataset.train.indptr) > 0
    return np.flatnonzero(held_out & trained)


def _rows_to_dense(m: sp.csr_matrix, rows: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row positions, column indices) of the nonzeros of m[rows], as tensors."""
    sub = m[rows]
    counts = np.diff(sub.indptr)
    row_pos = np.repeat(np.arange(len(rows)), counts)
    return torch.from_numpy(row_pos).to(device), torch.from_numpy(sub.indices.astype(np.int64)).to(device)


@torch.no_grad()
def rank_split(
    model: Recommender,
    embeddings: tuple[torch.Tensor, torch.Tensor],
    dataset: Dataset,
    split: str,
    ks: list[int],
    batch_users: int = 1024,
) -> dict[str, np.ndarray]:
    """Per-user metric arrays (plus "user": the evaluated user ids) for one split."""
    user_vecs, item_vecs = embeddings
    device = item_vecs.device
    users = evaluated_users(dataset, split)
    k_max = min(max(ks), dataset.n_items)
    held_out = dataset.split(split)
    n_relevant = np.diff(held_out.indptr)[users]
    hits = np.zeros((len(users), k_max), dtype=bool)
    for start in range(0, len(users), batch_users):
        chunk = users[start:start + batch_users]
        scores = model.score(user_vecs[torch.from_numpy(chunk).to(device)], item_vecs).float()
        rows, cols = _rows_to_dense(dataset.train, chunk, device)
        scores[rows, cols] = -torch.inf
        top = torch.topk(scores, k_max, dim=1).indices
        relevant = torch.zeros_like(scores, dtype=torch.bool)
        rows, cols = _rows_to_dense(held_out, chunk, device)
        relevant[rows, cols] = True
        hits[start:start + len(chunk)] = relevant.gather(1, top).cpu().numpy()
    per_user = ranking_metrics(hits, n_relevant, [k for k in ks if k <= k_max])
    per_user["user"] = users
    return per_user


def summarize(per_user: dict[str, np.ndarray]) -> dict[str, float]:
    return mean_metrics({k: v for k, v in per_user.items() if k != "user"})


@torch.no_grad()
def evaluate_per_user(model: Recommender, dataset: Dataset, splits: list[str], ks: list[int], batch_users: int = 1024):
    """{split: per-user metric arrays (and "user")} for each split, from ONE call of model.embed()."""
    was_training = model.training
    model.eval()
    embeddings = model.embed()
    out = {split: rank_split(model, embeddings, dataset, split, ks, batch_users) for split in splits}
    model.train(was_training)
    return out


def evaluate(model: Recommender, dataset: Dataset, splits: list[str], ks: list[int], batch_users: int = 1024):
    """{split: mean metrics} for each split, from ONE call of model.embed()."""
    return {split: summarize(per_user) for split, per_user in evaluate_per_user(model, dataset, splits, ks, batch_users).items()}
