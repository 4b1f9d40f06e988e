"""The FITMM model: forward/loss contract, every ablation switch, and that it learns."""

import json

import numpy as np
import pytest
import torch

from conftest import small_args, small_dataset
from fitmm.cli import main
from fitmm.errors import InputError
from fitmm.train import train_step
from tiny import build, first_batch


def make(tmp_path, dataset=None, **overrides):
    """FITMM on the small synthetic set (or `dataset`), its kNN graphs cached under tmp_path."""
    dataset = dataset or small_dataset()
    return build("fitmm", dataset, **{"cache_dir": str(tmp_path / "cache"), **overrides}), dataset


def batch_of(dataset):
    return first_batch(dataset, size=256)


def one_step(model, ds):
    """One Adam step (lr 0.1) on the first batch, as training takes it."""
    train_step(model, batch_of(ds), torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1))


def test_loss_parts_and_embedding_shapes(tmp_path):
    model, ds = make(tmp_path)
    loss, parts = model.loss(batch_of(ds))
    assert set(parts) == {"rec", "ib", "cl"}
    assert loss.item() == pytest.approx(parts["rec"] + parts["ib"] + 0.001 * parts["cl"], rel=1e-5)
    loss.backward()
    assert model.features[0].grad is not None  # raw features are trained by default, as released
    users, items = model.embed()
    assert users.shape == (ds.n_users, 64 * 3) and items.shape == (ds.n_items, 64 * 3)


def test_bands_of_each_view_sum_to_the_view(tmp_path):
    """Z = Band(X) + Band(H) summed over bands equals X + H: the decomposition loses nothing."""
    model, _ = make(tmp_path)
    x_u, h_u, x_i, h_i = model._views()
    _, bands, _ = model._side(x_i, h_i, model.item_gate, model.item_band_weights)
    torch.testing.assert_close(bands.sum(0), x_i + h_i, atol=1e-4, rtol=1e-4)
    assert bands.shape[0] == 3


def test_ablation_num_bands_1(tmp_path):
    model, ds = make(tmp_path, num_bands=1)
    x_u, h_u, x_i, h_i = model._views()
    items, bands, gates = model._side(x_i, h_i, model.item_gate, model.item_band_weights)
    assert bands.shape[0] == 1
    torch.testing.assert_close(bands[0], x_i + h_i)  # no decomposition at all
    _, parts = model.loss(batch_of(ds))
    assert parts["cl"] == 0.0  # cross-band consistency has no pair of bands to compare


def test_ablation_gate_off(tmp_path):
    model, ds = make(tmp_path, gate="off")
    assert not any("gate" in name for name, _ in model.named_parameters())
    x_u, _, _, _ = model._views()
    assert torch.equal(model.user_gate(x_u), torch.ones(ds.n_users, 3))
    _, parts = model.loss(batch_of(ds))
    assert "ib" not in parts  # nothing to regularise


def test_ablation_ib_weight_0_and_consistency_none(tmp_path):
    model, ds = make(tmp_path, ib_weight=0.0, consistency="none")
    loss, parts = model.loss(batch_of(ds))
    assert set(parts) == {"rec"}
    assert loss.item() == pytest.approx(parts["rec"])


def test_ablation_no_item_graph_changes_item_embeddings(tmp_path):
    with_graph, ds = make(tmp_path)
    without, _ = make(tmp_path, item_graph=False)
    assert without.item_graph is None and with_graph.item_graph is not None
    assert without._views()[3] is None
    a, b = with_graph.embed()[1], without.embed()[1]
    assert not torch.allclose(a, b)


def test_consistency_variants_differ(tmp_path):
    band, ds = make(tmp_path, consistency="cross_band")
    modal, _ = make(tmp_path, consistency="cross_modal")
    batch = batch_of(ds)
    assert band.loss(batch)[1]["cl"] != pytest.approx(modal.loss(batch)[1]["cl"])


def test_dual_gate_and_bpr_loss_run(tmp_path):
    model, ds = make(tmp_path, gate="dual", ib_mode="dual", loss="bpr")
    loss, _ = model.loss(batch_of(ds))
    loss.backward()
    assert torch.isfinite(loss)


def test_frozen_features_do_not_change(tmp_path):
    model, ds = make(tmp_path, train_features=False)
    before = model.features[0].detach().clone()
    one_step(model, ds)
    assert torch.equal(model.features[0], before)
    assert not model.features[0].requires_grad


