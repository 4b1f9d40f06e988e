"""The training loop: epochs of sampled batches, periodic full-ranking validation, early stopping,
checkpoints, resume.

Run directory (written only by `train`, each file atomically):
    config.yaml   the resolved configuration
    log.jsonl     one line per epoch: losses, seconds, validation (and in mmrec mode test) metrics
    best.pt       the weights of the best validation epoch
    last.pt       everything needed to resume (weights, optimiser, random states, early-stopping state)
    summary.json  the result (model, dataset, seed, best epoch, timings, valid and test metrics)
    per_user.npz  per-user valid and test metrics of the best checkpoint ("test/recall@20", "test/user", ...)
    curves.png    training loss and validation metric per epoch (when matplotlib is installed)
"""

from __future__ import annotations

import ctypes
import json
import math
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import runio
from .data.dataset import Dataset
from .data.sampling import TrainSampler
from .errors import InputError
from .evaluate import evaluate, evaluate_per_user, evaluated_users, summarize
from .models import model_class


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def keep_freed_memory() -> None:
    """Let glibc's malloc keep and reuse freed large blocks instead of returning each to the OS.

    A training step allocates and frees the same tensors every time (with a trainable 4096-d
    feature table, several of ~100 MB). By default glibc serves blocks that large with fresh
    mmaps, so every step page-faults them in again: 0.17-0.3 s of system time per Baby-scale
    FITMM step, ~0.06-0.09 s of its wall time (docs/performance.md). Process-wide, so only the
    command line (and the benchmarks that measure it) call this; a no-op where the C library is
    not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: serve blocks below 1 GiB from the heap
        libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD: keep up to 2 GiB of freed heap for reuse
    except (OSError, AttributeError):
        pass


def use_threads(config: dict[str, Any]) -> None:
    """Config key `threads`: torch's intra-op threads for this process (0 = torch's choice, all cores)."""
    if config["threads"]:
        torch.set_num_threads(config["threads"])


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("config key 'device': cuda was asked for but no CUDA GPU is visible; use device=auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_run(config: dict[str, Any], dataset: Dataset) -> None:
    """Everything that can be wrong with a run before anything is written."""
    cls = model_class(config["model"])
    if len(evaluated_users(dataset, "valid")) == 0:
        raise InputError(
            f"{dataset.source}: no user has both training and validation rows (x_label = 1); "
            f"early stopping needs a validation split"
        )
    if len(evaluated_users(dataset, "test")) == 0:
        raise InputError(f"{dataset.source}: no user has both training and test rows (x_label = 2)")
    if max(config["topk"]) > dataset.n_items:  # covers valid_metric too: its K is one of topk
        raise InputError(
            f"config key 'topk': cutoff {max(config['topk'])} is above the number of items ({dataset.n_items}); "
            f"use cutoffs of at most {dataset.n_items}"
        )
    cls.check(dataset, config)


def build_model(config: dict[str, Any], dataset: Dataset, device: torch.device):
    seed_everything(config["seed"])  # parameter initialisation depends on the seed alone
    return model_class(config["model"])(dataset, config).to(device)


def _read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_step(model, batch, optimizer):
    """One optimiser step on one batch; returns (loss, loss parts).

    Gradients are dropped BEFORE the forward (and by run_epoch after the epoch), so they never
    sit in memory beside a forward's activations or an evaluation (with a trainable 4096-d
    feature table they are as large as the table itself)."""
    optimizer.zero_grad(set_to_none=True)
    loss, parts = model.loss(batch)
    loss.backward()
    optimizer.step()
    return loss, parts


def run_epoch(model, sampler: TrainSampler, optimizer, epoch: int, batch_size: int, device) -> dict[str, float]:
    """One pass over the training interactions; returns the mean loss and loss parts."""
    model.train()
    model.start_epoch(epoch, sampler.rng)
    totals: dict[str, float] = {}
    n_batches = 0
    for batch in sampler.batches(batch_size, model.uses_negatives, device):
        loss, parts = train_step(model, batch, optimizer)
        totals["loss"] = totals.get("loss", 0.0) + loss.item()
        for name, value in parts.items():
            totals[name] = totals.get(name, 0.0) + value
        n_batches += 1
    optimizer.zero_grad(set_to_none=True)
    return {k: v / max(1, n_batches) for k, v in totals.items()}


def make_optimizer(model, config):
    """Adam over the trainable parameters; None for models with nothing to train."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not (model.trainable and params):
        return None
    try:
        # The fused kernel updates each parameter in one pass: ~7x faster than the default
        # loop on a CPU, which matters for a trainable 4096-wide feature table.
        return torch.optim.Adam(params, lr=config["lr"], weight_decay=config["weight_decay"], fused=True)
    except (RuntimeError, ValueError, TypeError):  # older torch, or a device without the fused kernel
        return torch.optim.Adam(params, lr=config["lr"], weight_decay=config["weight_decay"])


