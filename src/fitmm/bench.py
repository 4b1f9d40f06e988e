"""`fitmm bench`: several models, several seeds, one table with mean ± std and paired significance.

For each model, in the order given:
  * without --grid its defaults are used; with --grid every combination of its `search_space`
    (keys pinned by --set excepted) is trained with the FIRST seed, and the combination with the
    best VALIDATION metric (config key `valid_metric`) is kept. Test metrics play no part in it.
    --grid-max N turns a bigger grid into a random search over N of its points (see sample_points).
    A space with ranges (FITMM's) has no grid: --grid runs that model's defaults and says so.
  * with --search N, `fitmm search` (search.py: Optuna, N finished trials, the first seed) explores
    the model's `search_space` instead, in search/<model>/, and its best trial's configuration is
    kept; the trials never evaluate test, so the kept configuration is trained with EVERY seed.
  * the kept configuration is then trained with every seed. Runs use selection=clean: test is
    evaluated once per run, on the best validation checkpoint.

Bench folder (every file written atomically; the command can be re-run to continue it):
    search/<model>/               with --search: that model's `fitmm search` folder (study.db, trials/,
                                  trials.md, best.yaml, importance.png)
    runs/<model>/<hash>-s<seed>/  one `fitmm train` run directory per (model, configuration, seed);
                                  <hash> is a short stable hash of overrides.json inside it (the data,
                                  the --set values and the grid point: what differs from the defaults)
    selection.md                  every configuration tried and its validation metric
    results.md, results.csv       mean ± std of test Recall/NDCG@10/20 per model, and the p-value of a
                                  paired Wilcoxon signed-rank test of the first model against each other
    bench.png                     mean test Recall@20 and NDCG@20 per model, std error bars (matplotlib)

A cell whose summary.json exists is not run again; one with last.pt but no summary.json is resumed;
one with neither is removed and started again, unless another process holds it (then exit 2, naming its pid).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import random
import shutil
import statistics
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import runio
from . import search as hpsearch
from .cli import run_config
from .config import BASE_DEFAULTS, RESULT_NEUTRAL_KEYS, format_point, format_value, resolve
from .data import load as load_dataset
from .errors import InputError
from .models import model_class
from .train import check_run, train

DEFAULT_MODELS = ["fitmm", "freedom", "smore", "lgmrec", "bm3", "vbpr", "lightgcn", "bpr", "pop"]
DEFAULT_SEEDS = 5
METRICS = ["recall@10", "recall@20", "ndcg@10", "ndcg@20"]
METRIC_LABELS = {"recall@10": "Recall@10", "recall@20": "Recall@20", "ndcg@10": "NDCG@10", "ndcg@20": "NDCG@20"}
SIGNIFICANCE_METRIC = "recall@20"
# Keys bench sets itself; --set may not touch them.
RESERVED = {
    "model": "use --models",
    "seed": "use --seeds N or --seed-list 1,2,3",
    "data": "use --data",
    "selection": "bench always uses selection=clean (test evaluated once per run)",
}
NONE = "–"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- parsing the command line -----------------------------------------------------------------


def parse_models(text: str | None) -> list[str]:
    if text is None:
        return list(DEFAULT_MODELS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise InputError("--models: expected comma-separated model names, e.g. --models fitmm,lightgcn,pop")
    for name in names:
        model_class(name)  # unknown names raise InputError with a suggestion
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"--models: '{duplicates[0]}' is listed twice; list each model once")
    return names


def parse_seeds(count: int | None, seed_list: str | None) -> list[int]:
    """--seeds N -> [1..N] (default 5); --seed-list '1,2,3' -> [1, 2, 3]. The first seed runs the grid."""
    if seed_list is not None:
        if count is not None:
            raise InputError("give either --seeds N or --seed-list, not both")
        try:
            seeds = [int(s) for s in seed_list.split(",") if s.strip()]
        except ValueError:
            raise InputError(f"--seed-list {seed_list!r}: expected comma-separated integers, e.g. 1,2,3") from None
        if not seeds:
            raise InputError("--seed-list: expected at least one seed, e.g. --seed-list 1,2,3")
        if len(set(seeds)) != len(seeds):
            raise InputError(f"--seed-list {seed_list!r}: a seed is listed twice")
        return seeds
    count = DEFAULT_SEEDS if count is None else count
    if count < 1:
        raise InputError(f"--seeds: must be >= 1, got {count}")
    return list(range(1, count + 1))


# -- configurations and cells -----------------------------------------------------------------


def grid_points(search_space: dict[str, list], pinned=()) -> list[dict[str, Any]]:
    """Every combination of `search_space` (cartesian product, in its key order); keys in `pinned`
    (fixed by --set) are left out. An empty space gives one point: the defaults ({})."""
    space = {k: list(v) for k, v in search_space.items() if k not in pinned}
    keys = list(space)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(space[k] for k in keys))]


def sample_points(points: list[dict[str, Any]], limit: int, defaults: dict[str, Any], model: str) -> list[dict[str, Any]]:
    """At most `limit` of a model's grid points (random search, for grids too big to train in full:
    SMORE's has 128): the point equal to the model's defaults when the grid holds it, plus a random
    sample of the others. The draw is seeded with the model's name, so re-running a bench picks the
    same points and resumes; the points keep their grid order."""
    if limit < 1:
        raise InputError(f"--grid-max: must be >= 1, got {limit}")
    if len(points) <= limit:
        return points
    default = [i for i, p in enumerate(points) if all(defaults.get(k) == v for k, v in p.items())][:1]
    others = [i for i in range(len(points)) if i not in default]
    keep = default + random.Random(f"fitmm bench grid {model}").sample(others, limit - len(default))
    return [points[i] for i in sorted(keep)]


def _model_defaults(name: str) -> dict:
    return model_class(name).defaults


def _defaults(name: str) -> dict:
    """Every key's default for this model (the base keys included)."""
    return {**BASE_DEFAULTS, **_model_defaults(name)}


