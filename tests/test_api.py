"""fitmm.load and the Recommender handle on tiny trained runs: recommendations against a ranking
done by hand, explanations that add up, ids (dense, raw, unknown), cold-start items."""

import json
import math
import sys

import numpy as np
import pytest
import torch

import fitmm
from conftest import small_dataset
from fitmm.api import Recommender, UnknownIdError
from fitmm.cli import build_config, main, make_parser
from fitmm.errors import InputError
from fitmm.models import model_class
from tiny_runs import dataset_with_raw_ids, train_tiny


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    data = dataset_with_raw_ids(root / "ds")
    return train_tiny(data, root / "fitmm")


@pytest.fixture(scope="module")
def rec(run):
    return fitmm.load(run)


@pytest.fixture()
def fresh(run):
    """A handle of its own, for tests that add items."""
    return fitmm.load(run)


def test_recommend_is_the_top_k_of_the_cached_scores_without_training_items(rec):
    scores = (rec.user_vectors @ rec.item_vectors.T).numpy()
    for user in (0, 17, 299):
        seen = set(rec.dataset.train[user].indices.tolist())
        expected = [i for i in np.argsort(-scores[user], kind="stable") if i not in seen][:10]
        got = rec.recommend(user, k=10)
        assert [i for i, _ in got] == expected
        assert [s for _, s in got] == pytest.approx([float(scores[user, i]) for i in expected], rel=1e-6)
        with_seen = rec.recommend(user, k=10, exclude_seen=False)
        assert [i for i, _ in with_seen] == list(np.argsort(-scores[user], kind="stable")[:10])


def test_recommend_stops_at_the_unseen_items(rec):
    user = 5
    n_seen = rec.dataset.train[user].nnz
    got = rec.recommend(user, k=rec.n_items)
    assert len(got) == rec.n_items - n_seen
    assert all(math.isfinite(s) for _, s in got)


def test_the_cached_embeddings_are_the_models(rec, run):
    model = rec.model
    with torch.no_grad():
        users, items = model.embed()
    assert torch.equal(users, rec.user_vectors) and torch.equal(items, rec.item_vectors)
    assert not model.training


def test_score_is_pairwise_and_agrees_with_recommend(rec):
    top = rec.recommend(3, k=4)
    got = rec.score([3] * 4, [i for i, _ in top])
    assert got.dtype == np.float32 and got.shape == (4,)
    assert got.tolist() == pytest.approx([s for _, s in top], rel=1e-6)
    with pytest.raises(InputError, match="same length, got 2 and 1"):
        rec.score([1, 2], [3])


def test_similar_items_are_the_nearest_by_cosine_without_the_item_itself(rec):
    table = torch.nn.functional.normalize(rec.item_vectors, dim=1)
    sims = (table @ table[11]).numpy()
    sims[11] = -np.inf
    got = rec.similar_items(11, k=5)
    assert [i for i, _ in got] == list(np.argsort(-sims, kind="stable")[:5])
    assert [s for _, s in got] == pytest.approx(sims[[i for i, _ in got]].tolist(), rel=1e-5)
    assert len(rec.similar_items(11, k=rec.n_items)) == rec.n_items - 1


def test_fitmm_explanations_add_up_to_the_score(rec):
    rng = np.random.default_rng(0)
    for user, item in zip(rng.integers(0, rec.n_users, 20), rng.integers(0, rec.n_items, 20)):
        e = rec.explain(int(user), int(item))
        assert list(e["bands"]) == ["band1", "band2", "band3"]
        assert list(e["modalities"]) == ["id", "image", "text"]
        assert sum(e["bands"].values()) == pytest.approx(e["score"], rel=1e-9, abs=1e-12)
        assert sum(e["modalities"].values()) == pytest.approx(e["score"], rel=1e-9, abs=1e-12)
        assert np.sum(e["band_table"]) == pytest.approx(e["score"], rel=1e-9, abs=1e-12)
        row_sums, col_sums = np.sum(e["band_table"], axis=1), np.sum(e["band_table"], axis=0)
        assert list(e["bands"].values()) == pytest.approx((row_sums + col_sums) / 2, rel=1e-12)
        # The same score the float32 tables give.
        assert e["score"] == pytest.approx(float(rec.score([int(user)], [int(item)])[0]), rel=1e-4, abs=1e-5)
    # Not a trivial split: several bands and modalities carry weight.
    assert sum(abs(c) > 1e-4 for c in e["bands"].values()) >= 2
    assert sum(abs(c) > 1e-4 for c in e["modalities"].values()) >= 2