def test_trained_features_copy_the_dataset_unless_it_lends_them(tmp_path):
    name = small_dataset().modalities[0]
    # Default: the model trains a copy; the dataset (which fitmm bench reuses) stays as loaded.
    model, ds = make(tmp_path)
    loaded = ds.features[name].copy()
    one_step(model, ds)
    assert np.array_equal(ds.features[name], loaded)
    assert not np.array_equal(model.features[0].detach().numpy(), loaded)
    # Lent (fitmm train): no copy, the dataset's array is trained in place; the fingerprint (the
    # kNN cache key) still describes the features as loaded.
    ds = small_dataset()
    ds.lend_features = True
    model, _ = make(tmp_path, dataset=ds)
    assert np.shares_memory(model.features[0].detach().numpy(), ds.features[name])
    one_step(model, ds)
    assert np.array_equal(ds.features[name], model.features[0].detach().numpy())
    assert ds.fingerprint == small_dataset().fingerprint
    # Frozen features are never written, so they are never copied.
    model, ds = make(tmp_path, train_features=False)
    assert np.shares_memory(model.features[0].detach().numpy(), ds.features[name])


def test_bfloat16_feature_mlps_stay_close_to_float32(tmp_path):
    """feature_precision=bfloat16 changes only the MLP products' rounding: same parameters, a loss
    within bfloat16's ~3 significant digits, float32 embeddings and float32 gradients."""
    exact, ds = make(tmp_path)
    fast, _ = make(tmp_path, ds, feature_precision="bfloat16")
    batch = batch_of(ds)
    loss32, _ = exact.loss(batch)
    loss16, _ = fast.loss(batch)
    assert loss16.item() == pytest.approx(loss32.item(), rel=1e-2)
    loss16.backward()
    assert fast.features[0].grad.dtype == torch.float32 and torch.isfinite(fast.features[0].grad).all()
    users, items = fast.embed()
    assert users.dtype == items.dtype == torch.float32


def test_user_graph_smooths_the_user_view(tmp_path):
    plain, _ = make(tmp_path)
    smoothed, _ = make(tmp_path, user_graph=True)
    assert smoothed.user_graph is not None
    torch.testing.assert_close(plain._views()[0], smoothed._views()[0])  # base view unchanged
    assert not torch.allclose(plain._views()[1], smoothed._views()[1])  # enhanced user view smoothed


def test_modalities_are_not_hard_wired(tmp_path):
    from fitmm.data import synthetic

    one = synthetic.generate(users=200, items=120, feature_dims={"audio": 12})
    model, _ = make(tmp_path, dataset=one)
    assert model.embed()[1].shape[1] == 64 * 2
    three = synthetic.generate(users=200, items=120, feature_dims={"a": 8, "b": 8, "c": 8})
    model, _ = make(tmp_path, dataset=three)
    assert model.embed()[1].shape[1] == 64 * 4


def test_id_only_dataset(tmp_path):
    from fitmm.data import synthetic

    ds = synthetic.generate(users=200, items=120, feature_dims={})
    with pytest.raises(InputError, match="item_graph=false"):
        make(tmp_path, dataset=ds)
    model, _ = make(tmp_path, dataset=ds, item_graph=False)
    assert model.embed()[0].shape == (200, 64)


def test_bad_fitmm_settings_are_input_errors(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), *small_args("num_bands=65")]) == 2
    assert "'num_bands': must be between 1 and embedding_size (64)" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r"), *small_args("consistency=crossband")]) == 2
    assert "'consistency': 'crossband' is not one of cross_band, cross_modal, none" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r"), *small_args("modality_weights={image: 0.5}")]) == 2
    assert "modality_weights" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_item_graph_is_cached_on_disk(tmp_path):
    make(tmp_path)
    files = list((tmp_path / "cache").glob("knn-*.npz"))
    assert len(files) == 1
    make(tmp_path, knn_k=5)
    assert len(list((tmp_path / "cache").glob("knn-*.npz"))) == 2


def test_fitmm_learns_and_beats_most_popular(tmp_path):
    base = [f"cache_dir={tmp_path / 'cache'}"]
    assert main(["train", "--out", str(tmp_path / "pop"), *small_args("model=pop")]) == 0
    assert main(["train", "--out", str(tmp_path / "fitmm"),
                 *small_args(*base, "model=fitmm", "epochs=25", "lr=0.003", "batch_size=512")]) == 0
    pop = json.loads((tmp_path / "pop" / "summary.json").read_text())
    fit = json.loads((tmp_path / "fitmm" / "summary.json").read_text())
    assert fit["test"]["recall@20"] > 1.2 * pop["test"]["recall@20"]


