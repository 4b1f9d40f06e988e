"""Resume for every registered model: interrupted after epoch k and resumed, a run ends exactly where
an uninterrupted one does (every checkpoint tensor bit for bit, the per-epoch log, the summary).

The interruption is a KeyboardInterrupt raised in-process from inside epoch k + 1, after its first
optimiser step: deterministic (no timing, no polling), and late enough that the process's weights,
optimiser and random generators have all moved past the last checkpoint, as after a real Ctrl-C.
The run keeps its configuration (epochs included), so a schedule that depends on the total number
of epochs is exercised as the user would run it. Resuming goes through `fitmm train --resume`, as a
user would, so the saved config.yaml is part of what is tested.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import fitmm.train
from fitmm.cli import main
from fitmm.models import REGISTRY

EPOCHS = 4
INTERRUPT_AFTER = 2  # the last checkpointed epoch before the interruption

# Tiny data: a few batches per epoch (so the sampler's generator moves within an epoch), seconds per model.
TINY = [
    "synthetic_users=60", "synthetic_items=50", "synthetic_mean_interactions=10",
    "synthetic_feature_dims={image: 8, text: 6}", "batch_size=64",
    "threads=1", "progress=false", "patience=100", f"epochs={EPOCHS}",
]
TIMING_KEYS = {"train_seconds", "eval_seconds", "seconds_per_epoch"}


def tiny_args(model: str, cache, *extra: str) -> list[str]:
    out = ["--model", model]
    embeddings = ["embedding_size=8"] if "embedding_size" in REGISTRY[model].defaults else []
    for item in [*TINY, *embeddings, f"cache_dir={cache}", *extra]:
        out += ["--set", item]
    return out


def interrupt_inside_epoch(monkeypatch, epoch: int) -> None:
    """Raise KeyboardInterrupt right after the first optimiser step of `epoch` (as Ctrl-C would)."""
    real_run_epoch, real_train_step = fitmm.train.run_epoch, fitmm.train.train_step
    current = {"epoch": 0}

    def run_epoch(model, sampler, optimizer, epoch_, *args, **kwargs):
        current["epoch"] = epoch_
        return real_run_epoch(model, sampler, optimizer, epoch_, *args, **kwargs)

    def train_step(*args, **kwargs):
        out = real_train_step(*args, **kwargs)
        if current["epoch"] == epoch:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(fitmm.train, "run_epoch", run_epoch)
    monkeypatch.setattr(fitmm.train, "train_step", train_step)


def without_timings(obj):
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if k not in TIMING_KEYS}
    return obj


def log_lines(run_dir) -> list[dict]:
    return [without_timings(json.loads(line)) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def load_checkpoint(path):
    # weights_only=False: these are files this test has just written, and the comparison below must
    # not depend on what a checkpoint holds (its layout may change); it compares whatever is there.
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_identical(a, b, where: str = "") -> None:
    """Same structure and every value equal, tensors and arrays bit for bit (dtype and shape too)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.nan_to_num(), b.nan_to_num())
                                     and torch.equal(a.isnan(), b.isnan())), f"{where}: tensors differ"
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for key in a:
            assert_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


TRAINABLE = sorted(name for name, cls in REGISTRY.items() if cls.trainable)


def test_every_model_but_the_untrained_ones_is_covered(tmp_path):
    # An untrained model (most-popular) trains no epoch even when epochs is set, so it writes no
    # last.pt and there is nothing to resume; every other registered model is parametrised below.
    assert sorted(REGISTRY) == sorted([*TRAINABLE, "pop"])
    run = tmp_path / "pop"
    assert main(["train", "--out", str(run), *tiny_args("pop", tmp_path / "cache")]) == 0
    assert (run / "log.jsonl").read_text() == "" and not (run / "last.pt").exists()
    assert json.loads((run / "summary.json").read_text())["epochs_run"] == 0


