"""Behaviour of the FITMM spectral core: bands, projector gradients, gates, IB and consistency."""

import math

import pytest
import torch

from fitmm.models.spectral import (
    BandWeights,
    ResidualGate,
    band_projectors,
    band_sizes,
    band_split,
    cross_band_consistency,
    cross_modal_consistency,
    fuse,
    ib_loss,
    modality_band_split,
)


def assert_close(actual, expected, atol=1e-6, rtol=1e-5):
    """Light stand-in for torch.testing.assert_close (whose first call costs ~1 s of imports)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    diff = (actual - expected).abs().max().item()
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), f"max abs diff {diff}"


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def with_spectrum(n, sing, dtype=torch.float64, seed=0):
    """n x d matrix with the given singular values (descending) and random singular vectors."""
    g = gen(seed)
    d = len(sing)
    q, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (q * torch.tensor(sing, dtype=torch.float64)) @ v.T, q, v


def svd_bands(y, num_bands):
    """Reference: truncated-SVD reconstructions Q_G Sigma_G V_G^T, float64."""
    u, s, vh = torch.linalg.svd(y.double(), full_matrices=False)
    out, start = [], 0
    for k in band_sizes(y.shape[1], num_bands):
        sl = slice(start, start + k)
        out.append((u[:, sl] * s[sl]) @ vh[sl])
        start += k
    return torch.stack(out)


# ---------------------------------------------------------------- band sizes


def test_band_sizes():
    assert band_sizes(64, 3) == [22, 21, 21]
    assert band_sizes(10, 1) == [10]
    assert band_sizes(5, 5) == [1, 1, 1, 1, 1]
    assert band_sizes(7, 2) == [4, 3]


@pytest.mark.parametrize("d,m", [(64, 0), (4, 5), (8, -1)])
def test_band_sizes_rejects_bad_num_bands(d, m):
    with pytest.raises(ValueError, match="num_bands"):
        band_sizes(d, m)


# ---------------------------------------------------------------- decomposition


SING = [9.0, 7.5, 6.0, 5.0, 4.0, 3.2, 2.5, 2.0, 1.5, 1.1, 0.8, 0.5]


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-11)])
def test_bands_sum_to_input_and_are_orthogonal(dtype, atol):
    y = with_spectrum(50, SING)[0].to(dtype)
    bands = band_split(y, 3)
    assert bands.shape == (3, 50, 12) and bands.dtype == dtype
    scale = y.norm().item() ** 2
    assert_close(bands.sum(0), y, atol=atol, rtol=0)
    for a in range(3):
        for b in range(3):
            if a != b:
                cross = bands[a].T @ bands[b]
                assert cross.abs().max().item() < atol * scale
                assert (bands[a] * bands[b]).sum().abs().item() < atol * scale


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-11)])
def test_bands_equal_truncated_svd(dtype, atol):
    y = with_spectrum(40, SING, seed=1)[0].to(dtype)
    ref = svd_bands(y, 3)
    assert_close(band_split(y, 3).double(), ref, atol=atol, rtol=0)
    # band 1 holds the largest singular values: it carries the most energy
    energies = ref.pow(2).sum(dim=(1, 2))
    assert energies[0] > energies[1] > energies[2]


def test_float32_gram_option_matches_default_on_well_conditioned_input():
    y = with_spectrum(40, SING, seed=1)[0].float()
    fast = band_split(y, 3, gram_dtype=None)
    assert_close(fast, band_split(y, 3), atol=1e-4, rtol=0)
    assert_close(fast.sum(0), y, atol=1e-5, rtol=0)


def test_projectors_are_orthogonal_projectors_summing_to_identity():
    y = torch.randn(30, 8, generator=gen(2), dtype=torch.float64)
    p = band_projectors(y, 3)
    assert p.shape == (3, 8, 8)
    assert_close(p.sum(0), torch.eye(8, dtype=torch.float64))
    for b, k in enumerate(band_sizes(8, 3)):
        assert_close(p[b] @ p[b], p[b])
        assert_close(p[b], p[b].T)
        assert torch.trace(p[b]).item() == pytest.approx(k)


def test_single_band_is_identity():
    y = torch.randn(10, 6, generator=gen(3))
    bands = band_split(y, 1)
    assert bands.shape == (1, 10, 6)
    assert torch.equal(bands[0], y)
    assert_close(band_projectors(y, 1)[0], torch.eye(6))
    x = torch.randn(10, 12, generator=gen(3))
    assert torch.equal(modality_band_split(x, 4, 1)[0], x)


def test_modality_band_split_matches_per_chunk_decomposition():
    g = gen(4)
    chunks = [torch.randn(60, 8, generator=g) * s for s in (1.0, 5.0, 0.1)]
    chunks[1][:, 0] *= 4  # give the chunks visibly different bases
    x = torch.cat(chunks, dim=1)
    bands = modality_band_split(x, 8, 3)
    assert bands.shape == (3, 60, 24)
    expected = torch.cat([band_split(c, 3) for c in chunks], dim=2)
    assert_close(bands, expected, atol=1e-5, rtol=1e-5)
    assert_close(bands.sum(0), x, atol=1e-5, rtol=1e-5)
    # not the same as decomposing the whole matrix in one basis
    assert not torch.allclose(bands, band_split(x, 3), atol=1e-3)


def test_modality_band_split_rejects_bad_chunk():
    with pytest.raises(ValueError):
        modality_band_split(torch.randn(5, 10), 4, 2)


# ---------------------------------------------------------------- gradients


def test_gradcheck_well_conditioned():
    y = torch.randn(7, 4, generator=gen(5), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: band_projectors(t, 3), (y,))
    assert torch.autograd.gradcheck(lambda t: band_split(t, 2), (y,), fast_mode=True)
    x = torch.randn(9, 6, generator=gen(6), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: modality_band_split(t, 3, 2), (x,), fast_mode=True)


def test_gradcheck_with_ties_inside_groups():
    # Exactly repeated singular values inside each band, distinct between bands: the
    # projectors are smooth here, and the custom backward must get the derivative right.
    y = with_spectrum(6, [3.0, 3.0, 1.0, 1.0], seed=7)[0].requires_grad_()
    assert torch.autograd.gradcheck(lambda t: band_projectors(t, 2), (y,))
    y = with_spectrum(8, [3.0, 3.0, 2.0, 2.0, 1.0, 1.0], seed=7)[0].requires_grad_()
    assert torch.autograd.gradcheck(lambda t: band_split(t, 3), (y,), fast_mode=True)


def _band_loss(bands):
    w = torch.arange(1, bands.shape[0] + 1, dtype=bands.dtype).view(-1, 1, 1)
    return (w * bands.pow(2)).sum() + bands[-1].sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_finite_with_duplicated_columns(dtype):
    g = gen(8)
    a, b = torch.randn(40, 2, generator=g), torch.randn(40, 2, generator=g)
    y = torch.cat([a, a, b, b, a[:, :1]], dim=1).to(dtype).requires_grad_()  # d = 9, rank 4
    _band_loss(band_split(y, 3)).backward()
    assert torch.isfinite(y.grad).all()
    x = torch.cat([y.detach()] * 3, dim=1).requires_grad_()
    _band_loss(modality_band_split(x, 9, 3)).backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_finite_rank_deficient(dtype):
    # rank 2 with d = 9: seven zero singular values spread over all three bands
    g = gen(9)
    y = (torch.randn(30, 2, generator=g) @ torch.randn(2, 9, generator=g)).to(dtype)
    y.requires_grad_()
    _band_loss(band_split(y, 3)).backward()
    assert torch.isfinite(y.grad).all()
    # exactly equal eigenvalues of the Gram matrix, where plain eigh backward gives NaN
    for z in (torch.zeros(12, 6, dtype=dtype), 2 * torch.eye(12, 6, dtype=dtype)):
        z.requires_grad_()
        _band_loss(band_split(z, 3)).backward()
        assert torch.isfinite(z.grad).all()


# ---------------------------------------------------------------- gate, weights, fusion


def test_gate_off_returns_ones_without_parameters():
    gate = ResidualGate(12, 3, mode="off")
    out = gate(torch.randn(5, 12))
    assert torch.equal(out, torch.ones(5, 3))
    assert len(list(gate.parameters())) == 0


def test_gate_pos_range():
    torch.manual_seed(10)
    gate = ResidualGate(12, 3, mode="pos", scale_init=0.5)
    g = gate(torch.randn(200, 12) * 10)
    assert g.shape == (200, 3)
    assert (g >= 1).all() and (g <= 1.5).all()
    assert gate.scale.item() == 0.5


def test_gate_dual_can_shrink():
    torch.manual_seed(11)
    gate = ResidualGate(12, 3, mode="dual")
    with torch.no_grad():
        gate.proj.bias.fill_(-5.0)
    g = gate(torch.randn(20, 12) * 0.01)
    assert (g < 1).all() and (g >= 0.5).all()


def test_gate_rejects_unknown_mode():
    with pytest.raises(ValueError):
        ResidualGate(4, 2, mode="neg")


def test_band_weights_init():
    w = BandWeights(3)()
    assert_close(w, torch.full((3,), 1 / (1 + math.exp(-1.0))))


def test_fuse_hand_example():
    bands = torch.tensor([[[1.0, 0.0], [0.0, 2.0]],      # band 0: rows r0, r1
                          [[3.0, 1.0], [1.0, 1.0]]])     # band 1
    gates = torch.tensor([[1.0, 2.0], [1.5, 1.0]])       # n x M
    weights = torch.tensor([0.5, 0.25])
    # r0: 0.5*1*[1,0] + 0.25*2*[3,1] = [2.0, 0.5]; r1: 0.5*1.5*[0,2] + 0.25*1*[1,1] = [0.25, 1.75]
    expected = torch.tensor([[2.0, 0.5], [0.25, 1.75]])
    assert_close(fuse(bands, gates, weights), expected)


# ---------------------------------------------------------------- information bottleneck


GATES = torch.tensor([[1.5, 1.0, 1.2], [0.8, 1.3, 1.0]])


def test_ib_zero_at_identity_gates():
    ones = torch.ones(4, 3, requires_grad=True)
    for mode in ("pos", "dual"):
        loss = ib_loss(ones, mode=mode)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.isfinite(ones.grad).all()


def test_ib_hand_value_pos():
    # delta (clamped): [0.5, 0, 0.2], [0, 0.3, 0]
    sq = [0.29, 0.09]
    norms = [math.sqrt(0.29), 0.3]
    expected = (sq[0] + sq[1]) / 2 + (norms[0] * 0.7 + norms[1] * 0.3) / 2
    assert ib_loss(GATES).item() == pytest.approx(expected, rel=1e-6)
    # with shut-off threshold 0.25 only the excess over 0.25 counts in the second term
    expected_phi = (sq[0] + sq[1]) / 2 + (norms[0] * 0.25 + norms[1] * 0.05) / 2
    assert ib_loss(GATES, phi_plus=0.25).item() == pytest.approx(expected_phi, rel=1e-6)
    # alpha and mu scale their terms
    expected_am = 2 * (sq[0] + sq[1]) / 2 + 0.5 * (norms[0] * 0.7 + norms[1] * 0.3) / 2
    assert ib_loss(GATES, alpha=2.0, mu=0.5).item() == pytest.approx(expected_am, rel=1e-6)


def test_ib_hand_value_dual():
    # delta: [0.5, 0, 0.2], [-0.2, 0.3, 0]; relu part of row 2 is still 0.3
    sq = [0.29, 0.13]
    norms = [math.sqrt(0.29), math.sqrt(0.13)]
    expected = (sq[0] + sq[1]) / 2 + (norms[0] * 0.7 + norms[1] * 0.3) / 2
    assert ib_loss(GATES, mode="dual").item() == pytest.approx(expected, rel=1e-6)


def test_ib_pos_clamps_gates_below_one():
    low = torch.tensor([[0.5, 0.9, 1.0]])
    assert ib_loss(low, mode="pos").item() == 0.0
    assert ib_loss(low, mode="dual").item() > 0.0


# ---------------------------------------------------------------- consistency


def _orthonormal_rows(b, d):
    return torch.eye(d)[:b]


# CE of softmax rows of the identity logits matrix (B = 2) against uniform
UNIFORM_CE_I2 = math.log(1 + math.e) - 0.5


def test_cross_band_identical_bands_only_uniform_term():
    z = _orthonormal_rows(2, 4)  # z z^T = I
    bands = z.expand(3, 2, 4).clone()
    # cosine part is 0; upper-half bands (1 and 2) each add the uniform CE; / M(M-1) = 6
    expected = 2 * UNIFORM_CE_I2 / 6
    assert cross_band_consistency(bands).item() == pytest.approx(expected, rel=1e-6)
    # tau scales the logits
    ce_tau = math.log(1 + math.exp(0.5)) - 0.25
    assert cross_band_consistency(bands, tau=2.0).item() == pytest.approx(2 * ce_tau / 6, rel=1e-6)


def test_cross_band_cosine_part():
    # two bands, B = 1, orthogonal rows: each ordered pair gives (0 - 1)^2 = 1; z z^T = [1]
    # for the upper band: uniform CE of a 1 x 1 softmax is 0. Total (1 + 1) / 2 = 1.
    bands = torch.tensor([[[1.0, 0.0]], [[0.0, 3.0]]])
    assert cross_band_consistency(bands).item() == pytest.approx(1.0)


def test_cross_band_single_band_is_zero():
    out = cross_band_consistency(torch.randn(1, 5, 6))
    assert out.item() == 0.0 and out.dim() == 0


def test_cross_modal_identical_chunks_only_uniform_term():
    z = _orthonormal_rows(2, 4) / math.sqrt(3)
    band = torch.cat([z, z, z], dim=1)  # 3 identical modality chunks, band @ band^T = I
    bands = band.expand(3, 2, 12).clone()
    expected = 2 * UNIFORM_CE_I2 / (6 * 3)
    assert cross_modal_consistency(bands, chunk=4).item() == pytest.approx(expected, rel=1e-6)
    assert cross_modal_consistency(bands, chunk=12).item() == 0.0  # single chunk


def test_cross_modal_cosine_part():
    # M = 1 (band 0 is "upper half"), B = 1, chunks [1,0] and [0,1]: both ordered pairs give 1;
    # uniform CE over a 1 x 1 matrix is 0; divided by C(C-1)M = 2 -> 1.
    bands = torch.tensor([[[1.0, 0.0, 0.0, 1.0]]])
    assert cross_modal_consistency(bands, chunk=2).item() == pytest.approx(1.0)


def test_consistency_losses_differentiable_and_safe_on_zero_rows():
    bands = torch.randn(3, 6, 12, generator=gen(12))
    bands[1, 2] = 0.0  # a zero row must not produce NaN cosines
    bands.requires_grad_()
    loss = cross_band_consistency(bands) + cross_modal_consistency(bands, chunk=4)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(bands.grad).all() and bands.grad.abs().sum() > 0


def test_end_to_end_pipeline_backward():
    # decomposition -> gate -> fusion -> all losses: one finite backward pass
    torch.manual_seed(13)
    x = torch.randn(40, 12, requires_grad=True)
    h = torch.randn(40, 12, requires_grad=True)
    z = modality_band_split(x, 4, 3) + modality_band_split(h, 4, 3)
    gate, weights = ResidualGate(12, 3), BandWeights(3)
    g = gate(x)
    e = fuse(z, g, weights())
    loss = e.pow(2).mean() + ib_loss(g) + cross_band_consistency(z[:, :8]) \
        + cross_modal_consistency(z[:, :8], chunk=4)
    loss.backward()
    for t in (x, h, gate.proj.weight, gate.scale, weights.phi):
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("loss", ["cross_band", "cross_modal"])
def test_counted_rows_equal_the_expanded_batch(loss):
    """Deduplicated rows with counts give exactly the loss (and gradient) of the repeated batch."""
    torch.manual_seed(0)
    unique = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    counts = torch.tensor([1, 3, 2, 1, 4])
    expanded = unique.repeat_interleave(counts, dim=1)
    if loss == "cross_band":
        a = cross_band_consistency(unique, tau=0.7, counts=counts)
        b = cross_band_consistency(expanded, tau=0.7)
    else:
        a = cross_modal_consistency(unique, chunk=4, tau=0.7, counts=counts)
        b = cross_modal_consistency(expanded, chunk=4, tau=0.7)
    torch.testing.assert_close(a, b)
    (ga,) = torch.autograd.grad(a, unique)
    (gb,) = torch.autograd.grad(b, unique)
    torch.testing.assert_close(ga, gb)


def test_uniform_ce_hand_written_backward_passes_gradcheck():
    """_uniform_ce's analytic backward against finite differences, with and without counts."""
    from fitmm.models.spectral import _uniform_ce

    torch.manual_seed(0)
    z = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _uniform_ce(t, 0.7), (z,))
    counts = torch.tensor([1, 3, 2, 1, 4, 2])
    assert torch.autograd.gradcheck(lambda t: _uniform_ce(t, 1.3, counts), (z,))
    # and the plain definition: mean over rows of -mean log softmax
    expected = -torch.log_softmax(z @ z.T / 0.7, dim=-1).mean()
    torch.testing.assert_close(_uniform_ce(z, 0.7), expected)


