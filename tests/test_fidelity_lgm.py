"""Issue 13: LGMRec, BM3 and the field's EmbLoss (BPR, LightGCN, VBPR, LGMRec) follow the reference
mechanisms. Each test pins one mechanism on a case small enough to check by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

import fitmm.models.bm3  # noqa: F401  (registers the models)
import fitmm.models.bpr  # noqa: F401
import fitmm.models.lgmrec  # noqa: F401
import fitmm.models.lightgcn  # noqa: F401
import fitmm.models.vbpr  # noqa: F401
from fitmm.data import synthetic
from fitmm.data.sampling import Batch
from fitmm.models.base import embedding_norm_penalty
from fitmm.models.lgmrec import contrastive_sum, gumbel_softmax
from tiny import build, first_batch


@pytest.fixture(scope="module")
def dataset():
    return synthetic.generate(users=120, items=80, mean_interactions=10, feature_dims={"image": 12, "text": 8})


# -- EmbLoss: Frobenius norms, not squared, over the rows of the last tensor ---------------------


def test_embedding_norm_penalty_on_a_hand_case():
    a = torch.tensor([[3.0, 0.0], [4.0, 0.0]])  # norm 5 (row norms would sum to 7, squares to 25)
    b = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # norm 1
    assert embedding_norm_penalty(a, b).item() == pytest.approx((5 + 1) / 2)


# LightGCN's default is the reference yaml's first value; BPR's is not (its first value, 2.0,
# collapses the embeddings on both real datasets; bpr.py's docstring).
@pytest.mark.parametrize("name, weight", [("bpr", 1e-2), ("lightgcn", 1e-2)])
def test_bpr_and_lightgcn_penalise_the_norms_of_the_batch_ego_embeddings(name, weight, dataset, tmp_path):
    model = build(name, dataset, embedding_size=2)
    assert model.config["reg_weight"] == weight
    with torch.no_grad():
        model.user_emb.copy_(torch.tensor([0.6, 0.8]).expand_as(model.user_emb))  # unit rows
        model.item_emb.copy_(torch.tensor([1.0, 0.0]).expand_as(model.item_emb))
    batch = first_batch(dataset, size=64)
    _, parts = model.loss(batch)
    # three 64 x 2 tables of unit rows: each has norm sqrt(64) = 8; (8 + 8 + 8) / 64
    assert parts["reg"] == pytest.approx(weight * 24 / 64, rel=1e-6)


def test_vbpr_penalises_the_norms_of_its_whole_user_and_item_vectors(dataset, tmp_path):
    model = build("vbpr", dataset, reg_weight=1.0)
    batch = first_batch(dataset, size=64)
    _, parts = model.loss(batch)
    with torch.no_grad():
        users, items = model.embed()  # [ID factors, content factors] side by side
    expected = sum(t.norm().item() for t in (users[batch.users], items[batch.pos_items], items[batch.neg_items])) / 64
    assert parts["reg"] == pytest.approx(expected, rel=1e-5)


def test_lgmrec_penalises_the_norms_of_the_batch_final_embeddings(dataset, tmp_path):
    model = build("lgmrec", dataset, reg_weight=1.0)
    model.eval()  # no dropout; the evaluation's Gumbel noise is seeded, so embed() repeats it
    batch = first_batch(dataset, size=64)
    _, parts = model.loss(batch)
    with torch.no_grad():
        users, items = model.embed()
    expected = sum(t.norm().item() for t in (users[batch.users], items[batch.pos_items], items[batch.neg_items])) / 64
    assert parts["reg"] == pytest.approx(expected, rel=1e-5)


# -- LGMRec: contrastive term ----------------------------------------------------------------


def test_contrastive_sum_on_a_hand_case():
    e = torch.eye(3)
    # each row: cos 1 with itself, 0 with the two others -> -log(e^5 / (e^5 + 2)) at tau 0.2
    per_row = math.log(1 + 2 * math.exp(-5))
    assert contrastive_sum(e, e, e, 0.2).item() == pytest.approx(3 * per_row, rel=1e-5)
    # rows of a batch are summed as they come (a repeated row counts twice), against ALL candidates
    assert contrastive_sum(e[[0, 0]], e[[0, 0]], e, 0.2).item() == pytest.approx(2 * per_row, rel=1e-5)
    # scaling a vector changes nothing (cosines)
    assert contrastive_sum(3 * e, e, 0.5 * e, 0.2).item() == pytest.approx(3 * per_row, rel=1e-5)


def _contrastive_by_definition(anchors, positives, candidates, tau):
    """The docstring's formula literally (exp, sum, log; fine in float64 for these sizes)."""
    a, p, c = (F.normalize(t, dim=1) for t in (anchors, positives, candidates))
    return -torch.log(torch.exp((a * p).sum(1) / tau) / torch.exp(a @ c.T / tau).sum(1)).sum()


