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
