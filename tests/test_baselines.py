"""The multimodal baselines VBPR, FREEDOM and BM3: their distinctive mechanisms, the model contract,
input checks, and a tiny training run of each through the CLI."""

import json

import numpy as np
import pytest
import torch

import fitmm.models.bm3  # noqa: F401  (registers the models)
import fitmm.models.freedom  # noqa: F401
import fitmm.models.vbpr  # noqa: F401
from conftest import small_args
from fitmm.cli import main
from fitmm.config import resolve
from fitmm.data import synthetic
from fitmm.data.sampling import Batch, TrainSampler
from fitmm.errors import InputError
from fitmm.models import model_class
from fitmm.models.freedom import degree_sensitive_sample

MODELS = ["vbpr", "freedom", "bm3"]


@pytest.fixture(scope="module")
def dataset():
    return synthetic.generate(users=300, items=200, mean_interactions=20, feature_dims={"image": 32, "text": 16})


@pytest.fixture(scope="module")
def id_only():
    return synthetic.generate(users=300, items=200, mean_interactions=20, feature_dims={})


def make_config(name, cache, **overrides):
    return resolve([("test", {"model": name, "cache_dir": str(cache), **overrides})])


def build(name, dataset, cache, **overrides):
    torch.manual_seed(0)
    config = make_config(name, cache, **overrides)
    model_class(name).check(dataset, config)
    return model_class(name)(dataset, config)


def first_batch(dataset, negatives=True, size=256):
    return next(TrainSampler(dataset.train, seed=0).batches(size, negatives))


# -- the contract, for every model ------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_loss_backward_gives_finite_grads(name, dataset, tmp_path):
    # FREEDOM's default reg_weight (0, the reference's first configuration) turns off the terms
    # the projections learn from; switch them on here.
    model = build(name, dataset, tmp_path, **({"reg_weight": 1e-4} if name == "freedom" else {}))
    model.train()
    model.start_epoch(1, np.random.default_rng(0))
    loss, parts = model.loss(first_batch(dataset, model.uses_negatives))
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert parts and all(np.isfinite(v) for v in parts.values())
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads, "no parameter received a gradient"
    assert all(torch.isfinite(g).all() for g in grads.values())
    # the ID embeddings and the content projections all learn from this loss
    assert any("user" in n for n in grads) and any("item" in n for n in grads)
    assert any("projection" in n for n in grads)


@pytest.mark.parametrize("name", MODELS)
def test_embed_shapes(name, dataset, tmp_path):
    model = build(name, dataset, tmp_path)
    model.eval()
    with torch.no_grad():
        users, items = model.embed()
        scores = model.score(users[:7], items)
    assert users.shape[0] == dataset.n_users and items.shape[0] == dataset.n_items
    # VBPR's vectors are [ID factors | content factors], 64 each (the reference's widths)
    assert users.shape[1] == items.shape[1] == (128 if name == "vbpr" else 64)
    assert scores.shape == (7, dataset.n_items) and torch.isfinite(scores).all()


@pytest.mark.parametrize("name", MODELS)
def test_check_rejects_id_only_dataset(name, id_only, tmp_path):
    config = make_config(name, tmp_path)
    with pytest.raises(InputError, match="content features"):
        model_class(name).check(id_only, config)


@pytest.mark.parametrize("name", MODELS)
def test_defaults_and_search_space_are_valid_config(name, tmp_path):
    cls = model_class(name)
    assert cls.defaults["lr"] == 1e-3 and cls.defaults["embedding_size"] == 64
    for key, values in cls.search_space.items():
        assert key in cls.defaults
        for value in values:
            make_config(name, tmp_path, **{key: value})  # every grid value type-checks


# -- VBPR -------------------------------------------------------------------------------------


def test_vbpr_score_is_id_part_plus_content_part(dataset, tmp_path):
    model = build("vbpr", dataset, tmp_path)
    users, items = torch.tensor([0, 5, 17, 299]), torch.arange(dataset.n_items)
    with torch.no_grad():
        u, i = model.embed()
        full = model.score(u[users], i[items])
        id_part, content_part = model.score_parts(users, items)
    assert id_part.shape == content_part.shape == full.shape
    assert torch.allclose(full, id_part + content_part, atol=1e-6)
    assert id_part.abs().sum() > 0 and content_part.abs().sum() > 0
    # the content part depends on the features alone: items with the same features score the same
    model.features[1] = model.features[0]
    with torch.no_grad():
        _, content = model.score_parts(users, torch.tensor([0, 1]))
    assert torch.allclose(content[:, 0], content[:, 1])


# -- FREEDOM ----------------------------------------------------------------------------------


