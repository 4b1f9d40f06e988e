"""Atomic writes for run directories: a reader never sees a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml


def atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda h: h.write(text.encode()))


def write_yaml(path: Path, obj: Any) -> None:
    text = yaml.safe_dump(obj, sort_keys=True)
    atomic_write(path, lambda h: h.write(text.encode()))


def save_torch(path: Path, obj: Any) -> None:
    atomic_write(path, lambda h: torch.save(obj, h))


def append_jsonl(path: Path, obj: Any) -> None:
    """One line per record; a line is written in a single call so a crash leaves whole lines."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(obj) + "\n")