# ---------------------------------------------------------------- pinned by mutation testing
# Each test below kills mutants that survived the tests above (docs/testing.md, Mutation testing).


@pytest.mark.parametrize("bad", [2.0, True])
def test_band_sizes_refuses_non_integers_with_its_message(bad):
    with pytest.raises(ValueError, match=f"^num_bands must be an integer, got {bad!r}$"):
        band_sizes(4, bad)


def test_single_band_projector_is_the_identity_in_the_input_dtype_and_batch_shape():
    p = band_projectors(torch.randn(5, 3, dtype=torch.float64, generator=gen(1)), 1)
    assert p.dtype == torch.float64 and p.shape == (1, 3, 3)
    batched = band_projectors(torch.randn(2, 5, 3, generator=gen(2)), 1)
    assert batched.shape == (2, 1, 3, 3)
    assert torch.equal(batched, torch.eye(3).expand(2, 1, 3, 3))


def test_two_bands_and_one_column_edge_cases():
    y, _, _ = with_spectrum(7, [3.0, 2.0, 1.0, 0.5])
    assert_close(band_split(y, 2), svd_bands(y, 2), atol=1e-9)
    assert torch.equal(band_split(torch.ones(3, 1), 1), torch.ones(1, 3, 1))  # d = 1 allows M = 1
    with pytest.raises(ValueError, match="num_bands must satisfy"):
        band_split(torch.ones(3, 0), 1)  # d = 0 has no direction at all
    x = torch.cat([y, with_spectrum(7, [2.0, 1.5, 1.0, 0.1], seed=1)[0]], dim=1)
    expected = torch.cat([svd_bands(x[:, :4], 2), svd_bands(x[:, 4:], 2)], dim=2)
    assert_close(modality_band_split(x, 4, 2), expected, atol=1e-9)
    assert torch.equal(modality_band_split(x[:, :2], 1, 1), x[None, :, :2])  # 1-column chunks, one band


