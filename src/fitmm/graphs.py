"""The user-item interaction graph. (Item-item and user-user similarity graphs: knn.py.)"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch


def normalized_adjacency(train: sp.csr_matrix) -> sp.csr_matrix:
    """D^-1/2 A D^-1/2 over the symmetric bipartite graph of training edges (N = U + I nodes).

    Users come first (rows 0..U-1), items after. No self loops. Isolated nodes keep zero rows.
    """
    n_users, n_items = train.shape
    r = train.astype(np.float32)
    adj = sp.bmat([[None, r], [r.T, None]], format="csr", dtype=np.float32)
    degree = np.asarray(adj.sum(axis=1)).ravel()
    inv_sqrt = np.zeros_like(degree)
    nonzero = degree > 0
    inv_sqrt[nonzero] = degree[nonzero] ** -0.5
    scale = sp.diags(inv_sqrt)
    out = (scale @ adj @ scale).tocsr()
    out.sort_indices()
    return out


def to_torch(m: sp.spmatrix, device="cpu") -> torch.Tensor:
    """scipy sparse -> torch sparse CSR float32 (sparse @ dense products are fast and autograd-able)."""
    m = m.tocsr().astype(np.float32)
    with warnings.catch_warnings():  # torch flags sparse CSR as "beta" on every construction
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            torch.from_numpy(m.indptr.astype(np.int64)),
            torch.from_numpy(m.indices.astype(np.int64)),
            torch.from_numpy(m.data),
            size=m.shape,
            check_invariants=False,  # scipy already guarantees a valid, sorted CSR
        ).to(device)


class _SparseMatmul(torch.autograd.Function):
    """y = A @ x with the backward A^T @ grad from a transpose prepared once.

    torch's generic sparse backward transposes A on every call, which costs more than the
    product itself; graphs are fixed, so their transposes are built once (and a symmetric
    matrix, like a normalised adjacency, is its own transpose).
    """

    @staticmethod
    def forward(ctx, a, a_t, x):
        ctx.a_t = a_t
        return a @ x

    @staticmethod
    def backward(ctx, grad):
        return None, None, ctx.a_t @ grad


def sparse_matmul(a: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor | None = None) -> torch.Tensor:
    """a @ x for a fixed sparse `a`, differentiable in x; pass `a_t` (a's transpose) unless a is symmetric."""
    return _SparseMatmul.apply(a, a if a_t is None else a_t, x)
