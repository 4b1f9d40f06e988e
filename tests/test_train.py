"""End-to-end training through the CLI: accuracy sanity, determinism, run files, resume, evaluate."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import small_args
from fitmm.cli import main


def train(tmp_path, name, *extra):
    out = tmp_path / name
    assert main(["train", "--out", str(out), *small_args(*extra)]) == 0
    return out, json.loads((out / "summary.json").read_text())


def test_lightgcn_clearly_beats_most_popular(tmp_path):
    _, pop = train(tmp_path, "pop", "model=pop")
    _, lgcn = train(tmp_path, "lgcn", "model=lightgcn", "epochs=40", "lr=0.01")
    assert lgcn["test"]["recall@20"] > 1.3 * pop["test"]["recall@20"]
    assert lgcn["test"]["ndcg@20"] > 1.3 * pop["test"]["ndcg@20"]


def test_same_seed_same_numbers_and_run_files(tmp_path):
    out, a = train(tmp_path, "a", "model=lightgcn", "epochs=4")
    _, b = train(tmp_path, "b", "model=lightgcn", "epochs=4")
    _, c = train(tmp_path, "c", "model=lightgcn", "epochs=4", "seed=1")
    assert a["valid"] == b["valid"] and a["test"] == b["test"]
    assert a["test"] != c["test"]
    assert {"config.yaml", "log.jsonl", "best.pt", "last.pt", "summary.json", "per_user.npz"} <= {p.name for p in out.iterdir()}
    per_user = np.load(out / "per_user.npz")
    assert per_user["test/recall@20"].mean() == pytest.approx(a["test"]["recall@20"])
    assert len(per_user["test/user"]) == len(per_user["test/ndcg@20"])
    for key in ("model", "dataset", "seed", "best_epoch", "epochs_run", "seconds_per_epoch", "eval_seconds"):
        assert key in a
    for key in ("recall@20", "ndcg@20", "precision@10", "map@10", "hit@10"):
        assert 0.0 <= a["test"][key] <= 1.0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    assert all("loss" in r and "valid" in r and "test" not in r for r in log)  # clean mode: no test peeking


def test_mmrec_mode_logs_test_and_early_stopping_stops(tmp_path):
    out, summary = train(tmp_path, "m", "model=bpr", "selection=mmrec", "epochs=60", "patience=2", "lr=0.05")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all("test" in r for r in log)
    assert summary["epochs_run"] < 60  # stopped early
    assert summary["epochs_run"] == summary["best_epoch"] + 3  # 2 bad evaluations tolerated, the 3rd stops
    best = max(log, key=lambda r: r["valid"]["recall@20"])
    assert best["epoch"] == summary["best_epoch"]
    assert best["test"] == summary["test"]  # test at the best validation epoch


def test_existing_run_dir_is_refused(tmp_path, capsys):
    out, _ = train(tmp_path, "a", "model=pop")
    before = sorted(p.name for p in out.iterdir())
    assert main(["train", "--out", str(out), *small_args("model=pop")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


def test_evaluate_reproduces_the_saved_run(tmp_path, capsys):
    before = torch.get_num_threads()
    out, summary = train(tmp_path, "a", "model=bpr", "epochs=3", "threads=1")  # sets this process's threads
    capsys.readouterr()
    try:
        torch.set_num_threads(2)
        assert main(["evaluate", str(out)]) == 0
        assert torch.get_num_threads() == 1  # the run's `threads`, as it was trained
    finally:
        torch.set_num_threads(before)
    again = json.loads(capsys.readouterr().out)
    assert again["test"] == summary["test"] and again["valid"] == summary["valid"]


def default_ctrl_c() -> None:
    """Run in the child between fork and exec: SIGINT back to its default disposition. A child
    inherits an ignored SIGINT (pytest as a script's background job, `nohup pytest &`), and Python
    then never installs the handler that turns Ctrl-C into KeyboardInterrupt: the SIGINT below
    would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    """A real interruption: SIGINT to a training process, then --resume; same numbers as no interruption."""
    args = ["model=lightgcn", "epochs=25", "patience=100"]
    _, reference = train(tmp_path, "reference", *args)

    out = tmp_path / "interrupted"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fitmm", "train", "--out", str(out), *small_args(*args)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_ctrl_c)
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"fitmm train --resume {out}" in err
    assert not (out / "summary.json").exists()
    done = len(log.read_text().splitlines())
    assert 3 <= done < 25

    assert main(["train", "--resume", str(out)]) == 0
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["test"] == reference["test"]
    assert resumed["best_epoch"] == reference["best_epoch"]
    epochs = [json.loads(line)["epoch"] for line in log.read_text().splitlines()]
    assert epochs == list(range(1, 26))
    # Resuming a finished run trains nothing more and reports the same result.
    assert main(["train", "--resume", str(out)]) == 0
    assert len(log.read_text().splitlines()) == 25
    assert json.loads((out / "summary.json").read_text())["test"] == reference["test"]


@pytest.mark.parametrize("interrupted_save", ["best.pt", "last.pt"])
def test_interruption_while_checkpointing_loses_no_log_line(tmp_path, monkeypatch, interrupted_save):
    """Ctrl-C can land between an epoch's log line and its checkpoint; resume must still log every epoch once."""
    from fitmm import runio

    args = ["model=lightgcn", "epochs=8", "patience=100"]
    _, reference = train(tmp_path, "reference", *args)

    real_save = runio.save_torch

    def save_then_interrupt(path, obj):
        real_save(path, obj)
        if path.name == interrupted_save and obj.get("epoch", obj.get("state", {}).get("epoch")) == 4:
            raise KeyboardInterrupt  # as if Ctrl-C arrived just after this file was written

    monkeypatch.setattr(runio, "save_torch", save_then_interrupt)
    out = tmp_path / "interrupted"
    assert main(["train", "--out", str(out), *small_args(*args)]) == 130
    monkeypatch.undo()  # the resumed run saves for real

    assert main(["train", "--resume", str(out)]) == 0
    epochs = [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 9))
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["test"] == reference["test"] and resumed["best_epoch"] == reference["best_epoch"]