@pytest.mark.parametrize("tau", [0.2, 0.02])  # 0.2: the bounded path; 0.02 (1/tau > 30): torch.logsumexp
def test_contrastive_sum_value_and_gradients_match_the_definition(tau):
    gen = torch.Generator().manual_seed(0)
    anchors, positives = (torch.randn(7, 5, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    candidates = torch.randn(11, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    ours = contrastive_sum(anchors, positives, candidates, tau)
    expected = _contrastive_by_definition(anchors, positives, candidates, tau)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-12)
    got = torch.autograd.grad(ours, (anchors, positives, candidates))
    want = torch.autograd.grad(expected, (anchors, positives, candidates))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, p, c: contrastive_sum(a, p, c, tau), (anchors, positives, candidates))


def test_contrastive_sum_with_counts_equals_the_repeated_rows():
    gen = torch.Generator().manual_seed(1)
    table, view = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    rows = torch.tensor([3, 0, 3, 5, 3, 0])
    unique, counts = torch.unique(rows, return_counts=True)
    repeated = contrastive_sum(table[rows], view[rows], view, 0.2)
    weighted = contrastive_sum(table[unique], view[unique], view, 0.2, counts)
    assert weighted.item() == pytest.approx(repeated.item(), rel=1e-6)


def test_lgmrec_contrastive_term_is_summed_over_the_batch_and_the_size_of_bpr(dataset, tmp_path):
    model = build("lgmrec", dataset)
    batch = first_batch(dataset, size=64)
    twice = Batch(users=batch.users.repeat(2), pos_items=batch.pos_items.repeat(2), neg_items=batch.neg_items.repeat(2))
    torch.manual_seed(1)
    _, parts = model.loss(batch)
    torch.manual_seed(1)  # the same Gumbel noise and dropout masks (they do not depend on the batch)
    _, parts2 = model.loss(twice)
    assert parts2["cl"] == pytest.approx(2 * parts["cl"], rel=1e-5)  # a sum over rows, not a mean
    # each row's InfoNCE is at most 2 / tau + log(candidates) and at least 0; summed over 64 users
    # and 64 items it is far above one row's value, and cl_weight 1e-4 keeps it beside BPR
    assert 64 < parts["cl"] < 2 * 64 * (2 / 0.2 + math.log(120))
    cl_term = model.config["cl_weight"] * parts["cl"]
    assert 1e-3 * parts["bpr"] < cl_term < 10 * parts["bpr"]


def test_lgmrec_contrastive_term_runs_from_image_to_the_other_modality_whatever_the_order(tmp_path):
    # The reference always anchors on its "v" (image) modality; a folder with audio and image
    # sorts as audio, image (tiktok_mmssl), which once made ours run audio -> image.
    data = synthetic.generate(users=120, items=80, mean_interactions=10, feature_dims={"audio": 8, "image": 12})
    assert data.modalities == ["audio", "image"]
    model = build("lgmrec", data)
    assert model.contrastive_anchor() == 1
    batch = first_batch(data, size=64)
    torch.manual_seed(1)
    _, _, g = model._forward()
    tau = model.config["tau"]
    (audio_u, audio_i), (image_u, image_i) = g
    u, p = batch.users, batch.pos_items
    image_first = contrastive_sum(image_u[u], audio_u[u], audio_u, tau) + contrastive_sum(image_i[p], audio_i[p], audio_i, tau)
    audio_first = contrastive_sum(audio_u[u], image_u[u], image_u, tau) + contrastive_sum(audio_i[p], image_i[p], image_i, tau)
    assert model.contrastive(g, batch).item() == pytest.approx(image_first.item(), rel=1e-6)
    assert abs(image_first.item() - audio_first.item()) > 1e-3 * image_first.item()  # the direction matters
    # without a modality named 'image', the first one is the anchor
    assert build("lgmrec", synthetic.generate(users=60, items=40, mean_interactions=8,
                                              feature_dims={"a": 4, "b": 4})).contrastive_anchor() == 0


# -- LGMRec: Gumbel-softmax assignments --------------------------------------------------------


def test_gumbel_softmax_temperature_and_noise():
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1])).expand(20000, 3).contiguous()
    out = gumbel_softmax(logits, 0.2, torch.Generator().manual_seed(3))
    torch.testing.assert_close(out.sum(1), torch.ones(20000))
    # Gumbel-max: the arg max falls on each hyperedge with its softmax probability
    freq = torch.bincount(out.argmax(1), minlength=3).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.015, rtol=0)
    # the same noise with logit 0 raised by 1: its log-ratio to the others rises by 1 / tau = 5
    shifted = logits.clone()
    shifted[:, 0] += 1.0
    out2 = gumbel_softmax(shifted, 0.2, torch.Generator().manual_seed(3))
    delta = (out2[:5, 0] / out2[:5, 1]).log() - (out[:5, 0] / out[:5, 1]).log()
    torch.testing.assert_close(delta, torch.full((5,), 5.0), atol=1e-3, rtol=1e-4)


