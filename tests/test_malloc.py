"""fitmm.malloc: the training process re-executes itself with glibc's tcache off, once, as the same
process; a user's own tcache setting wins; foreign subprocesses get glibc's defaults back."""

import os
import subprocess
import sys

import pytest

from fitmm import malloc

pytestmark = pytest.mark.skipif(not malloc._glibc(), reason="glibc only: elsewhere these are no-ops")

# Prints before and after the restart: a re-executed script prints "before" twice, "after" once.
SCRIPT = """
import os, sys
print("before", os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
from fitmm.malloc import keep_freed_memory, restart_without_malloc_caches
restart_without_malloc_caches()
keep_freed_memory()
print("after", os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
"""


def run(env_tunables):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if env_tunables is not None:
        env["GLIBC_TUNABLES"] = env_tunables
    done = subprocess.run([sys.executable, "-c", SCRIPT, "x", "--y"], env=env, capture_output=True, text=True, check=True)
    return [line.split(" ", 2) for line in done.stdout.splitlines()]


def test_restarts_once_as_the_same_process_with_the_same_arguments():
    lines = run(None)
    assert [kind for kind, _, _ in lines] == ["before", "before", "after"]
    assert len({pid for _, pid, _ in lines}) == 1  # execv: same pid, so a caller waiting on it sees one process
    assert lines[0][2] == "None ['x', '--y']"
    assert lines[2][2] == f"{malloc.TCACHE_OFF} ['x', '--y']"


def test_keeps_other_tunables_and_a_users_own_tcache_setting():
    lines = run("glibc.malloc.arena_max=2")
    assert lines[-1][2] == f"glibc.malloc.arena_max=2:{malloc.TCACHE_OFF} ['x', '--y']"
    lines = run("glibc.malloc.tcache_count=3")  # the user's choice: no restart
    assert [kind for kind, _, _ in lines] == ["before", "after"]
    assert lines[-1][2] == "glibc.malloc.tcache_count=3 ['x', '--y']"


def test_environ_with_malloc_defaults_drops_only_the_tcache_setting(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", f"glibc.malloc.arena_max=2:{malloc.TCACHE_OFF}")
    assert malloc.environ_with_malloc_defaults()["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"
    monkeypatch.setenv("GLIBC_TUNABLES", malloc.TCACHE_OFF)
    assert "GLIBC_TUNABLES" not in malloc.environ_with_malloc_defaults()
    assert os.environ["GLIBC_TUNABLES"] == malloc.TCACHE_OFF  # a copy: this process is unchanged