def model_config(model: str, shared: dict[str, Any], point: dict[str, Any], seed: int, data: str) -> dict[str, Any]:
    """The resolved config of one cell: defaults < model defaults < --set < grid point < bench's own keys."""
    layers = [
        ("--set", shared),
        (f"grid of '{model}'", point),
        ("fitmm bench", {"model": model, "data": data, "seed": seed, "selection": "clean"}),
    ]
    try:
        return resolve(layers)
    except InputError as exc:
        raise InputError(f"model '{model}': {exc}") from None


def cell_overrides(config: dict[str, Any], shared: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """What names a configuration (the seed aside): model, data, the --set values and the grid point,
    as resolved (so lr=1e-3 and lr=0.001 are the same). A grid point's keys at their default value
    are left out, so the grid point equal to the defaults IS the defaults' cell: a bench run without
    --grid and one with it share those runs instead of training them twice."""
    defaults = _defaults(config["model"])
    return {
        "model": config["model"],
        "data": config["data"],
        "set": {k: config[k] for k in sorted(shared) if k not in RESULT_NEUTRAL_KEYS},
        "grid": {k: config[k] for k in point if config[k] != defaults[k]},
    }


HASH_DIGITS = 10  # a configuration's name in run folders and results.csv: this many hex digits of its sha256


def config_hash(overrides: dict[str, Any]) -> str:
    text = json.dumps(overrides, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_DIGITS]


def cell_dir(out: str | Path, model: str, overrides: dict[str, Any], seed: int) -> Path:
    return hashed_cell_dir(out, model, config_hash(overrides), seed)


def hashed_cell_dir(out: str | Path, model: str, hashed: str, seed: int) -> Path:
    """The run folder of a cell named by its configuration's hash (as results.csv lists it)."""
    return Path(out) / "runs" / model / f"{hashed}-s{seed}"


@dataclass
class Cell:
    model: str
    point: dict[str, Any]
    seed: int
    config: dict[str, Any]
    overrides: dict[str, Any]
    run_dir: Path


@dataclass
class ModelPlan:
    model: str
    points: list[dict[str, Any]]
    configs: list[dict[str, Any]]  # one per point, with the first seed
    grid_size: int = 1  # points in the model's whole grid (more than len(points) with --grid-max)
    tried: list[dict] = field(default_factory=list)  # per point: {"point", "hash", "valid", "run"}
    selected: int = 0
    search: Any = None  # with --search: the model's search.Search (None: nothing to search)
    note: str = ""  # why the model ran its defaults although a search was asked for


def make_cell(out: Path, plan: ModelPlan, index: int, seed: int, shared: dict[str, Any]) -> Cell:
    config = {**plan.configs[index], "seed": seed}
    overrides = cell_overrides(config, shared, plan.points[index])
    return Cell(plan.model, plan.points[index], seed, config, overrides, cell_dir(out, plan.model, overrides, seed))


def check_same_config(run_dir: Path, config: dict[str, Any]) -> None:
    """InputError unless the run in `run_dir` was made with `config` (result-neutral keys aside). A
    cell is named by its overrides relative to the model's defaults, so when a default changes, an
    older cell of the defaults' point holds a run of the OLD value under the same name: reusing it
    would put another configuration's numbers in the table."""
    saved = run_config(run_dir)
    differ = sorted(k for k in set(saved) | set(config)
                    if k not in RESULT_NEUTRAL_KEYS and saved.get(k) != config.get(k))
    if differ:
        what = ", ".join(f"{k}: {saved.get(k)!r} there, {config.get(k)!r} now" for k in differ)
        raise InputError(f"{run_dir}: holds a run of another configuration ({what}: another --out's folder, or a "
                         f"model default changed since it ran); remove that folder to train it again")


def run_cell(cell: Cell, dataset, log: Callable[[str], None] = _log, callbacks: Callable | None = None) -> dict[str, Any]:
    """The cell's summary: read when the run finished earlier, otherwise trained (or resumed).
    `callbacks(config, run_dir, resume)`: the trainer callbacks of a run it trains (tracking)."""
    run_dir = cell.run_dir
    summary_path = run_dir / "summary.json"
    if summary_path.is_file() or (run_dir / "last.pt").is_file():
        check_same_config(run_dir, cell.config)
    if summary_path.is_file():
        log("  finished earlier; not run again")
        return json.loads(summary_path.read_text())
    resume = (run_dir / "last.pt").is_file()
    if resume:
        log("  resuming from last.pt")
    elif run_dir.exists():
        # A start without a checkpoint may be another bench's on the same --out, still in its
        # first epoch: never delete a cell someone holds.
        runio.check_not_busy(run_dir)
        log("  removing an unfinished start (no last.pt) and starting again")
        shutil.rmtree(run_dir)
    runio.write_json(run_dir / "overrides.json", cell.overrides)
    if callbacks is None:
        return train(cell.config, dataset, run_dir, resume=resume)
    trackers = callbacks(cell.config, run_dir, resume)
    try:
        return train(cell.config, dataset, run_dir, resume=resume, callbacks=trackers)
    except BaseException:
        for tracker in trackers:  # a cell that failed (or was interrupted) is marked so in MLflow
            tracker.close("FAILED")
        raise


def select_best(scores: list[float]) -> int:
    """Index of the best validation score; ties go to the first (grid order). NaN never wins."""
    best, best_score = 0, -math.inf
    for i, score in enumerate(scores):
        if score is not None and not math.isnan(score) and score > best_score:
            best, best_score = i, score
    return best


# -- aggregation and significance -------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def per_user_mean(run_dirs: list[Path], metric: str = SIGNIFICANCE_METRIC, split: str = "test"):
    """(user ids, per-user `metric` averaged over the runs) over the users every run evaluated."""
    loaded = []
    for run in run_dirs:
        with np.load(Path(run) / "per_user.npz") as arrays:
            loaded.append((arrays[f"{split}/user"], arrays[f"{split}/{metric}"]))
    users = loaded[0][0]
    for u, _ in loaded[1:]:
        users = np.intersect1d(users, u)
    users = np.unique(users)
    total = np.zeros(len(users), dtype=np.float64)
    for u, v in loaded:
        order = np.argsort(u, kind="stable")
        total += np.asarray(v, dtype=np.float64)[order][np.searchsorted(u[order], users)]
    return users, total / len(loaded)


def paired(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The values of the users both (users, values) pairs have, in the same user order."""
    _, ia, ib = np.intersect1d(a[0], b[0], assume_unique=True, return_indices=True)
    return a[1][ia], b[1][ib]


def wilcoxon_p(x: np.ndarray, y: np.ndarray) -> float | None:
    """Two-sided paired Wilcoxon signed-rank p-value (scipy's defaults); None when undefined
    (no pairs, or every difference zero)."""
    from scipy.stats import wilcoxon

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) == 0 or not np.any(x != y):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            p = float(wilcoxon(x, y).pvalue)
        except ValueError:
            return None
    return p if math.isfinite(p) else None


def aggregate(plans: list[ModelPlan], runs: dict[str, list[tuple[int, Path, dict]]], seeds: list[int]) -> list[dict]:
    """One row per model: selected config, seeds, mean/std of METRICS, p-value against the first model."""
    rows = []
    for plan in plans:
        model_runs = runs[plan.model]
        row = {
            "model": plan.model,
            "config": format_point(plan.points[plan.selected]),
            "hash": plan.tried[plan.selected]["hash"],
            "seeds": [seed for seed, _, _ in model_runs],
            "runs": [str(run) for _, run, _ in model_runs],
            "mean": {},
            "std": {},
            "p": None,
            "n_users": 0,
        }
        for metric in METRICS:
            row["mean"][metric], row["std"][metric] = mean_std([s["test"][metric] for _, _, s in model_runs])
        rows.append(row)
    first = per_user_mean([Path(r) for r in rows[0]["runs"]])
    for row in rows[1:]:
        x, y = paired(first, per_user_mean([Path(r) for r in row["runs"]]))
        row["p"], row["n_users"] = wilcoxon_p(x, y), len(x)
    return rows


# -- writing ----------------------------------------------------------------------------------


def _cell(mean: float, std: float | None) -> str:
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _p(p: float | None) -> str:
    return NONE if p is None else f"{p:.3g}"


def results_markdown(rows: list[dict], data: str, shared: dict[str, Any], grid: bool, valid_metric: str,
                     search: int | None = None) -> str:
    first = rows[0]["model"]
    if search is not None:
        chosen = (f"Optuna search of {search} trials on validation {valid_metric} with seed {rows[0]['seeds'][0]} "
                  f"(selection.md, search/<model>/trials.md)")
    elif grid:
        chosen = f"grid search on validation {valid_metric} with seed {rows[0]['seeds'][0]} (selection.md)"
    else:
        chosen = "model defaults"
    settings = ", ".join(f"{k}={format_value(v)}" for k, v in shared.items()) or "none"
    head = ["model", "config", "seeds"] + [METRIC_LABELS[m] for m in METRICS] + [f"p vs {first}"]
    lines = [
        "# fitmm bench",
        "",
        f"- data: {data}",
        f"- configurations: {chosen}; test evaluated once per run (selection=clean)",
        f"- --set for every model: {settings}",
        "- metrics: test, mean ± sample std over seeds",
        f"- p: two-sided paired Wilcoxon signed-rank test of {first} against the model on per-user test "
        f"{METRIC_LABELS[SIGNIFICANCE_METRIC]} (users paired by id, each user's value averaged over seeds); "
        f"{NONE} when not applicable or undefined (e.g. every difference zero)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in rows:
        cells = [row["model"], row["config"], ", ".join(map(str, row["seeds"]))]
        cells += [_cell(row["mean"][m], row["std"][m]) for m in METRICS] + [_p(row["p"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def results_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    p_column = f"p_wilcoxon_{SIGNIFICANCE_METRIC}"
    writer.writerow(["model", "config", "config_hash", "n_seeds", "seeds"]
                    + [f"{m}_{stat}" for m in METRICS for stat in ("mean", "std")] + [p_column, "n_users_paired"])
    for row in rows:
        values = [row["model"], row["config"], row["hash"], len(row["seeds"]), " ".join(map(str, row["seeds"]))]
        for m in METRICS:
            values += [repr(row["mean"][m]), "" if row["std"][m] is None else repr(row["std"][m])]
        values += ["" if row["p"] is None else repr(row["p"]), "" if row is rows[0] else row["n_users"]]
        writer.writerow(values)
    return buffer.getvalue()


def selection_markdown(plans: list[ModelPlan], valid_metric: str, first_seed: int, grid: bool = True,
                       search: int | None = None) -> str:
    if search is not None:
        how = (f"Each model with a search space was tuned by `fitmm search` in search/<model>/ ({search} finished "
               f"trials, TPE sampler and median pruning, seed {first_seed}) on validation {valid_metric}; the "
               "trials never evaluate test. The completed trials are listed; search/<model>/trials.md has "
               "every trial (pruned ones too) and the parameter importances. Keys fixed with --set are not searched.")
    elif grid:
        how = (f"Each configuration was trained with seed {first_seed}; the one with the best validation "
               f"{valid_metric} was kept (ties: the first). Test metrics play no part in the choice. "
               "Keys fixed with --set are not searched.")
    else:
        how = f"No grid search (--grid not given): each model ran its defaults; validation {valid_metric} with seed {first_seed}."
    lines = ["# Configuration selection", "", how]
    for plan in plans:
        lines += ["", f"## {plan.model}", ""]
        if plan.note:
            lines += [plan.note, ""]
        if len(plan.points) < plan.grid_size:
            lines += [f"Random search: {len(plan.points)} of the grid's {plan.grid_size} points (--grid-max; the "
                      "defaults' point included when the grid holds it, the rest drawn with a fixed seed).", ""]
        lines += [f"| configuration | run | valid {valid_metric} | selected |", "|---|---|---|---|"]
        for i, tried in enumerate(plan.tried):
            mark = "✓" if i == plan.selected else ""
            lines.append(f"| {format_point(tried['point'])} | {tried['run']} | {tried['valid']:.4f} | {mark} |")
    return "\n".join(lines) + "\n"


def plot_bench(rows: list[dict], path: Path, dataset: str) -> bool:
    """Grouped bars of mean test Recall@20 and NDCG@20 per model with std error bars, titled with
    the dataset's name; returns False when matplotlib is missing."""
    from .plots import _pyplot, save_figure

    plt = _pyplot()
    if plt is None:
        return False
    x = np.arange(len(rows))
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(rows) + 2.0), 3.8))
    for j, metric in enumerate(["recall@20", "ndcg@20"]):
        means = [row["mean"][metric] for row in rows]
        stds = [row["std"][metric] or 0.0 for row in rows]
        ax.bar(x + (j - 0.5) * width, means, width, yerr=stds, capsize=3, label=METRIC_LABELS[metric])
    labels = [row["model"] for row in rows]
    # slanted when a label is wider than its bar pair (e.g. the reproduction's "FITMM released")
    slant = {"rotation": 20, "ha": "right"} if max(map(len, labels), default=0) > 10 else {}
    ax.set_xticks(x, labels, **slant)
    ax.set_ylabel("test (mean ± std over seeds)")
    ax.set_title(f"{dataset}: test Recall@20 and NDCG@20")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)
    return True


