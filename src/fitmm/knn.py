"""Content kNN graphs: item–item (and optional user–user) similarity graphs.

For each content modality the graph keeps, for every row, the ``k`` most cosine-similar rows
(the row itself always among them), gives each kept entry the value ``1/k`` (a value of one,
row-normalised), and the modalities are mixed as ``S = sum_m w_m S_m``.

Everything here is computed in row chunks (``chunk_size × n`` similarity blocks), so the dense
``n × n`` similarity matrix never exists in memory.  Results are deterministic: ties at the
k-th place are broken towards the lowest column index, independent of the chunk size.

This module depends only on numpy, scipy and torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

__all__ = [
    "CACHE_FORMAT_VERSION",
    "knn_graph",
    "mixed_knn_graph",
    "default_modality_weights",
    "validate_modality_weights",
    "cache_key",
    "cached_mixed_knn_graph",
    "user_knn_graph",
    "to_torch_sparse",
]

#: Bumped whenever the on-disk cache layout or the graph definition changes.
CACHE_FORMAT_VERSION = 1

#: Weights used when exactly the modalities ``image`` and ``text`` are present
#: (the released configuration's ``mm_image_weight = 0.1``).
IMAGE_TEXT_WEIGHTS = {"image": 0.1, "text": 0.9}

_WEIGHT_SUM_TOL = 1e-6
_TIE_SUBCHUNK = 256


# --------------------------------------------------------------------------------------------
# single-modality kNN graph
# --------------------------------------------------------------------------------------------


def _as_feature_matrix(features: np.ndarray, name: str = "features") -> np.ndarray:
    arr = np.asarray(features)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (rows × dims), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} has no rows")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _check_k(k: int, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer, got {k!r}")
    k = int(k)
    if not 1 <= k <= n:
        raise ValueError(f"k must satisfy 1 <= k <= number of rows ({n}), got k={k}")
    return k


def _row_normalise(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """L2-normalise rows into a new float32 tensor; all-zero rows stay all-zero (no NaN).

    Norms are computed in float64 chunk by chunk (no overflow for large values, and no full
    float64 copy of the matrix).
    """
    out = torch.empty_like(x)
    for start in range(0, x.shape[0], chunk_size):
        block = x[start : start + chunk_size].to(torch.float64)
        norms = torch.linalg.vector_norm(block, dim=1, keepdim=True)
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        out[start : start + chunk_size] = (block / norms).to(torch.float32)
    return out


def _topk_with_self(sim: torch.Tensor, row_offset: int, k: int) -> torch.Tensor:
    """Column indices (rows × k) of the top-k entries of each row of a similarity block.

    The diagonal (global row ``row_offset + r`` vs itself) is forced to +inf so self is always
    kept.  Ties at the k-th value are broken towards the lowest column index, so the result
    does not depend on how torch.topk orders equal values nor on the chunking.
    """
    rows, n = sim.shape
    r = torch.arange(rows, device=sim.device)
    sim[r, r + row_offset] = math.inf
    if k == n:  # every column is kept; nothing to choose
        return torch.arange(n, device=sim.device).expand(rows, n).clone()
    # one extra value tells whether the k-th place is tied with the (k+1)-th
    vals, idx = torch.topk(sim, k + 1, dim=1, largest=True, sorted=True)
    kth = vals[:, k - 1 : k]
    tie_rows = torch.nonzero(vals[:, k] == vals[:, k - 1]).flatten()
    idx = idx[:, :k].contiguous()
    if tie_rows.numel():
        for s in range(0, tie_rows.numel(), _TIE_SUBCHUNK):
            sel = tie_rows[s : s + _TIE_SUBCHUNK]
            sub = sim[sel]
            t = kth[sel]
            # every entry strictly above the k-th value is among the top k
            need = (k - (vals[sel, :k] > t).sum(dim=1, keepdim=True)).to(torch.int32)
            equal = sub == t
            keep = equal & (torch.cumsum(equal, dim=1, dtype=torch.int32) <= need)
            del equal
            keep |= sub > t
            idx[sel] = torch.nonzero(keep)[:, 1].view(-1, k)
    return idx


def knn_graph(
    features: np.ndarray,
    k: int,
    chunk_size: int = 2048,
    device: torch.device | str | None = None,
) -> sp.csr_matrix:
    """Row-normalised cosine top-k graph over the rows of ``features``.

    Parameters
    ----------
    features:
        ``n × F`` array (converted to float32).  All-zero rows are allowed: their similarity
        to everything is 0, they keep themselves plus the ``k-1`` lowest-indexed other rows.
    k:
        neighbours per row, ``1 <= k <= n``; the row itself is always one of them.
    chunk_size:
        rows per similarity block; peak extra memory is about ``chunk_size × n`` floats
        (plus one normalised float32 copy of ``features``).
    device:
        torch device for the computation (default CPU).  A GPU is much faster for wide
        features; the result is deterministic per device, but float rounding may differ
        between devices, which can flip exact near-ties.

    Returns
    -------
    ``n × n`` float32 CSR matrix with exactly ``k`` entries per row, each ``1/k`` (rows sum
    to 1), column indices sorted within each row.
    """
    x_np = _as_feature_matrix(features)
    n = x_np.shape[0]
    k = _check_k(k, n)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    chunk_size = int(chunk_size)

    neighbours = np.empty((n, k), dtype=np.int64)
    with torch.inference_mode():
        xt_dev = torch.device(device) if device is not None else torch.device("cpu")
        xn = _row_normalise(torch.from_numpy(x_np), chunk_size).to(xt_dev)
        xt = xn.t()
        for start in range(0, n, chunk_size):
            sim = torch.matmul(xn[start : start + chunk_size], xt)
            neighbours[start : start + sim.shape[0]] = _topk_with_self(sim, start, k).cpu().numpy()
            del sim
        del xn, xt

    neighbours.sort(axis=1)
    index_dtype = np.int32 if n < np.iinfo(np.int32).max // max(k, 1) else np.int64
    indptr = np.arange(0, n * k + 1, k, dtype=index_dtype)
    indices = neighbours.reshape(-1).astype(index_dtype, copy=False)
    data = np.full(n * k, 1.0 / k, dtype=np.float32)
    graph = sp.csr_matrix((data, indices, indptr), shape=(n, n))
    graph.has_sorted_indices = True
    return graph


# --------------------------------------------------------------------------------------------
# modality weights and the mixed graph
# --------------------------------------------------------------------------------------------


def default_modality_weights(names: list[str]) -> dict[str, float]:
    """Default mixing weights: image 0.1 / text 0.9 for exactly {image, text}; else equal."""
    names = list(names)
    if not names:
        raise ValueError("at least one modality name is required")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate modality names: {dup}")
    if set(names) == set(IMAGE_TEXT_WEIGHTS):
        return {name: IMAGE_TEXT_WEIGHTS[name] for name in names}
    return {name: 1.0 / len(names) for name in names}


def validate_modality_weights(weights: Mapping[str, float], names) -> dict[str, float]:
    """Check ``weights`` against the modality ``names``; return them as plain floats.

    Keys must equal ``names`` exactly, values must be finite, non-negative and sum to 1
    (tolerance 1e-6).  Raises ValueError naming what is wrong.
    """
    if not isinstance(weights, Mapping):
        raise ValueError(f"weights must be a mapping modality -> weight, got {type(weights).__name__}")
    expected = set(names)
    given = set(weights)
    missing = sorted(expected - given)
    extra = sorted(given - expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing weights for modalities {missing}")
        if extra:
            parts.append(f"weights given for unknown modalities {extra}")
        raise ValueError("modality weights do not match the features: " + "; ".join(parts)
                         + f" (features: {sorted(expected)})")
    out: dict[str, float] = {}
    for name in sorted(weights):
        w = weights[name]
        try:
            wf = float(w)
        except (TypeError, ValueError):
            raise ValueError(f"weight for modality {name!r} is not a number: {w!r}") from None
        if not math.isfinite(wf):
            raise ValueError(f"weight for modality {name!r} must be finite, got {wf}")
        if wf < 0:
            raise ValueError(f"weight for modality {name!r} must be non-negative, got {wf}")
        out[name] = wf
    total = math.fsum(out.values())
    if abs(total - 1.0) > _WEIGHT_SUM_TOL:
        raise ValueError(f"modality weights must sum to 1 (tolerance {_WEIGHT_SUM_TOL:g}), "
                         f"but they sum to {total:.10g}: {out}")
    return out


def _check_feature_dict(features: Mapping[str, np.ndarray]) -> int:
    if not isinstance(features, Mapping) or not features:
        raise ValueError("features must be a non-empty mapping modality -> (n × F) array")
    rows = {name: np.shape(f)[0] if np.ndim(f) == 2 else None for name, f in features.items()}
    for name, r in rows.items():
        if r is None:
            raise ValueError(f"features[{name!r}] must be a 2-D array, got shape {np.shape(features[name])}")
    if len(set(rows.values())) != 1:
        raise ValueError(f"all modalities must have the same number of rows, got {rows}")
    return next(iter(rows.values()))


def mixed_knn_graph(
    features: Mapping[str, np.ndarray],
    k: int,
    weights: Mapping[str, float] | None,
    chunk_size: int = 2048,
    device: torch.device | str | None = None,
) -> sp.csr_matrix:
    """``S = sum_m w_m * knn_graph(features[m], k)`` as a float32 CSR matrix.

    ``weights=None`` uses :func:`default_modality_weights`.  Modalities with weight 0 are not
    computed.  Every row of the result sums to 1.
    """
    n = _check_feature_dict(features)
    _check_k(k, n)
    if weights is None:
        weights = default_modality_weights(list(features))
    w = validate_modality_weights(weights, features.keys())
    total = None
    for name in sorted(features):
        if w[name] == 0.0:
            continue
        part = knn_graph(features[name], k, chunk_size=chunk_size, device=device)
        part = part.multiply(np.float32(w[name])).tocsr() if w[name] != 1.0 else part
        total = part if total is None else total + part
    total = sp.csr_matrix(total, dtype=np.float32)
    total.sum_duplicates()
    total.eliminate_zeros()
    total.sort_indices()
    return total


# --------------------------------------------------------------------------------------------
# on-disk cache
# --------------------------------------------------------------------------------------------


def cache_key(fingerprint: str, k: int, weights: Mapping[str, float]) -> str:
    """Hex sha256 of (format version, fingerprint, k, weights sorted by modality)."""
    payload = {
        "format": CACHE_FORMAT_VERSION,
        "fingerprint": str(fingerprint),
        "k": int(k),
        "weights": [[name, float(weights[name])] for name in sorted(weights)],
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def cache_path(cache_dir: str | Path, fingerprint: str, k: int, weights: Mapping[str, float]) -> Path:
    """Path of the cache file ``<cache_dir>/knn-<first 16 hex of the key>.npz``."""
    return Path(cache_dir) / f"knn-{cache_key(fingerprint, k, weights)[:16]}.npz"


def _load_cached(path: Path, n: int) -> sp.csr_matrix | None:
    try:
        graph = sp.load_npz(path)
    except FileNotFoundError:
        return None
    except Exception as exc:  # corrupt / truncated / foreign file: rebuild it
        warnings.warn(f"kNN cache file {path} is unreadable ({type(exc).__name__}: {exc}); rebuilding",
                      RuntimeWarning, stacklevel=3)
        return None
    if graph.shape != (n, n) or not np.all(np.isfinite(graph.data)):
        warnings.warn(f"kNN cache file {path} holds a {graph.shape} matrix, expected ({n}, {n}); rebuilding",
                      RuntimeWarning, stacklevel=3)
        return None
    graph = sp.csr_matrix(graph, dtype=np.float32)
    graph.sort_indices()
    return graph


def _save_atomic(graph: sp.csr_matrix, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            sp.save_npz(fh, graph, compressed=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def cached_mixed_knn_graph(
    features: Mapping[str, np.ndarray],
    k: int,
    weights: Mapping[str, float] | None,
    fingerprint: str,
    cache_dir: str | Path | None,
    chunk_size: int = 2048,
    device: torch.device | str | None = None,
) -> sp.csr_matrix:
    """:func:`mixed_knn_graph`, cached on disk under ``cache_dir`` (``None``: no caching).

    The file is ``<cache_dir>/knn-<key16>.npz`` with the key from :func:`cache_key`
    (fingerprint, k, validated weights, format version).  A hit is loaded from disk; an
    unreadable or mismatching file is rebuilt and overwritten.  Files are written atomically
    (temporary file in the same directory, then ``os.replace``); a failure to write the cache
    only warns.
    """
    n = _check_feature_dict(features)
    k = _check_k(k, n)
    if weights is None:
        weights = default_modality_weights(list(features))
    w = validate_modality_weights(weights, features.keys())
    if cache_dir is None:
        return mixed_knn_graph(features, k, w, chunk_size=chunk_size, device=device)

    path = cache_path(cache_dir, fingerprint, k, w)
    graph = _load_cached(path, n)
    if graph is not None:
        return graph
    graph = mixed_knn_graph(features, k, w, chunk_size=chunk_size, device=device)
    try:
        _save_atomic(graph, path)
    except OSError as exc:
        warnings.warn(f"could not write kNN cache file {path}: {exc}", RuntimeWarning, stacklevel=2)
    return graph


# --------------------------------------------------------------------------------------------
# user–user graph
# --------------------------------------------------------------------------------------------


def user_knn_graph(
    train: sp.spmatrix,
    features: Mapping[str, np.ndarray],
    k: int,
    weights: Mapping[str, float] | None,
    chunk_size: int = 2048,
    device: torch.device | str | None = None,
) -> sp.csr_matrix:
    """Optional user–user kNN graph (U × U).

    Each user's embedding in modality m is the mean of ``features[m]`` over the items of its
    row of ``train`` (U × I interactions; any stored nonzero counts as one interaction);
    users without training items get a zero vector (they keep themselves plus the lowest
    indexed other users).  The mean is a sparse row-normalised ``train`` times the features;
    ``train`` is never densified.  Then :func:`mixed_knn_graph` over those embeddings.
    """
    if not sp.issparse(train):
        raise ValueError("train must be a scipy sparse matrix (users × items)")
    n_items = _check_feature_dict(features)
    train = sp.csr_matrix(train)
    if train.shape[1] != n_items:
        raise ValueError(f"train has {train.shape[1]} item columns but the features have {n_items} rows")
    train = train.copy()
    train.sum_duplicates()
    train.eliminate_zeros()
    train.data = np.ones_like(train.data, dtype=np.float32)
    train = train.astype(np.float32)
    deg = np.diff(train.indptr).astype(np.float64)
    inv = np.divide(1.0, deg, out=np.zeros_like(deg), where=deg > 0).astype(np.float32)
    mean_op = sp.diags(inv, format="csr", dtype=np.float32) @ train
    user_feats = {
        name: np.asarray(mean_op @ _as_feature_matrix(f, f"features[{name!r}]"), dtype=np.float32)
        for name, f in features.items()
    }
    return mixed_knn_graph(user_feats, k, weights, chunk_size=chunk_size, device=device)


# --------------------------------------------------------------------------------------------
# torch conversion
# --------------------------------------------------------------------------------------------


def to_torch_sparse(m: sp.spmatrix, device: torch.device | str | None = None) -> torch.Tensor:
    """scipy sparse matrix -> torch sparse CSR float32 tensor (int64 indices)."""
    if not sp.issparse(m):
        raise ValueError("expected a scipy sparse matrix")
    m = sp.csr_matrix(m, dtype=np.float32, copy=True)
    m.sum_duplicates()
    m.sort_indices()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        t = torch.sparse_csr_tensor(
            torch.from_numpy(m.indptr.astype(np.int64)),
            torch.from_numpy(m.indices.astype(np.int64)),
            torch.from_numpy(m.data),
            size=m.shape,
            dtype=torch.float32,
            check_invariants=False,
        )
    return t if device is None else t.to(device)
