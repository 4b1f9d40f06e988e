"""Data-parallel training on PyTorch's own engine (torch.distributed + DistributedDataParallel).

The trainer asks this module four things and models never know about it:
    which rank am I, and how many are there        -> Context.rank, .world_size, .main
    which rows of each batch are mine              -> Context.batches
    my loss, with gradients averaged over ranks    -> Context.wrap (DDP)
    everyone's per-user metrics, or mean losses    -> Context.gather_per_user, .mean

Launch: `torchrun --nproc_per_node=N -m fitmm train ...` (or `fitmm train --nproc N`, which calls
torchrun's API). torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; `setup()` reads them and joins the
group (gloo on CPU, NCCL on GPU, one GPU per rank).

Why the numbers match a 1-process run with batch N x batch_size (the derivation):
  * `batch_size` is per process. Every rank draws the SAME global batch of N x batch_size rows
    (same seed, same sampler state, negatives drawn for the whole global batch so the random
    streams stay in step) and keeps its 1/N slice. A rank therefore takes N x fewer steps per
    epoch, and each step sees exactly the rows, negatives included, that a 1-process run with
    batch N x batch_size sees in its step.
  * A model's loss is mean_over_rows(per-row term) + F(parameters), where F is a full-graph term
    (FITMM's IB over the gates of ALL users and items) that every rank computes identically.
    DDP AVERAGES gradients: (1/N) sum_r [grad mean_{rows of r} + grad F] = grad mean_{all rows}
    + grad F, provided the slices are equal-sized. So F is counted once, not N times: no rescaling
    is needed, and summing (instead of averaging) would be the bug. The remainder of the last
    global batch that does not split evenly (at most N - 1 rows an epoch, other rows each epoch
    as the order is reshuffled) is dropped to keep the slices equal.
  * Not exact: terms that couple the rows of a batch non-linearly. FITMM's consistency loss has an
    in-batch uniform cross-entropy (a softmax over the batch's users), which each rank computes over
    its own slice, as per-GPU contrastive losses usually are; it carries weight 0.001.
Evaluation: every rank computes the embeddings (one full-graph pass), ranks a contiguous 1/N of
the evaluated users and the per-user metrics are gathered in user order, so the metrics are
exactly those of one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .data.sampling import Batch, TrainSampler


def env_world_size() -> int:
    """The world size torchrun gave this process (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device_name: str) -> "Context":
    """Join the process group torchrun prepared (no-op for one process); returns the Context."""
    world = env_world_size()
    if world == 1 or dist.is_initialized():
        return current()
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:  # one GPU per rank; NCCL's collectives need the rank's device set first
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return current()


def teardown() -> None:
    if dist.is_initialized():
        # DDP wrappers left in reference cycles must be freed while their process group lives:
        # a reducer destroyed after it aborts the process at exit.
        import gc

        gc.collect()
        dist.destroy_process_group()


def current() -> "Context":
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size())
    return Context()


class _LossModule(nn.Module):
    """DDP syncs gradients for what runs through its forward; our models' training call is loss()."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch):
        return self.model.loss(batch)


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        """Only the main rank writes the run directory, prints and calls callbacks."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """The rank's own GPU under NCCL (cuda:LOCAL_RANK); the given device otherwise."""
        if self.world_size > 1 and device.type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return device

    def batches(self, sampler: TrainSampler, batch_size: int, negatives: bool, device) -> Iterator[Batch]:
        """This rank's slice (batch_size rows) of each global batch of world_size x batch_size rows."""
        if self.world_size == 1:
            yield from sampler.batches(batch_size, negatives, device)
            return
        for batch in sampler.batches(batch_size * self.world_size, negatives, device):
            size = len(batch.users) // self.world_size  # equal slices: the remainder is dropped
            if size == 0:
                continue
            rows = slice(self.rank * size, (self.rank + 1) * size)
            yield Batch(batch.users[rows], batch.pos_items[rows],
                        None if batch.neg_items is None else batch.neg_items[rows])

    def steps_per_epoch(self, n_rows: int, batch_size: int) -> int:
        """Optimiser steps a rank takes per epoch (as `batches` yields them)."""
        if self.world_size == 1:
            return -(-n_rows // batch_size)
        global_batch = batch_size * self.world_size
        full, rest = divmod(n_rows, global_batch)
        return full + (1 if rest >= self.world_size else 0)

    def wrap(self, model: nn.Module):
        """batch -> (loss, parts): model.loss itself for one process; under DDP a call through
        DistributedDataParallel, whose backward averages the gradients over the ranks. Hold the
        returned object as long as training runs (DDP's backward needs it alive)."""
        if self.world_size == 1:
            return model.loss
        device_ids = [model_device(model)] if model_device(model).type == "cuda" else None
        module = _LossModule(model)
        # Buffers are data (frozen features, some models' sparse graphs), identical on every rank:
        # DDP must not broadcast them (it cannot broadcast sparse tensors at all).
        ddp = nn.parallel.DistributedDataParallel
        ddp._set_params_and_buffers_to_ignore_for_model(module, [name for name, _ in module.named_buffers()])
        # static_graph: every step of a model uses the same parameters (some leave one out of the
        # loss altogether, e.g. a branch only embed() uses), so DDP learns the set once instead of
        # waiting for a gradient that never comes or searching the graph at every step.
        return ddp(module, device_ids=device_ids, static_graph=True)

    def users_part(self, users: np.ndarray) -> np.ndarray:
        """This rank's contiguous share of a sorted array of users."""
        return np.array_split(users, self.world_size)[self.rank]

    def gather_per_user(self, per_user: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, np.ndarray]]:
        """Every rank's per-user metric arrays, concatenated in rank (= user) order, on every rank."""
        if self.world_size == 1:
            return per_user
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, per_user)
        return {split: {key: np.concatenate([p[split][key] for p in parts]) for key in per_user[split]}
                for split in per_user}

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over ranks of each value (the epoch's loss parts, each rank's over its slices)."""
        if self.world_size == 1 or not values:
            return values
        keys = list(values)  # every rank's model reports the same parts in the same order
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
