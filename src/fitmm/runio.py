"""Atomic writes for run directories: a reader never sees a half-written file."""

from __future__ import annotations

import json
import contextlib
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
import yaml


@contextlib.contextmanager
def _ctrl_c_after_block():
    """Hold a Ctrl-C (SIGINT) that arrives inside the block and raise it once the block is done.

    Why: torch.save interrupted mid-write raises a RuntimeError from its zip writer's cleanup in
    place of the KeyboardInterrupt, so the CLI reported an internal error instead of "interrupted,
    resume with ...". Only the main thread can own signal handlers; elsewhere nothing is held."""
    in_main = threading.current_thread() is threading.main_thread()
    if not in_main or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    held = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if held:
        raise KeyboardInterrupt


def atomic_write(path: Path, write) -> None:
    """Write `path` through a temporary file and a rename; a Ctrl-C during the write waits for it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with _ctrl_c_after_block():
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


def load_torch(path: Path, map_location=None) -> Any:
    """Read a file written by `save_torch`: tensors and plain containers only, never code.

    `weights_only=True` makes torch's unpickler refuse any object that is not a tensor, a number,
    a string or a list/tuple/dict of them, so a crafted checkpoint cannot run code when loaded."""
    return torch.load(path, map_location=map_location, weights_only=True)


def append_jsonl(path: Path, obj: Any) -> None:
    """One line per record; a line is written in a single call so a crash leaves whole lines."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(obj) + "\n")
