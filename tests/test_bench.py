"""`fitmm bench`: grid selection on validation, results files, paired Wilcoxon p-values, resuming, validation."""

import csv
import json
import math
import os
import statistics
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

import fitmm.bench as bench
from fitmm import runio
from fitmm.cli import main
from fitmm.models import model_class


@pytest.fixture
def tiny(tmp_path):
    """--set arguments for a tiny synthetic problem that trains in a second."""
    items = ["synthetic_users=200", "synthetic_items=120", "synthetic_feature_dims={image: 16, text: 8}",
             "epochs=2", "progress=false", f"cache_dir={tmp_path / 'cache'}"]
    return [arg for item in items for arg in ("--set", item)]


def run_bench(out, *args):
    return main(["bench", "--out", str(out), *args])


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def cells(out, model):
    """{run dir name: (overrides, summary)} of a model's cells."""
    return {d.name: (json.loads((d / "overrides.json").read_text()), json.loads((d / "summary.json").read_text()))
            for d in sorted((out / "runs" / model).iterdir())}


def user_means(run_dirs):
    """{user id: test recall@20 averaged over the runs}, computed without fitmm.bench."""
    sums, counts = {}, {}
    for run in run_dirs:
        arrays = np.load(run / "per_user.npz")
        for user, value in zip(arrays["test/user"].tolist(), arrays["test/recall@20"].tolist()):
            sums[user] = sums.get(user, 0.0) + value
            counts[user] = counts.get(user, 0) + 1
    return {u: sums[u] / counts[u] for u in sums if counts[u] == len(run_dirs)}


# -- end to end -------------------------------------------------------------------------------


def test_grid_selects_on_validation_and_writes_results(tmp_path, tiny, monkeypatch, capsys):
    monkeypatch.setattr(model_class("bpr"), "search_space", {"lr": [1e-6, 0.05]})
    out = tmp_path / "bench"
    assert run_bench(out, "--models", "pop,bpr", "--seeds", "2", "--grid", *tiny) == 0
    captured = capsys.readouterr()
    assert "[1/5]" in captured.err and "[5/5]" in captured.err and "grid 2/2" in captured.err  # progress

    # bpr: both grid points with seed 1, then the best one on validation with seed 2.
    bpr = cells(out, "bpr")
    grid = {name: c for name, c in bpr.items() if name.endswith("-s1")}
    assert sorted(c[0]["grid"]["lr"] for c in grid.values()) == [1e-6, 0.05]
    best = max(grid, key=lambda name: grid[name][1]["valid"]["recall@20"])
    assert grid[best][0]["grid"] == {"lr": 0.05}  # the clearly better configuration
    assert set(bpr) == set(grid) | {best.replace("-s1", "-s2")}
    assert bpr[best.replace("-s1", "-s2")][0] == grid[best][0]
    assert all(c[1]["selection"] == "clean" for c in bpr.values())
    assert len(cells(out, "pop")) == 2  # an empty search space: defaults only

    selection = (out / "selection.md").read_text()
    assert "lr=1e-06" in selection and "lr=0.05 |" in selection and selection.count("✓") == 2

    rows = read_csv(out / "results.csv")
    assert [r["model"] for r in rows] == ["pop", "bpr"]
    assert rows[1]["config"] == "lr=0.05" and rows[0]["config"] == "defaults"
    runs = {"pop": sorted((out / "runs" / "pop").iterdir()),
            "bpr": [out / "runs" / "bpr" / best, out / "runs" / "bpr" / best.replace("-s1", "-s2")]}
    for row in rows:
        summaries = [json.loads((run / "summary.json").read_text()) for run in runs[row["model"]]]
        assert row["seeds"] == "1 2" and row["n_seeds"] == "2"
        for metric in ("recall@10", "recall@20", "ndcg@10", "ndcg@20"):
            values = [s["test"][metric] for s in summaries]
            assert float(row[f"{metric}_mean"]) == pytest.approx(statistics.mean(values))
            assert float(row[f"{metric}_std"]) == pytest.approx(statistics.stdev(values), abs=1e-12)

    # p-value: scipy's Wilcoxon on per-user test recall@20, users paired by id, averaged over seeds.
    first, other = user_means(runs["pop"]), user_means(runs["bpr"])
    users = sorted(set(first) & set(other))
    expected = scipy.stats.wilcoxon([first[u] for u in users], [other[u] for u in users]).pvalue
    assert rows[0]["p_wilcoxon_recall@20"] == ""
    assert float(rows[1]["p_wilcoxon_recall@20"]) == pytest.approx(expected, rel=1e-9)
    assert int(rows[1]["n_users_paired"]) == len(users)

    table = (out / "results.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| pop ") or line.startswith("| bpr ")]
    assert len(lines) == 2 and all(line.count(" ± ") == 4 for line in lines)
    assert lines[0].rstrip().endswith("| – |") and f"{expected:.3g}" in lines[1]
    assert table in captured.out  # the table is printed at the end
    pytest.importorskip("matplotlib")
    assert (out / "bench.png").stat().st_size > 1000


