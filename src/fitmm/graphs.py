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


class _SymmetricSpMM(torch.autograd.Function):
    """y = A @ x for a SYMMETRIC sparse A, whose backward is A @ grad (no transpose needed).

    torch's generic sparse backward transposes A on every call, which costs more than the
    product itself; normalised adjacencies are symmetric, so we skip it.
    """

    @staticmethod
    def forward(ctx, adjacency, x):
        ctx.adjacency = adjacency
        return adjacency @ x

    @staticmethod
    def backward(ctx, grad):
        return None, ctx.adjacency @ grad


def symmetric_matmul(adjacency: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """adjacency @ x, with a fast backward; `adjacency` must be symmetric."""
    return _SymmetricSpMM.apply(adjacency, x)
