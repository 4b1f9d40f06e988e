"""Hand-computed checks of fitmm.metrics (formulas: docs/protocol.md, Evaluation)."""

import math

import numpy as np
import pytest

from fitmm.metrics import DEFAULT_KS, METRIC_NAMES, mean_metrics, ranking_metrics


def row(*ranks, kmax=5):
    """Boolean hit row with hits at the given 1-based ranks."""
    r = np.zeros(kmax, dtype=bool)
    for k in ranks:
        r[k - 1] = True
    return r


def test_constants():
    assert METRIC_NAMES == ("recall", "ndcg", "precision", "map", "hit")
    assert DEFAULT_KS == (5, 10, 20, 50)


def test_keys_dtype_and_shape():
    hits = np.stack([row(1), row()])
    m = ranking_metrics(hits, np.array([1, 2]), [2, 5])
    assert set(m) == {f"{n}@{k}" for n in METRIC_NAMES for k in (2, 5)}
    for v in m.values():
        assert v.dtype == np.float64 and v.shape == (2,)


def test_single_heldout_item_at_rank_3():
    hits = row(3)[None, :]
    m = ranking_metrics(hits, np.array([1]), [2, 5])
    # K=5: one hit out of one held-out item.
    assert m["recall@5"][0] == pytest.approx(1.0)            # 1 / 1
    # DCG = 1/log2(3+1) = 1/2 ; IDCG over min(1,5)=1 position = 1/log2(2) = 1
    assert m["ndcg@5"][0] == pytest.approx(0.5)
    assert m["precision@5"][0] == pytest.approx(0.2)         # 1 / 5
    # AP sum = Precision@3 * hit_3 = (1/3) * 1 ; normalised by min(1,5) = 1
    assert m["map@5"][0] == pytest.approx(1 / 3)
    assert m["hit@5"][0] == 1.0
    # K=2: the hit at rank 3 is outside the cutoff -> everything is 0.
    for name in METRIC_NAMES:
        assert m[f"{name}@2"][0] == 0.0


def test_more_heldout_items_than_k():
    # 7 held-out items, hits at ranks 1, 2, 4 within the top 5.
    hits = row(1, 2, 4)[None, :]
    m = ranking_metrics(hits, np.array([7]), [3, 5])
    # Recall denominator is NOT capped at K: 3 / 7.
    assert m["recall@5"][0] == pytest.approx(3 / 7)
    # DCG@5 = 1/log2(2) + 1/log2(3) + 1/log2(5)
    dcg = 1.0 + 1 / math.log2(3) + 1 / math.log2(5)          # = 2.061606...
    # IDCG over min(7,5) = 5 positions: 1/log2(2) + ... + 1/log2(6)
    idcg = 1.0 + 1 / math.log2(3) + 1 / math.log2(4) + 1 / math.log2(5) + 1 / math.log2(6)
    assert m["ndcg@5"][0] == pytest.approx(dcg / idcg)      # = 2.061606 / 2.948459
    assert m["ndcg@5"][0] == pytest.approx(0.6992148, abs=1e-6)
    assert m["precision@5"][0] == pytest.approx(3 / 5)
    # AP sum = P@1*1 + P@2*1 + P@4*1 = 1/1 + 2/2 + 3/4 = 2.75 ; / min(7,5)=5 -> 0.55
    assert m["map@5"][0] == pytest.approx(0.55)
    assert m["hit@5"][0] == 1.0
    # K=3: hits at ranks 1, 2 only.
    assert m["recall@3"][0] == pytest.approx(2 / 7)
    assert m["ndcg@3"][0] == pytest.approx(
        (1.0 + 1 / math.log2(3)) / (1.0 + 1 / math.log2(3) + 1 / math.log2(4))
    )
    assert m["precision@3"][0] == pytest.approx(2 / 3)
    assert m["map@3"][0] == pytest.approx((1 + 1) / 3)     # (P@1 + P@2) / min(7,3)
    assert m["hit@3"][0] == 1.0


def test_fewer_heldout_items_than_k():
    # 2 held-out items, found at ranks 2 and 5.
    m = ranking_metrics(row(2, 5)[None, :], np.array([2]), [5])
    assert m["recall@5"][0] == pytest.approx(1.0)            # 2 / 2
    # DCG = 1/log2(3) + 1/log2(6) ; IDCG over min(2,5)=2 positions = 1 + 1/log2(3)
    assert m["ndcg@5"][0] == pytest.approx(
        (1 / math.log2(3) + 1 / math.log2(6)) / (1 + 1 / math.log2(3))
    )
    assert m["precision@5"][0] == pytest.approx(0.4)         # 2 / 5
    # AP sum = P@2 + P@5 = 1/2 + 2/5 = 0.9 ; / min(2,5)=2 -> 0.45
    assert m["map@5"][0] == pytest.approx(0.45)
    assert m["hit@5"][0] == 1.0