@pytest.mark.parametrize("chunk", [0, 5])
def test_bad_chunk_messages(chunk):
    message = f"^feature dim 8 is not a positive multiple of chunk={chunk}$"
    with pytest.raises(ValueError, match=message):
        modality_band_split(torch.ones(3, 8), chunk, 2)
    with pytest.raises(ValueError, match=message):
        cross_modal_consistency(torch.ones(2, 3, 8), chunk)


def test_bad_mode_messages():
    with pytest.raises(ValueError, match=r"^gate mode must be one of \('pos', 'dual', 'off'\), got 'both'$"):
        ResidualGate(4, 2, "both")
    with pytest.raises(ValueError, match=r"^ib mode must be one of \('pos', 'dual', 'off'\), got 'both'$"):
        ib_loss(torch.ones(2, 2), mode="both")


def test_float64_gram_resolves_the_small_singular_values_of_a_float32_input():
    """Eigenvalues are squared singular values: 3e-4 and 1e-4 give 9e-8 and 1e-8, below float32's
    resolution relative to 1. The default float64 Gram separates them; a float32 Gram cannot, and
    the gram_dtype option must reach the projectors."""
    y, _, _ = with_spectrum(40, [1.0, 0.5, 3e-4, 1e-4])
    y32 = y.float()
    reference = svd_bands(y32.double(), 4)
    assert_close(band_split(y32, 4).double(), reference, atol=1e-7, rtol=0)
    assert (band_split(y32, 4, gram_dtype=torch.float32).double() - reference).abs().max() > 1e-6
    x = torch.cat([y32, y32], dim=1)
    both = torch.cat([reference, reference], dim=2)
    assert_close(modality_band_split(x, 4, 4).double(), both, atol=1e-7, rtol=0)
    assert (modality_band_split(x, 4, 4, gram_dtype=torch.float32).double() - both).abs().max() > 1e-6


