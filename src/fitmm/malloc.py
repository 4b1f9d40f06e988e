"""glibc malloc settings for training processes: keep freed blocks for reuse, without fragmenting.

A training step allocates and frees the same large tensors every time. Two process-wide settings,
both no-ops where the C library is not glibc, and both for whole processes only (the command
line and the benchmarks that measure it call them; a library user's process is left alone):

- `keep_freed_memory()`: glibc keeps freed large blocks in its heap and reuses them, instead of
  returning each to the OS and page-faulting it in again on the next step.
- `restart_without_malloc_caches()`: re-executes the process with glibc's per-thread cache
  (tcache) off, which only an environment variable read at start-up can do. Kept freed blocks
  are only reusable if they merge: a small freed block parked in the cache counts as in use, so
  it splits the large free block around it, and over an epoch those splinters pushed FITMM's
  Baby heap up by ~300 MB (docs/performance.md, "Memory III").
"""

from __future__ import annotations

import ctypes
import os
import sys

# glibc's per-thread cache of freed small blocks, off: see the module docstring.
TCACHE_OFF = "glibc.malloc.tcache_count=0"


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # no such confstr name: not glibc
        return False


def keep_freed_memory() -> None:
    """Let glibc's malloc keep and reuse freed large blocks instead of returning each to the OS.

    By default glibc serves blocks of 32 MB or more (with a trainable 4096-d feature table
    several are ~100 MB) with fresh mmaps, so every step page-faults them in again: 0.17-0.3 s
    of system time per Baby-scale FITMM step, ~0.06-0.09 s of its wall time. Fastbins off: like
    the tcache (module docstring), a freed small block parked there splits the free space
    around it until the next consolidation; off, it merges at once (with the tcache off too,
    ~40 MB less peak RSS on Baby, no measurable time cost).
    """
    if not _glibc():
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: serve blocks below 1 GiB from the heap
        libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD: keep up to 2 GiB of freed heap for reuse
        libc.mallopt(1, 0)         # M_MXFAST: no fastbins
    except (OSError, AttributeError):
        pass


def restart_without_malloc_caches() -> None:
    """Re-execute this process (same interpreter, arguments, pid and open files) with glibc's
    tcache off, unless it is off already or GLIBC_TUNABLES sets it otherwise (the user's choice
    wins); returns only when no restart is needed or possible. Call it early, before anything
    is written or started: the process is replaced."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.tcache_count" in tunables or not _glibc() or not getattr(sys, "orig_argv", None):
        return
    os.environ["GLIBC_TUNABLES"] = f"{tunables}:{TCACHE_OFF}" if tunables else TCACHE_OFF
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, sys.orig_argv)
    except OSError:  # cannot re-execute (odd launcher): carry on with the cache on
        if tunables:
            os.environ["GLIBC_TUNABLES"] = tunables
        else:
            del os.environ["GLIBC_TUNABLES"]


def environ_with_malloc_defaults() -> dict[str, str]:
    """os.environ without the tunable set by restart_without_malloc_caches: for a subprocess that
    must run as it would on its own (a foreign program measured like for like)."""
    env = dict(os.environ)
    parts = [p for p in env.get("GLIBC_TUNABLES", "").split(":") if p and p != TCACHE_OFF]
    if parts:
        env["GLIBC_TUNABLES"] = ":".join(parts)
    else:
        env.pop("GLIBC_TUNABLES", None)
    return env
