"""Behaviour tests for fitmm.knn (content kNN graphs and their cache)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fitmm import knn
from fitmm.knn import (
    cached_mixed_knn_graph,
    default_modality_weights,
    knn_graph,
    mixed_knn_graph,
    to_torch_sparse,
    user_knn_graph,
)


def neighbour_sets(g: sp.csr_matrix) -> list[set[int]]:
    g = g.tocsr()
    return [set(g.indices[g.indptr[r] : g.indptr[r + 1]].tolist()) for r in range(g.shape[0])]


def dense_reference(x: np.ndarray, k: int) -> np.ndarray:
    """Brute force: full cosine matrix, self forced first, stable lowest-index tie-break."""
    x = x.astype(np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    xn = x / np.where(norms > 0, norms, 1.0)
    sim = xn @ xn.T
    np.fill_diagonal(sim, np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    out = np.zeros_like(sim, dtype=np.float32)
    np.put_along_axis(out, order, 1.0 / k, axis=1)
    return out


def check_knn_invariants(g: sp.csr_matrix, n: int, k: int) -> None:
    assert isinstance(g, sp.csr_matrix)
    assert g.shape == (n, n)
    assert g.dtype == np.float32
    assert np.all(np.diff(g.indptr) == k)
    np.testing.assert_allclose(np.asarray(g.sum(axis=1)).ravel(), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(g.diagonal(), np.float32(1.0 / k))
    assert np.all(np.isfinite(g.data))


# ------------------------------------------------------------------------------ knn_graph


HAND = np.array(
    [
        [1.0, 0.0],   # 0
        [1.0, 0.1],   # 1  ~ 0
        [0.0, 1.0],   # 2
        [0.1, 1.0],   # 3  ~ 2
        [-1.0, 0.0],  # 4  opposite of 0: cos to 2 is 0, to 3 is -0.0995, to 0/1 about -1
    ],
    dtype=np.float32,
)


def test_hand_example_k2():
    g = knn_graph(HAND, 2)
    check_knn_invariants(g, 5, 2)
    assert neighbour_sets(g) == [{0, 1}, {0, 1}, {2, 3}, {2, 3}, {2, 4}]
    assert np.all(g.data == np.float32(0.5))
    expected = np.zeros((5, 5), dtype=np.float32)
    for r, cols in enumerate([(0, 1), (0, 1), (2, 3), (2, 3), (2, 4)]):
        expected[r, list(cols)] = 0.5
    np.testing.assert_array_equal(g.toarray(), expected)


def test_hand_example_k1_is_identity_and_k_equals_n_is_full():
    np.testing.assert_array_equal(knn_graph(HAND, 1).toarray(), np.eye(5, dtype=np.float32))
    np.testing.assert_allclose(knn_graph(HAND, 5).toarray(), np.full((5, 5), 0.2, np.float32))


def test_scale_invariance_cosine():
    scaled = HAND * np.array([[3.0], [0.01], [7.0], [100.0], [0.5]], dtype=np.float32)
    assert (knn_graph(scaled, 2) != knn_graph(HAND, 2)).nnz == 0


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 10_000])
def test_chunked_equals_unchunked_and_dense_reference(chunk_size):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((53, 12)).astype(np.float32)
    full = knn_graph(x, 6, chunk_size=100_000)
    part = knn_graph(x, 6, chunk_size=chunk_size)
    check_knn_invariants(part, 53, 6)
    assert (full != part).nnz == 0
    np.testing.assert_array_equal(part.toarray(), dense_reference(x, 6))


def test_dense_reference_several_k():
    rng = np.random.default_rng(1)
    x = rng.random((40, 5)).astype(np.float32)  # non-negative, like real content features
    for k in (1, 2, 5, 17, 40):
        np.testing.assert_array_equal(knn_graph(x, k, chunk_size=9).toarray(), dense_reference(x, k))


def test_deterministic_across_calls():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    a, b = knn_graph(x, 5, chunk_size=10), knn_graph(x, 5, chunk_size=10)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.indptr, b.indptr)


def test_zero_rows_no_nan_self_kept_lowest_index_ties():
    x = HAND.copy()
    x[1] = 0.0
    x[4] = 0.0
    for chunk_size in (1, 2, 100):
        g = knn_graph(x, 3, chunk_size=chunk_size)
        check_knn_invariants(g, 5, 3)
        sets = neighbour_sets(g)
        # zero rows: similarity 0 to everything -> self plus the two lowest other indices
        assert sets[1] == {0, 1, 2}
        assert sets[4] == {0, 1, 4}
        # item 0: itself, then 3 (cos 0.0995), then tie at 0 among {1, 2, 4} -> 1
        assert sets[0] == {0, 3, 1}
        np.testing.assert_array_equal(g.toarray(), dense_reference(x, 3))


def test_all_zero_features():
    g = knn_graph(np.zeros((6, 4), np.float32), 2, chunk_size=4)
    check_knn_invariants(g, 6, 2)
    assert neighbour_sets(g) == [{0, 1}, {0, 1}, {0, 2}, {0, 3}, {0, 4}, {0, 5}]


def test_duplicate_rows_keep_self():
    x = np.array([[1, 2], [1, 2], [1, 2], [-3, 1]], dtype=np.float32)
    g = knn_graph(x, 1)
    np.testing.assert_array_equal(g.toarray(), np.eye(4, dtype=np.float32))
    g2 = knn_graph(x, 2, chunk_size=1)
    check_knn_invariants(g2, 4, 2)
    assert neighbour_sets(g2)[:3] == [{0, 1}, {0, 1}, {0, 2}]


def test_input_not_modified_and_float64_accepted():
    x = HAND.astype(np.float64) * 3
    before = x.copy()
    g = knn_graph(x, 2)
    np.testing.assert_array_equal(x, before)
    assert g.dtype == np.float32


@pytest.mark.parametrize("k", [0, -1, 6, 2.5, True])
def test_bad_k(k):
    with pytest.raises(ValueError, match="k must"):
        knn_graph(HAND, k)


def test_bad_inputs():
    with pytest.raises(ValueError, match="2-D"):
        knn_graph(np.zeros(5, np.float32), 1)
    with pytest.raises(ValueError, match="NaN"):
        knn_graph(np.array([[np.nan, 1.0], [1.0, 1.0]]), 1)
    with pytest.raises(ValueError, match="chunk_size"):
        knn_graph(HAND, 2, chunk_size=0)


# ------------------------------------------------------------------------------ mixed graph


def two_modalities(seed=3, n=30):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.standard_normal((n, 7)).astype(np.float32),
        "text": rng.standard_normal((n, 4)).astype(np.float32),
    }


def test_mixed_equals_weighted_sum():
    f = two_modalities()
    w = {"image": 0.25, "text": 0.75}
    s = mixed_knn_graph(f, 4, w)
    assert isinstance(s, sp.csr_matrix) and s.dtype == np.float32
    ref = 0.25 * knn_graph(f["image"], 4).toarray() + 0.75 * knn_graph(f["text"], 4).toarray()
    np.testing.assert_allclose(s.toarray(), ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(s.sum(axis=1)).ravel(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(s.diagonal(), 0.25, rtol=1e-6)  # self kept in both


def test_mixed_zero_weight_and_default_weights():
    f = two_modalities()
    s = mixed_knn_graph(f, 3, {"image": 0.0, "text": 1.0})
    assert (s != knn_graph(f["text"], 3)).nnz == 0
    d = mixed_knn_graph(f, 3, None)
    ref = 0.1 * knn_graph(f["image"], 3).toarray() + 0.9 * knn_graph(f["text"], 3).toarray()
    np.testing.assert_allclose(d.toarray(), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "weights, message",
    [
        ({"image": 1.0}, r"missing weights for modalities \['text'\]"),
        ({"image": 0.5, "text": 0.3, "audio": 0.2}, r"unknown modalities \['audio'\]"),
        ({"image": 0.5, "audio": 0.5}, r"missing .*'text'.*unknown .*'audio'"),
        ({"image": -0.1, "text": 1.1}, r"'image' must be non-negative"),
        ({"image": 0.2, "text": 0.7}, r"sum to 1 .*sum to 0\.9"),
        ({"image": 0.5, "text": 0.6}, r"sum to 1\.1"),
        ({"image": float("nan"), "text": 1.0}, r"finite"),
    ],
)
def test_bad_weights(weights, message):
    with pytest.raises(ValueError, match=message):
        mixed_knn_graph(two_modalities(), 3, weights)


def test_weights_within_tolerance_accepted():
    mixed_knn_graph(two_modalities(), 3, {"image": 0.1, "text": 0.9 + 5e-7})


def test_mixed_feature_shape_mismatch():
    f = two_modalities()
    f["text"] = f["text"][:-1]
    with pytest.raises(ValueError, match="same number of rows"):
        mixed_knn_graph(f, 3, {"image": 0.5, "text": 0.5})


def test_default_modality_weights():
    assert default_modality_weights(["image", "text"]) == {"image": 0.1, "text": 0.9}
    assert default_modality_weights(["text", "image"]) == {"text": 0.9, "image": 0.1}
    assert default_modality_weights(["image", "audio"]) == {"image": 0.5, "audio": 0.5}
    assert default_modality_weights(["text"]) == {"text": 1.0}
    three = default_modality_weights(["image", "text", "audio"])
    assert set(three) == {"image", "text", "audio"}
    assert all(v == pytest.approx(1 / 3) for v in three.values())
    with pytest.raises(ValueError):
        default_modality_weights([])
    with pytest.raises(ValueError, match="duplicate"):
        default_modality_weights(["text", "text"])


# ------------------------------------------------------------------------------ cache


def test_cache_hit_reads_file(tmp_path, monkeypatch):
    f = two_modalities()
    w = {"image": 0.1, "text": 0.9}
    first = cached_mixed_knn_graph(f, 4, w, "fp-A", tmp_path)
    files = sorted(tmp_path.glob("knn-*.npz"))
    assert len(files) == 1 and len(files[0].stem) == len("knn-") + 16
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]

    def boom(*args, **kwargs):
        raise AssertionError("knn_graph must not be recomputed on a cache hit")

    monkeypatch.setattr(knn, "knn_graph", boom)
    loaded = []
    real_load = sp.load_npz
    monkeypatch.setattr(knn.sp, "load_npz", lambda p: loaded.append(p) or real_load(p))
    second = cached_mixed_knn_graph(f, 4, w, "fp-A", tmp_path)
    assert loaded == [files[0]]
    assert isinstance(second, sp.csr_matrix) and second.dtype == np.float32
    np.testing.assert_array_equal(second.toarray(), first.toarray())


def test_cache_key_distinguishes_k_weights_fingerprint(tmp_path):
    f = two_modalities()
    w = {"image": 0.1, "text": 0.9}
    cached_mixed_knn_graph(f, 4, w, "fp-A", tmp_path)
    cached_mixed_knn_graph(f, 5, w, "fp-A", tmp_path)
    cached_mixed_knn_graph(f, 4, {"image": 0.2, "text": 0.8}, "fp-A", tmp_path)
    cached_mixed_knn_graph(f, 4, w, "fp-B", tmp_path)
    cached_mixed_knn_graph(f, 4, {"text": 0.9, "image": 0.1}, "fp-A", tmp_path)  # same as first
    assert len(list(tmp_path.glob("knn-*.npz"))) == 4
    assert knn.cache_key("fp", 4, w) == knn.cache_key("fp", 4, {"text": 0.9, "image": 0.1})


def test_cache_none_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = two_modalities()
    g = cached_mixed_knn_graph(f, 3, None, "fp", None)
    np.testing.assert_array_equal(g.toarray(), mixed_knn_graph(f, 3, None).toarray())
    assert list(tmp_path.iterdir()) == []


def test_corrupt_cache_rebuilt(tmp_path):
    f = two_modalities()
    w = {"image": 0.1, "text": 0.9}
    good = cached_mixed_knn_graph(f, 4, w, "fp-A", tmp_path)
    (path,) = tmp_path.glob("knn-*.npz")
    path.write_bytes(b"this is not an npz file")
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        again = cached_mixed_knn_graph(f, 4, w, "fp-A", tmp_path)
    np.testing.assert_array_equal(again.toarray(), good.toarray())
    np.testing.assert_array_equal(sp.load_npz(path).toarray(), good.toarray())  # overwritten

    # a readable file of the wrong shape is also rebuilt
    sp.save_npz(path, sp.identity(3, format="csr", dtype=np.float32))
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        again = cached_mixed_knn_graph(f, 4, w, "fp-A", tmp_path)
    np.testing.assert_array_equal(again.toarray(), good.toarray())


def test_cache_creates_directory(tmp_path):
    d = tmp_path / "a" / "b"
    cached_mixed_knn_graph(two_modalities(), 2, None, "fp", d)
    assert len(list(d.glob("knn-*.npz"))) == 1


# ------------------------------------------------------------------------------ user graph


def test_user_knn_graph_hand_example():
    # 4 items, one modality each; 4 users (user 3 has no training items)
    feats = {
        "image": np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=np.float32),
        "text": np.array([[1, 0], [0, 1], [1, 0], [0, 1]], dtype=np.float32),
    }
    train = sp.csr_matrix(
        np.array([[1, 1, 0, 0],   # user 0: image (1,0), text (.5,.5)
                  [0, 0, 1, 1],   # user 1: image (0,1), text (.5,.5)
                  [1, 0, 0, 0],   # user 2: image (1,0), text (1,0)
                  [0, 0, 0, 0]],  # user 3: zeros
                 dtype=np.float32)
    )
    g_img = user_knn_graph(train, feats, 2, {"image": 1.0, "text": 0.0})
    check_knn_invariants(g_img, 4, 2)
    assert neighbour_sets(g_img) == [{0, 2}, {1, 0}, {2, 0}, {3, 0}]

    g_txt = user_knn_graph(train, feats, 2, {"image": 0.0, "text": 1.0})
    # text: user0 = user1 = (.5,.5) (cos 1), user2 (1,0): cos to 0/1 = 0.707
    assert neighbour_sets(g_txt) == [{0, 1}, {1, 0}, {2, 0}, {3, 0}]

    g = user_knn_graph(train, feats, 2, {"image": 0.5, "text": 0.5})
    np.testing.assert_allclose(g.toarray(), 0.5 * g_img.toarray() + 0.5 * g_txt.toarray())


def test_user_knn_graph_uses_mean_and_ignores_counts():
    rng = np.random.default_rng(5)
    feats = {"text": rng.standard_normal((12, 3)).astype(np.float32)}
    dense = (rng.random((9, 12)) < 0.3).astype(np.float32)
    dense[4] = 0.0
    counts = sp.csr_matrix(dense * rng.integers(1, 4, size=dense.shape))
    g = user_knn_graph(counts, feats, 3, {"text": 1.0})
    deg = dense.sum(1, keepdims=True)
    means = (dense @ feats["text"]) / np.where(deg > 0, deg, 1)
    np.testing.assert_array_equal(g.toarray(), knn_graph(means, 3).toarray())


def test_user_knn_graph_validation():
    feats = {"text": np.ones((4, 2), np.float32)}
    with pytest.raises(ValueError, match="item columns"):
        user_knn_graph(sp.csr_matrix((3, 5), dtype=np.float32), feats, 1, {"text": 1.0})
    with pytest.raises(ValueError, match="sparse"):
        user_knn_graph(np.ones((3, 4)), feats, 1, {"text": 1.0})


# ------------------------------------------------------------------------------ torch


def test_to_torch_sparse_matches_and_backprops():
    g = mixed_knn_graph(two_modalities(n=12), 3, None)
    t = to_torch_sparse(g)
    assert t.layout == torch.sparse_csr and t.dtype == torch.float32 and tuple(t.shape) == g.shape
    np.testing.assert_allclose(t.to_dense().numpy(), g.toarray())
    x = torch.randn(12, 4, dtype=torch.float32, requires_grad=True)
    y = t @ x
    np.testing.assert_allclose(y.detach().numpy(), g.toarray() @ x.detach().numpy(), rtol=1e-5, atol=1e-6)
    y.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), np.repeat(g.toarray().sum(0)[:, None], 4, 1), rtol=1e-5)


def test_explicit_cpu_device_same_result():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((25, 6)).astype(np.float32)
    assert (knn_graph(x, 4, device="cpu") != knn_graph(x, 4)).nnz == 0
    f = {"text": x}
    assert (mixed_knn_graph(f, 4, None, device=torch.device("cpu")) != knn_graph(x, 4)).nnz == 0