def test_models_without_parts_explain_the_score_alone(tmp_path):
    run = train_tiny(dataset_with_raw_ids(tmp_path / "ds"), tmp_path / "bpr", "model=bpr", "epochs=1")
    rec = fitmm.load(run)
    e = rec.explain(2, 9)
    assert set(e) == {"score"}
    assert e["score"] == pytest.approx(float(rec.score([2], [9])[0]), rel=1e-6)
    with pytest.raises(InputError, match="model 'bpr' cannot score new items from their content"):
        rec.add_items({"image": np.zeros((1, 32)), "text": np.zeros((1, 16))})


def test_unknown_ids_raise_a_key_error_with_a_message(rec):
    cases = [
        (lambda: rec.recommend(300), "unknown user id 300: dense user ids run from 0 to 299"),
        (lambda: rec.recommend(-1), "unknown user id -1: dense user ids run from 0 to 299"),
        (lambda: rec.similar_items(200), "unknown item id 200: dense item ids run from 0 to 199"),
        (lambda: rec.explain(0, 10**9), "unknown item id 1000000000: dense item ids run from 0 to 199"),
        (lambda: rec.score([0, 1], [0, 201]), "unknown item id 201: dense item ids run from 0 to 199"),
        (lambda: rec.recommend("3"), "user id must be an integer dense id, got '3' (raw ids need raw=True)"),
        (lambda: rec.recommend("U9999", raw=True), "unknown raw user id 'U9999'"),
    ]
    for call, message in cases:
        with pytest.raises(UnknownIdError) as info:
            call()
        assert isinstance(info.value, KeyError)
        assert str(info.value) == message


def test_k_out_of_range_is_refused(rec):
    for k in (0, -3, rec.n_items + 1, 2.5):
        with pytest.raises(InputError, match=rf"k must be an integer from 1 to the number of items \(200\), got {k}"):
            rec.recommend(0, k=k)


def test_raw_ids_in_both_mapping_column_orders(rec):
    dense = rec.recommend(7, k=5)
    raw = rec.recommend("U0007", k=5, raw=True)
    assert [i for i, _ in raw] == [f"B{i:05d}" for i, _ in dense]
    assert [s for _, s in raw] == [s for _, s in dense]
    assert rec.score(["U0007"], ["B00012"], raw=True)[0] == rec.score([7], [12])[0]
    assert rec.explain("U0007", "B00012", raw=True) == rec.explain(7, 12)
    assert [i for i, _ in rec.similar_items("B00012", k=3, raw=True)] == [
        f"B{i:05d}" for i, _ in rec.similar_items(12, k=3)]


def test_raw_ids_without_mapping_files_are_a_clear_error(tmp_path):
    run = train_tiny(dataset_with_raw_ids(tmp_path / "ds"), tmp_path / "bpr", "model=bpr", "epochs=1")
    (tmp_path / "ds" / "u_id_mapping.tsv").unlink()
    rec = fitmm.load(run)
    assert not rec.has_raw_ids()
    with pytest.raises(InputError, match=r"raw ids need u_id_mapping.tsv in the dataset folder \(.*ds\); use dense ids"):
        rec.recommend("U0001", raw=True)


