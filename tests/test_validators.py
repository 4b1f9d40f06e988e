"""Validator branches of the MMRec loader and the evaluator that no other test reaches: which .inter
file, unreadable or empty files, short rows, feature arrays of the wrong kind, bad modality mappings,
duplicate rows, score ties and cutoffs above the item count. Messages are checked by short fragments
that name the file or field and the fix."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from fitmm.cli import main
from fitmm.data import load_mmrec
from fitmm.data.dataset import Dataset
from fitmm.errors import InputError
from fitmm.evaluate import evaluate, rank_split
from tiny import FixedScores

HEADER = "userID\titemID\tx_label"
# 3 users, 4 items; every user has train, valid and test rows.
ROWS = ["0\t0\t0", "0\t1\t0", "0\t2\t1", "0\t3\t2",
        "1\t1\t0", "1\t2\t0", "1\t3\t1", "1\t0\t2",
        "2\t2\t0", "2\t3\t0", "2\t0\t1", "2\t1\t2"]


def folder_with(tmp_path, rows=ROWS, header=HEADER, name="toy.inter", features=None):
    folder = tmp_path / "toy"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    for modality, array in (features or {}).items():
        np.save(folder / f"{modality}_feat.npy", array)
    return folder


def load_error(folder, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        load_mmrec(folder, **kwargs)
    return str(info.value)


def test_the_toy_folder_loads(tmp_path):
    ds = load_mmrec(folder_with(tmp_path, features={"image": np.ones((4, 3), np.float32)}))
    assert (ds.n_users, ds.n_items, ds.train.nnz, ds.valid.nnz, ds.test.nnz) == (3, 4, 6, 3, 3)


def test_several_inter_files_need_inter_file(tmp_path):
    folder = folder_with(tmp_path)
    (folder / "other.inter").write_text("\n".join([HEADER, "0\t0\t0"]) + "\n")
    message = load_error(folder)
    assert "several .inter files (other.inter, toy.inter)" in message
    assert "--set inter_file=NAME" in message
    # Naming one resolves it: the chosen file is the one read.
    assert load_mmrec(folder, inter_file="toy.inter").train.nnz == 6
    assert load_mmrec(folder, inter_file="other.inter").train.nnz == 1


def test_missing_inter_file_names_the_config_key(tmp_path):
    folder = folder_with(tmp_path)
    message = load_error(folder, inter_file="nope.inter")
    assert "nope.inter: interaction file not found" in message
    assert "config key 'inter_file'" in message


def test_non_utf8_inter_file(tmp_path):
    folder = folder_with(tmp_path)
    (folder / "toy.inter").write_bytes((HEADER + "\n0\t0\t0\n").encode() + b"\xff\xfe\t1\t0\n")
    message = load_error(folder)
    assert "toy.inter: not UTF-8 text" in message
    assert "save it as UTF-8" in message


@pytest.mark.parametrize("content", ["", "\n", "   \n\n"])
def test_empty_inter_file(tmp_path, content):
    folder = folder_with(tmp_path)
    (folder / "toy.inter").write_text(content)
    message = load_error(folder)
    assert "toy.inter: empty file" in message
    assert "header row" in message


def test_header_only_inter_file(tmp_path):
    message = load_error(folder_with(tmp_path, rows=[]))
    assert "toy.inter: no interaction rows below the header" in message


def test_short_row_names_the_row(tmp_path):
    rows = [*ROWS[:4], "1\t1", *ROWS[5:]]  # file row 6 (the header is row 1) lost its label
    message = load_error(folder_with(tmp_path, rows=rows))
    assert "toy.inter, row 6: 2 field(s), but the header needs at least 3" in message
    assert "TABs" in message


def test_short_row_counts_against_the_header_width(tmp_path):
    # x_label is the 4th column here: a row with 3 fields is short although 3 is the usual width.
    header = "userID\titemID\trating\tx_label"
    rows = ["\t".join([*r.split("\t")[:2], "5", r.split("\t")[2]]) for r in ROWS]
    rows[2] = "0\t2\t1"  # file row 4: no rating, so its label sits in the rating column
    message = load_error(folder_with(tmp_path, rows=rows, header=header))
    assert "row 4: 3 field(s), but the header needs at least 4" in message


def test_one_dimensional_features(tmp_path):
    message = load_error(folder_with(tmp_path, features={"image": np.ones(4, np.float32)}))
    assert "image_feat.npy: expected a 2-D (items x dim) matrix, got shape (4,)" in message


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_complex_features(tmp_path, dtype):
    message = load_error(folder_with(tmp_path, features={"text": np.ones((4, 2), dtype)}))
    assert "text_feat.npy: expected a real numeric matrix" in message
    assert np.dtype(dtype).name in message


def test_non_numeric_features(tmp_path):
    message = load_error(folder_with(tmp_path, features={"text": np.array([["a", "b"]] * 4)}))
    assert "text_feat.npy: expected a real numeric matrix" in message


@pytest.mark.parametrize("file_name", ["", 3, None, ["image_feat.npy"]])
def test_bad_modality_mapping(tmp_path, file_name):
    folder = folder_with(tmp_path, features={"image": np.ones((4, 3), np.float32)})
    message = load_error(folder, modalities={"image": file_name})
    assert "config key 'modalities'" in message
    assert "modality 'image' needs a .npy file name" in message


def test_bad_modality_mapping_from_the_command_line(tmp_path, capsys):
    folder = folder_with(tmp_path, features={"image": np.ones((4, 3), np.float32)})
    assert main(["data", "info", str(folder), "--set", "modalities={image: 7}"]) == 2
    assert "modality 'image' needs a .npy file name, got 7" in capsys.readouterr().err


def test_duplicate_rows_count_once(tmp_path):
    """The same (user, item) twice in a split is one interaction: value 1, counted once."""
    rows = [*ROWS, "0\t0\t0", "0\t0\t0", "1\t3\t1", "2\t1\t2"]  # three pairs repeated in their own split
    ds = load_mmrec(folder_with(tmp_path, rows=rows))
    for name, nnz in (("train", 6), ("valid", 3), ("test", 3)):
        m = ds.split(name)
        assert m.nnz == nnz, name
        np.testing.assert_array_equal(m.data, np.ones(nnz, np.float32), err_msg=name)
    assert ds.train[0, 0] == 1.0 and ds.valid[1, 3] == 1.0 and ds.test[2, 1] == 1.0
    assert ds.stats()["interactions"] == 12
    # ... so the data is the same as without the repeats.
    assert ds.fingerprint == load_mmrec(folder_with(tmp_path / "b", rows=ROWS)).fingerprint


# ---- evaluator ------------------------------------------------------------------------------------

def toy(train, valid, test, n_users=2, n_items=5) -> Dataset:
    def m(pairs):
        return sp.csr_matrix((np.ones(len(pairs), np.float32), ([u for u, _ in pairs], [i for _, i in pairs])),
                             shape=(n_users, n_items))
    return Dataset("toy", n_users, n_items, m(train), m(valid), m(test))


def test_all_scores_tied_never_ranks_a_training_item_above_the_rest():
    # Every item scores the same. User 0 trained on items 0 and 1 (masked to -inf), so whatever the
    # order among the 3 tied items left, the top 3 are exactly those: its test items 2 and 4 are both
    # in it (recall@3 = 1, precision@3 = 2/3), and hit@3 = 1.
    ds = toy(train=[(0, 0), (0, 1), (1, 0)], valid=[(0, 3), (1, 1)], test=[(0, 2), (0, 4), (1, 2)])
    model = FixedScores(ds, np.zeros((2, 5)))
    test = rank_split(model, model.embed(), ds, "test", [3])
    assert list(test["user"]) == [0, 1]
    assert test["recall@3"][0] == 1.0 and test["hit@3"][0] == 1.0
    assert test["precision@3"][0] == pytest.approx(2 / 3)
    # User 1 trained on item 0 only: its test item 2 is one of 4 tied items, so the top 4 hold it.
    four = rank_split(model, model.embed(), ds, "test", [4])
    assert four["recall@4"][1] == 1.0 and four["precision@4"][1] == 0.25


def test_a_tie_inside_the_top_k_does_not_change_the_metrics():
    # Items 1 and 2 tie at the top for user 0; its test item is one of them: at K = 2 it is found
    # whatever the tie order, at rank 1 or 2. Recall@2, precision@2, hit@2 do not depend on the order.
    ds = toy(train=[(0, 0), (1, 0)], valid=[(0, 3), (1, 3)], test=[(0, 2), (1, 1)])
    scores = [[0, 5, 5, 1, 1], [0, 5, 5, 1, 1]]
    model = FixedScores(ds, scores)
    test = rank_split(model, model.embed(), ds, "test", [2])
    np.testing.assert_array_equal(test["recall@2"], [1.0, 1.0])
    np.testing.assert_array_equal(test["precision@2"], [0.5, 0.5])
    np.testing.assert_array_equal(test["hit@2"], [1.0, 1.0])


def test_cutoffs_above_the_item_count_are_left_out():
    # 5 items: K = 3 is reported, K = 10 and 20 cannot be (there are not 10 items to rank) and are
    # left out rather than reported as if 10 items had been ranked.
    ds = toy(train=[(0, 0), (1, 0)], valid=[(0, 3), (1, 3)], test=[(0, 2), (1, 1)])
    model = FixedScores(ds, [[0, 1, 2, 3, 4], [0, 4, 3, 2, 1]])
    results = evaluate(model, ds, ["valid", "test"], [3, 10, 20])
    assert set(results["test"]) == {f"{m}@3" for m in ("recall", "ndcg", "precision", "map", "hit")}
    # User 0 ranks 4, 3, 2 (test item 2 at rank 3); user 1 ranks 1, 2, 3 (test item 1 at rank 1).
    assert results["test"]["recall@3"] == 1.0
    assert results["test"]["precision@3"] == pytest.approx(1 / 3)
    # K = the item count itself is kept: every item is ranked (the masked training item last).
    assert set(evaluate(model, ds, ["test"], [5])["test"]) == {f"{m}@5" for m in ("recall", "ndcg", "precision", "map", "hit")}

