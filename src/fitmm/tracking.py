"""Experiment tracking in MLflow (`fitmm train --track mlflow`; extra 'track').

A tracker is a trainer callback (train.py's hook): the resolved config as params when the run
starts, every epoch's losses and validation metrics as metrics (step = epoch), the final valid
and test metrics and the run directory's files as artifacts when it finishes. Where: config key
`tracking_uri`, a folder for a local file store (default ./mlruns) or any MLflow server's URI.
`fitmm bench` (and searches) open one parent run with `parent_run` and nest each trained run in it.

MLflow metric names may not contain '@': recall@20 is logged as recall_at_20.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from .errors import InputError

EXPERIMENT = "fitmm"


def require_mlflow():
    """The mlflow module; InputError (exit 2) naming the extra to install when it is missing."""
    try:
        import mlflow
    except ImportError:
        raise InputError("--track mlflow needs MLflow, which is not installed; install the 'track' extra: "
                         "pip install 'fitmm[track]' (or pip install mlflow-skinny)") from None
    return mlflow


def _connect(uri: str):
    """mlflow, pointed at `uri` (a folder is a local file store) and the 'fitmm' experiment."""
    if "://" not in uri:
        # MLflow 3 keeps its folder store but refuses it unless asked: a local folder is what the
        # issue and most single-user setups want, and it needs no database.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = str(Path(uri).expanduser().resolve())
    mlflow = require_mlflow()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(EXPERIMENT)
    return mlflow


def metric_name(name: str) -> str:
    return name.replace("@", "_at_")


def flat_params(config: dict[str, Any]) -> dict[str, str]:
    """Config values as MLflow params (strings; containers as JSON)."""
    return {key: value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            for key, value in config.items()}


def epoch_metrics(record: dict[str, Any]) -> dict[str, float]:
    """A log.jsonl record as metrics: losses and seconds as they are, split metrics as split/metric."""
    out = {}
    for key, value in record.items():
        if key == "epoch":
            continue
        if isinstance(value, dict):
            out.update({f"{key}/{metric_name(m)}": float(v) for m, v in value.items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[metric_name(key)] = float(value)
    return out


class MlflowTracker:
    """Trainer callback logging one fitmm run as one MLflow run (nested in the active run when
    `nested`, as bench and search do)."""

    def __init__(self, config: dict[str, Any], run_dir: str | Path, resume: bool = False, nested: bool = False):
        self.mlflow = _connect(config["tracking_uri"])
        self.run_dir = Path(run_dir)
        name = self.run_dir.name + (" (resumed)" if resume else "")
        self.run = self.mlflow.start_run(run_name=name, nested=nested)
        self.mlflow.log_params(flat_params(config))
        self.mlflow.set_tags({"fitmm.run_dir": str(self.run_dir.resolve()), "fitmm.model": config["model"]})

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        self.mlflow.log_metrics(epoch_metrics(record), step=epoch, run_id=self.run.info.run_id)

    def on_finish(self, summary: dict[str, Any]) -> None:
        run_id = self.run.info.run_id
        final = {f"final/{split}/{metric_name(m)}": float(v) for split in ("valid", "test")
                 for m, v in (summary[split] or {}).items()}  # a search trial has no test
        final.update({"best_epoch": summary["best_epoch"], "world_size": summary.get("world_size", 1)})
        self.mlflow.log_metrics(final, run_id=run_id)
        for path in sorted(self.run_dir.iterdir()):
            if path.is_file() and not path.name.startswith("."):  # not the lock, nor temporary files
                self.mlflow.log_artifact(str(path), run_id=run_id)
        self.close("FINISHED")

    def close(self, status: str = "FAILED") -> None:
        """End the MLflow run (FAILED when training raised); a no-op once ended."""
        if self.run is not None:
            self.mlflow.end_run(status=status)  # ours is the active run: started here, ended only here
            self.run = None


@contextlib.contextmanager
def parent_run(uri: str, name: str, params: dict[str, Any] | None = None) -> Iterator[Any]:
    """One MLflow run that the runs started inside (MlflowTracker(nested=True)) hang under."""
    mlflow = _connect(uri)
    with mlflow.start_run(run_name=name) as run:
        if params:
            mlflow.log_params(flat_params(params))
        yield run


def nested_trackers(config: dict[str, Any], run_dir: Path, resume: bool) -> list[MlflowTracker]:
    """Trainer callbacks for a run trained inside a `parent_run` (bench, search)."""
    return [MlflowTracker(config, run_dir, resume=resume, nested=True)]
