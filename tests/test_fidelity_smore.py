"""Issue 13 (rows 3-7, 10, 12, 13): SMORE, VBPR, FREEDOM and the negative sampler follow their
reference implementations mechanism by mechanism. Each test checks one mechanism on a case small
enough to work out by hand (expected values are derived in the comments, not printed by the code)."""

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import fitmm.models.freedom  # noqa: F401  (registers the models)
import fitmm.models.smore  # noqa: F401
import fitmm.models.vbpr  # noqa: F401
from fitmm.data import synthetic
from fitmm.data.sampling import Batch, TrainSampler
from fitmm.models import model_class
from fitmm.models.freedom import freedom_modality_weights
from fitmm.models.smore import all_pass, cosine_knn, elementwise_max, spectral_fusion, sym_normalize_weighted
from fitmm.train import run_epoch
from tiny import build, first_batch


def tiny(feature_dims=None):
    dims = {"image": 12, "text": 8} if feature_dims is None else feature_dims
    return synthetic.generate(users=40, items=30, mean_interactions=8, feature_dims=dims)


# -- SMORE ------------------------------------------------------------------------------------


def test_smore_defaults_are_the_reference_first_configuration():
    d = model_class("smore").defaults
    assert (d["n_ui_layers"], d["n_mm_layers"], d["image_knn_k"], d["text_knn_k"]) == (3, 1, 10, 10)
    assert (d["reg_weight"], d["dropout"], d["cl_weight"], d["tau"], d["lr"]) == (1e-5, 0.0, 0.01, 0.2, 1e-3)
    assert (d["lr_decay"], d["lr_decay_epochs"], d["epochs"]) == (0.96, 50, 1000)


def test_smore_item_views_are_the_id_table_gated_by_the_spectral_output():
    ds = tiny()
    model = build("smore", ds)
    with torch.no_grad():
        before = model.item_views()
        # The gates see only the spectral outputs, so a view is linear in the ID table:
        # scaling item 3's ID row by 2 doubles row 3 of every view, zeroing item 5's zeroes it.
        model.item_emb[3] *= 2.0
        model.item_emb[5] = 0.0
        after = model.item_views()
    assert len(before) == 3  # image, text, fused
    for b, a in zip(before, after):
        torch.testing.assert_close(a[3], 2.0 * b[3])
        assert torch.all(a[5] == 0)
        torch.testing.assert_close(a[7], b[7])
        # and each entry is the ID entry times a sigmoid gate, strictly between 0 and 1 of it
        ratio = b / model.item_emb.detach().where(model.item_emb.detach() != 0, torch.ones(()))
        assert torch.all((ratio[[0, 1, 2, 4]] > 0) & (ratio[[0, 1, 2, 4]] < 1))


