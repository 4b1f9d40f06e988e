"""SMORE and LGMRec baselines: spectral filter, hypergraph dependencies, loss/embed contract, CLI smoke."""

import math

import pytest
import torch

import fitmm.models.lgmrec  # noqa: F401  (registers 'lgmrec')
import fitmm.models.smore  # noqa: F401  (registers 'smore')
from fitmm.cli import main
from fitmm.config import resolve
from fitmm.data import synthetic
from fitmm.errors import InputError
from fitmm.models import model_class
from fitmm.models.smore import all_pass, spectral_filter, spectral_fusion
from tiny import build, first_batch


def small(feature_dims=None):
    dims = {"image": 32, "text": 16} if feature_dims is None else feature_dims
    return synthetic.generate(users=300, items=200, mean_interactions=20, feature_dims=dims)


def make(name, tmp_path, dataset=None, **overrides):
    """Model `name` on the small synthetic set (or `dataset`), its kNN graphs cached under tmp_path."""
    dataset = dataset or small()
    return build(name, dataset, **{"cache_dir": str(tmp_path / "cache"), **overrides}), dataset


def batch_of(dataset):
    return first_batch(dataset, size=256)


# -- SMORE's frequency-domain filter ----------------------------------------------------------


def test_all_pass_filter_is_identity():
    torch.manual_seed(0)
    for d in (64, 63):  # even and odd lengths
        x = torch.randn(5, d)
        torch.testing.assert_close(spectral_filter(x, all_pass(d)), x, atol=1e-5, rtol=1e-5)
        ones = torch.ones(d // 2 + 1, dtype=torch.complex64)
        torch.testing.assert_close(spectral_filter(x, ones), x, atol=1e-5, rtol=1e-5)


def test_low_pass_filter_removes_high_frequencies():
    d = 64
    n = torch.arange(d, dtype=torch.float32)
    low = torch.cos(2 * math.pi * 2 * n / d)
    high = 0.7 * torch.sin(2 * math.pi * 20 * n / d)
    response = torch.zeros(d // 2 + 1, dtype=torch.complex64)
    response[:9] = 1.0  # pass frequencies 0..8
    out = spectral_filter((low + high).unsqueeze(0), response)[0]
    torch.testing.assert_close(out, low, atol=1e-5, rtol=1e-5)
    spectrum = torch.fft.rfft(out).abs()
    assert spectrum[9:].max() < 1e-4


def test_spectral_fusion_with_all_pass_filters():
    torch.manual_seed(0)
    a, b = torch.randn(3, 16), torch.randn(3, 16)
    uni, fused = spectral_fusion([a, b], [all_pass(16), all_pass(16)], all_pass(16))
    torch.testing.assert_close(uni[0], a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(uni[1], b, atol=1e-5, rtol=1e-5)
    # the product of spectra is a (scaled, orthonormal FFT) circular convolution
    conv = torch.stack([sum(a[:, j] * b[:, (k - j) % 16] for j in range(16)) for k in range(16)], dim=1) / 4.0
    torch.testing.assert_close(fused, conv, atol=1e-4, rtol=1e-4)


# -- model contract -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["smore", "lgmrec"])
def test_loss_backward_and_embed_shapes(name, tmp_path):
    model, ds = make(name, tmp_path)
    model.train()
    loss, parts = model.loss(batch_of(ds))
    assert torch.isfinite(loss) and {"bpr", "reg", "cl"} <= set(parts)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        users, items = model.embed()
    assert users.shape == (ds.n_users, 64) and items.shape == (ds.n_items, 64)
    assert torch.isfinite(users).all() and torch.isfinite(items).all()


@pytest.mark.parametrize("name", ["smore", "lgmrec"])
def test_single_modality_works(name, tmp_path):
    model, ds = make(name, tmp_path, dataset=small({"text": 16}))
    loss, _ = model.loss(batch_of(ds))
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", ["smore", "lgmrec"])
def test_id_only_dataset_is_refused(name, tmp_path):
    config = resolve([("test", {"model": name})])
    with pytest.raises(InputError, match="modalit"):
        model_class(name).check(small({}), config)


def test_smore_knn_k_larger_than_items_is_refused(tmp_path):
    config = resolve([("test", {"model": "smore", "image_knn_k": 500})])
    with pytest.raises(InputError, match="image_knn_k"):
        model_class("smore").check(small(), config)


def test_smore_graphs_use_per_modality_k(tmp_path):
    model, ds = make("smore", tmp_path, image_knn_k=10, text_knn_k=5)
    (image, _), (text, _), (fused, _) = model.item_graphs
    per_row = lambda g: torch.diff(g.crow_indices())  # noqa: E731
    assert (per_row(image) == 10).all() and (per_row(text) == 5).all()
    assert (per_row(fused) >= 10).all() and (per_row(fused) <= 15).all()


# -- LGMRec's hypergraph ------------------------------------------------------------------


def test_lgmrec_hyperedge_dependency_shapes(tmp_path):
    model, ds = make("lgmrec", tmp_path, hyper_num=8)
    model.eval()
    deps = model.hyperedge_dependencies()
    assert len(deps) == 2
    for items, users in deps:
        assert items.shape == (ds.n_items, 8) and users.shape == (ds.n_users, 8)
        torch.testing.assert_close(items.sum(1), torch.ones(ds.n_items))  # a distribution over hyperedges
        torch.testing.assert_close(users.sum(1), torch.ones(ds.n_users))  # so is a user's row


def test_lgmrec_keep_rate_dropout_only_in_training(tmp_path):
    model, ds = make("lgmrec", tmp_path, keep_rate=0.5, gumbel=False)
    model.eval()
    h, _ = model.hyperedge_dependencies()[0]
    torch.testing.assert_close(model._drop(h), h)
    first = model.global_embeddings(model.item_emb)
    again = model.global_embeddings(model.item_emb)
    torch.testing.assert_close(first[0][1], again[0][1])  # evaluation is deterministic
    model.train()
    dropped = model._drop(h)
    zero = (dropped == 0).float().mean().item()
    assert 0.35 < zero < 0.65
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], 2.0 * h[kept])  # kept entries scaled by 1/keep_rate
    assert not torch.allclose(model.global_embeddings(model.item_emb)[0][1], first[0][1])


# -- CLI smoke ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["smore", "lgmrec"])
def test_cli_smoke_training(name, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", name, "--out", str(out)]
    for item in ["synthetic_users=300", "synthetic_items=200", "epochs=2", "progress=false", "threads=1",
                 f"cache_dir={tmp_path}"]:
        args += ["--set", item]
    assert main(args) == 0
    assert (out / "log.jsonl").read_text().count("\n") == 2