def _write_text(path: Path, text: str) -> None:
    runio.atomic_write(path, lambda h: h.write(text.encode("utf-8")))


# -- the command ------------------------------------------------------------------------------


def search_model(out: Path, plan: ModelPlan, dataset, seeds: list[int], shared: dict[str, Any], trials: int,
                 run: Callable[[Cell, str], dict], log: Callable[[str], None],
                 callbacks: Callable | None = None) -> list[tuple[int, Path, dict]]:
    """--search: `fitmm search` picks the model's configuration on validation (its trials never see
    test), then that configuration is trained with every seed, test evaluated once per run."""
    folder = out / "search" / plan.model
    log(f"{plan.model}: search of {trials} trials in {folder.relative_to(out)}")
    result = hpsearch.run_search(plan.search, dataset, folder, trials, log=log, rerun_best=False, callbacks=callbacks)
    complete = [r for r in result["trials"] if r["state"] == "complete" and r["same_as"] is None]
    plan.points = [r["point"] for r in complete]
    plan.configs = [model_config(plan.model, shared, point, seeds[0], plan.configs[0]["data"]) for point in plan.points]
    plan.selected = [r["number"] for r in complete].index(result["best"])
    cells = [make_cell(out, plan, plan.selected, seed, shared) for seed in seeds]
    plan.tried = [{"point": r["point"], "valid": r["value"], "run": f"search/{plan.model}/trials/{r['number']:04d}",
                   "hash": config_hash(cells[0].overrides) if r["number"] == result["best"] else ""}
                  for r in complete]
    log(f"  {plan.model}: selected trial {result['best']} ({format_point(result['point'])}, "
        f"valid {result['value']:.4f})")
    return [(cell.seed, cell.run_dir, run(cell, "")) for cell in cells]


