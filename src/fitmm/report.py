"""Tables over finished runs: one row per run, then mean ± std per group of runs that differ only in the seed."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import yaml

from .config import RESULT_NEUTRAL_KEYS
from .errors import InputError

# Runs differing only in these are pooled: the seed, and the keys that cannot change a run's numbers.
NOT_GROUPED = frozenset({"seed"} | RESULT_NEUTRAL_KEYS)


def read_summaries(run_dirs: list[str | Path]) -> list[dict]:
    """Each run's summary.json, with "run" (the folder) and "config" (its resolved config.yaml) added."""
    out = []
    for run in run_dirs:
        path = Path(run) / "summary.json"
        if not path.is_file():
            raise InputError(f"{run}: no summary.json (not a finished run of `fitmm train`)")
        config_path = Path(run) / "config.yaml"
        if not config_path.is_file():
            raise InputError(f"{run}: no config.yaml (not a run directory of `fitmm train`)")
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
            config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        except (ValueError, yaml.YAMLError):
            raise InputError(f"{run}: summary.json or config.yaml is not readable (a damaged run directory)") from None
        if not isinstance(summary, dict) or not isinstance(config, dict):
            raise InputError(f"{run}: summary.json or config.yaml is not a mapping (a damaged run directory)")
        summary["run"] = str(run)
        summary["config"] = config
        out.append(summary)
    return out


def group_runs(summaries: list[dict]) -> tuple[dict[str, list[dict]], list[str]]:
    """Runs grouped by their whole resolved config minus NOT_GROUPED ({group key: runs}, in order of
    first appearance), and the config keys whose values differ between groups."""
    groups: dict[str, list[dict]] = {}
    for s in summaries:
        key = json.dumps({k: v for k, v in s["config"].items() if k not in NOT_GROUPED}, sort_keys=True, default=str)
        groups.setdefault(key, []).append(s)
    configs = [runs[0]["config"] for runs in groups.values()]
    keys = sorted({k for c in configs for k in c} - set(NOT_GROUPED) - {"model"})
    # A key differs when the groups that have it disagree (a model's own key is absent from others).
    differing = [k for k in keys if len({json.dumps(c[k], sort_keys=True, default=str) for c in configs if k in c}) > 1]
    return groups, differing


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _setting(config: dict, differing: list[str]) -> str:
    parts = [f"{k}={json.dumps(config[k], default=str)}" for k in differing if k in config]
    return ", ".join(parts) if parts else "—"


def markdown_table(summaries: list[dict], metrics: list[str], split: str = "test") -> str:
    head = ["run", "model", "dataset", "seed", "best epoch", "epochs", "s/epoch"] + [f"{split} {m}" for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        cells = [s["run"], s["model"], s["dataset"], str(s["seed"]), str(s["best_epoch"]), str(s["epochs_run"]),
                 f"{s['seconds_per_epoch']:.1f}"] + [f"{s[split][m]:.4f}" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    groups, differing = group_runs(summaries)
    lines += ["", "Runs are pooled when their configs differ only in the seed; "
              + (f"keys that differ between groups: {', '.join(differing)}." if differing else "all groups share one config."),
              "", "| model | dataset | differing keys | seeds | " + " | ".join(f"{split} {m}" for m in metrics) + " |",
              "|" + "---|" * (4 + len(metrics))]
    for runs in groups.values():
        first = runs[0]
        cells = [first["model"], first["dataset"], _setting(first["config"], differing), str(len(runs))]
        cells += [_mean_std([r[split][m] for r in runs]) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
