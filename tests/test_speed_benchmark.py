"""benchmarks/speed.py's FLOP counter: dense products counted exactly, sparse graph products not."""

import importlib.util
from pathlib import Path

import scipy.sparse as sp
import torch

from fitmm.graphs import to_torch

SPEED = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


def load_speed():
    spec = importlib.util.spec_from_file_location("speed", SPEED)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ToyModel:
    """One dense product (10x20 @ 20x30) and one sparse one per loss."""

    uses_negatives = False

    def __init__(self):
        self.x = torch.randn(10, 20, requires_grad=True)
        self.w = torch.randn(20, 30)
        self.graph = to_torch(sp.identity(10, format="csr"))  # how fitmm builds its graphs

    def loss(self, batch):
        return (self.graph @ (self.x @ self.w)).sum(), {}


class OneBatch:
    def batches(self, *args):
        yield None


class NoOptimizer:
    def zero_grad(self, set_to_none=True):
        pass

    def step(self):
        pass


def test_step_gflop_counts_dense_products_only():
    speed = load_speed()
    flops = speed.step_gflop(ToyModel(), OneBatch(), NoOptimizer(), {"batch_size": 1}, None) * 1e9
    # forward x @ w: 2*10*20*30; backward: d(x) = g @ w^T, the same count; w needs no gradient
    assert flops == 2 * (2 * 10 * 20 * 30)


class MixedModel(ToyModel):
    """The toy's float32 product plus a float64 one (like FITMM's Grams): 4x3 @ 3x5, no gradient."""

    def loss(self, batch):
        total, parts = super().loss(batch)
        a, b = torch.ones(4, 3, dtype=torch.float64), torch.ones(3, 5, dtype=torch.float64)
        return total + (a @ b).sum().float(), parts


def test_step_flops_are_split_by_dtype():
    speed = load_speed()
    flops = speed.step_flops(MixedModel(), OneBatch(), NoOptimizer(), {"batch_size": 1}, None)
    assert flops == {"float32": 2 * (2 * 10 * 20 * 30), "float64": 2 * 4 * 3 * 5}


def test_floor_charges_each_dtype_at_its_own_rate():
    speed = load_speed()
    flops = {"float32": 6e9, "bfloat16": 4e9, "float16": 1e9}
    rates = {"float32": 3.0, "bfloat16": 8.0}  # GFLOP/s; float16 has no rate: charged at float32's
    # per step: 6/3 + 4/8 + 1/3 = 2.8333 s; 10 steps
    assert abs(speed.floor_seconds(flops, rates, steps=10) - 28.3333333) < 1e-6


def test_product_rates_measures_every_dtype_asked():
    speed = load_speed()
    rates = speed.product_rates(("float32", "bfloat16"), n=32, repeats=1)
    assert set(rates) == {"float32", "bfloat16"} and all(r > 0 for r in rates.values())


def test_table_row_has_the_floor_and_ratio_columns():
    speed = load_speed()
    result = {
        "model": "fitmm", "scale": "baby", "seconds_per_epoch": 30.0, "floor_seconds": 12.5, "floor_ratio": 2.4,
        "eval_seconds": 1.25, "graph_seconds": None, "peak_rss_mb": 1111.4, "gflop_per_step": 63.51,
        "product_gflops": {"float32": 150.2, "bfloat16": 310.7, "float64": 70.0}, "threads": 2,
    }
    header = [c.strip() for c in speed.TABLE_HEADER.strip("|").split("|")]
    row = [c.strip() for c in speed.table_row(result).strip("|").split("|")]
    assert len(header) == len(row)
    cells = dict(zip(header, row))
    assert cells["s/epoch"] == "30.00" and cells["floor s"] == "12.50" and cells["s/epoch / floor"] == "2.40"
    assert cells["graph s"] == "-" and cells["peak RSS MB"] == "1111" and cells["fp32 / bf16 GFLOP/s"] == "150 / 311"


FAKE_TRAINER = """
import time
class Trainer:
    def _train_epoch(self, data, epoch):
        time.sleep(0.01 * (epoch + 1))
    def _valid_epoch(self, data):
        time.sleep(0.005)
"""

FAKE_QUICK_START = """
import os
from common.trainer import Trainer
def quick_start(model, dataset, config_dict, save_model=True):
    # what the release's own quick_start reads: configs/ in the working directory, the data folder
    assert model == "FITMM" and dataset == "baby" and os.path.isfile("configs/model/FITMM.yaml")
    folder = config_dict["data_path"] + dataset
    assert sorted(os.listdir(folder)) == ["baby.inter", "image_feat.npy", "text_feat.npy"]
    trainer = Trainer()
    for epoch in range(config_dict["epochs"]):
        trainer._train_epoch(None, epoch)
        trainer._valid_epoch("valid")
        trainer._valid_epoch("test")
"""


def test_time_release_runs_the_checkout_and_pairs_validation_with_test(tmp_path):
    """--against-release's plumbing on a stand-in checkout with the release's layout: the
    trainer's own epoch and evaluation methods are timed, one validation + one test per epoch."""
    import statistics
    import sys

    import numpy as np

    speed = load_speed()
    src = tmp_path / "release" / "src"
    for path, text in {"models/fitmm.py": "", "configs/model/FITMM.yaml": "", "common/__init__.py": "",
                       "common/trainer.py": FAKE_TRAINER, "utils/__init__.py": "",
                       "utils/quick_start.py": FAKE_QUICK_START}.items():
        (src / path).parent.mkdir(parents=True, exist_ok=True)
        (src / path).write_text(text)
    inter = tmp_path / "baby.inter"
    inter.write_text("userID\titemID\tx_label\n0\t0\t0\n")

    class Data:
        features = {"image": np.ones((1, 4), np.float32), "text": np.ones((1, 2), np.float32)}

    out = speed.time_release(tmp_path / "release", Data(), inter, epochs=2, threads=1, python=sys.executable)
    assert len(out["epoch_seconds"]) == 3  # warm-up + 2
    assert out["seconds_per_epoch"] == statistics.median(out["epoch_seconds"][1:])  # the warm-up left out
    assert out["eval_seconds"] >= 0.01  # validation + test, each >= 5 ms
    assert out["threads"] == 1 and out["peak_rss_mb"] > 0


def test_time_release_refuses_a_folder_that_is_not_the_release(tmp_path):
    import pytest

    speed = load_speed()
    with pytest.raises(SystemExit, match="is not the FITMM release"):
        speed.time_release(tmp_path, None, tmp_path / "x.inter", 0, 1, "python")