def _uniform_ce_reference(z, tau):
    s = (z.double() @ z.double().T) / tau
    return (torch.logsumexp(s, dim=1) - s.mean(dim=1)).mean()


def test_uniform_term_is_stable_for_rows_of_very_different_scale():
    """The log-sum-exp shift is per row: one global shift would underflow the small row to log 0."""
    band = torch.tensor([[30.0, 0.0], [0.1, 0.0]])
    bands = torch.stack([band, band])  # identical bands: only the upper band's uniform term is left
    out = cross_band_consistency(bands, tau=0.01)
    assert torch.isfinite(out)
    assert out.item() == pytest.approx(_uniform_ce_reference(band, 0.01).item() / 2, rel=1e-6)


def _cross_modal_reference(bands, chunk, tau):
    """The docstring's formula, with plain loops: per band, ordered chunk pairs' mean (cos - 1)^2,
    the uniform term for bands b >= M // 2, all divided by C (C - 1) M."""
    m, _, dim = bands.shape
    c = dim // chunk
    total = 0.0
    for b in range(m):
        parts = [bands[b, :, k * chunk:(k + 1) * chunk].double() for k in range(c)]
        for i in range(c):
            for j in range(c):
                if i != j:
                    cos = torch.nn.functional.cosine_similarity(parts[i], parts[j], dim=1)
                    total += ((cos - 1) ** 2).mean().item()
        if b >= m // 2:
            total += _uniform_ce_reference(bands[b], tau).item()
    return total / (c * (c - 1) * m)


@pytest.mark.parametrize("m, chunk", [(2, 3), (4, 3), (2, 1)])
def test_cross_modal_against_a_loop_reference(m, chunk):
    bands = torch.randn(m, 5, 6, generator=gen(m))
    expected = _cross_modal_reference(bands, chunk, 0.5)
    assert cross_modal_consistency(bands, chunk, tau=0.5).item() == pytest.approx(expected, rel=1e-5)
