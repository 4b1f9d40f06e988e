"""The training loop: epochs of sampled batches, periodic full-ranking validation, early stopping,
checkpoints, resume.

Run directory (written only by `train`, each file atomically; one process at a time holds it):
    config.yaml   the resolved configuration
    data.json     the data it was trained on: path, content fingerprint, counts (evaluate and
                  resume check the data against it)
    log.jsonl     one line per epoch: losses, seconds, validation (and in mmrec mode test) metrics
    best.pt       the weights of the best validation epoch
    last.pt       everything needed to resume (weights, optimiser, random states, early-stopping state)
    summary.json  the result (model, dataset, seed, best epoch, timings, valid and test metrics)
    per_user.npz  per-user valid and test metrics of the best checkpoint ("test/recall@20", "test/user", ...)
    curves.png    training loss and validation metric per epoch (when matplotlib is installed)
    .lock         locked (flock) by the process training the run; holds its pid

Under torchrun (distributed.py) every rank runs this loop on its slice of each batch; only the
main rank writes the run directory and calls the callbacks.

Callbacks (`train(..., callbacks=[...])`): objects with any of the optional methods
    on_evaluation(epoch, results)   after each validation; results = {"valid": {metric: value}}
                                    (and "test" in mmrec mode). Raising stops the run (pruning).
    on_epoch_end(epoch, record)     after each epoch's log line and checkpoint are written (record = that line)
    on_finish(summary)              after summary.json is written
Tracking (tracking.py) and searches hang on this hook; the loop knows nothing about them.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import distributed, runio
from .config import read_config_file
from .data.dataset import SPLITS, Dataset
from .data.sampling import TrainSampler
from .errors import InputError, quote
from .evaluate import evaluate_per_user, evaluated_users, summarize
from .models import model_class


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def read_log(path: Path, cut_last_line_ok: bool = False) -> list[dict]:
    """The records of log.jsonl. A process killed while appending leaves its last line cut: with
    `cut_last_line_ok` (resume) that line is dropped, as its epoch is re-run anyway; a bad line
    anywhere else is an error naming it."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
                raise ValueError
        except ValueError:
            if cut_last_line_ok and i == last:
                break
            raise InputError(
                f"{path}: line {i + 1} is not an epoch record ({quote(line)}); the log is damaged: "
                f"restore it, or delete line {i + 1} and the lines after it, then resume"
            ) from None
        records.append(record)
    return records


# -- what a run knows about its data ---------------------------------------------------------------

DATA_FILE = "data.json"


def data_record(dataset: Dataset) -> dict[str, Any]:
    """What identifies the data a run trained on: its content hash, and counts to explain a change."""
    return {
        "path": dataset.source,
        "name": dataset.name,
        "fingerprint": dataset.fingerprint,
        "users": dataset.n_users,
        "items": dataset.n_items,
        "rows": {split: int(dataset.split(split).nnz) for split in SPLITS},
        "features": {name: list(feat.shape) for name, feat in dataset.features.items()},
    }


def describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """'items 200 -> 201, train rows 4000 -> 4010' (or what else differs) for two data records."""
    parts = [f"{key} {old.get(key)} -> {new[key]}" for key in ("users", "items") if old.get(key) != new[key]]
    old_rows = old.get("rows", {})
    parts += [f"{split} rows {old_rows.get(split)} -> {new['rows'][split]}"
              for split in SPLITS if old_rows.get(split) != new["rows"][split]]
    if old.get("features") != new["features"]:
        parts.append(f"features {old.get('features')} -> {new['features']}")
    return ", ".join(parts) or "same counts, different content"