def test_lgmrec_assignments_are_gumbel_softmax_of_item_and_summed_user_logits(dataset, tmp_path):
    model = build("lgmrec", dataset)
    model.eval()
    deps = model.hyperedge_dependencies()
    # evaluation: the noise comes from a generator seeded with the run's seed, items then users
    generator = torch.Generator().manual_seed(model.config["seed"])
    r = torch.from_numpy(dataset.train.toarray()).float()
    for (items, users), feat, edges in zip(deps, model.item_features(), model.hyperedges):
        item_logits = feat @ edges.T
        user_logits = r @ item_logits  # the SUM of the user's items' logits
        for logits, got in ((item_logits, items), (user_logits, users)):
            g = -torch.empty_like(logits).exponential_(generator=generator).log()
            torch.testing.assert_close(got, torch.softmax((logits + g) / 0.2, dim=1), atol=1e-5, rtol=1e-4)
    again = model.hyperedge_dependencies()
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(deps, again))
    # training draws fresh noise
    model.train()
    fresh = model.hyperedge_dependencies()
    assert not torch.allclose(fresh[0][0], deps[0][0])


def test_lgmrec_one_dropout_mask_per_assignment_matrix_shared_by_the_layers(dataset, tmp_path):
    model = build("lgmrec", dataset, n_hyper_layers=2, gumbel=False)
    model.train()
    e = model.item_emb.detach()
    torch.manual_seed(5)
    got = model.global_embeddings(e)
    torch.manual_seed(5)
    for (h_i, h_u), (users, items) in zip(model.hyperedge_dependencies(), got):
        m_i, m_u = F.dropout(h_i, 0.5), F.dropout(h_u, 0.5)  # drawn once, items then users
        x = e
        for _ in range(2):
            edges = m_i.T @ x
            u, x = m_u @ edges, m_i @ edges
        torch.testing.assert_close(items, x)
        torch.testing.assert_close(users, u)


# -- BM3 -----------------------------------------------------------------------------------


def test_bm3_item_vector_adds_the_id_embedding_to_the_graph_readout(dataset, tmp_path):
    model = build("bm3", dataset, n_layers=0)
    users, items = model.encode()
    torch.testing.assert_close(users, model.user_emb)
    torch.testing.assert_close(items, 2 * model.item_emb)  # readout (layer 0 alone) + residual
    model = build("bm3", dataset, n_layers=1)
    users, items = model.encode()
    ego = torch.cat([model.user_emb, model.item_emb]).detach()
    adj = model.adjacency.to_dense()
    readout = (ego + adj @ ego) / 2
    torch.testing.assert_close(items.detach(), readout[dataset.n_users:] + model.item_emb.detach(), atol=1e-6, rtol=1e-5)


def test_bm3_regulariser_on_a_hand_case(dataset, tmp_path):
    model = build("bm3", dataset, n_layers=0, embedding_size=2)
    assert model.config["dropout"] == 0.3 and model.config["reg_weight"] == 0.1
    with torch.no_grad():
        model.user_emb.zero_()
        model.item_emb.zero_()
        model.user_emb[0] = torch.tensor([3.0, 4.0])  # whole user table: norm 5
        model.item_emb[0] = torch.tensor([0.5, 0.0])  # items = 2 x ID embedding: norm 1
    _, parts = model.loss(first_batch(dataset))
    assert parts["reg"] == pytest.approx(0.1 * (5 + 1) / dataset.n_items, rel=1e-6)


def test_bm3_raw_features_are_trained(dataset, tmp_path):
    model = build("bm3", dataset)
    before = [f.detach().clone() for f in model.features]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    batch = first_batch(dataset)
    loss, _ = model.loss(Batch(users=batch.users, pos_items=batch.pos_items, neg_items=None))
    loss.backward()
    optimizer.step()
    assert all(not torch.equal(b, f) for b, f in zip(before, model.features))
