"""Run directories: atomic writes (a reader never sees a half-written file), safe checkpoint
reads, and one exclusive owner per run directory."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
import yaml

from .errors import InputError

LOCK_NAME = ".lock"  # inside a run directory: holds the owning process's pid while it is locked
# atomic_write's temporary files: "." + the file's name + "." + mkstemp's 8 random characters.
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}$")


def _umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
            # mkstemp creates 0600; the file gets the permissions any file of the user gets.
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda h: h.write(text.encode()))


def write_yaml(path: Path, obj: Any) -> None:
    # Top-level keys sorted for people; nested mappings keep their order, because some carry
    # meaning (a `modalities` mapping's order is the dataset's modality order).
    if isinstance(obj, dict):
        obj = dict(sorted(obj.items()))
    text = yaml.safe_dump(obj, sort_keys=False)
    atomic_write(path, lambda h: h.write(text.encode()))


def save_torch(path: Path, obj: Any) -> None:
    atomic_write(path, lambda h: torch.save(obj, h))


def load_torch(path: Path, map_location=None) -> Any:
    """Read a file written by `save_torch`: tensors and plain containers only, never code.

    `weights_only=True` makes torch's unpickler refuse any object that is not a tensor, a number,
    a string or a list/tuple/dict of them, so a crafted checkpoint cannot run code when loaded."""
    return torch.load(path, map_location=map_location, weights_only=True)


def read_checkpoint(path: Path, keys: tuple[str, ...], map_location=None) -> dict:
    """A checkpoint written by `fitmm train` (a dict with `keys`), or InputError saying why not."""
    path = Path(path)
    fix = "pass a run directory written by `fitmm train`, or train the run again"
    try:
        obj = load_torch(path, map_location)
    except FileNotFoundError:
        raise InputError(f"{path}: not found; {fix}") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied; make it readable for this user") from None
    except Exception as exc:  # torch raises many types for a bad file: say what it is, not how torch failed
        refused = re.search(r"unsupported GLOBAL (\S+)", str(exc))
        if refused:
            why = (f"it asks to load {refused.group(1)}, which a checkpoint never holds; torch refused it "
                   f"(loading it could run code). Do not use run files from a source you do not trust")
        elif path.stat().st_size == 0:
            why = "the file is empty"
        else:
            why = "it is truncated, corrupt or not a checkpoint at all"
        raise InputError(f"{path}: not a checkpoint written by fitmm train: {why}; {fix}") from None
    missing = [key for key in keys if not isinstance(obj, dict) or key not in obj]
    if missing:
        raise InputError(f"{path}: not a checkpoint written by fitmm train (no '{missing[0]}' entry); {fix}")
    return obj


def append_jsonl(path: Path, obj: Any) -> None:
    """One line per record; a line is written in a single call so a crash leaves whole lines."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(obj) + "\n")


def remove_stale_temps(folder: Path) -> None:
    """Remove atomic_write's temporary files left in `folder` by a process killed mid-write.

    Only for a run directory whose lock this process holds: nobody else is writing there."""
    for entry in Path(folder).iterdir():
        if _TEMP_NAME.match(entry.name) and entry.is_file():
            entry.unlink(missing_ok=True)


class RunLock:
    """An exclusive flock on a run directory's lock file, held until `release()` (or exit).

    flock is tied to the open file, so the lock dies with the process, even a killed one: a
    lock file left behind by a crash never blocks the next run."""

    def __init__(self, run_dir: Path, fd: int):
        self.run_dir = Path(run_dir)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the file releases the flock
            self.fd = None


def _take_lock(folder: Path) -> RunLock | None:
    """Lock `folder` and write this pid into its lock file; None when another process holds it."""
    fd = os.open(Path(folder) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return RunLock(folder, fd)


def _is_locked(run_dir: Path) -> bool:
    """Whether a process holds `run_dir`'s lock; looks without creating or writing anything."""
    try:
        fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # refused while someone holds LOCK_EX
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _busy(run_dir: Path) -> InputError:
    try:
        pid = (Path(run_dir) / LOCK_NAME).read_text().strip() or "unknown"
    except OSError:
        pid = "unknown"
    return InputError(f"{run_dir}: in use by another fitmm process (pid {pid}); wait for it to finish, "
                      f"or stop it, then try again")


def check_not_busy(run_dir: Path) -> None:
    """InputError naming the holder's pid when another process holds `run_dir`'s lock."""
    if _is_locked(run_dir):
        raise _busy(run_dir)


def lock_run_dir(run_dir: Path) -> RunLock:
    """Take the exclusive lock of an existing run directory (resume, bench); InputError naming the holder's pid."""
    try:
        lock = _take_lock(run_dir)
    except OSError as exc:
        raise InputError(f"{run_dir}: cannot lock the run directory ({exc.strerror}); it must be a writable folder") from None
    if lock is None:
        raise _busy(run_dir)
    return lock


def check_new_run_dir(run_dir: Path) -> None:
    """Cheap checks of `--out` before any data is loaded: free, and creatable by this user."""
    run_dir = Path(run_dir)
    if run_dir.exists() or run_dir.is_symlink():
        if not run_dir.is_dir():
            raise InputError(f"{run_dir}: exists and is not a directory; choose a new --out")
        check_not_busy(run_dir)
        if any(run_dir.iterdir()):
            raise InputError(f"{run_dir}: already exists and is not empty; choose a new --out, "
                             f"or continue it with --resume {run_dir}")
    ancestor = run_dir.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"{run_dir}: cannot be created: {ancestor} is a file, not a directory; choose another --out")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"{run_dir}: cannot be created: {ancestor} is not writable for this user; choose another --out")


def create_run_dir(run_dir: Path) -> RunLock:
    """Create `run_dir` already locked by this process, atomically; InputError when it is taken.

    The folder is made under a temporary name with its lock file (this pid inside, locked), then
    renamed into place. The rename fails when `run_dir` exists and is not empty, so of two runs
    started on one --out exactly one gets it, and the other finds a locked lock file with the
    winner's pid in it (never an empty folder whose owner has not locked it yet). An existing
    EMPTY folder is replaced, as a user may create the folder first."""
    run_dir = Path(run_dir)
    check_new_run_dir(run_dir)
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.", dir=run_dir.parent))
    except OSError as exc:
        raise InputError(f"{run_dir}: cannot be created ({exc.strerror}); choose another --out") from None
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp creates 0700
    lock = _take_lock(staging)
    try:
        os.rename(staging, run_dir)
    except OSError as exc:
        lock.release()
        shutil.rmtree(staging, ignore_errors=True)
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and run_dir.is_dir():
            if _is_locked(run_dir):
                raise _busy(run_dir) from None
            raise InputError(f"{run_dir}: already exists and is not empty; choose a new --out, "
                             f"or continue it with --resume {run_dir}") from None
        raise InputError(f"{run_dir}: cannot be created ({exc.strerror}); choose another --out") from None
    lock.run_dir = run_dir
    return lock
