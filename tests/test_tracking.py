"""`--track mlflow`: a tiny run logged to a temporary MLflow file store and read back."""

import json
import sys

import pytest

from conftest import small_args
from fitmm.cli import main

mlflow = pytest.importorskip("mlflow", reason="the 'track' extra (mlflow-skinny) is not installed")


def _client(store):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=str(store))


def _runs(store):
    client = _client(store)
    experiment = client.get_experiment_by_name("fitmm")
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def test_a_tracked_run_logs_its_config_every_epoch_the_final_metrics_and_its_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "store"
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--track", "mlflow", *small_args(
        "epochs=3", "lr=1e-3", "threads=1", "cache_dir=none", "model=bpr", f"tracking_uri={store}")]
    assert main(args) == 0
    client, runs = _runs(store)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    config = {**run.data.params}
    assert config["model"] == "bpr" and config["epochs"] == "3" and config["topk"] == "[5, 10, 20, 50]"
    assert config["tracking_uri"] == str(store)

    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    for name, key in (("loss", lambda r: r["loss"]), ("valid/recall_at_20", lambda r: r["valid"]["recall@20"]),
                      ("steps", lambda r: r["steps"])):
        history = sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)
        assert [m.step for m in history] == [1, 2, 3]
        assert [m.value for m in history] == pytest.approx([key(r) for r in log], rel=1e-12)

    summary = json.loads((out / "summary.json").read_text())
    assert run.data.metrics["final/test/recall_at_20"] == pytest.approx(summary["test"]["recall@20"])
    assert run.data.metrics["final/valid/ndcg_at_20"] == pytest.approx(summary["valid"]["ndcg@20"])
    assert run.data.metrics["world_size"] == 1

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "log.jsonl", "summary.json", "best.pt", "last.pt", "per_user.npz", "data.json"} <= artifacts
    assert ".lock" not in artifacts
    local = client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))
    assert json.loads(open(local).read()) == summary
    assert not (tmp_path / "mlruns").exists()  # tracking_uri was honoured, nothing went to ./mlruns


def test_bench_is_one_parent_run_with_each_trained_run_nested(tmp_path):
    store = tmp_path / "store"
    args = ["bench", "--models", "bpr,pop", "--seeds", "2", "--out", str(tmp_path / "bench"), "--track", "mlflow"]
    for item in small_args("epochs=2", "threads=1", "cache_dir=none", f"tracking_uri={store}"):
        args.append(item)
    assert main(args) == 0
    _, runs = _runs(store)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].data.params["models"] == "bpr,pop"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 4  # 2 models x 2 seeds
    assert sorted(r.data.params["model"] for r in children) == ["bpr", "bpr", "pop", "pop"]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_a_bench_cell_that_fails_is_a_failed_mlflow_run_not_a_running_one(tmp_path, monkeypatch):
    import fitmm.bench as bench

    def failing_train(config, dataset, run_dir, resume=False, callbacks=()):
        raise FloatingPointError("the loss is NaN")  # what a diverging run raises

    monkeypatch.setattr(bench, "train", failing_train)
    store = tmp_path / "store"
    args = ["bench", "--models", "bpr", "--seeds", "1", "--out", str(tmp_path / "bench"), "--track", "mlflow",
            *small_args("epochs=2", "threads=1", "cache_dir=none", f"tracking_uri={store}")]
    assert main(args) == 1  # an internal error, reported with its traceback
    _, runs = _runs(store)
    child = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 2 and len(child) == 1
    assert [r.info.status for r in runs] == ["FAILED", "FAILED"]  # the bench, and its cell


def test_track_mlflow_without_the_extra_is_exit_2_naming_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--track", "mlflow", *small_args("epochs=1")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'fitmm[track]'" in err
    assert not out.exists()


def test_search_is_one_parent_run_with_each_trial_nested_and_no_test_metric(tmp_path):
    pytest.importorskip("optuna")
    store = tmp_path / "store"
    space = tmp_path / "space.yaml"
    space.write_text("lr: [0.01, 0.001]\n")
    args = ["search", "--model", "bpr", "--data", "synthetic", "--trials", "2", "--space", str(space),
            "--out", str(tmp_path / "search"), "--track", "mlflow"]
    assert main([*args, *small_args("epochs=2", "threads=1", "cache_dir=none", f"tracking_uri={store}")]) == 0
    _, runs = _runs(store)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].data.params["model"] == "bpr"
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    trained = sorted((tmp_path / "search" / "trials").iterdir())  # a point drawn twice is not trained again
    assert len(trials) == len(trained) >= 1
    assert {r.data.tags["fitmm.run_dir"] for r in trials} == {str(p.resolve()) for p in trained}
    assert all(r.info.status == "FINISHED" for r in runs)
    for trial in trials:  # trials are chosen on validation: no test metric is ever logged for them
        assert any(k.startswith("final/valid/") for k in trial.data.metrics)
        assert not any(k.startswith("final/test/") for k in trial.data.metrics)
