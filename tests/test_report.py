"""What consumers of run directories show: `fitmm report` groups and the training-curve figure."""

import json

import pytest
import yaml

from fitmm.cli import main
from fitmm.config import resolve
from fitmm.models import model_class
from fitmm.report import group_runs, read_summaries


def fake_run(folder, seed, recall, **overrides):
    """A run directory with the two files report reads: the resolved config.yaml and summary.json."""
    config = resolve([("test", {"model": "bpr", "seed": seed, **overrides})])
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "summary.json").write_text(json.dumps({
        "model": config["model"], "dataset": "synthetic", "seed": seed, "selection": config["selection"],
        "best_epoch": 1, "epochs_run": config["epochs"], "seconds_per_epoch": 0.1,
        "valid": {"recall@20": recall}, "test": {"recall@20": recall}}))
    return folder


def test_report_pools_only_runs_that_differ_in_the_seed(tmp_path, capsys):
    runs = [
        fake_run(tmp_path / "a1", 1, 0.10, epochs=3),
        # progress, threads and the device cannot change results (config.RESULT_NEUTRAL_KEYS)
        fake_run(tmp_path / "a2", 2, 0.20, epochs=3, progress=False, threads=1, device="cpu"),
        fake_run(tmp_path / "b1", 1, 0.40, epochs=20),
        # the same reg_weight as bpr's default, so that only epochs differs between the groups
        fake_run(tmp_path / "c1", 1, 0.50, epochs=20, model="lightgcn",
                 reg_weight=model_class("bpr").defaults["reg_weight"]),
    ]
    groups, differing = group_runs(read_summaries(runs))
    assert [[r["run"] for r in g] for g in groups.values()] == [[str(runs[0]), str(runs[1])], [str(runs[2])], [str(runs[3])]]
    # epochs differs; lightgcn's own keys (n_layers) exist in one group only, so they do not "differ".
    assert differing == ["epochs"]
    assert main(["report", *map(str, runs), "--metrics", "recall@20"]) == 0
    out = capsys.readouterr().out
    assert "keys that differ between groups: epochs." in out
    assert "| bpr | synthetic | epochs=3 | 2 | 0.1500 ± 0.0707 |" in out
    assert "| bpr | synthetic | epochs=20 | 1 | 0.4000 |" in out
    assert "| lightgcn | synthetic | epochs=20 | 1 | 0.5000 |" in out


def test_report_refuses_a_run_without_config(tmp_path, capsys):
    run = fake_run(tmp_path / "a", 1, 0.1)
    (run / "config.yaml").unlink()
    assert main(["report", str(run)]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_training_curves_title_integer_ticks_and_best_epoch(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.ticker import MaxNLocator

    from fitmm import plots

    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig))
    recall = [0.1, 0.3, 0.2, 0.3, 0.25]  # epoch 4 ties epoch 2: the first (strictly better) is kept
    log = [{"epoch": e, "loss": 1.0 / e, "valid": {"recall@20": r}} for e, r in enumerate(recall, start=1)]
    assert plots.best_epoch(log, "recall@20") == 2
    assert plots.plot_training_curves(log, "recall@20", tmp_path / "c.png", title="bpr on ml100k_mm")
    fig = figures[0]
    assert fig._suptitle.get_text() == "bpr on ml100k_mm"
    loss_ax, metric_ax = fig.axes
    for ax in (loss_ax, metric_ax):
        locator = ax.xaxis.get_major_locator()
        assert isinstance(locator, MaxNLocator) and locator._integer
    labels = [line.get_label() for line in metric_ax.get_lines()]
    assert "best: epoch 2 (0.3000)" in labels


def test_bench_plot_names_the_dataset(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from fitmm import bench, plots

    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig))
    rows = [{"model": m, "mean": {"recall@20": 0.2, "ndcg@20": 0.1}, "std": {"recall@20": 0.01, "ndcg@20": None}}
            for m in ("fitmm", "pop")]
    assert bench.plot_bench(rows, tmp_path / "bench.png", "ml100k_mm")
    assert figures[0].axes[0].get_title() == "ml100k_mm: test Recall@20 and NDCG@20"