@pytest.mark.parametrize("model", TRAINABLE)
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch, model):
    cache = tmp_path / "cache"
    reference = tmp_path / "reference"
    assert main(["train", "--out", str(reference), *tiny_args(model, cache)]) == 0

    run = tmp_path / "run"
    interrupt_inside_epoch(monkeypatch, INTERRUPT_AFTER + 1)
    assert main(["train", "--out", str(run), *tiny_args(model, cache)]) == 130
    monkeypatch.undo()
    assert not (run / "summary.json").exists()
    assert [r["epoch"] for r in log_lines(run)] == list(range(1, INTERRUPT_AFTER + 1))

    assert main(["train", "--resume", str(run)]) == 0

    assert log_lines(run) == log_lines(reference)  # losses and validation metrics of every epoch
    assert [r["epoch"] for r in log_lines(run)] == list(range(1, EPOCHS + 1))
    summary = json.loads((run / "summary.json").read_text())
    assert without_timings(summary) == without_timings(json.loads((reference / "summary.json").read_text()))
    for name in ("best.pt", "last.pt"):
        assert_identical(load_checkpoint(run / name), load_checkpoint(reference / name), name)
    with np.load(run / "per_user.npz") as got, np.load(reference / "per_user.npz") as want:
        assert sorted(got.files) == sorted(want.files)
        for key in want.files:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_resume_re_runs_an_epoch_logged_after_the_last_checkpoint(tmp_path, monkeypatch):
    """With eval_every=2 only even epochs are checkpointed: interrupted in epoch 4, the run has logged
    epoch 3 but last.pt holds epoch 2, so resume drops epoch 3's line and trains it again."""
    cache = tmp_path / "cache"
    args = tiny_args("bm3", cache, "eval_every=2", "epochs=5")
    reference = tmp_path / "reference"
    assert main(["train", "--out", str(reference), *args]) == 0

    run = tmp_path / "run"
    interrupt_inside_epoch(monkeypatch, 4)
    assert main(["train", "--out", str(run), *args]) == 130
    monkeypatch.undo()
    assert [r["epoch"] for r in log_lines(run)] == [1, 2, 3]

    assert main(["train", "--resume", str(run)]) == 0
    assert [r["epoch"] for r in log_lines(run)] == [1, 2, 3, 4, 5]
    assert log_lines(run) == log_lines(reference)
    for name in ("best.pt", "last.pt"):
        assert_identical(load_checkpoint(run / name), load_checkpoint(reference / name), name)


def test_patience_counts_evaluations_so_the_first_one_always_happens(tmp_path):
    """patience=1 with eval_every=2: epoch 1 has no evaluation and cannot count against patience,
    so the run trains to its first evaluation (epoch 2), which improves on nothing and is the best."""
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *tiny_args("bpr", tmp_path / "cache", "patience=1", "eval_every=2")]) == 0
    log = log_lines(run)
    assert [r["epoch"] for r in log][:2] == [1, 2]
    assert "valid" not in log[0] and "valid" in log[1]
    assert json.loads((run / "summary.json").read_text())["best_epoch"] in (2, 4)


def script_validation(monkeypatch, scores: list[float]) -> None:
    """Make epoch e's validation recall@20 equal scores[e - 1] (training itself runs for real), so
    the early-stopping rule is checked against a sequence worked out by hand."""
    real_run_epoch = fitmm.train.run_epoch
    current = {"epoch": 0}

    def run_epoch(model, sampler, optimizer, epoch, *args, **kwargs):
        current["epoch"] = epoch
        return real_run_epoch(model, sampler, optimizer, epoch, *args, **kwargs)

    real_evaluate = fitmm.train._evaluate

    def evaluate(context, model, dataset, splits, config):
        if splits != ["valid"]:  # the final evaluation of the best checkpoint (valid and test) is real
            return real_evaluate(context, model, dataset, splits, config)
        return {"valid": {"recall@20": np.array([scores[current["epoch"] - 1]])}}  # one "user" with that score

    monkeypatch.setattr(fitmm.train, "run_epoch", run_epoch)
    monkeypatch.setattr(fitmm.train, "_evaluate", evaluate)