def test_bfloat16_setting_runs_the_feature_mlps_in_bfloat16(tmp_path):
    """Closeness to float32 (above) would also hold if the setting were ignored: check the dtype."""
    for precision, expected in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        model, _ = make(tmp_path, feature_precision=precision)
        seen = []
        model.mlps[0][0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
        items = model._item_ego(model.mlps[0], model.features[0])
        assert seen == [expected] and items.dtype == torch.float32


def test_gate_scale_init_reaches_both_gates(tmp_path):
    model, _ = make(tmp_path, gate_scale_init=0.2)
    assert model.user_gate.scale.item() == pytest.approx(0.2) and model.item_gate.scale.item() == pytest.approx(0.2)


def test_modality_weights_reach_the_item_and_user_graphs(tmp_path):
    from fitmm.knn import user_knn_graph
    from tiny import S_IMAGE, tiny_dataset

    model, _ = make(tmp_path, tiny_dataset(), modality_weights={"image": 1.0, "text": 0.0}, knn_k=2, user_knn_k=2, embedding_size=4)
    np.testing.assert_allclose(model.item_graph.to_dense().numpy(), S_IMAGE)  # the default would mix in 0.9 S_text
    ds = small_dataset()
    weights = {"image": 0.8, "text": 0.2}
    model, _ = make(tmp_path, ds, user_graph=True, modality_weights=weights)
    expected = user_knn_graph(ds.train, ds.features, 10, weights).toarray()
    assert not np.allclose(expected, user_knn_graph(ds.train, ds.features, 10, None).toarray())
    np.testing.assert_allclose(model.user_graph.to_dense().numpy(), expected)


def test_cached_item_graphs_of_different_datasets_do_not_collide(tmp_path):
    from tiny import tiny_dataset

    first, _ = make(tmp_path, tiny_dataset(), knn_k=2, user_knn_k=2, embedding_size=4)
    other = tiny_dataset()
    other.features["image"] = other.features["image"][::-1].copy()  # same shape, other content
    second, _ = make(tmp_path, other, knn_k=2, user_knn_k=2, embedding_size=4)
    assert list((tmp_path / "cache").iterdir())  # both went through the same on-disk cache
    assert not torch.equal(first.item_graph.to_dense(), second.item_graph.to_dense())


@pytest.mark.parametrize("key", ["knn_k", "user_knn_k"])
def test_knn_sizes_start_at_one(tmp_path, key):
    from tiny import tiny_dataset

    sizes = {"knn_k": 2, "user_knn_k": 2}
    make(tmp_path, tiny_dataset(), embedding_size=4, **{**sizes, key: 1})  # accepted: each node keeps only itself
    with pytest.raises(InputError, match=f"^config key '{key}': must be >= 1, got 0$"):
        make(tmp_path, tiny_dataset(), embedding_size=4, **{**sizes, key: 0})


def test_a_k_above_the_node_count_matters_only_when_its_graph_is_built(tmp_path):
    from tiny import tiny_dataset  # 3 users, 4 items

    make(tmp_path, tiny_dataset(), embedding_size=4, knn_k=2)  # user graph off: user_knn_k 10 > 3 users is unused
    make(tmp_path, tiny_dataset(), embedding_size=4, knn_k=9, item_graph=False)  # likewise knn_k without the item graph
    with pytest.raises(InputError, match="'user_knn_k': must be at most the number of users \\(3\\), got 10"):
        make(tmp_path, tiny_dataset(), embedding_size=4, knn_k=2, user_graph=True)


def test_a_step_saves_one_hidden_layer_per_mlp_and_no_copy_of_the_user_tables(tmp_path):
    """Memory of a training step (docs/performance.md, "Memory III"): autograd holds, per feature
    MLP, ONE items x mlp_hidden matrix (the in-place activation's output, which the second layer
    saves anyway), and per branch only the layer sum (U + I) x d, not also a normalised copy of
    the concatenated [user table; items] (normalised per part, the user table itself is saved)."""
    model, ds = make(tmp_path)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    sizes = {}  # storage -> number of elements, for every saved tensor that is not a parameter

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.loss(batch_of(ds))
    counts = list(sizes.values())
    assert counts.count(ds.n_items * model.config["mlp_hidden"]) == len(model.modalities)
    assert counts.count((ds.n_users + ds.n_items) * model.d) == 1 + len(model.modalities)