def test_smore_filters_start_random_not_all_pass():
    model = build("smore", tiny())
    for w in [*model.filters, model.fusion_filter]:
        assert w.shape == (64 // 2 + 1, 2)
        assert not torch.allclose(w, all_pass(64))
    assert not torch.allclose(model.filters[0], model.filters[1])
    # standard normal real and imaginary parts: over 3 x 66 draws the spread is about 1
    values = torch.cat([w.detach().reshape(-1) for w in [*model.filters, model.fusion_filter]])
    assert 0.7 < values.std() < 1.3


def test_smore_fusion_uses_the_unfiltered_spectra():
    torch.manual_seed(0)
    a, b = torch.randn(2, 8), torch.randn(2, 8)
    random_filters = [torch.randn(5, 2), torch.randn(5, 2)]
    uni, fused = spectral_fusion([a, b], random_filters, all_pass(8))
    # the modality filters shape the uni-modal outputs only: zero filters zero them, not the fusion
    uni0, fused0 = spectral_fusion([a, b], [torch.zeros(5, 2), torch.zeros(5, 2)], all_pass(8))
    assert torch.all(uni0[0] == 0) and torch.all(uni0[1] == 0)
    torch.testing.assert_close(fused0, fused)
    # all-pass fusion filter: the orthonormal FFT product is the circular convolution / sqrt(d)
    conv = torch.stack([sum(a[:, j] * b[:, (k - j) % 8] for j in range(8)) for k in range(8)], dim=1)
    torch.testing.assert_close(fused, conv / math.sqrt(8), atol=1e-5, rtol=1e-5)


def test_smore_knn_is_cosine_weighted_and_symmetrically_normalised_by_weighted_row_sums():
    # x0 = (1, 0), x1 = (4, 3), x2 = (0, 1): cos(0,1) = 0.8, cos(1,2) = 0.6, cos(0,2) = 0.
    # Top-2 (self included): row 0 {0: 1, 1: .8}, row 1 {1: 1, 0: .8}, row 2 {2: 1, 1: .6}.
    knn = cosine_knn(np.array([[1.0, 0.0], [4.0, 3.0], [0.0, 1.0]]), k=2).toarray()
    np.testing.assert_allclose(knn, [[1, 0.8, 0], [0.8, 1, 0], [0, 0.6, 1]], atol=1e-6)
    # Weighted row sums d = (1.8, 1.8, 1.6); entry (i, j) -> a_ij / sqrt(d_i d_j).
    norm = sym_normalize_weighted(sp.csr_matrix(knn)).toarray()
    expected = [
        [1 / 1.8, 0.8 / 1.8, 0],
        [0.8 / 1.8, 1 / 1.8, 0],
        [0, 0.6 / math.sqrt(1.6 * 1.8), 1 / 1.6],
    ]
    np.testing.assert_allclose(norm, expected, rtol=1e-6)


def test_smore_fused_graph_is_the_elementwise_max_over_the_union_of_edges():
    a = sp.csr_matrix(np.array([[0.5, 0.2, 0.0], [0.0, 0.3, -0.1], [0.0, 0.0, 0.4]]))
    b = sp.csr_matrix(np.array([[0.1, 0.0, 0.6], [0.0, 0.7, 0.0], [0.0, 0.0, 0.2]]))
    fused = elementwise_max([a, b])
    # (1, 2) is stored only in a, with a negative weight: it stays -0.1 (not max(-0.1, 0))
    np.testing.assert_allclose(fused.toarray(), [[0.5, 0.2, 0.6], [0.0, 0.7, -0.1], [0.0, 0.0, 0.4]])
    assert fused.nnz == 6


def test_smore_model_graphs_are_weighted_and_the_fused_one_is_their_max():
    ds = tiny()
    model = build("smore", ds, image_knn_k=3, text_knn_k=2)
    dense = [g.to_dense().numpy() for g, _ in model.item_graphs]
    # weighted, not binary: a row's values differ (self edge 1 and a cosine below 1, normalised)
    assert len(np.unique(np.round(dense[0][dense[0] != 0], 6))) > 1
    np.testing.assert_allclose(dense[2], np.maximum(dense[0], dense[1]), rtol=1e-6)  # all >= 0 here


def test_smore_preference_module_attention_gates_and_mean_of_views():
    ds = tiny()
    model = build("smore", ds, n_mm_layers=0)
    with torch.no_grad():
        # Queries whose last layer is zero give a uniform softmax (1/d per dimension); gates whose
        # linear layer is (0, +40) give sigmoid(40) = 1 (to float precision).
        for q in model.queries:
            q[2].weight.zero_()
        for g in model.prefer_gates:
            g[0].weight.zero_()
            g[0].bias.fill_(40.0)
        model.eval()
        behaviour, side = model._views()
        views = [torch.cat([model.user_item.to_dense() @ v, v]) for v in model.item_views()]
    d = 64
    expected = (views[0] / d + views[1] / d + views[2]) / 3  # mean of 3 views, the modal ones re-weighted
    torch.testing.assert_close(side, expected, atol=1e-6, rtol=1e-5)


def test_smore_dropout_is_on_the_preference_gates_only_in_training():
    ds = tiny()
    model = build("smore", ds, dropout=0.5)
    model.eval()
    with torch.no_grad():
        _, a = model._views()
        _, b = model._views()
    torch.testing.assert_close(a, b)  # deterministic at evaluation
    model.train()
    torch.manual_seed(1)
    with torch.no_grad():
        _, c = model._views()
    assert not torch.allclose(a, c)
    # a dropped gate zeroes that view's entry: entries where every view is dropped become exactly 0
    assert (c == 0).any() and not (a == 0).any()


def test_smore_loss_l2_is_on_the_final_embeddings_and_cl_pairs_side_with_behaviour():
    ds = tiny()
    model = build("smore", ds, reg_weight=0.5, cl_weight=1.0)
    batch = Batch(torch.tensor([0, 0, 3, 7]), torch.tensor([1, 1, 2, 4]), torch.tensor([5, 6, 8, 9]))
    model.train()  # dropout 0: training views equal evaluation views
    _, parts = model.loss(batch)
    with torch.no_grad():
        behaviour, side = model._views()
        users, items = model.embed()
    u, i, j = users[batch.users], items[batch.pos_items], items[batch.neg_items]
    expected_reg = 0.5 * 0.5 * (u.pow(2).sum() + i.pow(2).sum() + j.pow(2).sum()) / 4
    assert parts["reg"] == pytest.approx(float(expected_reg), rel=1e-5)

    def info_nce(a, b):  # rows as in the batch (repeats included); denominator over b's rows
        a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
        sim = torch.exp(a @ b.T / 0.2)
        return float((-torch.log(sim.diag() / sim.sum(1))).mean())

    pos = batch.pos_items + ds.n_users
    expected_cl = info_nce(side[pos], behaviour[pos]) + info_nce(side[batch.users], behaviour[batch.users])
    assert parts["cl"] == pytest.approx(expected_cl, rel=1e-5)


def test_smore_raw_features_are_trainable_and_graphs_come_from_the_loaded_features():
    ds = tiny()
    model = build("smore", ds)
    names = dict(model.named_parameters())
    assert "item_features_0" in names and "item_features_1" in names
    loss, _ = model.loss(first_batch(ds))
    loss.backward()
    assert names["item_features_0"].grad.abs().sum() > 0
    assert "item_features_0" in model.state_dict()  # trained, so saved


def test_smore_learning_rate_shrinks_by_096_every_50_epochs_through_the_trainer():
    ds = tiny()
    model = build("smore", ds)
    assert model.lr_factor(1) == 1.0  # the reference's first epoch runs at the base lr
    assert model.lr_factor(51) == pytest.approx(0.96)
    assert model.lr_factor(26) == pytest.approx(0.96 ** 0.5)
    fast = build("smore", ds, lr_decay=0.5, lr_decay_epochs=1)
    optimizer = torch.optim.Adam(fast.parameters(), lr=0.01)
    sampler = TrainSampler(ds.train, seed=0)
    for epoch, lr in [(1, 0.01), (2, 0.005), (4, 0.00125)]:
        run_epoch(fast, sampler, optimizer, epoch, 256, "cpu")
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr)
    # models without a schedule keep the base lr
    vbpr = build("vbpr", ds)
    opt = torch.optim.Adam(vbpr.parameters(), lr=0.01)
    run_epoch(vbpr, sampler, opt, 7, 256, "cpu")
    assert opt.param_groups[0]["lr"] == 0.01