def check_data(run_dir: Path, dataset: Dataset, allow_change: bool = False) -> tuple[dict | None, str | None]:
    """Is `dataset` the data the run in `run_dir` was trained on (same fingerprint, wherever it lies)?

    Returns (the run's data record to write back, or None when nothing changed; a description of
    the change when `allow_change` accepted different data, else None). Different data without
    `allow_change` is an InputError saying what changed. A run written before runs recorded their
    data has nothing to compare: it gets a warning and a record of today's data."""
    path = run_dir / DATA_FILE
    now = data_record(dataset)
    if not path.exists():
        print(f"fitmm: warning: {run_dir} records no data fingerprint (written by an older fitmm); "
              f"the data cannot be checked", file=sys.stderr)
        return {**now, "history": []}, None
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
        recorded["fingerprint"], recorded["path"]
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        raise InputError(f"{path}: damaged (not the data record fitmm train writes); restore it or train a new run") from None
    if recorded["fingerprint"] == now["fingerprint"]:
        return ({**recorded, "path": now["path"]} if recorded["path"] != now["path"] else None), None
    change = describe_change(recorded, now)
    if not allow_change:
        raise InputError(
            f"{run_dir}: the data differs from the data this run was trained on ({change}; fingerprint "
            f"{recorded['fingerprint'][:12]} -> {now['fingerprint'][:12]}, now read from {now['path']}). "
            f"If the dataset folder moved, pass --data PATH_OF_THE_SAME_DATA; to go on with the new data "
            f"anyway, pass --allow-data-change (it is recorded in summary.json)"
        )
    earlier = {key: value for key, value in recorded.items() if key != "history"}
    return {**now, "history": [*recorded.get("history", []), earlier]}, change


# -- checkpoints ----------------------------------------------------------------------------------

CHECKPOINT_KEYS = ("model", "optimizer", "sampler", "torch_rng", "state")
STATE_KEYS = ("epoch", "best", "best_epoch", "bad_evals")


def _first_line(exc: BaseException) -> str:
    """The informative line of a load_state_dict error (torch's message starts with a header)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("size mismatch", "Missing key", "Unexpected key")):
            return line[:160]
    return (lines[-1] if lines else type(exc).__name__)[:160]


def _does_not_fit(path: Path, exc: BaseException) -> InputError:
    return InputError(
        f"{path}: does not fit this run's model ({_first_line(exc)}); it was written by another model, "
        f"another configuration or for other data; train a new run with --out"
    )


def _check_model_name(path: Path, checkpoint: dict, name: str) -> None:
    """Models with the same parameter shapes (BPR, LightGCN) would load each other's weights silently."""
    written_for = checkpoint.get("model_name", name)  # absent in checkpoints of older versions
    if written_for != name:
        raise InputError(f"{path}: written by a {written_for!r} run, and this run is {name!r}; "
                         f"pass the run directory the checkpoint belongs to, or train a new run with --out")


