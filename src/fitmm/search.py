"""`fitmm search`: a hyper-parameter search of one model on validation, with Optuna (the `search` extra).

A study is a set of trials. Each trial samples a point of the model's search space (TPE,
seeded), trains it with `train()` into DIR/trials/NNNN (NNNN = the trial's number in the study)
and scores it by the best validation `valid_metric` (Recall@20 by default). Each validation is
reported to a median pruner, which stops a trial whose best value so far is below the median of
earlier trials at the same epoch (once PRUNE_STARTUP_TRIALS trials have finished, and not before
epoch PRUNE_WARMUP_EPOCHS). Trials never evaluate test (train(..., evaluate_test=False)):
selection is on validation only. A point of a finite space drawn again is not trained again (the
earlier trial's value stands). At the end the winner is trained once more, into DIR/best, from DIR/best.yaml,
with test evaluated once on its best validation checkpoint.

Search folder (the command can be re-run to continue it; one process at a time holds it):
    study.db      the Optuna study (embedded SQLite), unless --storage names another place
    trials/NNNN/  one `fitmm train` run directory per trial (no test metrics)
    best.yaml     the best trial's whole configuration: `fitmm train --config DIR/best.yaml`
    trials.md     every trial: state, validation metric, epochs, parameters; the importances
    importance.png  Optuna's parameter-importance plot (matplotlib) by PED-ANOVA, which needs no
                  scikit-learn (fANOVA and mean-decrease-impurity do)
    best/         the winner re-trained from best.yaml, test evaluated once (summary.json)

`--trials N` is the number of FINISHED (complete or pruned) trials the study should hold: a
search interrupted after 7 of 20 runs 13 more when the same command is run again, and several
machines running the same command against one --storage stop together at N (each machine checks
before it starts a trial, so two starting at the same instant may finish one more than N).
A trial that was running when the search was interrupted (Ctrl-C, a kill, a crash of the
machine) is marked failed, and its parameters are the first trial run when this folder's search
is resumed, as a new trial trained from scratch (its pruning reports start again with it).

The search space is the model's `search_space` (the same attribute `fitmm bench --grid` reads)
or a --space YAML file; each key is a config key and its value one of:
    [v1, v2, ...]                              a finite set (what a grid lists)
    {type: categorical, choices: [v1, v2]}     the same, spelled out
    {type: float, low: A, high: B, log: true}  a range of numbers (log: sampled on a log scale)
    {type: int, low: A, high: B, log: false}   a range of integers, both ends included
    {type: weights}                            for modality_weights: one weight in [0, 1] per
                                               modality of the data, normalised to sum 1
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from . import runio
from .config import (RESULT_NEUTRAL_KEYS, format_point, format_value, model_keys, read_config_file, resolve,
                     unknown_key_message)
from .data import load as load_dataset
from .errors import InputError, quote
from .models import model_class
from .train import check_run, train

DEFAULT_TRIALS = 20
DEFAULT_SEED = 1  # as `fitmm bench`, whose first seed runs the search
STUDY_FILE = "study.db"
PRUNE_STARTUP_TRIALS = 5  # finished trials before the median pruner prunes anything
PRUNE_WARMUP_EPOCHS = 10  # no trial is pruned before this epoch (models start slowly)
# Keys the search sets itself; --set and the space may not touch them.
RESERVED = {
    "model": "use --model",
    "data": "use --data",
    "seed": "use --seed",
    "selection": "search trials never evaluate test, so selection is always clean",
}
TYPES = ("float", "int", "categorical", "weights")
FIELDS = {"float": {"low", "high", "log"}, "int": {"low", "high", "log"}, "categorical": {"choices"}, "weights": set()}
FINISHED = ("COMPLETE", "PRUNED")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def require_optuna():
    """The optuna module, or an InputError saying how to install it (exit 2 at the CLI)."""
    try:
        import optuna
    except ImportError:
        raise InputError("fitmm search needs Optuna, which is not installed: pip install 'fitmm[search]' "
                         "(or pip install optuna)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what happens
    return optuna


# -- the search space ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One dimension of a search space: a config key and how its values are drawn."""

    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple = ()

    def describe(self) -> dict[str, Any]:
        """As the space file spells it (stored with the study, compared when it is resumed)."""
        if self.type == "categorical":
            return {"type": "categorical", "choices": list(self.choices)}
        if self.type == "weights":
            return {"type": "weights"}
        return {"type": self.type, "low": self.low, "high": self.high, "log": self.log}

    def candidates(self, modalities: list[str]) -> list[Any]:
        """Values that stand for the whole range in the checks made before anything runs."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "weights":
            return [{m: 1.0 / len(modalities) for m in modalities}]
        return [self.low, self.high]


def _scalar(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def parse_space(raw: Any, where: str) -> dict[str, Param]:
    """{key: Param} from a space mapping (a model's `search_space` or a --space file's content)."""
    if not isinstance(raw, dict):
        raise InputError(f"{where}: expected a mapping of config key: values or {{type: ...}}, got {quote(raw)}")
    space = {}
    for key, spec in raw.items():
        def bad(problem: str) -> InputError:
            return InputError(f"{where}: key '{key}': {problem}")

        if not isinstance(key, str):
            raise InputError(f"{where}: key {quote(key)} is not a config key name")
        if isinstance(spec, list):
            spec = {"type": "categorical", "choices": spec}
        elif isinstance(spec, dict):
            spec = dict(spec)  # never change the model's own attribute
        if not isinstance(spec, dict):
            raise bad(f"expected a list of values or a mapping {{type: float|int|categorical|weights, ...}}, "
                      f"got {quote(spec)}")
        kind = spec.get("type")
        if kind not in TYPES:
            raise bad(f"'type' must be one of {', '.join(TYPES)}, got {quote(kind)}")
        unknown = sorted(set(spec) - FIELDS[kind] - {"type"})
        if unknown:
            raise bad(f"a {kind} entry takes {', '.join(sorted(FIELDS[kind])) or 'no other field'}; "
                      f"'{unknown[0]}' is not one of them")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise bad("'choices' must be a non-empty list, e.g. choices: [2, 3, 4]")
            if not all(_scalar(c) for c in choices):
                raise bad(f"choices must be numbers, strings, true/false or null, got {quote(choices)}")
            space[key] = Param(key, kind, choices=tuple(choices))
        elif kind == "weights":
            space[key] = Param(key, kind)
        else:
            number = int if kind == "int" else (int, float)
            for end in ("low", "high"):
                value = spec.get(end)
                if kind == "float" and isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
                    try:
                        value = spec[end] = float(value)
                    except ValueError:
                        pass
                if not isinstance(value, number) or isinstance(value, bool) or not math.isfinite(value):
                    raise bad(f"'{end}' must be {'an integer' if kind == 'int' else 'a number'}, got {quote(value)}")
            log = spec.get("log", False)
            if not isinstance(log, bool):
                raise bad(f"'log' must be true or false, got {quote(log)}")
            if not spec["low"] < spec["high"]:
                raise bad(f"'low' ({spec['low']}) must be below 'high' ({spec['high']})")
            if log and spec["low"] <= 0:
                raise bad(f"a log scale needs low > 0, got {spec['low']}")
            space[key] = Param(key, kind, spec["low"], spec["high"], log)
    return space


def read_space_file(path: str | Path) -> dict[str, Param]:
    """A --space YAML file (read as a config file is: missing, binary or bad YAML are InputErrors)."""
    try:
        raw = read_config_file(path)
    except InputError as exc:
        raise InputError(str(exc).replace("config file", "search space file").replace("--config", "--space")) from None
    if not raw:
        raise InputError(f"search space file {path}: empty; give at least one key, e.g. lr: {{type: float, low: 1e-4, "
                         f"high: 1e-2, log: true}}")
    return parse_space(raw, f"search space file {path}")


def sample(trial, space: dict[str, Param], modalities: list[str]) -> dict[str, Any]:
    """One point of the space: {config key: value}, drawn by the study's sampler."""
    point: dict[str, Any] = {}
    for key, p in space.items():
        if p.type == "float":
            point[key] = trial.suggest_float(key, p.low, p.high, log=p.log)
        elif p.type == "int":
            point[key] = trial.suggest_int(key, p.low, p.high, log=p.log)
        elif p.type == "categorical":
            point[key] = trial.suggest_categorical(key, list(p.choices))
        else:
            point[key] = normalise_weights({m: trial.suggest_float(f"{key}.{m}", 0.0, 1.0) for m in modalities})
    return point


