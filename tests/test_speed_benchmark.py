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