def load_weights(path: Path, model, device, name: str) -> int:
    """Load best.pt's weights into `model` (model `name`); returns its epoch. InputError for anything
    but a fitting checkpoint."""
    best = runio.read_checkpoint(path, ("model", "epoch"), map_location=device)
    _check_model_name(path, best, name)
    try:
        model.load_state_dict(best["model"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _does_not_fit(path, exc) from None
    return int(best["epoch"]) if isinstance(best["epoch"], int) else 0


def restore(path: Path, checkpoint: dict, name: str, model, optimizer, sampler) -> dict[str, Any]:
    """Put last.pt's weights, optimiser, random states back (model `name`); returns the early-stopping state."""
    _check_model_name(path, checkpoint, name)
    state = checkpoint["state"]
    if not (isinstance(state, dict) and all(isinstance(state.get(key), (int, float)) for key in STATE_KEYS)):
        raise InputError(f"{path}: not a checkpoint written by fitmm train (bad 'state' entry); train a new run with --out")
    try:
        model.load_state_dict(checkpoint["model"])
        if optimizer is not None:
            optimizer.load_state_dict(checkpoint["optimizer"])
        sampler.load_state_dict(checkpoint["sampler"])
        torch.set_rng_state(checkpoint["torch_rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise _does_not_fit(path, exc) from None
    return dict(state)


# -- progress -------------------------------------------------------------------------------------

class Progress:
    """Epoch progress on stderr: a tqdm bar in a terminal; redirected (to a file, a pipe, a job
    log), one plain line per evaluation, since carriage-return bars pile up there as one long line."""

    def __init__(self, config: dict[str, Any], done: int, total: int):
        threads = torch.get_num_threads()
        self.label = f"{config['model']}, {threads} thread{'s' if threads != 1 else ''}"
        self.total = total
        self.bar = None
        self.plain = config["progress"] and not sys.stderr.isatty()
        if config["progress"] and not self.plain:
            self.bar = tqdm(initial=done, total=total, desc=self.label, unit="epoch", dynamic_ncols=True)
        elif self.plain and done < total:
            print(f"fitmm: training {self.label}: epochs {done + 1}..{total}", file=sys.stderr, flush=True)

    def epoch_done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def evaluated(self, epoch: int, loss: float, metric: str, score: float, state: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", **{metric: f"{score:.4f}"},
                                 best=f"{state['best']:.4f}@{state['best_epoch']}")
        elif self.plain:
            print(f"epoch {epoch}/{self.total}  loss {loss:.4f}  {metric} {score:.4f}  "
                  f"best {state['best']:.4f}@{state['best_epoch']}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_step(model, batch, optimizer, loss_fn=None):
    """One optimiser step on one batch; returns (loss, loss parts). `loss_fn`: what computes
    the loss (default model.loss; under DDP the DistributedDataParallel wrapper around it).

    Gradients are dropped BEFORE the forward (and by run_epoch after the epoch), so they never
    sit in memory beside a forward's activations or an evaluation (with a trainable 4096-d
    feature table they are as large as the table itself)."""
    optimizer.zero_grad(set_to_none=True)
    loss, parts = (loss_fn or model.loss)(batch)
    loss.backward()
    optimizer.step()
    return loss, parts


def run_epoch(model, sampler: TrainSampler, optimizer, epoch: int, batch_size: int, device,
              context: distributed.Context = distributed.Context(), loss_fn=None) -> dict[str, float]:
    """One pass over the training interactions (this rank's slices of them); returns the mean
    loss and loss parts (averaged over the ranks) and the number of steps."""
    model.train()
    model.start_epoch(epoch, sampler.rng)
    if optimizer is not None:  # a per-model learning-rate schedule (1 for most models)
        factor = model.lr_factor(epoch)
        for group in optimizer.param_groups:
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor
    totals: dict[str, float] = {}
    n_batches = 0
    for batch in context.batches(sampler, batch_size, model.uses_negatives, device):
        loss, parts = train_step(model, batch, optimizer, loss_fn)
        totals["loss"] = totals.get("loss", 0.0) + loss.item()
        for name, value in parts.items():
            totals[name] = totals.get(name, 0.0) + value
        n_batches += 1
    optimizer.zero_grad(set_to_none=True)
    # "steps": optimiser steps this process took (under torchrun, world_size x fewer than one
    # process with the same batch_size would take).
    return {**context.mean({k: v / max(1, n_batches) for k, v in totals.items()}), "steps": n_batches}


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


def train(config: dict[str, Any], dataset: Dataset, run_dir: str | Path, resume: bool = False, *,
          lock: runio.RunLock | None = None, allow_data_change: bool = False,
          callbacks: list | tuple = (), evaluate_test: bool = True) -> dict[str, Any]:
    """Train `config["model"]` on `dataset`, writing the run directory; returns the summary.

    `lock`: the run directory's lock, when the caller holds it (the CLI creates the folder locked);
    otherwise the folder is created if needed and locked here, for the call's duration (by the
    main rank only, under torchrun).
    `evaluate_test=False` (hyper-parameter search trials): test is never evaluated, and
    summary.json's "test" is null.
    With `resume`, `config` may differ from the saved one in `epochs` (to extend a run) and `data`
    (a moved folder with the same fingerprint); `allow_data_change` accepts different data.
    `callbacks`: see the module docstring."""
    run_dir = Path(run_dir)
    context = distributed.current()
    own_lock = None
    if lock is None and context.main:
        if not resume:
            run_dir.mkdir(parents=True, exist_ok=True)
        own_lock = runio.lock_run_dir(run_dir)
    try:
        return _train(config, dataset, run_dir, resume, allow_data_change, context, list(callbacks), evaluate_test)
    finally:
        if own_lock is not None:
            own_lock.release()


def _notify(callbacks: list, event: str, *args) -> None:
    for callback in callbacks:
        method = getattr(callback, event, None)
        if method is not None:
            method(*args)


def _evaluate(context: distributed.Context, model, dataset: Dataset, splits: list[str], config) -> dict:
    """{split: per-user arrays}: each rank ranks its share of the users, then all are gathered."""
    per_user = evaluate_per_user(model, dataset, splits, config["topk"], config["eval_batch_size"],
                                 users_part=context.users_part)
    return context.gather_per_user(per_user)


def _train(config, dataset: Dataset, run_dir: Path, resume: bool, allow_data_change: bool,
           context: distributed.Context, callbacks: list, evaluate_test: bool = True) -> dict[str, Any]:
    use_threads(config)
    device = context.device(pick_device(config["device"]))
    main = context.main
    callbacks = callbacks if main else []
    log_path = run_dir / "log.jsonl"
    data_json, data_change = {**data_record(dataset), "history": []}, None  # fingerprinted before training
    checkpoint, log = None, []
    if resume:  # every check first: a refused resume writes nothing
        data_json, data_change = check_data(run_dir, dataset, allow_data_change)
        if data_change and main:
            print(f"fitmm: warning: resuming on different data ({data_change}), as --allow-data-change asks; "
                  f"summary.json will say so", file=sys.stderr)
        if (run_dir / "last.pt").exists():
            checkpoint = runio.read_checkpoint(run_dir / "last.pt", CHECKPOINT_KEYS, map_location=device)
        log = read_log(log_path, cut_last_line_ok=True)
    model = build_model(config, dataset, device)
    sampler = TrainSampler(dataset.train, seed=config["seed"])
    optimizer = make_optimizer(model, config)
    mmrec = config["selection"] == "mmrec"
    if mmrec and not evaluate_test:
        raise InputError("config key 'selection': mmrec evaluates test at every epoch; use selection=clean")
    metric = config["valid_metric"]
    state = {"epoch": 0, "best": -math.inf, "best_epoch": 0, "bad_evals": 0}
    epochs = config["epochs"] if model.trainable else 0

    if resume:
        saved = read_config_file(run_dir / "config.yaml")
        if checkpoint is not None:
            state = restore(run_dir / "last.pt", checkpoint, config["model"], model, optimizer, sampler)
        stopped_early = state["bad_evals"] > config["patience"]
        if epochs and config["epochs"] < state["epoch"]:
            raise InputError(f"{run_dir}: has already trained {state['epoch']} epochs; "
                             f"--set epochs must be at least {state['epoch']}")
        if stopped_early and config["epochs"] > saved.get("epochs", config["epochs"]):
            raise InputError(
                f"{run_dir}: this run stopped early at epoch {state['epoch']} ({metric} did not improve on "
                f"epoch {state['best_epoch']} for {state['bad_evals']} evaluations, patience "
                f"{config['patience']}); more epochs would train nothing. Start a new run with --out and "
                f"a larger patience"
            )
        if stopped_early:  # resuming a run that had already stopped early: just finish it
            epochs = state["epoch"]
        if data_json is None:
            data_json = json.loads((run_dir / DATA_FILE).read_text(encoding="utf-8"))
        elif main:
            runio.write_json(run_dir / DATA_FILE, data_json)
        if main:  # checked: from here on the run directory is written, first rid of any write a kill cut short
            runio.remove_stale_temps(run_dir)
            if saved != config:  # extended epochs, or the data's new location
                runio.write_yaml(run_dir / "config.yaml", config)
            if checkpoint is None:  # killed before the first checkpoint: start again from epoch 1
                (run_dir / "best.pt").unlink(missing_ok=True)
            if state["epoch"] < epochs:  # it trains again, so an earlier result no longer describes it
                (run_dir / "summary.json").unlink(missing_ok=True)
            # Epochs logged after the last checkpoint are re-run; drop their lines.
            kept = [r for r in log if r["epoch"] <= state["epoch"]]
            runio.atomic_write(log_path, lambda h: h.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
    elif main:
        runio.write_yaml(run_dir / "config.yaml", config)
        runio.write_json(run_dir / DATA_FILE, data_json)
        log_path.write_text("")

    # Under DDP the loss goes through DistributedDataParallel (gradients averaged over the ranks).
    loss_fn = context.wrap(model) if epochs > state["epoch"] else None
    progress = Progress(config if main else {**config, "progress": False}, state["epoch"], epochs)
    for epoch in range(state["epoch"] + 1, epochs + 1):
        start = time.perf_counter()
        record: dict[str, Any] = {"epoch": epoch, **run_epoch(model, sampler, optimizer, epoch, config["batch_size"],
                                                              device, context, loss_fn)}
        record["train_seconds"] = time.perf_counter() - start
        if not math.isfinite(record.get("loss", 0.0)):
            raise FloatingPointError(f"epoch {epoch}: the training loss is {record['loss']}; lower lr")
        progress.epoch_done()

        if epoch % config["eval_every"] == 0 or epoch == epochs:
            start = time.perf_counter()
            per_user = _evaluate(context, model, dataset, ["valid", "test"] if mmrec else ["valid"], config)
            results = {split: summarize(values) for split, values in per_user.items()}
            record["eval_seconds"] = time.perf_counter() - start
            record.update(results)
            _notify(callbacks, "on_evaluation", epoch, results)
            score = results["valid"][metric]
            if score > state["best"]:  # strictly better, as in the protocol
                state.update(best=score, best_epoch=epoch, bad_evals=0)
                if main:
                    runio.save_torch(run_dir / "best.pt", {"model": model.state_dict(), "epoch": epoch,
                                                            "model_name": config["model"]})
            else:
                state["bad_evals"] += 1
            state["epoch"] = epoch
            progress.evaluated(epoch, record.get("loss", 0.0), metric, score, state)
        # The log line goes first and the checkpoint second: an interruption between the two leaves
        # a line newer than last.pt, which resume drops and re-runs. The other order would leave a
        # checkpointed epoch with no line in the log.
        if main:
            runio.append_jsonl(log_path, record)
        if state["epoch"] == epoch and main:
            # Tensors, numbers, strings and containers only: runio.load_torch reads it with weights_only.
            runio.save_torch(run_dir / "last.pt", {
                "model": model.state_dict(),
                "model_name": config["model"],
                "optimizer": optimizer.state_dict() if optimizer is not None else None,
                "sampler": sampler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "state": state,
            })
        _notify(callbacks, "on_epoch_end", epoch, record)
        # MMRec's rule: `patience` evaluations without a better score are tolerated; the next one stops.
        if state["bad_evals"] > config["patience"]:
            break
    progress.close()
    summary = finish(config, dataset, model, run_dir, device, data_json, context, evaluate_test)
    _notify(callbacks, "on_finish", summary)
    return summary


def finish(config, dataset, model, run_dir: Path, device, data_json: dict,
           context: distributed.Context = distributed.Context(), evaluate_test: bool = True) -> dict[str, Any]:
    """Evaluate the best checkpoint on validation and test (unless `evaluate_test` is False) once;
    write summary.json and plots."""
    best_path = run_dir / "best.pt"
    best_epoch = 0
    context.barrier()  # best.pt is written by the main rank: every rank reads it after this
    if best_path.exists():
        best_epoch = load_weights(best_path, model, device, config["model"])
    elif context.main:  # nothing trained (most-popular, or epochs = 0): the model as built is the result
        runio.save_torch(best_path, {"model": model.state_dict(), "epoch": 0, "model_name": config["model"]})
    start = time.perf_counter()
    per_user = _evaluate(context, model, dataset, ["valid", "test"] if evaluate_test else ["valid"], config)
    eval_seconds = time.perf_counter() - start
    results = {split: summarize(values) for split, values in per_user.items()}
    log = read_log(run_dir / "log.jsonl")
    train_seconds = [r["train_seconds"] for r in log]
    summary = {
        "model": config["model"],
        "dataset": dataset.name,
        "data": dataset.source,
        "data_fingerprint": dataset.fingerprint,
        "seed": config["seed"],
        "selection": config["selection"],
        "best_epoch": best_epoch,
        "epochs_run": len(log),
        "seconds_per_epoch": statistics.median(train_seconds) if train_seconds else 0.0,
        "eval_seconds": eval_seconds,
        # Processes that trained it (torchrun): each took its slice of every batch of world_size x batch_size.
        "world_size": context.world_size,
        "valid": results["valid"],
        "test": results.get("test"),
    }
    if not context.main:
        return summary
    # Per-user metrics allow paired significance tests between runs on the same data.
    runio.atomic_write(run_dir / "per_user.npz", lambda h: np.savez_compressed(
        h, **{f"{split}/{key}": values for split, arrays in per_user.items() for key, values in arrays.items()}))
    if data_json.get("history"):  # trained on more than one dataset (resumed with --allow-data-change)
        summary["data_changes"] = [
            {"from": old["fingerprint"], "path": old["path"], "change": describe_change(old, new)}
            for old, new in zip(data_json["history"], [*data_json["history"][1:], data_json])
        ]
    runio.write_json(run_dir / "summary.json", summary)
    from .plots import plot_training_curves  # matplotlib is optional

    plot_training_curves(log, config["valid_metric"], run_dir / "curves.png", title=f"{config['model']} on {dataset.name}")
    return summary