def normalise_weights(raw: dict[str, float]) -> dict[str, float]:
    total = sum(raw.values())
    if total <= 0:  # every weight drawn as 0: no preference
        return {m: 1.0 / len(raw) for m in raw}
    return {m: w / total for m, w in raw.items()}


def point_of(params: dict[str, Any], space: dict[str, Param]) -> dict[str, Any]:
    """A trial's Optuna parameters as config values (the 'key.modality' weights joined and normalised)."""
    point = {}
    for key, p in space.items():
        if p.type == "weights":
            point[key] = normalise_weights({name.partition(".")[2]: v for name, v in params.items()
                                            if name.startswith(key + ".")})
        elif key in params:
            point[key] = params[key]
    return point


# -- the plan: everything checked before anything is written ----------------------------------


@dataclass
class Search:
    model: str
    data: str
    seed: int
    fixed: dict[str, Any]
    space: dict[str, Param]
    pinned: list[str] = field(default_factory=list)  # space keys fixed by --set instead
    where: str = "search space"  # where the space comes from, for messages

    def layers(self, point: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        return [
            ("--set", self.fixed),
            (f"search space of '{self.model}'", point),
            ("fitmm search", {"model": self.model, "data": self.data, "seed": self.seed, "selection": "clean"}),
        ]

    def config(self, point: dict[str, Any]) -> dict[str, Any]:
        return resolve(self.layers(point))

    def definition(self, dataset) -> dict[str, Any]:
        """What makes two runs the same search (compared when a study is continued)."""
        return {
            "model": self.model,
            "data_fingerprint": dataset.fingerprint,
            "seed": self.seed,
            "set": {k: v for k, v in sorted(self.fixed.items()) if k not in RESULT_NEUTRAL_KEYS},
            "space": {k: p.describe() for k, p in self.space.items()},
        }


def plan_search(model: str, data: str, seed: int, fixed: dict[str, Any], space: dict[str, Param] | None = None,
                where: str = "search space") -> Search:
    """The search of `model` (its own search_space unless `space`, read from `where`, is given);
    InputError for bad keys."""
    model_class(model)  # an unknown model: InputError with a suggestion
    for key in fixed:
        if key in RESERVED:
            raise InputError(f"--set {key}=...: fitmm search sets '{key}' itself; {RESERVED[key]}")
    if space is None:
        space = parse_space(dict(model_class(model).search_space), f"search_space of model '{model}'")
    defaults, _, _ = model_keys(model)
    for key, p in space.items():
        if key in RESERVED:
            raise InputError(f"{where}: '{key}' cannot be searched; {RESERVED[key]}")
        if key not in defaults:
            raise InputError(unknown_key_message(key, where, model, defaults))
        if p.type == "weights" and not isinstance(defaults[key], dict):
            raise InputError(f"{where}: key '{key}': type weights is for modality_weights; '{key}' is not "
                             f"a modality -> weight mapping")
    pinned = [k for k in space if k in fixed]
    kept = {k: p for k, p in space.items() if k not in fixed}
    return Search(model, data, seed, dict(fixed), kept, pinned, where)


def check_search(search: Search, dataset) -> None:
    """Every value a trial can draw fits the config and the data: each choice and each range end
    (one key at a time, the others at their defaults) is resolved and checked as a run would be."""
    check_run(search.config({}), dataset)
    for key, p in search.space.items():
        if p.type == "weights" and not dataset.modalities:
            raise InputError(f"{search.where}: key '{key}': {dataset.source} has no content features to weigh; "
                             f"leave '{key}' out of the space")
        for value in p.candidates(dataset.modalities):
            try:
                check_run(search.config({key: value}), dataset)
            except InputError as exc:
                raise InputError(f"{search.where} of '{search.model}', key '{key}' = {quote(value)}: {exc}") from None


# -- storage and the study ----------------------------------------------------------------------


def open_storage(optuna, url: str):
    """An Optuna RDB storage; SQLite waits up to a minute for a lock (several processes on one file)."""
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except ImportError as exc:
        raise InputError(f"--storage {url}: its database driver is not installed ({exc}); e.g. pip install "
                         f"psycopg2-binary for postgresql://") from None
    except Exception as exc:  # sqlalchemy's URL, connection and schema errors
        raise InputError(f"--storage {url}: cannot open it ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                         f"give an SQLAlchemy URL such as sqlite:////abs/path/study.db or "
                         f"postgresql://user:password@host/db") from None


def check_definition(study, definition: dict[str, Any]) -> None:
    saved = study.user_attrs.get("fitmm")
    if saved is None:
        study.set_user_attr("fitmm", definition)
        return
    differ = [key for key in definition if saved.get(key) != definition[key]]
    if differ:
        key = differ[0]
        raise InputError(
            f"study '{study.study_name}' was made by another search: its {key} is {quote(saved.get(key), 200)}, "
            f"this one's is {quote(definition[key], 200)}; continue it with the same settings, or start a new "
            f"search (another --out, or --study NAME with --storage)"
        )


def _attrs(trial) -> dict[str, Any]:
    return trial.user_attrs


def recover_interrupted(study, storage, owner: str, is_shared: bool, log) -> int:
    """Mark this folder's trials still RUNNING as failed (their process is gone: this one holds the
    folder's lock), and queue the parameters of every interrupted trial of this folder that has not
    been re-run yet. Returns the number queued. In the folder's own study.db every trial is this
    folder's, whatever owner it recorded: the folder may have been copied to another machine or
    path since (a search carried on elsewhere), which changes `owner` but not whose trials they are."""
    from optuna.trial import TrialState

    def mine(t) -> bool:
        return not is_shared or _attrs(t).get("owner") == owner

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if mine(t):
            storage.set_trial_user_attr(t._trial_id, "interrupted", True)
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    retried = {_attrs(t).get("retry_of") for t in trials}
    queued = 0
    for t in trials:
        if t.state == TrialState.FAIL and _attrs(t).get("interrupted") and mine(t) and t.number not in retried:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
            queued += 1
            log(f"  trial {t.number} was interrupted: its parameters run again first")
    return queued


class Pruning:
    """A train() callback: reports each validation to the trial and stops it when the pruner says so."""

    def __init__(self, optuna, trial, metric: str):
        self.optuna, self.trial, self.metric = optuna, trial, metric

    def on_evaluation(self, epoch: int, results: dict[str, dict[str, float]]) -> None:
        self.trial.report(results["valid"][self.metric], epoch)
        if self.trial.should_prune():
            self.trial.set_user_attr("pruned_at", epoch)
            raise self.optuna.TrialPruned(f"pruned at epoch {epoch}")


def counts(study) -> tuple[int, int]:
    """(finished trials, trials running now) of the study."""
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    return sum(s in FINISHED for s in states), states.count("RUNNING")


def run_search(
    search: Search,
    dataset,
    out: str | Path,
    trials: int = DEFAULT_TRIALS,
    storage: str | None = None,
    study_name: str | None = None,
    log: Callable[[str], None] = _log,
    rerun_best: bool = True,
    callbacks: Callable | None = None,
) -> dict[str, Any]:
    """Run (or continue) a search into `out`; returns {"best": the best trial's number, "value", "point",
    "config", "trials": rows of trials.md, "summary": the winner's re-run summary (or None)}.
    `callbacks(config, run_dir, resume)`: more trainer callbacks for each trial (MLflow tracking)."""
    optuna = require_optuna()
    if trials < 0:
        raise InputError(f"--trials: must be >= 0, got {trials}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder; choose another --out")
    check_search(search, dataset)
    shared = open_storage(optuna, storage) if storage else None  # a bad URL: refused before --out is made
    out.mkdir(parents=True, exist_ok=True)
    lock = runio.lock_run_dir(out)
    try:
        if shared is None:
            shared = open_storage(optuna, f"sqlite:///{(out / STUDY_FILE).resolve()}")
        return _run_search(optuna, search, dataset, out, trials, shared, bool(storage), study_name, log, rerun_best,
                           callbacks)
    finally:
        lock.release()


def _run_search(optuna, search, dataset, out, trials, storage, is_shared, study_name, log, rerun_best, callbacks):
    name = study_name or f"{search.model}-{dataset.name}"
    study = optuna.create_study(
        storage=storage, study_name=name, direction="maximize", load_if_exists=True,
        pruner=optuna.pruners.MedianPruner(n_startup_trials=PRUNE_STARTUP_TRIALS, n_warmup_steps=PRUNE_WARMUP_EPOCHS),
    )
    check_definition(study, search.definition(dataset))
    owner = f"{socket.gethostname()}:{out.resolve()}"
    recover_interrupted(study, storage, owner, is_shared, log)
    # Seeded by the trials already there: an uninterrupted search draws the same points every
    # time, and a resumed one does not repeat the draws it made before. Workers sharing a
    # --storage add their pid, or two started together would draw the same points.
    worker = os.getpid() if is_shared else 0
    study.sampler = optuna.samplers.TPESampler(seed=(search.seed + len(study.trials) + worker) % 2**32)
    metric = search.config({})["valid_metric"]
    if search.pinned:
        log(f"  pinned by --set, not searched: {', '.join(search.pinned)}")

    def objective(trial):
        trial.set_user_attr("owner", owner)  # first: a kill from here on is found by recover_interrupted
        point = sample(trial, search.space, dataset.modalities)
        run_dir = out / "trials" / f"{trial.number:04d}"
        trial.set_user_attr("run", str(run_dir))
        same = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if t.params == trial.params]
        if same:  # a finite space drawn twice: the earlier result stands, nothing is trained
            trial.set_user_attr("same_as", same[0].number)
            log(f"  trial {trial.number}: same parameters as trial {same[0].number}; not trained again")
            return same[0].value
        log(f"  trial {trial.number} ({format_point(point)}): {run_dir}")
        if run_dir.exists():  # a leftover of a study whose storage was reset
            shutil.rmtree(run_dir)
        config = search.config(point)
        trackers = callbacks(config, run_dir, False) if callbacks else []
        try:
            summary = train(config, dataset, run_dir, callbacks=[Pruning(optuna, trial, metric), *trackers],
                            evaluate_test=False)
        except BaseException as exc:
            for tracker in trackers:  # a pruned trial is KILLED in MLflow, anything else FAILED
                tracker.close("KILLED" if isinstance(exc, optuna.TrialPruned) else "FAILED")
            if isinstance(exc, KeyboardInterrupt):
                trial.set_user_attr("interrupted", True)
            if isinstance(exc, FloatingPointError):  # diverged (lr too high): a poor point, not a broken search
                trial.set_user_attr("diverged", str(exc))
                raise optuna.TrialPruned(str(exc)) from None
            raise
        trial.set_user_attr("epochs", summary["epochs_run"])
        trial.set_user_attr("best_epoch", summary["best_epoch"])
        return summary["valid"][metric]

    while True:
        finished, running = counts(study)
        if finished + running >= trials:
            break
        log(f"[{finished + 1}/{trials}] {search.model}")
        study.optimize(objective, n_trials=1)
    return finish_search(optuna, study, search, dataset, out, metric, log, rerun_best)


