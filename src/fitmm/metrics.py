"""Top-K ranking metrics for full-ranking evaluation (MMRec-compatible).

The evaluator ranks, for every evaluated user, all items by score after masking
the user's training items, keeps the top ``Kmax`` and marks which of those
ranked items belong to the user's held-out (validation or test) set.  This
module turns that boolean hit matrix into per-user metric values and averages.

Definitions (rank ``r`` is 1-based, ``hit_r`` is 1 when the item at rank ``r``
is held-out, ``R`` is the number of held-out items of the user):

* ``Recall@K    = sum_{r<=K} hit_r / R``            (denominator NOT capped at K)
* ``NDCG@K      = DCG@K / IDCG@K`` with ``DCG@K = sum_{r<=K} hit_r / log2(r + 1)``
  and the ideal DCG taken over ``min(R, K)`` positions (binary gains)
* ``Precision@K = sum_{r<=K} hit_r / K``
* ``MAP@K       = sum_{r<=K} Precision@r * hit_r / min(R, K)``
* ``Hit@K       = 1.0 if any hit in the top K else 0.0``

These match the formulas of the MMRec toolkit, so numbers are comparable with
published results produced by it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

__all__ = ["METRIC_NAMES", "DEFAULT_KS", "ranking_metrics", "mean_metrics"]

METRIC_NAMES: tuple[str, ...] = ("recall", "ndcg", "precision", "map", "hit")
DEFAULT_KS: tuple[int, ...] = (5, 10, 20, 50)


def _validate(hits: np.ndarray, n_relevant: np.ndarray, ks: Iterable[int]):
    hits = np.asarray(hits)
    if hits.ndim != 2:
        raise ValueError(f"hits must be a 2-D (n_users, Kmax) array, got shape {hits.shape}")
    if hits.dtype != np.bool_:
        if not np.issubdtype(hits.dtype, np.number) or not np.isin(hits, (0, 1)).all():
            raise ValueError("hits must be boolean (or contain only 0/1)")
        hits = hits.astype(bool)
    n_users, kmax = hits.shape

    n_relevant = np.asarray(n_relevant)
    if n_relevant.shape != (n_users,):
        raise ValueError(
            f"n_relevant must have shape ({n_users},) to match hits {hits.shape}, "
            f"got {n_relevant.shape}"
        )
    if n_users and not np.issubdtype(n_relevant.dtype, np.number):
        raise ValueError(f"n_relevant must be numeric, got dtype {n_relevant.dtype}")
    if n_users:
        if np.issubdtype(n_relevant.dtype, np.floating) and not np.all(
            np.isfinite(n_relevant) & (n_relevant == np.round(n_relevant))
        ):
            raise ValueError("n_relevant must contain whole numbers")
        if n_relevant.min() < 1:
            bad = int(np.flatnonzero(n_relevant < 1)[0])
            raise ValueError(
                f"n_relevant must be >= 1 for every user (user row {bad} has "
                f"{n_relevant[bad]}); drop users with no held-out items before evaluating"
            )
    n_relevant = n_relevant.astype(np.int64)
    row_hits = hits.sum(axis=1)
    if n_users and np.any(row_hits > n_relevant):
        bad = int(np.flatnonzero(row_hits > n_relevant)[0])
        raise ValueError(
            f"user row {bad} has {int(row_hits[bad])} hits but only "
            f"{int(n_relevant[bad])} held-out items"
        )

    ks_list = list(ks)
    if not ks_list:
        raise ValueError("ks must contain at least one cutoff")
    out_ks = []
    for k in ks_list:
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
            raise ValueError(f"each K must be an int, got {k!r}")
        k = int(k)
        if k < 1:
            raise ValueError(f"each K must be >= 1, got {k}")
        if k > kmax:
            raise ValueError(f"K={k} exceeds the number of ranked positions Kmax={kmax}")
        out_ks.append(k)
    return hits, n_relevant, out_ks


def ranking_metrics(
    hits: np.ndarray, n_relevant: np.ndarray, ks: Iterable[int] = DEFAULT_KS
) -> dict[str, np.ndarray]:
    """Per-user top-K metrics from a ranked hit matrix.

    Args:
        hits: ``(n_users, Kmax)`` boolean array; ``hits[u, r]`` is True when the
            item at rank ``r + 1`` of user ``u``'s ranking (training items already
            masked out) is one of the user's held-out items.
        n_relevant: ``(n_users,)`` integer array, number of held-out items of each
            user (must be >= 1 and >= the number of hits in the row).
        ks: cutoffs, each ``1 <= K <= Kmax``.

    Returns:
        ``{"recall@K", "ndcg@K", "precision@K", "map@K", "hit@K"}`` for every K
        in ``ks`` (first-seen order, duplicates collapsed), each a float64 array of
        shape ``(n_users,)``.

    Raises:
        ValueError: on a non-2-D or non-boolean ``hits``, a ``n_relevant`` whose
            shape does not match, any ``n_relevant < 1`` (or fewer held-out items
            than hits), an empty ``ks`` or any K outside ``[1, Kmax]``.
    """
    hits, n_rel, ks = _validate(hits, n_relevant, ks)
    kmax = hits.shape[1]
    h = hits.astype(np.float64)
    ranks = np.arange(1, kmax + 1, dtype=np.float64)            # 1..Kmax

    cum_hits = np.cumsum(h, axis=1)                             # hits in top r
    discount = 1.0 / np.log2(ranks + 1.0)                       # 1/log2(r+1)
    cum_dcg = np.cumsum(h * discount, axis=1)                   # DCG@r
    cum_idcg = np.cumsum(discount)                              # IDCG with n ideal hits
    cum_ap = np.cumsum((cum_hits / ranks) * h, axis=1)          # sum Precision@r * hit_r
    n_rel_f = n_rel.astype(np.float64)

    out: dict[str, np.ndarray] = {}
    for k in dict.fromkeys(ks):
        n_hits = cum_hits[:, k - 1]
        ideal_len = np.minimum(n_rel, k)                        # >= 1 after validation
        out[f"recall@{k}"] = n_hits / n_rel_f
        out[f"ndcg@{k}"] = cum_dcg[:, k - 1] / cum_idcg[ideal_len - 1]
        out[f"precision@{k}"] = n_hits / float(k)
        out[f"map@{k}"] = cum_ap[:, k - 1] / ideal_len.astype(np.float64)
        out[f"hit@{k}"] = (n_hits > 0).astype(np.float64)
    return out


def mean_metrics(per_user: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Average each per-user metric array over users.

    Args:
        per_user: mapping ``name -> (n_users,)`` array, e.g. the output of
            :func:`ranking_metrics`. All arrays must have the same length.

    Returns:
        ``{name: mean}`` as plain Python floats, in the input's key order.

    Raises:
        ValueError: when there are no users to evaluate (arrays of length 0, or
            an empty mapping) -- averaging nothing would give NaN or a silently
            misleading 0.0, so the caller must handle that case explicitly --
            or when arrays are not 1-D or differ in length.
    """
    if not per_user:
        raise ValueError("no users to evaluate: no metrics given")
    n = None
    out: dict[str, float] = {}
    for name, values in per_user.items():
        arr = np.asarray(values, dtype=np.float64)
        if arr.ndim != 1:
            raise ValueError(f"metric {name!r} must be a 1-D per-user array, got shape {arr.shape}")
        if n is None:
            n = arr.shape[0]
        elif arr.shape[0] != n:
            raise ValueError(
                f"metric {name!r} has {arr.shape[0]} users, expected {n} like the others"
            )
        if n == 0:
            raise ValueError("no users to evaluate")
        out[name] = float(arr.mean())
    return out