# Validation score per epoch, patience 2 (MMRec's rule: 2 bad evaluations tolerated, the 3rd stops).
# Epoch 1 is the first best; 2 only ties it (not strictly better: 1 bad evaluation); 3 improves
# (best, the count restarts at 0); 4 is worse (1); 5 ties the best (2, still tolerated); 6 is worse
# (3): the run stops after epoch 6 with epoch 3 as the best. Counting a tie as better (best 5, no
# stop by epoch 6), not restarting the count at an improvement (stop after epoch 5), or stopping at
# the patience-th bad evaluation (after epoch 5) each change the outcome.
SCRIPTED = [0.1, 0.1, 0.2, 0.15, 0.2, 0.19, 0.3, 0.4]


@pytest.mark.parametrize("interrupted", [False, True])
def test_early_stopping_follows_hand_worked_scores_across_a_resume(tmp_path, monkeypatch, interrupted):
    args = tiny_args("bpr", tmp_path / "cache", "patience=2", "epochs=8")
    run = tmp_path / "run"
    script_validation(monkeypatch, SCRIPTED)
    if interrupted:  # stopped inside epoch 5, after epoch 4's checkpoint (bad evaluations: 1)
        interrupt_inside_epoch(monkeypatch, 5)
        assert main(["train", "--out", str(run), *args]) == 130
        monkeypatch.undo()
        script_validation(monkeypatch, SCRIPTED)
        assert main(["train", "--resume", str(run)]) == 0
    else:
        assert main(["train", "--out", str(run), *args]) == 0
    log = log_lines(run)
    assert [r["epoch"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert [r["valid"]["recall@20"] for r in log] == SCRIPTED[:6]
    assert json.loads((run / "summary.json").read_text())["best_epoch"] == 3


def test_an_early_stopped_run_resumes_to_the_same_end(tmp_path, monkeypatch):
    """Scores 0.3 four times: epochs 2-4 only tie the best, so they are not improvements and
    patience=2 (2 tolerated) stops the run after epoch 4 with epoch 1 as the best. Resuming the stopped run trains
    nothing more and reports the same result."""
    run = tmp_path / "run"
    args = tiny_args("bpr", tmp_path / "cache", "patience=2", "epochs=6")
    script_validation(monkeypatch, [0.3, 0.3, 0.3, 0.3, 0.9, 0.9])
    assert main(["train", "--out", str(run), *args]) == 0
    first = json.loads((run / "summary.json").read_text())
    assert (first["best_epoch"], first["epochs_run"]) == (1, 4)
    best, last = load_checkpoint(run / "best.pt"), load_checkpoint(run / "last.pt")

    assert main(["train", "--resume", str(run)]) == 0
    assert [r["epoch"] for r in log_lines(run)] == [1, 2, 3, 4]
    assert without_timings(json.loads((run / "summary.json").read_text())) == without_timings(first)
    assert_identical(load_checkpoint(run / "best.pt"), best, "best.pt")
    assert_identical(load_checkpoint(run / "last.pt"), last, "last.pt")


@pytest.mark.parametrize("damaged", [[1, 2], {"epoch": 2, "best": "high", "best_epoch": 1, "bad_evals": 0}])
def test_a_last_pt_with_a_damaged_state_entry_is_refused(tmp_path, capsys, damaged):
    """The early-stopping state is the one entry of last.pt that names itself in the error: a list, or a
    field that is not a number, is bad input (exit 2, nothing written), not an internal error."""
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *tiny_args("bpr", tmp_path / "cache", "epochs=2")]) == 0
    checkpoint = load_checkpoint(run / "last.pt")
    checkpoint["state"] = damaged
    torch.save(checkpoint, run / "last.pt")
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'last.pt'}: not a checkpoint written by fitmm train (bad 'state' entry)" in err
    assert "Traceback" not in err