def ranges(search_space: dict[str, Any], pinned=()) -> list[str]:
    """The keys of a search space given as ranges (not lists), which a grid cannot enumerate."""
    return [k for k, v in search_space.items() if k not in pinned and not isinstance(v, list)]


def plan_bench(
    models: list[str], seeds: list[int], shared: dict[str, Any], data: str, grid: bool, grid_max: int | None = None,
    search: int | None = None,
) -> list[ModelPlan]:
    """Resolve every configuration that will run; raises InputError before anything is written."""
    for key in shared:
        if key in RESERVED:
            raise InputError(f"--set {key}=...: fitmm bench sets '{key}' itself; {RESERVED[key]}")
    if grid_max is not None and not grid:
        raise InputError("--grid-max limits the grid search: give it together with --grid")
    if search is not None:
        if grid:
            raise InputError("give either --grid or --search N, not both")
        if search < 1:
            raise InputError(f"--search: the number of trials must be >= 1, got {search}")
        hpsearch.require_optuna()
    plans = []
    for model in models:
        space = model_class(model).search_space
        note = ""
        if grid and ranges(space, pinned=shared):
            full = [{}]
            note = (f"Its search space has ranges ({', '.join(ranges(space, pinned=shared))}), which a grid cannot "
                    f"list: --grid ran its defaults; `--search N` explores them.")
        else:
            full = grid_points(space, pinned=shared) if grid else [{}]
        points = full if grid_max is None else sample_points(full, grid_max, _defaults(model), model)
        configs = [model_config(model, shared, point, seeds[0], data) for point in points]
        plan = ModelPlan(model, points, configs, grid_size=len(full), note=note)
        if search is not None:
            plan.search = hpsearch.plan_search(model, data, seeds[0], shared)
            if not plan.search.space:
                plan.search = None
                plan.note = "Nothing to search (an empty search space, or every key fixed with --set): its defaults ran."
        plans.append(plan)
    missing = [m for m in METRICS if int(m.split("@")[1]) not in plans[0].configs[0]["topk"]]
    if missing:
        raise InputError(f"config key 'topk': fitmm bench reports {', '.join(METRICS)}; topk must include 10 and 20")
    return plans


