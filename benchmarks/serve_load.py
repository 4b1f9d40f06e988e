"""Load test of `fitmm serve`: N concurrent clients x M GET /recommend requests each.

Starts `fitmm serve RUN_DIR` on a free local port (or uses --url of a running server), waits for
/health, sends a few warm-up requests, then runs the clients (threads, one keep-alive HTTP
connection each, users drawn with a fixed seed) and prints requests/s, p50/p99 latency and the
error count (any non-200 answer or failed request). Not a test: the figures depend on the machine.

    python benchmarks/serve_load.py runs/cold_start/run --clients 2 --requests 1000
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run_dir: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fitmm", "serve", run_dir, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"fitmm serve exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("fitmm serve did not answer /health within 300 s")


def client(url: str, users: np.ndarray, k: int, latencies: list, errors: list) -> None:
    with httpx.Client(base_url=url, timeout=30) as http:
        for user in users:
            start = time.perf_counter()
            try:
                ok = http.get("/recommend", params={"user": int(user), "k": k}).status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - start)
            if not ok:
                errors.append(int(user))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", help="run directory to serve (omit with --url)")
    parser.add_argument("--url", help="an already running server instead of starting one")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--requests", type=int, default=1000, help="requests per client")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (args.run_dir or args.url):
        parser.error("give a RUN_DIR or --url")

    proc, url = (None, args.url) if args.url else start_server(args.run_dir)
    try:
        health = httpx.get(f"{url}/health").json()
        rng = np.random.default_rng(args.seed)
        client(url, rng.integers(0, health["users"], 20), args.k, [], [])  # warm-up, not counted
        plans = [rng.integers(0, health["users"], args.requests) for _ in range(args.clients)]
        latencies: list[list[float]] = [[] for _ in plans]
        errors: list[int] = []
        threads = [threading.Thread(target=client, args=(url, users, args.k, lat, errors))
                   for users, lat in zip(plans, latencies)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)

    ms = np.array([x for lat in latencies for x in lat]) * 1000
    total = len(ms)
    print(f"{health['model']} with {health['users']} users x {health['items']} items, GET /recommend k={args.k}\n")
    print("| clients x requests | requests/s | p50 ms | p99 ms | max ms | errors |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.clients} x {args.requests} | {total / seconds:.0f} | {np.percentile(ms, 50):.1f} | "
          f"{np.percentile(ms, 99):.1f} | {ms.max():.1f} | {len(errors)} |")


if __name__ == "__main__":
    main()
