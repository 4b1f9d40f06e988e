import numpy as np
import scipy.sparse as sp
import pytest

from conftest import small_dataset
from fitmm.data.sampling import TrainSampler
from fitmm.errors import InputError


def test_epoch_visits_each_interaction_once_and_negatives_avoid_training_items():
    ds = small_dataset()
    sampler = TrainSampler(ds.train, seed=3)
    seen, negs, users = [], [], []
    for batch in sampler.batches(512):
        seen.append(np.stack([batch.users.numpy(), batch.pos_items.numpy()], 1))
        users.append(batch.users.numpy())
        negs.append(batch.neg_items.numpy())
    seen = np.concatenate(seen)
    assert len(seen) == ds.train.nnz
    assert len(np.unique(seen, axis=0)) == ds.train.nnz
    users, negs = np.concatenate(users), np.concatenate(negs)
    assert not np.asarray(ds.train[users, negs]).any()


def test_negatives_are_uniform_over_allowed_items():
    # User 0 trained on items 0..5, user 1 on 6..8; item 9 occurs in no training row. User 0's
    # negatives must be spread evenly over 6..8 (MMRec's pool: items that occur in training).
    rows, cols = [0] * 6 + [1] * 3, list(range(9))
    train = sp.csr_matrix((np.ones(9), (rows, cols)), shape=(2, 10))
    sampler = TrainSampler(train, seed=0)
    draws = sampler.negatives(np.zeros(30000, dtype=np.int64))
    counts = np.bincount(draws, minlength=10)
    assert counts[:6].sum() == 0 and counts[9] == 0
    assert np.allclose(counts[6:9] / 30000, 1 / 3, atol=0.01)


def test_an_explicit_negative_pool_is_used_as_given():
    train = sp.csr_matrix((np.ones(2), ([0, 0], [0, 1])), shape=(1, 10))
    draws = TrainSampler(train, seed=0, negative_pool=np.array([1, 7, 9])).negatives(np.zeros(3000, dtype=np.int64))
    assert set(np.unique(draws)) == {7, 9}
    with pytest.raises(InputError, match="user 0 has trained on every item that can be a negative"):
        TrainSampler(train, seed=0, negative_pool=np.array([0, 1]))


def test_same_seed_same_batches_and_state_round_trip():
    ds = small_dataset()
    a, b = TrainSampler(ds.train, seed=1), TrainSampler(ds.train, seed=1)
    state = a.state_dict()
    first = [x.neg_items.numpy() for x in a.batches(256)]
    assert all(np.array_equal(x, y.neg_items.numpy()) for x, y in zip(first, b.batches(256)))
    a.load_state_dict(state)
    assert all(np.array_equal(x, y.neg_items.numpy()) for x, y in zip(first, a.batches(256)))


def test_user_with_every_item_is_an_error():
    train = sp.csr_matrix(np.ones((2, 3)))
    with pytest.raises(InputError, match="user 0 has trained on every item"):
        TrainSampler(train, seed=0)
