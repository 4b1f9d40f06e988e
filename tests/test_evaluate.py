"""Full-ranking evaluation: masking of training items and agreement with a brute-force reference."""

import numpy as np
import scipy.sparse as sp

from conftest import small_dataset
from fitmm.data.dataset import Dataset
from fitmm.evaluate import evaluate, evaluated_users, rank_split
from fitmm.metrics import mean_metrics, ranking_metrics
from tiny import FixedScores


def _ds(train, valid, test, n_items):
    def m(pairs):
        rows = [u for u, _ in pairs]
        cols = [i for _, i in pairs]
        return sp.csr_matrix((np.ones(len(pairs), np.float32), (rows, cols)), shape=(3, n_items))
    return Dataset("toy", 3, n_items, m(train), m(valid), m(test))


def test_training_items_are_masked_and_held_out_items_counted():
    # User 0 trained on item 0, which it scores highest; its test item 3 comes right after.
    # Masked, item 3 is rank 1; unmasked it would be rank 2.
    ds = _ds(train=[(0, 0), (1, 1), (2, 2)], valid=[(0, 4), (1, 2)], test=[(0, 3), (1, 4), (1, 5)], n_items=6)
    scores = np.array([
        [9, 1, 2, 8, 3, 0],  # user 0: ranking after masking item 0 -> 3, 4, 2, 1, 5
        [0, 9, 5, 1, 2, 3],  # user 1: masked item 1 -> 2, 5, 4, 3, 0
        [0, 0, 9, 0, 0, 0],  # user 2: no held-out items -> not evaluated
    ])
    model = FixedScores(ds, scores)
    test = rank_split(model, model.embed(), ds, "test", [1, 2, 3])
    assert list(test["user"]) == [0, 1]
    np.testing.assert_allclose(test["recall@1"], [1.0, 0.0])
    np.testing.assert_allclose(test["recall@3"], [1.0, 1.0])  # user 1: items 5 (rank 2) and 4 (rank 3)
    np.testing.assert_allclose(test["precision@2"], [0.5, 0.5])
    valid = rank_split(model, model.embed(), ds, "valid", [1, 2])
    np.testing.assert_allclose(valid["recall@1"], [0.0, 1.0])  # user 1's valid item 2 is its rank 1
    np.testing.assert_allclose(valid["recall@2"], [1.0, 1.0])


def test_evaluate_reports_the_mean_of_each_metric_and_nothing_else():
    """The per-user "user" ids are not a metric: evaluate's summary has exactly the metric keys."""
    ds = _ds(train=[(0, 0), (1, 1), (2, 2)], valid=[(0, 4), (1, 2)], test=[(0, 3), (1, 4), (1, 5)], n_items=6)
    model = FixedScores(ds, np.array([[9, 1, 2, 8, 3, 0], [0, 9, 5, 1, 2, 3], [0, 0, 9, 0, 0, 0]]))
    result = evaluate(model, ds, ["test"], [1, 2])
    assert set(result["test"]) == {f"{m}@{k}" for m in ("recall", "ndcg", "precision", "map", "hit") for k in (1, 2)}
    assert result["test"]["recall@1"] == 0.5  # users 0 (hit at rank 1) and 1 (miss)


def test_batch_users_bounds_the_rows_scored_at_once():
    """The caller's chunk size reaches the scoring loop (it bounds the evaluator's memory)."""
    ds = _ds(train=[(0, 0), (1, 1), (2, 2)], valid=[(0, 4), (1, 2), (2, 3)], test=[(0, 3), (1, 4), (2, 5)], n_items=6)
    model = FixedScores(ds, np.arange(18).reshape(3, 6) % 5)
    seen = []
    model.score = lambda u, i: seen.append(len(u)) or u @ i.T
    evaluate(model, ds, ["valid", "test"], [1], batch_users=2)
    rank_split(model, model.embed(), ds, "test", [1], batch_users=1)
    assert seen == [2, 1, 1, 1, 1]


def test_users_without_training_rows_are_dropped():
    ds = _ds(train=[(0, 0)], valid=[(0, 1), (1, 2)], test=[(1, 3)], n_items=4)
    assert list(evaluated_users(ds, "valid")) == [0]
    assert list(evaluated_users(ds, "test")) == []


def test_chunked_evaluation_matches_a_dense_reference():
    ds = small_dataset()
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(ds.n_users, ds.n_items))
    model = FixedScores(ds, scores)
    ks = [5, 10, 20, 50]
    chunked = evaluate(model, ds, ["test"], ks, batch_users=37)["test"]

    users = evaluated_users(ds, "test")
    dense = scores.copy()
    dense[ds.train.toarray() > 0] = -np.inf
    top = np.argsort(-dense[users], axis=1, kind="stable")[:, :50]
    test = ds.test.toarray() > 0
    hits = np.take_along_axis(test[users], top, axis=1)
    reference = mean_metrics(ranking_metrics(hits, test[users].sum(1), ks))
    for key, value in reference.items():
        assert abs(chunked[key] - value) < 1e-9, key
