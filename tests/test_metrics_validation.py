"""metrics.py's input checks, branch by branch, with their exact messages.

Written to kill the mutants that survived tests/test_metrics.py (docs/testing.md): each test pins
one branch of `_validate` / `mean_metrics` -- what is accepted, what is refused, and the exact
message, including which row it names.
"""

import re

import numpy as np
import pytest

from fitmm.metrics import mean_metrics, ranking_metrics

HITS = np.array([[True, False, True], [False, True, False]])


def refused(message, hits, n_relevant, ks=(1,)):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ranking_metrics(hits, n_relevant, ks)


def same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_integer_zero_one_hits_are_accepted_like_booleans():
    same(ranking_metrics(HITS.astype(np.int64), [2, 3], [1, 3]), ranking_metrics(HITS, [2, 3], [1, 3]))
    same(ranking_metrics(HITS.astype(np.float32), [2, 3], [1, 3]), ranking_metrics(HITS, [2, 3], [1, 3]))


@pytest.mark.parametrize("hits", [np.array([[2, 0]]), np.array([[0.5, 0]]), np.array([["a", "b"]])])
def test_hits_other_than_zero_one_are_refused(hits):
    refused("hits must be boolean (or contain only 0/1)", hits, [2])


def test_whole_float_n_relevant_is_accepted():
    same(ranking_metrics(HITS, np.array([2.0, 3.0]), [3]), ranking_metrics(HITS, [2, 3], [3]))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("value", [2.5, np.inf, np.nan])
def test_fractional_or_infinite_n_relevant_is_refused(dtype, value):
    refused("n_relevant must contain whole numbers", HITS, np.array([2, value], dtype=dtype))


def test_non_numeric_n_relevant_is_refused():
    refused("n_relevant must be numeric, got dtype <U1", HITS, np.array(["2", "3"]))


def test_n_relevant_below_one_names_the_first_bad_row():
    # row 0 has exactly 1 (fine: >= 1), row 1 has 0
    refused("n_relevant must be >= 1 for every user (user row 1 has 0); drop users with no held-out items "
            "before evaluating", np.array([[True, False], [False, False]]), [1, 0])


def test_more_hits_than_held_out_items_names_the_first_bad_row():
    # row 0 has as many hits as held-out items (fine), row 1 one more
    refused("user row 1 has 2 hits but only 1 held-out items", np.array([[True, False], [True, True]]), [1, 1])


def test_cutoffs():
    refused("ks must contain at least one cutoff", HITS, [2, 3], [])
    refused("each K must be an int, got 1.0", HITS, [2, 3], [1.0])
    refused("each K must be an int, got True", HITS, [2, 3], [True])
    refused("each K must be >= 1, got 0", HITS, [2, 3], [0])
    assert set(ranking_metrics(HITS, [2, 3], [np.int32(2)])) == {"recall@2", "ndcg@2", "precision@2", "map@2", "hit@2"}


def test_mean_metrics_messages():
    with pytest.raises(ValueError, match="^no users to evaluate: no metrics given$"):
        mean_metrics({})
    with pytest.raises(ValueError, match="^no users to evaluate$"):
        mean_metrics({"recall@1": np.array([])})
    with pytest.raises(ValueError, match=re.escape("metric 'recall@1' must be a 1-D per-user array, got shape (1, 1)")):
        mean_metrics({"recall@1": np.array([[1.0]])})
