"""FITMM spectral core: frequency bands, gates, fusion and the FITMM regularisers.

Pure torch, no dependency on the rest of fitmm. Read top to bottom:

1. band sizes                  -- how the d singular directions are grouped into M bands
2. band projectors             -- P_b from the eigendecomposition of the d x d Gram matrix,
                                  with a custom backward that stays finite on repeated
                                  singular values
3. band splitting              -- band_b(Y) = Y P_b, per matrix or per modality chunk
4. gate, band weights, fusion  -- e = sum_b w_b g_b Z_b
5. information-bottleneck surrogate on the gates
6. consistency losses          -- cross-band and cross-modal

"Frequency" here means the matrix's own singular basis (not an FFT/DCT): band 1 holds the
directions with the largest singular values ("low frequency"), band M the smallest.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

# Between-group eigenvalue gaps at or below GAP_RTOL * max|eigenvalue| are treated as
# degenerate (their gradient term is dropped, see _GroupProjectors.backward). With the default
# float64 Gram, gaps this small are indistinguishable from round-off. (With a float32 Gram,
# round-off gaps are ~1e-7 relative: their terms stay finite, just large.)
GAP_RTOL = 1e-12

# Cosine similarity denominator floor: zero rows get cosine 0 instead of NaN.
COS_EPS = 1e-8


# ----------------------------------------------------------------------------------------------
# 1. band sizes


def band_sizes(d: int, num_bands: int) -> list[int]:
    """Sizes of the M contiguous groups of singular directions: floor(d/M), with the first
    (d mod M) groups one larger, so that lower-frequency bands never get fewer directions.
    (64, 3) -> [22, 21, 21]."""
    if isinstance(num_bands, bool) or not hasattr(num_bands, "__index__"):
        raise ValueError(f"num_bands must be an integer, got {num_bands!r}")
    num_bands = int(num_bands)
    if not 1 <= num_bands <= d:
        raise ValueError(
            f"num_bands must satisfy 1 <= num_bands <= d (each band needs at least one "
            f"singular direction); got num_bands={num_bands}, d={d}"
        )
    base, extra = divmod(d, num_bands)
    return [base + 1 if b < extra else base for b in range(num_bands)]


# ----------------------------------------------------------------------------------------------
# 2. band projectors


class _GroupProjectors(torch.autograd.Function):
    """Symmetric G (..., d, d) -> projectors onto groups of its eigenvectors (..., M, d, d).

    Eigenvalues are ordered descending and split into contiguous groups of the given sizes.

    Why a custom backward: torch.linalg.eigh's own backward divides by ALL eigenvalue gaps,
    so it returns inf/NaN as soon as two eigenvalues coincide (duplicated columns, rank
    deficiency). A group projector P_g = sum_{i in g} v_i v_i^T is invariant to rotations
    inside the group, so within-group gaps do not appear in its true derivative:

        dP_g = sum_{i in g, j not in g} (v_i^T dG v_j) / (l_i - l_j) (v_i v_j^T + v_j v_i^T)

    Pairing this with the upstream gradients Gbar_g and symmetrising gives

        dL/dG = V K V^T,  K_ij = (R_ij - R_ji) / (2 (l_i - l_j))   if group(i) != group(j)
                          K_ij = 0                                  otherwise,
        R_ij = S_{group(i), ij},  S_g = V^T (Gbar_g + Gbar_g^T) V.

    Tiny between-group gaps: a gap |l_i - l_j| <= GAP_RTOL * max|l| means the two groups
    share (numerically) an eigenvalue, where the projectors are not differentiable at all.
    We zero those terms rather than clamp the gap: clamping would produce gradients of size
    ~1e12 that would swamp an optimiser step; zeroing treats the pair like a within-group
    pair (the tie is assumed not to be split). The common case is a rank-deficient input
    whose null directions straddle a band boundary; for the bands y P_b the numerator of
    such a term is exactly zero there (y v_i = y v_j = 0), so zero is the right value.
    """

    @staticmethod
    def forward(ctx, gram: Tensor, sizes: tuple[int, ...]) -> Tensor:
        lam, vec = torch.linalg.eigh(gram)           # ascending
        lam, vec = lam.flip(-1), vec.flip(-1)        # descending: band 1 = largest
        groups = torch.repeat_interleave(
            torch.arange(len(sizes), device=gram.device),
            torch.tensor(sizes, device=gram.device),
        )
        ctx.save_for_backward(lam, vec, groups)
        projs, start = [], 0
        for k in sizes:
            v = vec[..., start:start + k]
            projs.append(v @ v.transpose(-1, -2))
            start += k
        return torch.stack(projs, dim=-3)

    @staticmethod
    @once_differentiable  # second derivatives would silently miss the eigenvector terms
    def backward(ctx, grad_p: Tensor):
        lam, vec, groups = ctx.saved_tensors
        m = grad_p.shape[-3]
        vt = vec.transpose(-1, -2).unsqueeze(-3)                  # (..., 1, d, d)
        s = vt @ (grad_p + grad_p.transpose(-1, -2)) @ vt.transpose(-1, -2)  # (..., M, d, d)
        # R_ij = S_{group(i), ij}: pick, for every row i, the slice of its own group.
        onehot = F.one_hot(groups, m).to(s.dtype).transpose(0, 1)  # (M, d)
        r = (s * onehot.unsqueeze(-1)).sum(dim=-3)                 # (..., d, d)
        gap = lam.unsqueeze(-1) - lam.unsqueeze(-2)                # l_i - l_j
        tol = GAP_RTOL * lam.abs().amax(dim=-1, keepdim=True).unsqueeze(-1).clamp_min(1e-300)
        keep = (groups.unsqueeze(-1) != groups.unsqueeze(-2)) & (gap.abs() > tol)
        k = torch.where(keep, (r - r.transpose(-1, -2)) / (2 * torch.where(keep, gap, 1.0)), 0.0)
        return vec @ k @ vec.transpose(-1, -2), None


class _Gram(torch.autograd.Function):
    """Y^T Y accumulated in `dtype` (None: y's dtype), returned in float64 for eigh.

    Eigenvalues are SQUARED singular values, so a float32 Gram resolves the small singular
    directions only down to ~1e-7 * sigma_max^2, and the band boundaries of a trained model
    can be closer than that; float64 keeps them (it is the default). The backward,
    dL/dY = Y (Gbar + Gbar^T), runs as ONE product in y's own dtype: autograd's generic
    backward of a float64 product would cost two float64 products plus a sum, about 4x the
    forward on a CPU, for gradient precision float32 training cannot use anyway.
    """

    @staticmethod
    def forward(ctx, y: Tensor, dtype: torch.dtype | None) -> Tensor:
        ctx.save_for_backward(y)
        acc = y if dtype is None else y.to(dtype)
        return (acc.transpose(-1, -2) @ acc).to(torch.float64)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (y,) = ctx.saved_tensors
        grad = grad.to(y.dtype)
        return y @ (grad + grad.transpose(-1, -2)), None


def band_projectors(
    y: Tensor, num_bands: int, *, gram_dtype: torch.dtype | None = torch.float64
) -> Tensor:
    """Projectors P_b (M x d x d) onto the right singular directions of y (n x d) in band b.

    Computed from eigh of the d x d Gram matrix (not an SVD of y: far cheaper for n >> d),
    eigh in float64, result cast back to y's dtype. Leading batch dims are allowed:
    (..., n, d) -> (..., M, d, d). The projectors sum to the identity, so the bands always sum
    exactly to y. With num_bands == 1 the single projector is the identity (no decomposition).
    """
    d = y.shape[-1]
    sizes = band_sizes(d, num_bands)
    if num_bands == 1:
        eye = torch.eye(d, dtype=y.dtype, device=y.device)
        return eye.expand(*y.shape[:-2], 1, d, d)
    return _GroupProjectors.apply(_Gram.apply(y, gram_dtype), tuple(sizes)).to(y.dtype)


# ----------------------------------------------------------------------------------------------
# 3. band splitting


def band_split(
    y: Tensor, num_bands: int, *, gram_dtype: torch.dtype | None = torch.float64
) -> Tensor:
    """Bands of y (n x d) in y's own singular basis, stacked as (M x n x d).

    band_b(y) = y P_b = Q_G Sigma_G V_G^T for the group G of band b: mutually orthogonal,
    summing to y. With num_bands == 1 the single band is y itself.
    """
    if num_bands == 1:
        band_sizes(y.shape[-1], 1)  # validates d >= 1
        return y.unsqueeze(0)
    return torch.einsum("ni,bij->bnj", y, band_projectors(y, num_bands, gram_dtype=gram_dtype))


def modality_band_split(
    x: Tensor, chunk: int, num_bands: int, *, gram_dtype: torch.dtype | None = torch.float64
) -> Tensor:
    """Per-modality bands of x (n x D), re-assembled per band as (M x n x D).

    x is the concatenation of D/chunk modality blocks [x_id | x_v | x_t ...]. Each block is
    decomposed in its OWN singular basis (modalities have unrelated spectra), then
    Band_b(x) = [band_b(x_id) | band_b(x_v) | ...]. The eigendecompositions of all blocks
    run as one batched eigh.
    """
    n, dim = x.shape
    if chunk <= 0 or dim % chunk:
        raise ValueError(f"feature dim {dim} is not a positive multiple of chunk={chunk}")
    if num_bands == 1:
        band_sizes(chunk, 1)
        return x.unsqueeze(0)
    c = dim // chunk
    blocks = x.reshape(n, c, chunk).transpose(0, 1)              # (C, n, chunk)
    projs = band_projectors(blocks, num_bands, gram_dtype=gram_dtype)  # (C, M, chunk, chunk)
    bands = torch.einsum("nci,cbij->bncj", x.reshape(n, c, chunk), projs)
    return bands.reshape(num_bands, n, dim)


# ----------------------------------------------------------------------------------------------
# 4. gate, band weights, fusion

GATE_MODES = ("pos", "dual", "off")


class ResidualGate(nn.Module):
    """Per-node band gates g = 1 + s * act(W x + c), act = sigmoid ('pos') or tanh ('dual').

    Residual around 1 so an untrained gate leaves the bands as they are; 'pos' can only
    amplify a band (g in [1, 1+s] for s >= 0), 'dual' may also damp it. 'off' is the ablation:
    all-ones gates and no parameters at all (so nothing dead reaches the optimiser).
    """

    def __init__(self, in_dim: int, num_bands: int, mode: str = "pos", scale_init: float = 0.5):
        super().__init__()
        if mode not in GATE_MODES:
            raise ValueError(f"gate mode must be one of {GATE_MODES}, got {mode!r}")
        self.mode, self.num_bands = mode, num_bands
        if mode != "off":
            self.proj = nn.Linear(in_dim, num_bands)
            self.scale = nn.Parameter(torch.tensor(float(scale_init)))

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "off":
            return x.new_ones(x.shape[0], self.num_bands)
        act = torch.sigmoid if self.mode == "pos" else torch.tanh
        return 1.0 + self.scale * act(self.proj(x))


class BandWeights(nn.Module):
    """Global band weights w_b = sigmoid(phi_b), phi initialised to 1 (w ~ 0.73 each):
    sigmoid keeps each weight in (0, 1) so no band can flip sign or blow up."""

    def __init__(self, num_bands: int):
        super().__init__()
        self.phi = nn.Parameter(torch.ones(num_bands))

    def forward(self) -> Tensor:
        return torch.sigmoid(self.phi)


def fuse(bands: Tensor, gates: Tensor, weights: Tensor) -> Tensor:
    """e = sum_b w_b g_b Z_b: bands (M x n x D), gates (n x M), weights (M,) -> (n x D)."""
    return torch.einsum("bnd,nb,b->nd", bands, gates, weights)


# ----------------------------------------------------------------------------------------------
# 5. information-bottleneck surrogate


def ib_loss(
    gates: Tensor,
    alpha: float = 1.0,
    mu: float = 1.0,
    phi_plus: float = 0.0,
    mode: str = "pos",
) -> Tensor:
    """Penalise gates for departing from 1 (the "pass everything unchanged" point).

    delta = g - 1 (clamped at 0 in 'pos' mode: only amplification is penalised);
    loss = alpha * mean_rows ||delta||^2 + mu * mean_rows(||delta||_2 * sum_b relu(delta_b - phi+)).
    The first term is a plain energy cost; the second only bites on bands opened beyond the
    shut-off threshold phi+, which pushes each node to open few bands (sparsity).
    Zero when all gates equal 1.
    """
    if mode not in GATE_MODES:
        raise ValueError(f"ib mode must be one of {GATE_MODES}, got {mode!r}")
    delta = gates - 1.0
    if mode == "pos":
        delta = delta.clamp_min(0.0)
    sq = delta.pow(2).sum(dim=-1)
    norm = torch.linalg.vector_norm(delta, dim=-1)  # its backward gives 0 (not NaN) at 0
    over = F.relu(delta - phi_plus).sum(dim=-1)
    return alpha * sq.mean() + mu * (norm * over).mean()


# ----------------------------------------------------------------------------------------------
# 6. consistency losses


def _row_mean(values: Tensor, counts: Tensor | None) -> Tensor:
    """Mean over rows, row r counted counts[r] times (None: once each)."""
    if counts is None:
        return values.mean(dim=-1)
    c = counts.to(values.dtype)
    return (values * c).sum(dim=-1) / c.sum()


def _pairwise_cos_mse(z: Tensor, counts: Tensor | None = None) -> Tensor:
    """z (K x B x D) -> sum over ordered pairs k != l of mean_rows (cos(z_k, z_l) - 1)^2."""
    u = z / z.norm(dim=-1, keepdim=True).clamp_min(COS_EPS)
    k = z.shape[0]
    # Row-wise dot products per pair (K is tiny): far cheaper than a batched (K x D)(D x K) product.
    return sum(
        _row_mean((u[i] * u[j]).sum(-1).sub(1.0).pow(2), counts) for i in range(k) for j in range(k) if i != j
    )


class _UniformCE(torch.autograd.Function):
    """The value of _uniform_ce, with a hand-written backward: dL/dS_rs = (c_r/n)(p_rs - c_s/n)
    for p the count-weighted row softmax, and dL/dz = (G + G^T) z / tau. One B x B x D product
    instead of autograd's two, and every B x B step in place: after the feature MLPs this is
    the most expensive FITMM term (B ~ 2000 unique users per batch)."""

    @staticmethod
    def forward(ctx, z: Tensor, tau: float, c: Tensor) -> Tensor:
        n = c.sum()
        sim = torch.mm(z, z.t()).div_(tau)
        linear = (sim @ c) / n                       # sum_s c_s S_rs / n, before sim is reused
        p = sim.add_(c.log())                        # logits S_rs + log c_s
        peak = p.amax(dim=-1, keepdim=True)
        p = p.sub_(peak).exp_()
        total = p.sum(dim=-1, keepdim=True)
        p = p.div_(total)                            # the count-weighted softmax
        lse = (peak + total.log()).squeeze(-1)
        ctx.save_for_backward(z, p, c)
        ctx.tau = tau
        return (c * (lse - linear)).sum() / n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        z, p, c = ctx.saved_tensors
        w = c / c.sum()
        g = (p - w).mul_(w.unsqueeze(1))            # not in place: a retained graph may run backward twice
        return torch.mm(g + g.t(), z).mul_(grad / ctx.tau), None, None


def _uniform_ce(z: Tensor, tau: float, counts: Tensor | None = None) -> Tensor:
    """Cross-entropy of the rows of softmax(z z^T / tau) (B x B) against a uniform target:
    mean_rows -(1/B) sum_j log softmax_ij. It spreads a band's batch similarities out, a
    counterweight to the cosine terms that pull representations together.

    With `counts`, row r of z stands for counts[r] identical batch rows (a batch repeats users
    and items). The value is exactly that of the expanded batch, from a smaller matrix:
    with n = sum(c), -mean log softmax = (1/n) sum_r c_r [log sum_s c_s e^{S_rs} - (1/n) sum_s c_s S_rs].
    """
    c = z.new_ones(z.shape[0]) if counts is None else counts.to(z.dtype)
    return _UniformCE.apply(z, tau, c)


def cross_band_consistency(bands: Tensor, tau: float = 1.0, counts: Tensor | None = None) -> Tensor:
    """Cross-band consistency (the variant the released code trains), bands (M x B x D).

    sum over ordered band pairs m != n of mean_rows (cos(Z_m, Z_n) - 1)^2, plus the uniform
    cross-entropy of each upper-half band (0-based b >= M // 2), all divided by M(M-1).
    With M == 1 there are no pairs and the divisor is 0: returns a constant 0 (no graph).
    `counts` (B,): how many batch rows each row stands for (see _uniform_ce); None = 1 each.
    """
    m = bands.shape[0]
    if m == 1:
        return bands.new_zeros(())
    total = _pairwise_cos_mse(bands, counts)
    for b in range(m // 2, m):
        total = total + _uniform_ce(bands[b], tau, counts)
    return total / (m * (m - 1))


def cross_modal_consistency(
    bands: Tensor, chunk: int, tau: float = 1.0, counts: Tensor | None = None
) -> Tensor:
    """Cross-modal consistency (the paper's "aligns modalities within each band").

    Interpretation of the spec ("for each band, MSE(cos, 1) between the id/v/t chunks
    pairwise, same uniform term, divided by 6M"): for each band, the D columns are split into
    C = D/chunk modality chunks; sum over ORDERED pairs of different chunks of
    mean_rows (cos - 1)^2 (C(C-1) = 6 pairs for 3 modalities, which matches 6M); plus the
    uniform cross-entropy of the whole band for upper-half bands (0-based b >= M // 2), as in
    cross_band; total divided by C(C-1) * M. With a single chunk there is nothing to align
    and the divisor is 0: returns a constant 0 (no graph). `counts`: as in cross_band_consistency.
    """
    m, b, dim = bands.shape
    if chunk <= 0 or dim % chunk:
        raise ValueError(f"feature dim {dim} is not a positive multiple of chunk={chunk}")
    c = dim // chunk
    if c == 1:
        return bands.new_zeros(())
    total = bands.new_zeros(())
    for i in range(m):
        total = total + _pairwise_cos_mse(bands[i].reshape(b, c, chunk).transpose(0, 1), counts)
        if i >= m // 2:
            total = total + _uniform_ce(bands[i], tau, counts)
    return total / (c * (c - 1) * m)