def train(config: dict[str, Any], dataset: Dataset, run_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Train `config["model"]` on `dataset`, writing the run directory; returns the summary."""
    run_dir = Path(run_dir)
    use_threads(config)
    device = pick_device(config["device"])
    model = build_model(config, dataset, device)
    sampler = TrainSampler(dataset.train, seed=config["seed"])
    optimizer = make_optimizer(model, config)
    mmrec = config["selection"] == "mmrec"
    metric = config["valid_metric"]
    ks = config["topk"]
    state = {"epoch": 0, "best": -math.inf, "best_epoch": 0, "bad_evals": 0}

    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "log.jsonl"
    if resume:
        checkpoint = torch.load(run_dir / "last.pt", map_location=device, weights_only=False)
        model.load_state_dict(checkpoint["model"])
        if optimizer is not None:
            optimizer.load_state_dict(checkpoint["optimizer"])
        sampler.load_state_dict(checkpoint["sampler"])
        torch.set_rng_state(checkpoint["torch_rng"])
        state = checkpoint["state"]
        # Epochs logged after the last checkpoint are re-run; drop their lines.
        kept = [r for r in _read_log(log_path) if r["epoch"] <= state["epoch"]]
        runio.atomic_write(log_path, lambda h: h.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
    else:
        runio.write_yaml(run_dir / "config.yaml", config)
        log_path.write_text("")

    epochs = config["epochs"] if model.trainable else 0
    if state["bad_evals"] >= config["patience"]:  # resuming a run that had already stopped early
        epochs = state["epoch"]
    bar = tqdm(
        range(state["epoch"] + 1, epochs + 1), initial=state["epoch"], total=epochs,
        desc=f"{config['model']}", unit="epoch", disable=not config["progress"], dynamic_ncols=True,
    )
    for epoch in bar:
        start = time.perf_counter()
        record: dict[str, Any] = {"epoch": epoch, **run_epoch(model, sampler, optimizer, epoch, config["batch_size"], device)}
        record["train_seconds"] = time.perf_counter() - start
        if not math.isfinite(record.get("loss", 0.0)):
            raise FloatingPointError(f"epoch {epoch}: the training loss is {record['loss']}; lower lr")

        if epoch % config["eval_every"] == 0 or epoch == epochs:
            start = time.perf_counter()
            results = evaluate(model, dataset, ["valid", "test"] if mmrec else ["valid"], ks, config["eval_batch_size"])
            record["eval_seconds"] = time.perf_counter() - start
            record.update(results)
            score = results["valid"][metric]
            if score > state["best"]:  # strictly better, as in the protocol
                state.update(best=score, best_epoch=epoch, bad_evals=0)
                runio.save_torch(run_dir / "best.pt", {"model": model.state_dict(), "epoch": epoch})
            else:
                state["bad_evals"] += 1
            state["epoch"] = epoch
            bar.set_postfix(loss=f"{record.get('loss', 0):.4f}", **{metric: f"{score:.4f}"},
                            best=f"{state['best']:.4f}@{state['best_epoch']}")
        # The log line goes first and the checkpoint second: an interruption between the two leaves
        # a line newer than last.pt, which resume drops and re-runs. The other order would leave a
        # checkpointed epoch with no line in the log.
        runio.append_jsonl(log_path, record)
        if state["epoch"] == epoch:
            runio.save_torch(run_dir / "last.pt", {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict() if optimizer is not None else None,
                "sampler": sampler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "state": state,
            })
        if state["bad_evals"] >= config["patience"]:
            break
    bar.close()
    return finish(config, dataset, model, run_dir, device)


def finish(config, dataset, model, run_dir: Path, device) -> dict[str, Any]:
    """Evaluate the best checkpoint on validation and test once; write summary.json and plots."""
    best_path = run_dir / "best.pt"
    best_epoch = 0
    if best_path.exists():
        best = torch.load(best_path, map_location=device, weights_only=False)
        model.load_state_dict(best["model"])
        best_epoch = best["epoch"]
    else:  # nothing trained (most-popular, or epochs = 0): the model as built is the result
        runio.save_torch(best_path, {"model": model.state_dict(), "epoch": 0})
    start = time.perf_counter()
    per_user = evaluate_per_user(model, dataset, ["valid", "test"], config["topk"], config["eval_batch_size"])
    eval_seconds = time.perf_counter() - start
    results = {split: summarize(values) for split, values in per_user.items()}
    # Per-user metrics allow paired significance tests between runs on the same data.
    runio.atomic_write(run_dir / "per_user.npz", lambda h: np.savez_compressed(
        h, **{f"{split}/{key}": values for split, arrays in per_user.items() for key, values in arrays.items()}))
    log = _read_log(run_dir / "log.jsonl")
    train_seconds = [r["train_seconds"] for r in log]
    summary = {
        "model": config["model"],
        "dataset": dataset.name,
        "data": dataset.source,
        "seed": config["seed"],
        "selection": config["selection"],
        "best_epoch": best_epoch,
        "epochs_run": len(log),
        "seconds_per_epoch": statistics.median(train_seconds) if train_seconds else 0.0,
        "eval_seconds": eval_seconds,
        "valid": results["valid"],
        "test": results["test"],
    }
    runio.write_json(run_dir / "summary.json", summary)
    from .plots import plot_training_curves  # matplotlib is optional

    plot_training_curves(log, config["valid_metric"], run_dir / "curves.png", title=f"{config['model']} on {dataset.name}")
    return summary