def run_bench(
    out: str | Path,
    models: list[str],
    seeds: list[int],
    shared: dict[str, Any] | None = None,
    data: str = "synthetic",
    grid: bool = False,
    log: Callable[[str], None] = _log,
    grid_max: int | None = None,
    search: int | None = None,
    callbacks: Callable | None = None,
) -> dict[str, Any]:
    """Run (or continue) a bench in `out`; returns {"rows": per-model results, "table": results.md}.
    `callbacks`: see run_cell."""
    out = Path(out)
    shared = dict(shared or {})
    if not models:
        raise InputError("--models: expected at least one model")
    if not seeds:
        raise InputError("expected at least one seed")
    if data != "synthetic":
        data = str(Path(data).expanduser().resolve())  # stored absolute, like `fitmm train`
    plans = plan_bench(models, seeds, shared, data, grid, grid_max, search)
    dataset = load_dataset(plans[0].configs[0])  # data keys are shared: one dataset for every model
    for plan in plans:
        for config in plan.configs:
            check_run(config, dataset)
        if plan.search is not None:
            hpsearch.check_search(plan.search, dataset)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder; choose another --out")
    valid_metric = plans[0].configs[0]["valid_metric"]

    total = sum(len(seeds) if plan.search else len(plan.points) + len(seeds) - 1 for plan in plans)
    done = 0

    def run(cell: Cell, what: str) -> dict[str, Any]:
        nonlocal done
        done += 1
        log(f"[{done}/{total}] {cell.model} ({format_point(cell.point)}) seed {cell.seed}{what}: "
            f"{cell.run_dir.relative_to(out)}")
        return run_cell(cell, dataset, log, callbacks)

    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[tuple[int, Path, dict]]] = {}
    for plan in plans:
        if plan.search is not None:
            runs[plan.model] = search_model(out, plan, dataset, seeds, shared, search, run, log, callbacks)
            _write_text(out / "selection.md", selection_markdown([p for p in plans if p.tried], valid_metric, seeds[0],
                                                                 grid, search))
            continue
        searching = len(plan.points) > 1
        first: dict[int, tuple[Cell, dict]] = {}
        for i in range(len(plan.points)):
            cell = make_cell(out, plan, i, seeds[0], shared)
            first[i] = (cell, run(cell, f", grid {i + 1}/{len(plan.points)}" if searching else ""))
        plan.tried = [
            {"point": plan.points[i], "hash": config_hash(cell.overrides), "valid": summary["valid"][valid_metric],
             "run": str(cell.run_dir.relative_to(out))}
            for i, (cell, summary) in first.items()
        ]
        plan.selected = select_best([t["valid"] for t in plan.tried])
        if searching:
            log(f"  {plan.model}: selected {format_point(plan.points[plan.selected])} "
                f"(valid {valid_metric} {plan.tried[plan.selected]['valid']:.4f})")
        _write_text(out / "selection.md", selection_markdown([p for p in plans if p.tried], valid_metric, seeds[0],
                                                             grid, search))
        cell, summary = first[plan.selected]
        runs[plan.model] = [(seeds[0], cell.run_dir, summary)]
        for seed in seeds[1:]:
            cell = make_cell(out, plan, plan.selected, seed, shared)
            runs[plan.model].append((seed, cell.run_dir, run(cell, "")))

    rows = aggregate(plans, runs, seeds)
    table = results_markdown(rows, data, shared, grid, valid_metric, search)
    _write_text(out / "results.md", table)
    _write_text(out / "results.csv", results_csv(rows))
    if plot_bench(rows, out / "bench.png", dataset.name):
        log(f"wrote {out}/results.md, results.csv, selection.md and bench.png")
    else:
        log(f"wrote {out}/results.md, results.csv and selection.md; bench.png skipped: matplotlib is not "
            f"installed (pip install fitmm[plots])")
    return {"rows": rows, "table": table}


__all__ = [
    "DEFAULT_MODELS", "HASH_DIGITS", "METRICS", "aggregate", "cell_dir", "cell_overrides", "config_hash", "grid_points",
    "hashed_cell_dir", "model_config", "parse_models", "parse_seeds", "paired", "per_user_mean", "plan_bench",
    "run_bench", "run_cell", "select_best", "wilcoxon_p",
]
