"""`fitmm search`: interrupted and resumed searches, test never seen by trials, best.yaml, a shared
storage, pruning through train()'s callbacks, bad space files, and `fitmm bench --search`."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

optuna = pytest.importorskip("optuna")

import fitmm.evaluate as evaluate_module  # noqa: E402
import fitmm.search as search  # noqa: E402
from fitmm.cli import main  # noqa: E402
from fitmm.config import resolve  # noqa: E402
from fitmm.data import load  # noqa: E402
from fitmm.models import model_class  # noqa: E402
from fitmm.train import train  # noqa: E402

from conftest import small_args  # noqa: E402

BPR_SPACE = "lr: {type: float, low: 1e-3, high: 1e-1, log: true}\nembedding_size: [16, 32]\n"


@pytest.fixture
def tiny(tmp_path):
    return small_args("epochs=3", "threads=1", f"cache_dir={tmp_path / 'cache'}")


def load_study(storage, name):
    return optuna.load_study(study_name=name, storage=storage)


def states(study):
    return [t.state.name for t in study.get_trials()]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- an interrupted search, resumed -------------------------------------------------------------


def test_interrupted_search_resumes_to_n_trials_never_evaluates_test_and_writes_best_yaml(tmp_path, tiny, monkeypatch):
    out = tmp_path / "search"
    space = write(tmp_path / "space.yaml", BPR_SPACE)
    args = ["search", "--model", "bpr", "--data", "synthetic", "--out", str(out), "--trials", "3",
            "--space", str(space), *tiny]

    # Spies: which run is training, and which splits each ranking evaluates.
    current = {"run": None}
    evaluations = []
    real_rank_splits, real_train = evaluate_module.rank_splits, search.train

    def rank_splits(model, embeddings, dataset, splits, *a, **k):
        evaluations.append((current["run"], tuple(splits)))
        return real_rank_splits(model, embeddings, dataset, splits, *a, **k)

    class CtrlC:  # Ctrl-C in the middle of trial 1 (its second epoch)
        def on_epoch_end(self, epoch, record):
            if epoch == 2:
                raise KeyboardInterrupt

    interrupt = {"on": True}

    def spy_train(config, dataset, run_dir, *a, callbacks=(), **k):
        current["run"] = Path(run_dir)
        if interrupt["on"] and Path(run_dir).name == "0001":
            callbacks = [*callbacks, CtrlC()]
        return real_train(config, dataset, run_dir, *a, callbacks=callbacks, **k)

    monkeypatch.setattr(evaluate_module, "rank_splits", rank_splits)
    monkeypatch.setattr(search, "train", spy_train)

    assert main(args) == 130
    storage = f"sqlite:///{out / 'study.db'}"
    study = load_study(storage, "bpr-synthetic")
    assert states(study) == ["COMPLETE", "FAIL"]
    interrupted = study.trials[1]
    assert interrupted.user_attrs["interrupted"] is True
    assert not (out / "best.yaml").exists()

    interrupt["on"] = False
    assert main(args) == 0
    study = load_study(storage, "bpr-synthetic")
    assert states(study) == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]  # exactly 3 finished
    rerun = study.trials[2]
    assert rerun.params == interrupted.params and rerun.user_attrs["retry_of"] == 1
    # Every trial stays valid-only; test is evaluated exactly once, in the winner's re-run.
    with_test = [(run, splits) for run, splits in evaluations if "test" in splits]
    assert with_test == [(out / "best", ("valid", "test"))]
    assert evaluations.index(with_test[0]) == len(evaluations) - 1
    for number in (0, 2, 3):
        trial_summary = json.loads((out / "trials" / f"{number:04d}" / "summary.json").read_text())
        assert trial_summary["test"] is None
        with np.load(out / "trials" / f"{number:04d}" / "per_user.npz") as arrays:
            assert not [k for k in arrays.files if k.startswith("test/")]

    best = study.best_trial
    assert best.value == max(t.value for t in study.trials if t.state.name == "COMPLETE")
    best_yaml = yaml.safe_load((out / "best.yaml").read_text())
    assert best_yaml["lr"] == best.params["lr"] and best_yaml["embedding_size"] == best.params["embedding_size"]
    assert best_yaml["model"] == "bpr" and best_yaml["selection"] == "clean" and best_yaml["epochs"] == 3
    summary = json.loads((out / "best" / "summary.json").read_text())
    assert summary["valid"]["recall@20"] == pytest.approx(best.value, abs=1e-12)  # best.yaml reproduces the trial
    assert set(summary["test"]) >= {"recall@20", "ndcg@20"}

    # `fitmm train --config best.yaml` accepts it and trains the same model again.
    run = tmp_path / "from-best-yaml"
    assert main(["train", "--config", str(out / "best.yaml"), "--out", str(run), "--json"]) == 0
    again = json.loads((run / "summary.json").read_text())
    assert again["valid"]["recall@20"] == pytest.approx(best.value, abs=1e-12)

    trials_md = (out / "trials.md").read_text()
    assert "| 1 | fail |" in trials_md and "interrupted" in trials_md and "re-run of 1" in trials_md
    assert f"| {best.number} | complete | {best.value:.4f} ✓ |" in trials_md
    assert (out / "importance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same command once more: nothing is trained, test is not evaluated again.
    evaluations.clear()
    assert main(args) == 0
    assert evaluations == [] and len(load_study(storage, "bpr-synthetic").trials) == 4


@pytest.mark.parametrize("owner", [None, "another-machine:/elsewhere/search"])
def test_a_killed_trial_left_running_is_failed_and_rerun(tmp_path, tiny, owner):
    """A process killed outright leaves its trial RUNNING in the study; the next run of the same
    folder (which holds the folder's lock, so that process is gone) fails and re-runs it. In the
    folder's own study.db every trial is this folder's: one left before it recorded its owner (None),
    and one left by a process on another machine or at another path (the folder carried there)."""
    out = tmp_path / "search"
    space = write(tmp_path / "space.yaml", BPR_SPACE)
    args = ["search", "--model", "bpr", "--data", "synthetic", "--out", str(out), "--space", str(space), *tiny]
    assert main([*args, "--trials", "1"]) == 0
    storage = f"sqlite:///{out / 'study.db'}"
    study = load_study(storage, "bpr-synthetic")
    left = study.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)})
    if owner is not None:
        left.set_user_attr("owner", owner)
    assert main([*args, "--trials", "2"]) == 0
    study = load_study(storage, "bpr-synthetic")
    assert states(study) == ["COMPLETE", "FAIL", "COMPLETE"]
    assert study.trials[1].user_attrs["interrupted"] is True
    assert study.trials[2].user_attrs["retry_of"] == 1


# -- several processes on one storage -----------------------------------------------------------


def fitmm(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "fitmm", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process):
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    return out, err


def test_processes_share_trials_through_a_storage_url(tmp_path):
    """Another SQLite file stands in for a database server."""
    storage = f"sqlite:///{tmp_path / 'server.db'}"
    space = write(tmp_path / "space.yaml", BPR_SPACE)
    common = ["search", "--model", "bpr", "--data", "synthetic", "--storage", storage, "--study", "shared",
              "--space", str(space), *small_args("epochs=2", "threads=1")]
    finish(fitmm(*common, "--out", str(tmp_path / "a"), "--trials", "2", cwd=tmp_path))
    assert states(load_study(storage, "shared")) == ["COMPLETE"] * 2

    # A second process (another machine) sees those two and adds two more; its results cover all four.
    finish(fitmm(*common, "--out", str(tmp_path / "b"), "--trials", "4", cwd=tmp_path))
    study = load_study(storage, "shared")
    assert states(study) == ["COMPLETE"] * 4
    assert sorted(p.name for p in (tmp_path / "a" / "trials").iterdir()) == ["0000", "0001"]
    assert sorted(p.name for p in (tmp_path / "b" / "trials").iterdir()) == ["0002", "0003"]
    trials_md = (tmp_path / "b" / "trials.md").read_text()
    assert all(f"\n| {n} | complete |" in trials_md for n in range(4))
    best_yaml = yaml.safe_load((tmp_path / "b" / "best.yaml").read_text())
    assert best_yaml["lr"] == study.best_trial.params["lr"]

    # Both at once (SQLite's locking holds): each checks the study before a trial, so together they
    # stop at 6 (7 when both start the last one at the same instant).
    a = fitmm(*common, "--out", str(tmp_path / "a"), "--trials", "6", cwd=tmp_path)
    b = fitmm(*common, "--out", str(tmp_path / "b"), "--trials", "6", cwd=tmp_path)
    finish(a), finish(b)
    finished = [s for s in states(load_study(storage, "shared")) if s in ("COMPLETE", "PRUNED")]
    assert 6 <= len(finished) <= 7 and "FAIL" not in states(load_study(storage, "shared"))


def test_a_study_is_only_continued_by_the_same_search(tmp_path, tiny):
    out = tmp_path / "search"
    space = write(tmp_path / "space.yaml", BPR_SPACE)
    args = ["search", "--model", "bpr", "--data", "synthetic", "--out", str(out), "--space", str(space), "--trials", "1"]
    assert main([*args, *tiny]) == 0
    assert main([*args, *tiny, "--set", "weight_decay=0.1"]) == 2
    assert main([*args, *small_args("epochs=3", "threads=2", f"cache_dir={tmp_path / 'other-cache'}")]) == 0  # not numbers


# -- pruning through train()'s callbacks --------------------------------------------------------


def test_train_callbacks_see_each_validation_and_epoch_and_can_stop_a_run(tmp_path):
    config = resolve([("test", {"model": "bpr", "epochs": 3, "progress": False, "threads": 1, "synthetic_users": 300,
                                "synthetic_items": 200, "synthetic_feature_dims": {"image": 8}})])
    dataset = load(config)
    calls = []

    class Recorder:
        def on_evaluation(self, epoch, results):
            calls.append(("evaluation", epoch, sorted(results)))

        def on_epoch_end(self, epoch, record):
            logged = (tmp_path / "a" / "log.jsonl").read_text().splitlines()
            calls.append(("epoch_end", epoch, json.loads(logged[-1])["epoch"], record["valid"]["recall@20"]))

    summary = train(config, dataset, tmp_path / "a", callbacks=[Recorder()], evaluate_test=False)
    assert [c[:2] for c in calls] == [("evaluation", 1), ("epoch_end", 1), ("evaluation", 2), ("epoch_end", 2),
                                      ("evaluation", 3), ("epoch_end", 3)]
    assert all(c[2] == ["valid"] for c in calls if c[0] == "evaluation")  # clean selection: no test
    assert all(c[2] == c[1] for c in calls if c[0] == "epoch_end")  # the epoch's line is already written
    assert summary["test"] is None

    class Stop:
        def on_evaluation(self, epoch, results):
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")

    with pytest.raises(optuna.TrialPruned, match="epoch 1"):
        train(config, dataset, tmp_path / "b", callbacks=[Stop()])
    assert not (tmp_path / "b" / "summary.json").exists()


def test_pruning_reports_the_validation_metric_and_stops_below_the_median():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    first = study.ask()
    first.report(0.5, 1)
    study.tell(first, 0.5)
    good, bad = study.ask(), study.ask()
    search.Pruning(optuna, good, "recall@20").on_evaluation(1, {"valid": {"recall@20": 0.6}})
    with pytest.raises(optuna.TrialPruned):
        search.Pruning(optuna, bad, "recall@20").on_evaluation(1, {"valid": {"recall@20": 0.1}})
    assert bad.user_attrs["pruned_at"] == 1
    assert good.storage.get_trial(good._trial_id).intermediate_values == {1: 0.6}
    study.tell(bad, state=optuna.trial.TrialState.PRUNED)
    rows = {r["number"]: r for r in search.trial_rows(study, SimpleNamespace(space={}))}
    assert rows[bad.number]["state"] == "pruned" and rows[bad.number]["epochs"] == 1  # trials.md's epochs column


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ("- lr\n", "space.yaml: expected a mapping of key: value at the top level"),
    ("lr: {type: normal, low: 1, high: 2}\n", "key 'lr': 'type' must be one of float, int, categorical, weights"),
    ("lr: {type: float, low: 0.1, high: 0.01}\n", "key 'lr': 'low' (0.1) must be below 'high' (0.01)"),
    ("lr: {type: float, low: 0, high: 0.1, log: true}\n", "key 'lr': a log scale needs low > 0"),
    ("lr: {type: float, low: 1e-4, hihg: 0.1}\n", "a float entry takes high, log, low; 'hihg' is not one of them"),
    ("knn_k: {type: int, low: 5.5, high: 10}\n", "key 'knn_k': 'low' must be an integer"),
    ("gate: {type: categorical, choices: []}\n", "key 'gate': 'choices' must be a non-empty list"),
    ("lr: 0.01\n", "key 'lr': expected a list of values or a mapping"),
    ("learning_rate: [0.1]\n", "unknown config key 'learning_rate' (search space file "),
    ("hyper_num: [4, 8]\n", "hyper_num is a lgmrec key; fitmm has no such key"),
    ("seed: [1, 2]\n", "'seed' cannot be searched; use --seed"),
    ("num_bands: [0, 3]\n", "key 'num_bands' = 0: config key 'num_bands'"),
    ("knn_k: [10, 5000]\n", "key 'knn_k' = 5000: config key 'knn_k': must be at most the number of items (200)"),
    ("gate: [pos, both]\n", "key 'gate' = 'both': config key 'gate': 'both' is not one of pos, dual, off"),
    ("train_features: {type: weights}\n", "type weights is for modality_weights"),
    ("", "empty; give at least one key"),
    ("lr: [0.1\n", "not valid YAML"),
])
def test_bad_space_file_exits_2_naming_the_key_and_writes_nothing(tmp_path, capsys, text, message):
    space = write(tmp_path / "space.yaml", text)
    out = tmp_path / "search"
    code = main(["search", "--model", "fitmm", "--data", "synthetic", "--out", str(out), "--space", str(space),
                 *small_args("epochs=1")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and err.startswith("fitmm: error: ") and str(space) in err
    assert not out.exists()


def test_bad_search_options_exit_2(tmp_path, capsys):
    space = write(tmp_path / "space.yaml", BPR_SPACE)
    base = ["search", "--model", "bpr", "--data", "synthetic", "--space", str(space), *small_args("epochs=1")]
    assert main([*base, "--out", str(tmp_path / "a"), "--set", "seed=3"]) == 2
    assert "fitmm search sets 'seed' itself; use --seed" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "b"), "--trials", "-1"]) == 2
    assert "--trials: must be >= 0" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "c"), "--storage", "nosuchdb://x"]) == 2
    assert "--storage nosuchdb://x: cannot open it" in capsys.readouterr().err
    assert main(["search", "--model", "pop", "--data", "synthetic", "--out", str(tmp_path / "d")]) == 2
    assert "model 'pop' has nothing to search" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_search_without_optuna_exits_2_saying_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    code = main(["search", "--model", "bpr", "--data", "synthetic", "--out", str(tmp_path / "s")])
    assert code == 2
    assert "pip install 'fitmm[search]'" in capsys.readouterr().err
    code = main(["bench", "--models", "bpr", "--search", "2", "--out", str(tmp_path / "b")])
    assert code == 2
    assert not (tmp_path / "s").exists() and not (tmp_path / "b").exists()


def test_space_format():
    space = search.parse_space({"a": [1, 2], "b": {"type": "float", "low": "1e-4", "high": 1, "log": True},
                                "c": {"type": "int", "low": 1, "high": 4}}, "here")
    assert space["a"] == search.Param("a", "categorical", choices=(1, 2))
    assert space["b"] == search.Param("b", "float", 1e-4, 1, True)
    assert space["c"].describe() == {"type": "int", "low": 1, "high": 4, "log": False}
    assert search.point_of({"modality_weights.image": 0.3, "modality_weights.text": 0.9, "a": 2},
                           {"modality_weights": search.Param("modality_weights", "weights"), "a": space["a"]}) == \
        {"modality_weights": {"image": 0.25, "text": 0.75}, "a": 2}


def test_fitmm_default_space_covers_the_issue_keys_and_runs(tmp_path):
    space = search.parse_space(model_class("fitmm").search_space, "fitmm")
    assert {"lr", "ib_weight", "cl_weight", "num_bands", "gate", "train_features", "knn_k", "modality_weights"} <= set(space)
    assert space["lr"].log and space["modality_weights"].type == "weights"
    assert model_class("fitmm").defaults["lr"] == 1e-4  # the released configuration stays the default

    out = tmp_path / "search"
    assert main(["search", "--model", "fitmm", "--data", "synthetic", "--out", str(out), "--trials", "2",
                 *small_args("epochs=1", "threads=1", f"cache_dir={tmp_path / 'cache'}")]) == 0
    study = load_study(f"sqlite:///{out / 'study.db'}", "fitmm-synthetic")
    assert states(study) == ["COMPLETE", "COMPLETE"]
    for trial in study.trials:  # the trial's config is its sampled point, the weights normalised
        config = yaml.safe_load((out / "trials" / f"{trial.number:04d}" / "config.yaml").read_text())
        raw = {m: trial.params[f"modality_weights.{m}"] for m in ("image", "text")}
        assert config["modality_weights"] == pytest.approx({m: w / sum(raw.values()) for m, w in raw.items()})
        assert all(config[key] == trial.params[key] for key in ("lr", "ib_weight", "num_bands", "gate", "knn_k"))


# -- fitmm bench --search ---------------------------------------------------------------------------


def test_bench_search_tunes_on_validation_then_runs_every_seed(tmp_path, monkeypatch):
    monkeypatch.setattr(model_class("bpr"), "search_space", {"lr": {"type": "float", "low": 1e-3, "high": 0.1, "log": True}})
    out = tmp_path / "bench"
    assert main(["bench", "--models", "bpr,pop", "--seeds", "2", "--search", "2", "--out", str(out),
                 *small_args("epochs=2", "threads=1", f"cache_dir={tmp_path / 'cache'}")]) == 0
    study = load_study(f"sqlite:///{out / 'search' / 'bpr' / 'study.db'}", "bpr-synthetic")
    assert states(study) == ["COMPLETE", "COMPLETE"]
    for trial in study.trials:  # the trials never evaluated test
        assert json.loads((out / "search" / "bpr" / "trials" / f"{trial.number:04d}" / "summary.json").read_text())["test"] is None
    runs = sorted((out / "runs" / "bpr").iterdir())
    assert [r.name[-3:] for r in runs] == ["-s1", "-s2"] and runs[0].name[:-3] == runs[1].name[:-3]
    for run in runs:  # the kept configuration is the best trial's, trained with each seed
        assert yaml.safe_load((run / "config.yaml").read_text())["lr"] == study.best_trial.params["lr"]
    assert json.loads((runs[0] / "summary.json").read_text())["valid"]["recall@20"] == pytest.approx(study.best_value)
    assert not (out / "search" / "bpr" / "best").exists()  # bench's own seed runs replace the re-run
    selection = (out / "selection.md").read_text()
    assert "fitmm search" in selection and selection.count("✓") == 2 and "search/bpr/trials/000" in selection
    assert "Optuna search of 2 trials" in (out / "results.md").read_text()
    assert main(["bench", "--models", "bpr", "--search", "2", "--grid", "--out", str(tmp_path / "x")]) == 2


def test_bench_grid_runs_a_space_of_ranges_at_its_defaults_and_says_so(tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "--models", "fitmm", "--seeds", "1", "--grid", "--out", str(out),
                 *small_args("epochs=1", "threads=1", f"cache_dir={tmp_path / 'cache'}")]) == 0
    assert len(list((out / "runs" / "fitmm").iterdir())) == 1
    selection = (out / "selection.md").read_text()
    assert "Its search space has ranges (lr, ib_weight, cl_weight, modality_weights)" in selection
    assert "| defaults |" in selection


def test_a_point_drawn_again_is_not_trained_again(tmp_path, tiny):
    out = tmp_path / "search"
    space = write(tmp_path / "space.yaml", "embedding_size: [16]\n")
    assert main(["search", "--model", "bpr", "--data", "synthetic", "--out", str(out), "--space", str(space),
                 "--trials", "2", *tiny]) == 0
    study = load_study(f"sqlite:///{out / 'study.db'}", "bpr-synthetic")
    assert states(study) == ["COMPLETE", "COMPLETE"] and study.trials[1].value == study.trials[0].value
    assert study.trials[1].user_attrs["same_as"] == 0
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0000"]
    assert "| 1 | complete |" in (out / "trials.md").read_text() and "same as 0" in (out / "trials.md").read_text()
    assert "trial 0 of study" in (out / "best.yaml").read_text()
