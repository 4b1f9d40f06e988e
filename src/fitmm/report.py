"""Tables over finished runs: one row per run, then mean ± std per (model, dataset, selection)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .errors import InputError


def read_summaries(run_dirs: list[str | Path]) -> list[dict]:
    out = []
    for run in run_dirs:
        path = Path(run) / "summary.json"
        if not path.is_file():
            raise InputError(f"{run}: no summary.json (not a finished run of `fitmm train`)")
        summary = json.loads(path.read_text())
        summary["run"] = str(run)
        out.append(summary)
    return out


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def markdown_table(summaries: list[dict], metrics: list[str], split: str = "test") -> str:
    head = ["run", "model", "dataset", "seed", "best epoch", "epochs", "s/epoch"] + [f"{split} {m}" for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        cells = [s["run"], s["model"], s["dataset"], str(s["seed"]), str(s["best_epoch"]), str(s["epochs_run"]),
                 f"{s['seconds_per_epoch']:.1f}"] + [f"{s[split][m]:.4f}" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    groups: dict[tuple, list[dict]] = {}
    for s in summaries:
        groups.setdefault((s["model"], s["dataset"], s.get("selection", "")), []).append(s)
    lines += ["", "| model | dataset | selection | seeds | " + " | ".join(f"{split} {m}" for m in metrics) + " |",
              "|" + "---|" * (4 + len(metrics))]
    for (model, dataset, selection), runs in groups.items():
        cells = [model, dataset, selection, str(len(runs))] + [_mean_std([r[split][m] for r in runs]) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
