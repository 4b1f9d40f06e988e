"""Property-based tests (hypothesis): the MMRec loader round-trips any valid small dataset, and the
ranking metrics keep their bounds, their monotonicity in K and their invariance under relabelling
users and items. Derandomised, so a run is deterministic; example counts keep each under seconds."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from fitmm.data import load_mmrec, write_mmrec
from fitmm.data.dataset import Dataset
from fitmm.evaluate import evaluate_per_user
from fitmm.metrics import METRIC_NAMES, mean_metrics, ranking_metrics
from tiny import FixedScores

FAST = settings(deadline=None, max_examples=100, derandomize=True)


@st.composite
def datasets(draw) -> Dataset:
    """A valid small dataset: every user and item has a row (so the ids read back are dense and the
    sizes are max id + 1), each (user, item) pair in one split only, a non-empty training split, and
    0 to 3 modalities of finite float32 features."""
    n_users, n_items = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    # cell[u, i]: 0 = no interaction, 1 = train, 2 = valid, 3 = test
    cells = np.array(draw(st.lists(st.integers(0, 3), min_size=n_users * n_items, max_size=n_users * n_items)))
    cells = cells.reshape(n_users, n_items)
    for j in range(max(n_users, n_items)):  # a training row on a wrapped diagonal covers every id
        u, i = j % n_users, j % n_items
        if cells[u, i] == 0:
            cells[u, i] = 1
    if not (cells == 1).any():
        cells[0, 0] = 1
    splits = {name: sp.csr_matrix((cells == label).astype(np.float32)) for label, name in
              ((1, "train"), (2, "valid"), (3, "test"))}
    features = {}
    for name in draw(st.lists(st.sampled_from(["image", "text", "audio"]), unique=True, max_size=3)):
        dim = draw(st.integers(1, 3))
        values = draw(st.lists(st.floats(-1e6, 1e6, width=32), min_size=n_items * dim, max_size=n_items * dim))
        features[name] = np.array(values, dtype=np.float32).reshape(n_items, dim)
    return Dataset("prop", n_users, n_items, features=features, **splits)


@FAST
@given(datasets())
def test_any_valid_dataset_round_trips_through_write_and_load(ds):
    with tempfile.TemporaryDirectory() as folder:
        write_mmrec(ds, folder)
        loaded = load_mmrec(folder)
    assert (loaded.n_users, loaded.n_items) == (ds.n_users, ds.n_items)
    for split in ("train", "valid", "test"):
        got, want = loaded.split(split), ds.split(split)
        assert got.shape == want.shape
        np.testing.assert_array_equal(got.toarray(), want.toarray(), err_msg=split)
    assert sorted(loaded.features) == sorted(ds.features)
    for name, feat in ds.features.items():
        assert loaded.features[name].dtype == np.float32
        np.testing.assert_array_equal(loaded.features[name], feat, err_msg=name)
    assert loaded.fingerprint == Dataset("prop", ds.n_users, ds.n_items, ds.train, ds.valid, ds.test,
                                         features={k: ds.features[k] for k in loaded.features}).fingerprint


@st.composite
def hit_matrices(draw):
    """(hits, n_relevant): up to 6 users ranked to depth 1..8, each with at least as many held-out
    items as hits, and at least one."""
    n_users, kmax = draw(st.integers(1, 6)), draw(st.integers(1, 8))
    hits = np.array(draw(st.lists(st.booleans(), min_size=n_users * kmax, max_size=n_users * kmax)))
    hits = hits.reshape(n_users, kmax)
    extra = np.array(draw(st.lists(st.integers(0, 5), min_size=n_users, max_size=n_users)))
    return hits, np.maximum(hits.sum(axis=1) + extra, 1)


@FAST
@given(hit_matrices())
def test_every_metric_lies_in_0_1(case):
    hits, n_rel = case
    for name, values in ranking_metrics(hits, n_rel, range(1, hits.shape[1] + 1)).items():
        assert np.all((values >= 0) & (values <= 1 + 1e-12)), name


@FAST
@given(hit_matrices())
def test_recall_and_hit_never_decrease_with_k(case):
    # Recall@K and Hit@K count the hits among the top K over a denominator that does not depend on K
    # (R, or 1), and a longer list only adds hits. Precision@K divides by K, so a miss at rank K lowers
    # it (hit at rank 1 only: precision@1 = 1, precision@2 = 1/2). NDCG@K and MAP@K normalise by
    # min(R, K), which grows with K, so they can fall too (see the examples below).
    hits, n_rel = case
    ks = range(1, hits.shape[1] + 1)
    m = ranking_metrics(hits, n_rel, ks)
    for name in ("recall", "hit"):
        stacked = np.stack([m[f"{name}@{k}"] for k in ks])
        assert np.all(np.diff(stacked, axis=0) >= 0), name


def test_precision_ndcg_and_map_can_decrease_with_k():
    m = ranking_metrics(np.array([[True, False]]), np.array([2]), [1, 2])
    assert m["precision@2"][0] < m["precision@1"][0]
    assert m["ndcg@2"][0] < m["ndcg@1"][0]
    assert m["map@2"][0] < m["map@1"][0]


@FAST
@given(hit_matrices(), st.randoms(use_true_random=False))
def test_relabelling_users_permutes_per_user_values(case, random):
    hits, n_rel = case
    order = list(range(len(hits)))
    random.shuffle(order)
    ks = [1, hits.shape[1]]
    base, permuted = ranking_metrics(hits, n_rel, ks), ranking_metrics(hits[order], n_rel[order], ks)
    for name in base:
        np.testing.assert_array_equal(permuted[name], base[name][order], err_msg=name)
    for name, value in mean_metrics(permuted).items():
        assert value == pytest.approx(mean_metrics(base)[name], rel=1e-12, abs=1e-15)


@settings(deadline=None, max_examples=40, derandomize=True)
@given(datasets(), st.randoms(use_true_random=False))
def test_evaluation_does_not_depend_on_item_or_user_ids(ds, random):
    """Renumbering items (and users), with the scores renumbered alike, changes no user's metrics.
    Scores are distinct, so no tie makes the ranking depend on the ids."""
    scores = np.arange(ds.n_users * ds.n_items, dtype=np.float64)
    random.shuffle(scores)
    scores = scores.reshape(ds.n_users, ds.n_items)
    items, users = list(range(ds.n_items)), list(range(ds.n_users))
    random.shuffle(items)
    random.shuffle(users)

    def relabel(m):  # new user a is old user users[a], new item b is old item items[b]
        return sp.csr_matrix(m[users][:, items])

    moved = Dataset("moved", ds.n_users, ds.n_items, relabel(ds.train), relabel(ds.valid), relabel(ds.test))
    ks = [1, 3, 5]
    base = evaluate_per_user(FixedScores(ds, scores), ds, ["valid", "test"], ks)
    after = evaluate_per_user(FixedScores(moved, scores[users][:, items]), moved, ["valid", "test"], ks)
    for split in ("valid", "test"):
        # The same users are evaluated, under their new ids; each keeps every metric value exactly.
        assert sorted(np.asarray(users)[after[split]["user"]]) == sorted(base[split]["user"])
        position = {u: p for p, u in enumerate(base[split]["user"])}
        for name in base[split]:
            if name == "user":
                continue
            want = [base[split][name][position[users[a]]] for a in after[split]["user"]]
            np.testing.assert_array_equal(after[split][name], want, err_msg=f"{split} {name}")
