"""The real datasets in ../shared/data load with the documented statistics (skipped when absent)."""

import pytest

from conftest import shared_dataset
from fitmm.data import load_mmrec


@pytest.mark.parametrize("name,users,items,splits,modalities", [
    ("ml100k_mm", 943, 1321, (78540, 9791, 9791), {"image": [1321, 1280], "text": [1321, 384]}),
    ("tiktok_mmssl", 9308, 6710, (59541, 3051, 6130), {"audio": [6710, 128], "image": [6710, 128]}),
])
def test_real_dataset_loads(name, users, items, splits, modalities):
    ds = load_mmrec(shared_dataset(name))
    stats = ds.stats()
    assert (stats["users"], stats["items"]) == (users, items)
    assert tuple(stats["per_split"].values()) == splits
    assert stats["modalities"] == modalities


def test_tiktok_quirks_are_kept():
    """float16 features, users without validation/test rows, test items unseen in training."""
    stats = load_mmrec(shared_dataset("tiktok_mmssl")).stats()
    assert stats["users_without_valid"] == 6257
    assert stats["users_without_test"] == 3178
    assert stats["users_without_train"] == 10
    assert stats["test_items_unseen_in_train"] > 0


def test_amazon_baby_is_id_only():
    ds = load_mmrec(shared_dataset("amazon_baby"))
    assert (ds.n_users, ds.n_items, ds.modalities) == (19445, 7050, [])
