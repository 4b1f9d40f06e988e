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
def rank_splits(
    model: Recommender,
    embeddings: tuple[torch.Tensor, torch.Tensor],
    dataset: Dataset,
    splits: list[str],
    ks: list[int],
    batch_users: int = 1024,
    users_part=None,
) -> dict[str, dict[str, np.ndarray]]:
    """{split: per-user metric arrays (plus "user": the evaluated user ids)} for several splits.

    Every split masks the same (training) items, so a user's top-K list is the same for all of
    them: each chunk of users is scored and ranked ONCE, then checked against each split.
    `users_part`: sorted user ids -> the contiguous share of them to rank here (distributed
    evaluation: each process ranks its share; concatenated in order, the shares give the whole).
    """
    user_vecs, item_vecs = embeddings
    device = item_vecs.device
    k_max = min(max(ks), dataset.n_items)
    users = {split: evaluated_users(dataset, split) for split in splits}
    everyone = np.unique(np.concatenate(list(users.values())))
    if users_part is not None:
        everyone = users_part(everyone)
        users = {split: u[np.isin(u, everyone)] for split, u in users.items()}
    top_all = np.zeros((len(everyone), k_max), dtype=np.int64)
    for start in range(0, len(everyone), batch_users):
        chunk = everyone[start:start + batch_users]
        scores = model.score(user_vecs[torch.from_numpy(chunk).to(device)], item_vecs).float()
        rows, cols = _rows_to_dense(dataset.train, chunk, device)
        scores[rows, cols] = -torch.inf
        top_all[start:start + len(chunk)] = torch.topk(scores, k_max, dim=1).indices.cpu().numpy()
    out = {}
    for split, split_users in users.items():
        top = top_all[np.searchsorted(everyone, split_users)]
        held_out = dataset.split(split)[split_users]
        # hit[u, r] = (u, top[u, r]) is a held-out pair: binary search of the pair keys
        # row * I + item, which a sorted CSR lists in ascending order.
        held_out.sort_indices()
        n_items = dataset.n_items
        held_keys = np.repeat(np.arange(len(split_users)), np.diff(held_out.indptr)) * n_items + held_out.indices
        top_keys = np.arange(len(split_users))[:, None] * n_items + top
        found = np.minimum(np.searchsorted(held_keys, top_keys), len(held_keys) - 1)
        hits = held_keys[found] == top_keys
        per_user = ranking_metrics(hits, np.diff(held_out.indptr), [k for k in ks if k <= k_max])
        per_user["user"] = split_users
        out[split] = per_user
    return out


def rank_split(model, embeddings, dataset: Dataset, split: str, ks: list[int], batch_users: int = 1024):
    """Per-user metric arrays (plus "user": the evaluated user ids) for one split."""
    return rank_splits(model, embeddings, dataset, [split], ks, batch_users)[split]


def summarize(per_user: dict[str, np.ndarray]) -> dict[str, float]:
    return mean_metrics({k: v for k, v in per_user.items() if k != "user"})


@torch.no_grad()
def evaluate_per_user(model: Recommender, dataset: Dataset, splits: list[str], ks: list[int], batch_users: int = 1024,
                      users_part=None):
    """{split: per-user metric arrays (and "user")} for each split, from ONE call of model.embed()
    (`users_part`: see rank_splits)."""
    was_training = model.training
    model.eval()
    embeddings = model.embed()
    out = rank_splits(model, embeddings, dataset, splits, ks, batch_users, users_part)
    model.train(was_training)
    return out


def evaluate(model: Recommender, dataset: Dataset, splits: list[str], ks: list[int], batch_users: int = 1024):
    """{split: mean metrics} for each split, from ONE call of model.embed()."""
    return {split: summarize(per_user) for split, per_user in evaluate_per_user(model, dataset, splits, ks, batch_users).items()}
