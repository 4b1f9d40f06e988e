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
    # One user who trained on items 0..5 of 10: negatives must be spread evenly over 6..9.
    train = sp.csr_matrix((np.ones(6), ([0] * 6, range(6))), shape=(1, 10))
    sampler = TrainSampler(train, seed=0)
    draws = sampler.negatives(np.zeros(40000, dtype=np.int64))
    counts = np.bincount(draws, minlength=10)
    assert counts[:6].sum() == 0
    assert np.allclose(counts[6:] / 40000, 0.25, atol=0.01)


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
