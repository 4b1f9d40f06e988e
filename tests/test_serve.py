"""`fitmm serve` over real HTTP: a uvicorn server on 127.0.0.1 (a free port), every endpoint,
and the bad requests (unknown id, k out of range, wrong types, oversize body) answered 4xx with
a message."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

import fitmm  # noqa: E402
from fitmm.serve import MAX_BODY_BYTES, create_app  # noqa: E402
from tiny_runs import dataset_with_raw_ids, train_tiny  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc=None, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited early:\n{proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not come up")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return train_tiny(dataset_with_raw_ids(root / "ds"), root / "fitmm")


@pytest.fixture(scope="module")
def server(run):
    """`fitmm serve RUN_DIR --port P` in a subprocess; stopped with Ctrl-C (SIGINT) at the end."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fitmm", "serve", str(run), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0, proc.stdout.read()


@pytest.fixture(scope="module")
def rec(run):
    return fitmm.load(run)


def test_health_and_docs(server, rec):
    r = httpx.get(f"{server}/health")
    assert r.json() == {"status": "ok", "model": "fitmm", "users": 300, "items": 200, "raw_ids": False}
    assert httpx.get(f"{server}/docs").status_code == 200
    paths = httpx.get(f"{server}/openapi.json").json()["paths"]
    assert {"/health", "/recommend", "/similar", "/explain", "/score"} <= set(paths)


def test_recommend_similar_explain_score_answer_as_the_api(server, rec):
    r = httpx.get(f"{server}/recommend", params={"user": 7, "k": 5})
    assert r.status_code == 200
    assert r.json() == {"user": 7, "items": [{"item": i, "score": s} for i, s in rec.recommend(7, k=5)]}
    r = httpx.get(f"{server}/recommend", params={"user": 7, "k": 5, "exclude_seen": "false"})
    assert [x["item"] for x in r.json()["items"]] == [i for i, _ in rec.recommend(7, k=5, exclude_seen=False)]
    r = httpx.get(f"{server}/similar", params={"item": 3, "k": 4})
    assert r.json() == {"item": 3, "items": [{"item": i, "score": s} for i, s in rec.similar_items(3, k=4)]}
    r = httpx.get(f"{server}/explain", params={"user": 7, "item": 3})
    e = r.json()
    assert e == {"user": 7, "item": 3, **rec.explain(7, 3)}
    assert sum(e["bands"].values()) == pytest.approx(e["score"], rel=1e-9)
    r = httpx.post(f"{server}/score", json={"users": [7, 8, 9], "items": [3, 3, 0]})
    assert r.status_code == 200
    assert r.json()["scores"] == pytest.approx(rec.score([7, 8, 9], [3, 3, 0]).tolist(), rel=1e-6)


def detail(r) -> str:
    return json.dumps(r.json()["detail"])


@pytest.mark.parametrize("path, params, status, message", [
    ("/recommend", {"user": 300}, 404, "unknown user id 300: dense user ids run from 0 to 299"),
    ("/recommend", {"user": -2}, 404, "unknown user id -2"),
    ("/similar", {"item": 200}, 404, "unknown item id 200: dense item ids run from 0 to 199"),
    ("/explain", {"user": 1, "item": 999}, 404, "unknown item id 999"),
    ("/recommend", {"user": 1, "k": 0}, 422, "Input should be greater than or equal to 1"),
    ("/recommend", {"user": 1, "k": 201}, 422, "Input should be less than or equal to 200"),
    ("/similar", {"item": 1, "k": 10**9}, 422, "Input should be less than or equal to 200"),
    ("/recommend", {"user": "abc"}, 422, "Input should be a valid integer"),
    ("/recommend", {"user": 1, "k": "ten"}, 422, "Input should be a valid integer"),
    ("/recommend", {}, 422, "Field required"),
    ("/explain", {"user": 1}, 422, "Field required"),
])
def test_bad_get_requests(server, path, params, status, message):
    r = httpx.get(f"{server}{path}", params=params)
    assert r.status_code == status
    assert message in detail(r)


@pytest.mark.parametrize("body, status, message", [
    ({"users": [1, 2], "items": [3]}, 422, "users and items must have the same length, got 2 and 1"),
    ({"users": ["1"], "items": [3]}, 422, "Input should be a valid integer"),
    ({"users": [1.5], "items": [3]}, 422, "Input should be a valid integer"),
    ({"users": [1]}, 422, "Field required"),
    ({"users": [1], "items": [200]}, 404, "unknown item id 200: dense item ids run from 0 to 199"),
    ({"users": [0] * 10_001, "items": [0] * 10_001}, 422, "List should have at most 10000 items"),
])
def test_bad_score_requests(server, body, status, message):
    r = httpx.post(f"{server}/score", json=body)
    assert r.status_code == status
    assert message in detail(r)


def test_malformed_and_oversize_bodies(server):
    r = httpx.post(f"{server}/score", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON decode error" in detail(r)
    big = json.dumps({"users": [1] * 400_000, "items": [1] * 400_000}).encode()
    assert len(big) > MAX_BODY_BYTES
    r = httpx.post(f"{server}/score", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json() == {"detail": f"request body too large: {len(big)} bytes, the limit is {MAX_BODY_BYTES}"}
    # A streamed body has no Content-Length to check up front: refused too.
    r = httpx.post(f"{server}/score", content=iter([b'{"users": [1], ', b'"items": [1]}']),
                   headers={"content-type": "application/json"})
    assert r.status_code == 411 and r.json() == {"detail": "a request body needs a Content-Length header"}
    assert httpx.get(f"{server}/health").status_code == 200  # still serving


def test_raw_id_server(rec):
    """A server started with raw ids (in a thread, on the same loaded handle)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(rec, raw=True), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url)
        r = httpx.get(f"{url}/recommend", params={"user": "U0007", "k": 3})
        assert r.json() == {"user": "U0007", "items": [{"item": i, "score": s}
                                                       for i, s in rec.recommend("U0007", k=3, raw=True)]}
        assert r.json()["items"][0]["item"].startswith("B")
        r = httpx.post(f"{url}/score", json={"users": ["U0007"], "items": ["B00003"]})
        assert r.json()["scores"] == pytest.approx([float(rec.score([7], [3])[0])], rel=1e-6)
        r = httpx.get(f"{url}/explain", params={"user": "U0007", "item": "nope"})
        assert r.status_code == 404 and r.json() == {"detail": "unknown raw item id 'nope'"}
        r = httpx.post(f"{url}/score", json={"users": [7], "items": ["B00003"]})
        assert r.status_code == 422 and "Input should be a valid string" in detail(r)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert not thread.is_alive()