def test_bad_mapping_file_names_the_line(tmp_path):
    data = dataset_with_raw_ids(tmp_path / "ds")
    run = train_tiny(data, tmp_path / "bpr", "model=bpr", "epochs=1")
    lines = (data / "i_id_mapping.tsv").read_text().splitlines()
    lines[5] = lines[5].replace("B00004", "B00003")
    (data / "i_id_mapping.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"i_id_mapping.tsv, line 6: itemID 4 or raw id 'B00003' appears twice; each must appear once"):
        fitmm.load(run)


def test_added_items_are_scored_recommendable_and_explained(fresh):
    before = fresh.item_vectors.clone()
    rng = np.random.default_rng(1)
    feats = fresh.dataset.features
    new = fresh.add_items({"image": feats["image"][:3] + 0.1 * rng.standard_normal((3, 32)),
                           "text": feats["text"][:3]}, ids=["N1", "N2", "N3"])
    assert new == [200, 201, 202] and fresh.n_items == 203
    assert torch.equal(fresh.item_vectors[:200], before)  # the catalogue is left as it was
    assert torch.isfinite(fresh.item_vectors[200:]).all() and fresh.item_vectors[200:].abs().sum() > 0
    all_items = [i for i, _ in fresh.recommend(4, k=fresh.n_items)]
    assert set(new) <= set(all_items)
    e = fresh.explain(4, 201)
    assert sum(e["bands"].values()) == pytest.approx(e["score"], rel=1e-9, abs=1e-12)
    assert sum(e["modalities"].values()) == pytest.approx(e["score"], rel=1e-9, abs=1e-12)
    assert e["score"] == pytest.approx(float(fresh.score([4], [201])[0]), rel=1e-4, abs=1e-5)
    assert fresh.score(["U0004"], ["N2"], raw=True)[0] == fresh.score([4], [201])[0]
    # A new item's top neighbours are catalogue items, by cosine of the embeddings.
    assert len(fresh.similar_items(202, k=5)) == 5


def test_a_cold_item_is_scored_as_the_model_scores_an_item_without_interactions():
    """Without the item graph and with frozen features, a catalogue item with no training rows
    and a zero ID row is, to FITMM, exactly its content: add_items of the same content must give
    the same embedding."""
    dataset = small_dataset()
    item = 7
    keep = np.ones(dataset.n_items)
    keep[item] = 0
    dataset.train = dataset.train.multiply(keep[None, :]).tocsr()  # the item's training rows removed
    dataset.train.eliminate_zeros()
    config = {**build_config(make_parser().parse_args(["train", "--set", "cache_dir=none"])), "item_graph": False, "train_features": False}
    torch.manual_seed(0)
    model = model_class("fitmm")(dataset, config).eval()
    with torch.no_grad():
        model.item_id[item] = 0.0
    rec = Recommender(model, dataset, config)
    [new] = rec.add_items({m: f[item:item + 1] for m, f in dataset.features.items()})
    assert torch.allclose(rec.item_vectors[new], rec.item_vectors[item], rtol=1e-5, atol=1e-6)


def test_add_items_validates_its_input(fresh):
    cases = [
        ({"image": np.zeros((2, 32))}, r"exactly the modalities \['image', 'text'\], got \['image'\]"),
        ({"image": np.zeros((2, 31)), "text": np.zeros((2, 16))}, r"features\['image'\] must be a numeric \(n_new x 32\) array, got shape \(2, 31\)"),
        ({"image": np.zeros((2, 32)), "text": np.zeros((3, 16))}, r"the same, non-zero number of rows, got \[2, 3\]"),
        ({"image": np.full((2, 32), np.nan), "text": np.zeros((2, 16))}, r"features\['image'\] contains NaN"),
    ]
    for features, message in cases:
        with pytest.raises(InputError, match=message):
            fresh.add_items(features)
    with pytest.raises(InputError, match="ids must be 1 new, distinct raw ids"):
        fresh.add_items({"image": np.zeros((1, 32)), "text": np.zeros((1, 16))}, ids=["B00001"])
    assert fresh.n_items == 200


def test_cli_recommend_table_json_and_errors(run, capsys):
    assert main(["recommend", str(run), "--user", "U0007", "--raw", "--k", "3", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["user"] == "U0007" and len(answer["items"]) == 3
    assert [x["item"] for x in answer["items"]] == [i for i, _ in fitmm.load(run).recommend("U0007", k=3, raw=True)]
    assert main(["recommend", str(run), "--user", "7", "--k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "item", "score"] and len(lines) == 3
    assert main(["recommend", str(run), "--user", "400"]) == 2
    assert "unknown user id 400: dense user ids run from 0 to 299" in capsys.readouterr().err
    assert main(["recommend", str(run), "--user", "U1"]) == 2
    assert "--user: 'U1' is not a dense (integer) id; pass --raw" in capsys.readouterr().err
    assert main(["recommend", str(run.parent / "nowhere"), "--user", "1"]) == 2
    assert "missing config.yaml" in capsys.readouterr().err


def test_serve_without_the_extra_says_what_to_install(run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi -> ImportError
    assert main(["serve", str(run)]) == 2
    assert "fitmm serve needs the optional 'serve' extra (fastapi is not installed): pip install 'fitmm[serve]'" in \
        capsys.readouterr().err


def test_vbpr_explains_by_modality_and_adds_items(tmp_path):
    run = train_tiny(dataset_with_raw_ids(tmp_path / "ds"), tmp_path / "vbpr", "model=vbpr", "epochs=1")
    rec = fitmm.load(run)
    e = rec.explain(2, 9)
    assert set(e) == {"score", "modalities"} and list(e["modalities"]) == ["id", "image", "text", "bias"]
    assert sum(e["modalities"].values()) == pytest.approx(e["score"], rel=1e-9)
    assert e["score"] == pytest.approx(float(rec.score([2], [9])[0]), rel=1e-5)
    [new] = rec.add_items({m: f[9:10] for m, f in rec.dataset.features.items()})
    e_new = rec.explain(2, new)
    # Same content, no ID factors: the content parts are item 9's, the ID part is zero.
    assert e_new["modalities"]["id"] == 0.0
    assert e_new["modalities"]["image"] == pytest.approx(e["modalities"]["image"], rel=1e-5)
    assert e_new["score"] == pytest.approx(float(rec.score([2], [new])[0]), rel=1e-5, abs=1e-7)