def test_resume_trains_only_unfinished_cells(tmp_path, tiny, monkeypatch):
    out = tmp_path / "bench"
    args = ["--models", "bpr,pop", "--seeds", "2", *tiny]
    assert run_bench(out, *args) == 0
    results = (out / "results.csv").read_text()
    s1, s2 = sorted((out / "runs" / "bpr").iterdir())
    # s1: a start that never reached a checkpoint -> removed and restarted; s2: checkpoint, no summary -> resumed.
    for name in ("summary.json", "last.pt", "best.pt", "per_user.npz"):
        (s1 / name).unlink()
    (s1 / "stale").write_text("x")
    (s2 / "summary.json").unlink()

    calls = []
    real_train = bench.train

    def counting_train(config, dataset, run_dir, resume=False):
        calls.append((Path(run_dir).name, resume))
        return real_train(config, dataset, run_dir, resume=resume)

    monkeypatch.setattr(bench, "train", counting_train)
    assert run_bench(out, *args) == 0
    assert calls == [(s1.name, False), (s2.name, True)]
    assert not (s1 / "stale").exists() and (s1 / "summary.json").is_file() and (s2 / "summary.json").is_file()
    assert (out / "results.csv").read_text() == results  # same seeds, same numbers

    def no_training(*args, **kwargs):
        raise AssertionError("a finished bench trained again")

    monkeypatch.setattr(bench, "train", no_training)
    assert run_bench(out, *args) == 0
    assert (out / "results.csv").read_text() == results


@pytest.mark.parametrize("bad", ["unknown_key=1", "embedding_size=8", "seed=3", "model=bpr", "epochs=many"])
def test_bad_set_exits_2_and_writes_nothing(tmp_path, tiny, bad, capsys):
    # embedding_size is a key of bpr but not of pop: --set applies to every model, so it is refused.
    out = tmp_path / "bench"
    assert run_bench(out, "--models", "bpr,pop", "--seeds", "2", *tiny, "--set", bad) == 2
    assert not out.exists()
    assert "fitmm: error:" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--models", "bpr,nope"], ["--models", "bpr,bpr"], ["--seeds", "0"],
                                  ["--seed-list", "1,x"], ["--seeds", "2", "--seed-list", "1,2"]])
def test_bad_arguments_exit_2(tmp_path, tiny, args):
    out = tmp_path / "bench"
    assert run_bench(out, *args, *tiny) == 2
    assert not out.exists()


# -- the pieces -------------------------------------------------------------------------------


def fake_train(valid_of, test_of):
    """A stand-in for train(): valid/test recall@20 as functions of the config; per-user arrays to match."""
    def train(config, dataset, run_dir, resume=False):
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        valid, test = valid_of(config), test_of(config)
        metrics = lambda v: {"recall@10": v / 2, "recall@20": v, "ndcg@10": v / 4, "ndcg@20": v / 3}  # noqa: E731
        users = np.arange(50)
        values = np.clip(test + 0.01 * np.sin(users * (1 + config["seed"])), 0, 1)
        np.savez(run_dir / "per_user.npz", **{"test/user": users, "test/recall@20": values})
        summary = {"model": config["model"], "seed": config["seed"], "selection": config["selection"],
                   "valid": metrics(valid), "test": metrics(test)}
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return summary
    return train


