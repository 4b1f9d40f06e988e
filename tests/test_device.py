"""The `device` setting: moving a FITMM model moves every tensor it holds, graphs included
(checked on CPU by moving to the 'meta' device), and one training step runs on CUDA when a
GPU is visible (skipped otherwise)."""

import json

import pytest
import torch
import yaml

from conftest import small_args, small_dataset
from fitmm.cli import main
from fitmm.config import resolve
from fitmm.data.sampling import TrainSampler
from fitmm.models.fitmm import FITMM
from fitmm.train import build_model, make_optimizer, train_step


def every_tensor(model: torch.nn.Module):
    """(name, tensor) for every tensor any submodule holds: parameters, buffers and plain
    attributes (the sparse graphs are plain attributes, which nn.Module.to alone would miss)."""
    for prefix, module in model.named_modules():
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor):
                yield f"{prefix}.{name}", value
        for name, value in [*module._parameters.items(), *module._buffers.items()]:
            if value is not None:
                yield f"{prefix}.{name}", value


def fitmm_with_every_graph(tmp_path):
    dataset = small_dataset()
    config = resolve([("test", {"cache_dir": str(tmp_path / "cache"), "user_graph": True})])
    FITMM.check(dataset, config)
    return build_model(config, dataset, torch.device("cpu"))


def test_to_device_moves_every_tensor_graphs_included(tmp_path):
    model = fitmm_with_every_graph(tmp_path)
    held = dict(every_tensor(model))
    for graph in FITMM.graph_attributes:  # the test must see the graphs it claims to check
        assert isinstance(held.get(f".{graph}"), torch.Tensor), graph
    assert len(held) > len(FITMM.graph_attributes)
    model.to("meta")
    moved = dict(every_tensor(model))
    assert set(moved) == set(held)
    assert {name: t.device.type for name, t in moved.items() if t.device.type != "meta"} == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_training_step_on_cuda(tmp_path):
    dataset = small_dataset()
    config = resolve([("test", {"cache_dir": str(tmp_path / "cache"), "user_graph": True, "device": "cuda"})])
    model = build_model(config, dataset, torch.device("cuda"))
    optimizer = make_optimizer(model, config)
    batch = next(TrainSampler(dataset.train, seed=0).batches(256, True, torch.device("cuda")))
    before = model.user_ego[0].detach().clone()
    loss, parts = train_step(model, batch, optimizer)
    assert loss.device.type == "cuda" and torch.isfinite(loss)
    assert all(t.device.type == "cuda" for _, t in every_tensor(model))
    assert not torch.equal(before, model.user_ego[0].detach())  # the step changed the parameters


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cli_trains_and_evaluates_on_cuda(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *small_args("epochs=1", "device=cuda")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_run"] == 1 and 0.0 <= summary["test"]["recall@20"] <= 1.0
    assert yaml.safe_load((out / "config.yaml").read_text())["device"] == "cuda"