# -- VBPR ------------------------------------------------------------------------------------


def test_vbpr_widths_bias_and_init_follow_the_reference():
    ds = tiny()  # features: image 12 + text 8 = 20 columns
    model = build("vbpr", ds)
    assert model.defaults["reg_weight"] == 2.0 and model.defaults["epochs"] == 1000
    assert model.user_id.shape == model.user_content.shape == (40, 64)  # one 128-wide user row
    assert model.item_id.shape == (30, 64)
    assert model.projection.weight.shape == (64, 20) and torch.all(model.projection.bias == 0)
    users, items = model.embed()
    assert users.shape == (40, 128) and items.shape == (30, 128)
    with torch.no_grad():
        model.projection.bias.fill_(1.0)
        _, items = model.embed()
        # the content half is E f + b; the ID half is the ID table
        torch.testing.assert_close(items[:, 64:], model.features @ model.projection.weight.T + 1.0)
        torch.testing.assert_close(items[:, :64], model.item_id)


def test_vbpr_init_scales_are_xavier_for_a_128_wide_user_table_and_normal_content_layer():
    ds = synthetic.generate(users=2000, items=300, mean_interactions=5, feature_dims={"image": 256})
    model = build("vbpr", ds)
    users = torch.cat([model.user_id, model.user_content], dim=1).detach()
    bound = math.sqrt(6 / (2000 + 128))  # xavier-uniform over the whole (users x 128) table
    assert users.abs().max() <= bound and users.abs().max() > 0.95 * bound
    std = math.sqrt(2 / (256 + 64))  # xavier-normal: fan_in 256, fan_out 64
    assert model.projection.weight.std().item() == pytest.approx(std, rel=0.05)


# -- FREEDOM ---------------------------------------------------------------------------------


def test_freedom_raw_features_learn_from_the_modality_bpr_terms_only():
    ds = tiny()
    assert model_class("freedom").defaults["reg_weight"] == 0.0  # the reference's first configuration
    model = build("freedom", ds, reg_weight=1e-3)
    graph = model.item_graph.to_dense().clone()
    feats = dict(model.named_parameters())["item_features_0"]
    loss, _ = model.loss(first_batch(ds))
    loss.backward()
    assert feats.grad.abs().sum() > 0
    with torch.no_grad():
        feats.add_(1.0)
    torch.testing.assert_close(model.item_graph.to_dense(), graph)  # the kNN graph stays frozen
    off = build("freedom", ds)  # reg_weight 0: the terms are off, nothing reaches the features
    off.loss(first_batch(ds))[0].backward()
    assert dict(off.named_parameters())["item_features_0"].grad is None


def test_freedom_image_weight_is_01_against_any_second_modality():
    assert freedom_modality_weights(["audio", "image"]) == {"audio": 0.9, "image": 0.1}
    assert freedom_modality_weights(["image", "text"]) == {"image": 0.1, "text": 0.9}
    assert freedom_modality_weights(["a", "b"]) == {"a": 0.5, "b": 0.5}


# -- negatives -------------------------------------------------------------------------------


def test_negatives_are_never_items_absent_from_training():
    ds = tiny()
    # Move every training row of items 0..4 to the validation split: they occur only there now.
    train = ds.train.tolil()
    train[:, :5] = 0
    train = sp.csr_matrix(train)
    train.eliminate_zeros()
    sampler = TrainSampler(train, seed=0)
    negs = np.concatenate([b.neg_items.numpy() for _ in range(20) for b in sampler.batches(128)])
    assert negs.min() >= 5
    assert set(np.unique(negs)) == set(np.unique(train.tocoo().col))  # every training item can be one