def test_selection_uses_validation_never_test(tmp_path, monkeypatch):
    # Validation prefers reg_weight=0.01; test would prefer 1.0. The bench must keep 0.01.
    monkeypatch.setattr(model_class("bpr"), "search_space", {"reg_weight": [1.0, 0.01, 0.1]})
    valid = {1.0: 0.1, 0.01: 0.3, 0.1: 0.2}
    test = {1.0: 0.9, 0.01: 0.2, 0.1: 0.5}
    monkeypatch.setattr(bench, "train", fake_train(lambda c: valid.get(c.get("reg_weight"), 0.4),
                                                   lambda c: test.get(c.get("reg_weight"), 0.4)))
    shared = {"synthetic_users": 200, "synthetic_items": 120, "progress": False}
    result = bench.run_bench(tmp_path / "b", ["pop", "bpr"], [7, 8, 9], shared, grid=True, log=lambda message: None)
    pop, bpr = result["rows"]
    assert bpr["config"] == "reg_weight=0.01" and bpr["seeds"] == [7, 8, 9]
    assert bpr["mean"]["recall@20"] == pytest.approx(0.2) and pop["config"] == "defaults"
    assert sorted(p.name.split("-")[1] for p in (tmp_path / "b" / "runs" / "bpr").iterdir()) == ["s7", "s7", "s7", "s8", "s9"]


def test_grid_points_is_the_cartesian_product_without_pinned_keys():
    space = {"a": [1, 2], "b": ["x", "y", "z"], "c": [0.5]}
    points = bench.grid_points(space)
    assert len(points) == 6 and points[0] == {"a": 1, "b": "x", "c": 0.5} and points[-1] == {"a": 2, "b": "z", "c": 0.5}
    assert bench.grid_points(space, pinned={"b": "y"}) == [{"a": 1, "c": 0.5}, {"a": 2, "c": 0.5}]
    assert bench.grid_points({}) == [{}]


def test_grid_max_samples_the_same_points_every_time_and_keeps_the_defaults():
    space = model_class("smore").search_space
    full = bench.grid_points(space)
    assert len(full) == 128
    plans = bench.plan_bench(["smore", "bm3"], [1], {}, "synthetic", grid=True, grid_max=10)
    smore, bm3 = plans
    assert len(smore.points) == 10 and smore.grid_size == 128
    defaults = model_class("smore").defaults
    assert {k: defaults[k] for k in space} in smore.points  # the defaults' point is always searched
    assert [full.index(p) for p in smore.points] == sorted(full.index(p) for p in smore.points)  # grid order
    again = bench.plan_bench(["smore"], [1], {}, "synthetic", grid=True, grid_max=10)[0]
    assert again.points == smore.points  # same sample on a re-run, so the bench resumes
    assert len(bm3.points) == bm3.grid_size == 8  # a grid within the limit is searched in full
    assert bench.sample_points(full, 3, {}, "smore") != bench.sample_points(full, 3, {}, "other")


def test_grid_max_is_reported_and_checked(tmp_path, tiny, monkeypatch, capsys):
    monkeypatch.setattr(model_class("bpr"), "search_space", {"reg_weight": [1e-4, 1e-3, 1e-2], "lr": [1e-3, 1e-2]})
    out = tmp_path / "b"
    assert run_bench(out, "--models", "pop,bpr", "--seeds", "1", "--grid", "--grid-max", "2", *tiny) == 0
    assert len(list((out / "runs" / "bpr").iterdir())) == 2
    assert "Random search: 2 of the grid's 6 points" in (out / "selection.md").read_text()
    capsys.readouterr()
    assert run_bench(tmp_path / "c", "--models", "pop", "--grid-max", "2", *tiny) == 2
    assert "--grid-max limits the grid search: give it together with --grid" in capsys.readouterr().err
    assert run_bench(tmp_path / "c", "--models", "pop", "--grid", "--grid-max", "0", *tiny) == 2
    assert "--grid-max: must be >= 1, got 0" in capsys.readouterr().err