# -- the results ----------------------------------------------------------------------------------


def trial_rows(study, search: Search) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = _attrs(t)
        notes = []
        if "retry_of" in a:
            notes.append(f"re-run of {a['retry_of']}")
        if "same_as" in a:
            notes.append(f"same as {a['same_as']}")
        if "pruned_at" in a:
            notes.append(f"pruned at epoch {a['pruned_at']}")
        if "diverged" in a:
            notes.append("diverged")
        if a.get("interrupted"):
            notes.append("interrupted")
        rows.append({"number": t.number, "state": t.state.name.lower(), "value": t.value,
                     "point": point_of(t.params, search.space),
                     "epochs": a.get("epochs", a.get("pruned_at")),  # a pruned trial ran until it was pruned
                     "run": a.get("run"), "same_as": a.get("same_as"), "notes": "; ".join(notes)})
    return rows


def trials_markdown(rows, best: int, metric: str, search: Search, importances: dict[str, float] | None) -> str:
    keys = list(search.space)
    head = ["trial", "state", f"valid {metric}", "epochs", *keys, "notes"]
    lines = [
        f"# fitmm search: {search.model}",
        "",
        f"- data: {search.data}",
        f"- selection: best validation {metric} of each trial (its best epoch); test is never evaluated for a "
        f"trial. TPE sampler (seed {search.seed}), median pruning once {PRUNE_STARTUP_TRIALS} trials have "
        f"finished, from epoch {PRUNE_WARMUP_EPOCHS}",
        f"- fixed with --set: {format_point(search.fixed) if search.fixed else 'none'}",
        f"- best: trial {best} (✓), written to best.yaml",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        value = "" if r["value"] is None else f"{r['value']:.4f}" + (" ✓" if r["number"] == best else "")
        cells = [str(r["number"]), r["state"], value, "" if r["epochs"] is None else str(r["epochs"])]
        cells += [format_value(r["point"][k]) if k in r["point"] else "" for k in keys]
        lines.append("| " + " | ".join(cells + [r["notes"]]) + " |")
    if importances:
        complete = sum(r["state"] == "complete" for r in rows)
        lines += ["", "## Parameter importance (Optuna's PED-ANOVA, over the complete trials)", ""]
        if complete < 20:  # PED-ANOVA contrasts the top 10% of trials with all of them
            lines += [f"Only {complete} complete trials: the top 10% that PED-ANOVA contrasts with the rest is "
                      f"{max(1, complete // 10)} trial(s), so these values say little yet.", ""]
        lines += ["| parameter | importance |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in importances.items()]
    return "\n".join(lines) + "\n"


def importance(optuna, study, path: Path, log) -> dict[str, float] | None:
    """Parameter importances, plotted to `path`; None (and a line saying why) when they cannot be had."""
    from .plots import _pyplot, save_figure

    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(complete) < 2:
        log(f"  importance.png skipped: importances need at least 2 complete trials, the study has {len(complete)}")
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the plot function is marked experimental
            # Named, not left to Optuna's default: PED-ANOVA needs no scikit-learn (fANOVA does).
            evaluator = optuna.importance.PedAnovaImportanceEvaluator()
            values = optuna.importance.get_param_importances(study, evaluator=evaluator)
            plt = _pyplot()
            if plt is None:
                log("  importance.png skipped: matplotlib is not installed (pip install fitmm[plots])")
                return values
            from optuna.visualization.matplotlib import plot_param_importances

            axes = plot_param_importances(study, evaluator=evaluator)
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # e.g. no parameter varies yet
        log(f"  importance.png skipped: {exc}")
        return None
    save_figure(axes.figure, path)
    return values


def _write_text(path: Path, text: str) -> None:
    runio.atomic_write(path, lambda h: h.write(text.encode("utf-8")))


def finish_search(optuna, study, search, dataset, out: Path, metric: str, log, rerun_best: bool) -> dict[str, Any]:
    try:
        best = study.best_trial
    except ValueError:
        raise InputError(f"{out}: no trial of study '{study.study_name}' has completed, so there is no best "
                         f"configuration; run with --trials N (N >= 1)") from None
    if "same_as" in best.user_attrs:  # a repeat of a finite space's point: the trial that trained it
        best = study.trials[best.user_attrs["same_as"]]
    point = point_of(best.params, search.space)
    config = search.config(point)
    header = (f"# fitmm search: trial {best.number} of study '{study.study_name}', valid {metric} {best.value:.4f}\n"
              f"# train it: fitmm train --config best.yaml --out RUN_DIR\n")
    _write_text(out / "best.yaml", header + yaml.safe_dump(config, sort_keys=False))
    rows = trial_rows(study, search)
    values = importance(optuna, study, out / "importance.png", log)
    _write_text(out / "trials.md", trials_markdown(rows, best.number, metric, search, values))
    log(f"  best: trial {best.number} ({format_point(point)}), valid {metric} {best.value:.4f}; "
        f"wrote {out}/best.yaml and trials.md")
    summary = rerun(config, dataset, out / "best", log) if rerun_best else None
    return {"best": best.number, "value": best.value, "point": point, "config": config, "trials": rows,
            "summary": summary, "study": study.study_name}


def rerun(config: dict[str, Any], dataset, run_dir: Path, log) -> dict[str, Any]:
    """The winner trained again from its configuration, test evaluated once at the end: kept when
    it is already there with the same configuration, resumed when it was interrupted."""
    import json

    def numbers(c):  # threads, progress...: a re-run with other values is the same run
        return {k: v for k, v in c.items() if k not in RESULT_NEUTRAL_KEYS}

    same = (run_dir / "config.yaml").is_file() and numbers(read_config_file(run_dir / "config.yaml")) == numbers(config)
    if same and (run_dir / "summary.json").is_file():
        return json.loads((run_dir / "summary.json").read_text())
    resume = same and (run_dir / "last.pt").is_file()
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)
    log(f"  the winner trained again with test evaluated once: {run_dir}")
    summary = train(config, dataset, run_dir, resume=resume)
    log(f"  winner: valid {config['valid_metric']} {summary['valid'][config['valid_metric']]:.4f}, "
        f"test {config['valid_metric']} {summary['test'][config['valid_metric']]:.4f}")
    return summary


def search_command(model: str, data: str, out: str, trials: int, seed: int, fixed: dict[str, Any],
                   space_file: str | None = None, storage: str | None = None, study: str | None = None,
                   track: bool = False) -> dict[str, Any]:
    """`fitmm search`: every check first, then the search; `track`: one MLflow run for the search
    with each trial nested in it."""
    require_optuna()
    space = read_space_file(space_file) if space_file else None
    if data != "synthetic":
        data = str(Path(data).expanduser().resolve())  # stored absolute, like `fitmm train`
    where = f"search space file {space_file}" if space_file else "search space"
    search = plan_search(model, data, seed, fixed, space, where)
    if not search.space:
        why = "every key of its search space is fixed with --set" if search.pinned else "an empty search space"
        raise InputError(f"model '{model}' has nothing to search ({why}); give a --space file")
    dataset = load_dataset(search.config({}))
    if not track:
        return run_search(search, dataset, out, trials, storage, study)
    from . import tracking

    tracking.require_mlflow()
    uri = search.config({})["tracking_uri"]
    with tracking.parent_run(uri, f"search {Path(out).name}", {"model": model, "data": data, "trials": trials,
                                                               "seed": seed, **fixed}):
        return run_search(search, dataset, out, trials, storage, study, callbacks=tracking.nested_trackers)


__all__ = ["Param", "Search", "parse_space", "plan_search", "read_space_file", "run_search", "search_command"]