def test_perfect_ranking_gives_ones():
    m = ranking_metrics(row(1, 2, 3)[None, :], np.array([3]), [3])
    for name in ("recall", "ndcg", "map", "hit", "precision"):
        assert m[f"{name}@3"][0] == pytest.approx(1.0)


def test_no_hits_all_zero():
    m = ranking_metrics(row()[None, :], np.array([4]), [1, 5])
    for name, v in m.items():
        assert v[0] == 0.0, name


def test_mean_over_several_users():
    hits = np.stack([row(3), row(1, 2, 4), row()])          # users A, B, C
    n_rel = np.array([1, 7, 4])
    per_user = ranking_metrics(hits, n_rel, [5])
    avg = mean_metrics(per_user)
    assert set(avg) == set(per_user)
    assert all(isinstance(v, float) for v in avg.values())
    assert avg["recall@5"] == pytest.approx((1 + 3 / 7 + 0) / 3)        # 10/21
    assert avg["precision@5"] == pytest.approx((0.2 + 0.6 + 0) / 3)
    assert avg["map@5"] == pytest.approx((1 / 3 + 0.55 + 0) / 3)
    assert avg["hit@5"] == pytest.approx(2 / 3)
    ndcg_b = (1 + 1 / math.log2(3) + 1 / math.log2(5)) / sum(
        1 / math.log2(r + 1) for r in range(1, 6)
    )
    assert avg["ndcg@5"] == pytest.approx((0.5 + ndcg_b + 0) / 3)


def _reference(hits, n_rel, k):
    """Straightforward per-user loop, written independently of the vectorised code."""
    out = {n: [] for n in METRIC_NAMES}
    for h, R in zip(hits, n_rel):
        top = [bool(x) for x in h[:k]]
        n_hits = sum(top)
        dcg = sum(1 / math.log2(r + 2) for r, x in enumerate(top) if x)
        idcg = sum(1 / math.log2(r + 2) for r in range(min(R, k)))
        ap, seen = 0.0, 0
        for r, x in enumerate(top, start=1):
            if x:
                seen += 1
                ap += seen / r
        out["recall"].append(n_hits / R)
        out["ndcg"].append(dcg / idcg)
        out["precision"].append(n_hits / k)
        out["map"].append(ap / min(R, k))
        out["hit"].append(1.0 if n_hits else 0.0)
    return out


def test_matches_loop_reference_on_random_data():
    rng = np.random.default_rng(0)
    kmax, n_users = 50, 200
    hits = rng.random((n_users, kmax)) < 0.1
    n_rel = hits.sum(1) + rng.integers(1, 30, size=n_users)
    m = ranking_metrics(hits, n_rel, DEFAULT_KS)
    for k in DEFAULT_KS:
        ref = _reference(hits, n_rel, k)
        for name in METRIC_NAMES:
            np.testing.assert_allclose(m[f"{name}@{k}"], ref[name], rtol=1e-12, atol=0)


def test_zero_users_returns_empty_arrays_and_mean_raises():
    m = ranking_metrics(np.zeros((0, 5), dtype=bool), np.zeros(0, dtype=int), [5])
    assert all(v.shape == (0,) for v in m.values())
    with pytest.raises(ValueError, match="no users"):
        mean_metrics(m)
    with pytest.raises(ValueError, match="no users"):
        mean_metrics({})


def test_validation_errors():
    hits = np.stack([row(1), row(2)])
    n_rel = np.array([1, 2])
    with pytest.raises(ValueError, match="Kmax"):
        ranking_metrics(hits, n_rel, [10])                  # K > Kmax = 5
    with pytest.raises(ValueError):
        ranking_metrics(hits, n_rel, [0])                   # K < 1
    with pytest.raises(ValueError):
        ranking_metrics(hits, n_rel, [])                    # no cutoffs
    with pytest.raises(ValueError, match="shape"):
        ranking_metrics(hits, np.array([1, 2, 3]), [5])     # n_relevant length mismatch
    with pytest.raises(ValueError, match="2-D"):
        ranking_metrics(row(1), n_rel, [5])                 # hits not 2-D
    with pytest.raises(ValueError, match=">= 1"):
        ranking_metrics(hits, np.array([1, 0]), [5])        # n_relevant < 1
    with pytest.raises(ValueError, match="hits"):
        ranking_metrics(np.stack([row(1, 2), row(2)]), n_rel, [5])  # 2 hits > 1 held-out
    with pytest.raises(ValueError):
        ranking_metrics(np.full((2, 5), 2), n_rel, [5])     # non-0/1 hits


def test_mean_metrics_length_mismatch():
    with pytest.raises(ValueError, match="users"):
        mean_metrics({"recall@5": np.array([1.0, 0.0]), "ndcg@5": np.array([1.0])})