def test_freedom_pruning_keeps_exact_fraction_symmetric_and_normalised(dataset, tmp_path):
    model = build("freedom", dataset, tmp_path, dropout=0.8)
    n_edges = dataset.train.nnz
    n_keep = int((1 - 0.8) * n_edges)  # floor, as the reference
    adj = model.pruned_adjacency(np.random.default_rng(3)).tocsr()
    n = dataset.n_users + dataset.n_items
    assert adj.shape == (n, n)
    assert adj.nnz == 2 * n_keep  # each kept edge appears as (u, i) and (i, u)
    assert abs(adj - adj.T).max() == 0  # symmetric
    # only training edges, only in the user-item blocks
    block = adj[: dataset.n_users, dataset.n_users:]
    assert block.nnz == n_keep
    assert (block.multiply(dataset.train) != 0).sum() == n_keep
    assert adj[: dataset.n_users, : dataset.n_users].nnz == 0 and adj[dataset.n_users:, dataset.n_users:].nnz == 0
    # re-normalised with the PRUNED degrees: value = 1/sqrt(deg_r deg_c)
    deg = np.diff(adj.indptr).astype(np.float64)
    coo = adj.tocoo()
    np.testing.assert_allclose(coo.data, 1 / np.sqrt(deg[coo.row] * deg[coo.col]), rtol=1e-6)

    # start_epoch installs it for training; evaluation keeps the full graph
    model.start_epoch(1, np.random.default_rng(3))
    assert model.train_adjacency.values().numel() == 2 * n_keep
    assert model.adjacency.values().numel() == 2 * n_edges


def test_freedom_pruning_is_reproducible_from_the_rng(dataset, tmp_path):
    model = build("freedom", dataset, tmp_path)
    a = model.pruned_edges(np.random.default_rng(7))
    b = model.pruned_edges(np.random.default_rng(7))
    c = model.pruned_edges(np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    rng = np.random.default_rng(7)
    assert not np.array_equal(model.pruned_edges(rng), model.pruned_edges(rng))  # a new graph each epoch
    # same seed -> same training graph, hence the same loss
    batch = first_batch(dataset)
    losses = []
    for _ in range(2):
        model.start_epoch(1, np.random.default_rng(11))
        losses.append(model.loss(batch)[0].item())
    assert losses[0] == losses[1]


def test_freedom_pruning_prefers_low_degree_edges(dataset, tmp_path):
    model = build("freedom", dataset, tmp_path)
    w = model.edge_weights  # 1/sqrt(deg_u deg_i)
    hub_edge, low_edge = int(np.argmin(w)), int(np.argmax(w))
    assert w[low_edge] > 3 * w[hub_edge]
    n_keep = int(round(0.2 * len(w)))
    rng = np.random.default_rng(0)
    kept = np.zeros(len(w))
    draws = 300
    for _ in range(draws):
        idx = degree_sensitive_sample(w, n_keep, rng)
        assert len(idx) == n_keep == len(np.unique(idx))  # without replacement
        kept[idx] += 1
    # (here the low-degree edge has ~8.6x the hub edge's weight: kept ~50% vs ~9% of the epochs)
    assert kept[low_edge] > 3 * kept[hub_edge]
    assert kept[low_edge] / draws > 0.35 and kept[hub_edge] / draws < 0.15
    # on the whole, the keep rate rises with the edge's weight
    assert np.corrcoef(w, kept)[0, 1] > 0.5
    # uniform weights: every edge kept about equally often (the bias comes from the degrees only)
    uniform = np.zeros(len(w))
    for _ in range(100):
        uniform[degree_sensitive_sample(np.ones(len(w)), n_keep, rng)] += 1
    assert abs(uniform.mean() / 100 - n_keep / len(w)) < 1e-9 and uniform.std() / 100 < 0.06


def test_freedom_eval_uses_full_graph_and_item_graph_adds_to_items(dataset, tmp_path):
    model = build("freedom", dataset, tmp_path)
    model.eval()
    with torch.no_grad():
        before = model.embed()
        model.start_epoch(1, np.random.default_rng(0))
        after = model.embed()
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    no_mm = build("freedom", dataset, tmp_path, n_mm_layers=0)
    with torch.no_grad():
        plain_users, plain_items = no_mm.embed()
    # same initial weights (seeded); n_mm_layers=0 adds the raw item embeddings instead of S e_i
    assert torch.allclose(plain_users, before[0])
    assert not torch.allclose(plain_items, before[1])


def test_freedom_rejects_bad_modality_weights(dataset, tmp_path):
    with pytest.raises(InputError, match="modality_weights"):
        model_class("freedom").check(dataset, make_config("freedom", tmp_path, modality_weights={"image": 1.0}))


# -- BM3 --------------------------------------------------------------------------------------


def test_bm3_draws_no_negatives_and_its_loss_decreases(dataset, tmp_path):
    assert model_class("bm3").uses_negatives is False
    model = build("bm3", dataset, tmp_path)
    sampled = first_batch(dataset, negatives=False)
    assert sampled.neg_items is None
    batch = Batch(users=sampled.users, pos_items=sampled.pos_items, neg_items=None)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    model.train()
    for _ in range(30):
        loss, parts = model.loss(batch)
        assert set(parts) == {"rec", "align", "mask", "reg"}
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1


def test_bm3_targets_are_detached_and_inference_is_deterministic(dataset, tmp_path):
    model = build("bm3", dataset, tmp_path)
    h = torch.randn(4, 64, requires_grad=True)
    assert not model._target(h).requires_grad
    model.eval()
    with torch.no_grad():
        a, b = model.embed(), model.embed()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# -- a tiny run through the CLI ---------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_cli_smoke_training(name, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", name, "--out", str(out), *small_args("epochs=3", f"cache_dir={tmp_path / 'cache'}")]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == name and summary["epochs_run"] == 3
    assert 0.0 <= summary["test"]["recall@20"] <= 1.0
