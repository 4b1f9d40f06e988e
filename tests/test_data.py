"""Loading MMRec folders: the quirks that must load. (Every bad input's error: tests/test_bad_input.py.)"""

import os

import numpy as np
import pytest

from conftest import read_inter_lines, small_args, small_dataset, write_inter_lines
from fitmm.cli import main
from fitmm.data import load_mmrec, synthetic
from fitmm.errors import InputError


def test_round_trip_keeps_everything(dataset_dir):
    original = small_dataset()
    loaded = load_mmrec(dataset_dir)
    assert (loaded.n_users, loaded.n_items) == (original.n_users, original.n_items)
    for split in ("train", "valid", "test"):
        assert (loaded.split(split) != original.split(split)).nnz == 0
    assert loaded.modalities == ["image", "text"]  # auto-detected from *_feat.npy, sorted
    np.testing.assert_array_equal(loaded.features["image"], original.features["image"])
    assert loaded.fingerprint == original.fingerprint


def test_quirks_load(dataset_dir):
    lines = read_inter_lines(dataset_dir)
    header, rows = lines[0], lines[1:]
    # extra columns in any order, CRLF line ends, a user with only training rows,
    # a test row of an item never seen in training, float16 and float64 features.
    rows = [r for r in rows if not (r.startswith("0\t") and not r.endswith("\t0"))]
    train_items = {r.split("\t")[1] for r in rows if r.endswith("\t0")}
    new_item = 200  # one past the last item: only in test
    assert str(new_item) not in train_items
    rows.append(f"5\t{new_item}\t2")
    table = ["rating\t" + header + "\ttimestamp"] + [f"4\t{r}\t123" for r in rows]
    write_inter_lines(dataset_dir, table, newline="\r\n")
    image = np.random.default_rng(0).normal(size=(201, 8))
    np.save(dataset_dir / "image_feat.npy", image.astype(np.float16))
    np.save(dataset_dir / "text_feat.npy", image.astype(np.float64))
    ds = load_mmrec(dataset_dir)
    assert ds.n_items == 201
    assert ds.features["image"].dtype == np.float32 and ds.features["text"].dtype == np.float32
    assert ds.valid[0].nnz == 0 and ds.test[0].nnz == 0 and ds.train[0].nnz > 0
    assert ds.stats()["test_items_unseen_in_train"] >= 1


def test_id_only_and_explicit_modalities(dataset_dir):
    for f in dataset_dir.glob("*_feat.npy"):
        f.rename(dataset_dir / f.name.replace("_feat", ""))
    assert load_mmrec(dataset_dir).modalities == []
    ds = load_mmrec(dataset_dir, {"visual": "image.npy"})
    assert ds.modalities == ["visual"]


def test_data_info_prints_statistics(dataset_dir, capsys):
    import json

    assert main(["data", "info", str(dataset_dir)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["users"] == 300 and stats["items"] == 200
    assert stats["modalities"] == {"image": [200, 32], "text": [200, 16]}
    assert sum(stats["per_split"].values()) == stats["interactions"]


def test_synthetic_is_deterministic_and_split_8_1_1():
    a, b = synthetic.generate(users=200, items=150), synthetic.generate(users=200, items=150)
    assert a.fingerprint == b.fingerprint
    n = a.train.nnz + a.valid.nnz + a.test.nnz
    assert 0.75 < a.train.nnz / n < 0.85
    assert abs(a.valid.nnz - a.test.nnz) <= 0.02 * n
    assert (a.train.multiply(a.test)).nnz == 0  # a pair is in one split only
    assert np.all(np.diff(a.valid.indptr) >= 1)  # every user (>= 5 interactions) validates


def test_synthetic_content_carries_signal():
    """Items that share a user are closer in feature space than random pairs: content helps."""
    ds = synthetic.generate(users=400, items=300)
    feat = ds.features["text"] / np.linalg.norm(ds.features["text"], axis=1, keepdims=True)
    co = (ds.train.T @ ds.train).toarray()
    np.fill_diagonal(co, 0)
    sim = feat @ feat.T
    assert sim[co >= 3].mean() > sim[co == 0].mean() + 0.2


def test_loader_error_is_an_input_error(tmp_path):
    with pytest.raises(InputError):
        load_mmrec(tmp_path / "nothing")


def test_os_errors_are_named_by_cause(tmp_path):
    from fitmm.data.mmrec import os_error_message

    path = tmp_path / "x.inter"
    assert os_error_message(path, PermissionError(13, "Permission denied"), "read the interaction file") == (
        f"{path}: permission denied (cannot read the interaction file); make it readable for this user (e.g. chmod a+rX)")
    assert "is a folder, not a file" in os_error_message(path, IsADirectoryError(21, "Is a directory"), "read it")
    assert os_error_message(path, OSError(5, "Input/output error"), "read it") == f"{path}: cannot read it (Input/output error)"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file: permissions cannot be tested for real")
def test_real_permission_errors(dataset_dir, capsys):
    inter = dataset_dir / "synthetic.inter"
    try:
        inter.chmod(0)
        assert main(["data", "info", str(dataset_dir)]) == 2
        assert "synthetic.inter: permission denied" in capsys.readouterr().err
        inter.chmod(0o644)
        dataset_dir.chmod(0o300)  # can enter, cannot list
        assert main(["data", "info", str(dataset_dir)]) == 2
        assert "permission denied (cannot list the dataset folder)" in capsys.readouterr().err
    finally:
        dataset_dir.chmod(0o755)
        inter.chmod(0o644)


def test_dense_id_rule_passes_gaps_and_every_real_dataset(dataset_dir):
    """Ids with gaps load (max id + 1 <= 2 x distinct + 1000); the real datasets are all dense."""
    from conftest import SHARED_DATA

    lines = read_inter_lines(dataset_dir)
    write_inter_lines(dataset_dir, lines + ["1599\t5\t0"])  # 300 users -> 301 distinct, max id 1599
    assert load_mmrec(dataset_dir).n_users == 1600
    for folder in sorted(SHARED_DATA.glob("*/")) if SHARED_DATA.is_dir() else []:
        load_mmrec(folder)  # raises if a real dataset broke the rule