def test_cell_names_are_stable_and_ignore_cosmetic_keys(tmp_path):
    def name(shared, point, seed=1):
        config = bench.model_config("bpr", shared, point, seed, "synthetic")
        return bench.cell_dir(tmp_path, "bpr", bench.cell_overrides(config, shared, point), seed).name

    assert name({"epochs": 5}, {"lr": 0.01}) == name({"epochs": 5}, {"lr": "1e-2"})
    assert name({"epochs": 5}, {}) == name({"epochs": 5, "progress": False}, {})
    assert name({"epochs": 5}, {}) != name({"epochs": 6}, {})
    assert name({}, {"lr": 0.01}) != name({}, {"lr": 0.02})
    assert name({}, {}, seed=2).endswith("-s2") and name({}, {}, seed=2)[:-3] == name({}, {})[:-3]
    # A grid point at the defaults is the defaults' cell (runs shared by benches with and without --grid).
    lr = model_class("bpr").defaults.get("lr", bench.BASE_DEFAULTS["lr"])
    assert name({}, {"lr": lr}) == name({}, {}) and name({}, {"lr": lr * 10}) != name({}, {})


def test_select_best_and_wilcoxon_edge_cases():
    assert bench.select_best([0.1, 0.3, 0.3, float("nan")]) == 1  # ties: the first
    assert bench.select_best([float("nan"), 0.2]) == 1
    x = np.array([0.1, 0.4, 0.2, 0.9, 0.5, 0.3])
    assert bench.wilcoxon_p(x, x.copy()) is None  # every difference zero: undefined
    assert bench.wilcoxon_p(x[:0], x[:0]) is None
    y = x + np.array([0.05, -0.01, 0.2, 0.3, 0.02, 0.15])
    assert bench.wilcoxon_p(x, y) == pytest.approx(scipy.stats.wilcoxon(x, y).pvalue)
    a = (np.array([3, 1, 2]), np.array([0.3, 0.1, 0.2]))
    b = (np.array([2, 4, 3]), np.array([0.25, 0.4, 0.35]))
    pa, pb = bench.paired(a, b)
    assert pa.tolist() == [0.2, 0.3] and pb.tolist() == [0.25, 0.35]
    assert bench.parse_seeds(None, None) == [1, 2, 3, 4, 5] and bench.parse_seeds(None, "3,1") == [3, 1]
    assert math.isclose(bench.mean_std([1.0, 3.0])[1], math.sqrt(2)) and bench.mean_std([2.0])[1] is None


def test_a_cell_another_process_is_starting_is_not_deleted(tmp_path, tiny, capsys):
    # Two benches on one --out: the second must not remove the first's cell before its first checkpoint.
    out = tmp_path / "bench"
    args = ["--models", "bpr", "--seeds", "1", *tiny]
    assert run_bench(out, *args) == 0
    (cell,) = (out / "runs" / "bpr").iterdir()
    for name in ("summary.json", "last.pt", "best.pt", "per_user.npz"):
        (cell / name).unlink()
    before = sorted(p.name for p in cell.iterdir())
    lock = runio.lock_run_dir(cell)  # what a training process holds while it runs
    try:
        capsys.readouterr()
        assert run_bench(out, *args) == 2
        assert f"pid {os.getpid()}" in capsys.readouterr().err
        assert sorted(p.name for p in cell.iterdir()) == before
    finally:
        lock.release()
    assert run_bench(out, *args) == 0  # once it is free, the unfinished start is redone
    assert (cell / "summary.json").is_file()


def test_a_cell_made_before_a_default_changed_is_refused_not_reused(tmp_path, tiny, monkeypatch, capsys):
    # The defaults' cell is named by overrides relative to the defaults; when a default changes,
    # the old cell keeps its name but holds the old value's run (this happened to BPR's reg_weight).
    out = tmp_path / "bench"
    args = ["--models", "bpr", "--seeds", "1", *tiny]
    assert run_bench(out, *args) == 0
    (cell,) = (out / "runs" / "bpr").iterdir()
    summary = (cell / "summary.json").read_text()
    old = model_class("bpr").defaults["reg_weight"]
    monkeypatch.setitem(model_class("bpr").defaults, "reg_weight", old * 10)
    capsys.readouterr()
    assert run_bench(out, *args) == 2
    err = capsys.readouterr().err
    assert str(cell) in err and f"reg_weight: {old!r} there, {old * 10!r} now" in err and "remove that folder" in err
    assert (cell / "summary.json").read_text() == summary  # nothing touched
    monkeypatch.setitem(model_class("bpr").defaults, "reg_weight", old)
    assert run_bench(out, *args) == 0  # the same defaults: reused as before