def test_resume_needs_a_run(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "no resumable run" in capsys.readouterr().err


def test_console_script_exit_codes(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "fitmm", "train", "--data", str(tmp_path / "x"), "--out",
                          str(tmp_path / "r")], capture_output=True, text=True)
    assert bad.returncode == 2 and "dataset folder not found" in bad.stderr
    usage = subprocess.run([sys.executable, "-m", "fitmm", "nonsense"], capture_output=True, text=True)
    assert usage.returncode == 2


def test_clean_and_mmrec_select_the_same_checkpoint(tmp_path):
    """Evaluating test during training draws no random numbers and changes no weights, so both
    modes pick the same epoch and report the same test numbers; only clean never looks at test early."""
    _, clean = train(tmp_path, "clean", "model=bpr", "epochs=8", "lr=0.02")
    _, mmrec = train(tmp_path, "mmrec", "model=bpr", "epochs=8", "lr=0.02", "selection=mmrec")
    assert clean["best_epoch"] == mmrec["best_epoch"]
    assert clean["test"] == mmrec["test"]


def test_report_tables_runs_with_mean_and_std(tmp_path, capsys):
    runs = [train(tmp_path, f"s{seed}", "model=pop", f"seed={seed}")[0] for seed in (1, 2)]
    capsys.readouterr()
    assert main(["report", *map(str, runs), "--metrics", "recall@20,ndcg@10"]) == 0
    out = capsys.readouterr().out
    assert "| pop | synthetic | — | 2 |" in out
    assert "± 0.0000" in out  # most-popular ignores the seed
    assert main(["report", str(runs[0]), "--metrics", "recall@7"]) == 2
    assert main(["report", str(tmp_path / "missing")]) == 2
