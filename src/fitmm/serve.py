"""`fitmm serve`: a thin HTTP layer (FastAPI + uvicorn) over a loaded `fitmm.api.Recommender`.

Routing and validation only; every answer comes from api.py. The model is loaded once, before
the server starts; requests are products with the cached embeddings (no graph forward).

    GET  /health                      model name, numbers of users and items
    GET  /recommend?user=U&k=10       top-k items, the user's training items left out
    GET  /similar?item=I&k=10         most similar items (cosine of the item embeddings)
    GET  /explain?user=U&item=I       the score split by band and by modality (FITMM)
    POST /score  {"users": [...], "items": [...]}   scores of the pairs (equal lengths)
    GET  /docs                        OpenAPI documentation

Ids are dense integers, or the dataset's raw ids (strings) when the server runs with `--raw`.
Errors: unknown id -> 404, invalid parameter or body -> 422, body over the limit -> 413, a body
without Content-Length -> 411; each with a JSON {"detail": message}. No request ever names a
file: the only path is the run directory given on the command line.

fastapi and uvicorn are the optional extra `serve`: they are imported only here, only when a
server is built, so `import fitmm` works without them.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime,
# and they name types chosen inside create_app (dense int ids or raw string ids).

import json
from typing import Any, Dict, List, Union

from .api import Recommender, UnknownIdError
from .errors import InputError

MAX_BODY_BYTES = 1_000_000  # POST /score: ~100k id pairs; anything bigger is refused unread
MAX_PAIRS = 10_000  # pairs per POST /score


def require_serve_extra() -> None:
    """Raise InputError naming what to install when fastapi or uvicorn is missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise InputError(
            f"fitmm serve needs the optional 'serve' extra ({exc.name} is not installed): pip install 'fitmm[serve]'"
        ) from None


class BodyLimit:
    """ASGI middleware: refuse a request body over `limit` bytes (413) before reading it, and a
    body without a Content-Length (411), which could not be checked before reading."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is None and (b"transfer-encoding" in headers or scope["method"] in ("POST", "PUT", "PATCH")):
            return await self._refuse(send, 411, "a request body needs a Content-Length header")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return await self._refuse(send, 400, f"invalid Content-Length {length.decode(errors='replace')!r}")
            if n > self.limit:
                return await self._refuse(send, 413, f"request body too large: {n} bytes, the limit is {self.limit}")
        return await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(send, status: int, message: str):
        body = json.dumps({"detail": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def create_app(rec: Recommender, raw: bool = False, max_body_bytes: int = MAX_BODY_BYTES):
    """The FastAPI application answering from `rec` (dense ids, or raw ids with `raw`)."""
    require_serve_extra()
    from fastapi import FastAPI, Query, Request
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, Field, StrictInt, StrictStr, model_validator

    if raw and not rec.has_raw_ids():
        raise InputError(f"--raw needs u_id_mapping.tsv and i_id_mapping.tsv in the dataset folder ({rec.config['data']})")
    rec.prepare_explanations()  # once now, not on the first /explain request
    UserId = StrictStr if raw else int  # query strings are text: int() them; raw ids stay text
    BodyId = StrictStr if raw else StrictInt  # JSON has types: "3" is not a dense id
    ItemOut = str if raw else int
    n_items = rec.n_items

    class ItemScore(BaseModel):
        item: ItemOut
        score: float

    class Recommendation(BaseModel):
        user: UserId
        items: List[ItemScore]

    class Similar(BaseModel):
        item: UserId
        items: List[ItemScore]

    class ScoreRequest(BaseModel):
        users: List[BodyId] = Field(max_length=MAX_PAIRS, description=f"user ids, at most {MAX_PAIRS}")
        items: List[BodyId] = Field(max_length=MAX_PAIRS, description="item ids, as many as users")

        @model_validator(mode="after")
        def same_length(self):
            if len(self.users) != len(self.items):
                raise ValueError(f"users and items must have the same length, got {len(self.users)} and {len(self.items)}")
            return self

    class Scores(BaseModel):
        scores: List[float]

    app = FastAPI(
        title="fitmm",
        description=f"Recommendations from a trained {rec.model_name} model ({'raw' if raw else 'dense'} ids).",
    )
    app.add_middleware(BodyLimit, limit=max_body_bytes)

    @app.exception_handler(UnknownIdError)
    def unknown_id(request: Request, exc: UnknownIdError):
        return JSONResponse(status_code=404, content={"detail": str(exc)})

    @app.exception_handler(InputError)
    def bad_input(request: Request, exc: InputError):
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    K = Query(10, ge=1, le=n_items, description=f"number of items, 1 to {n_items}")

    @app.get("/health")
    def health() -> Dict[str, Any]:
        return {"status": "ok", "model": rec.model_name, "users": rec.n_users, "items": rec.n_items, "raw_ids": raw}

    @app.get("/recommend", response_model=Recommendation)
    def recommend(user: UserId = Query(..., description="user id"), k: int = K, exclude_seen: bool = True):
        items = rec.recommend(user, k, exclude_seen=exclude_seen, raw=raw)
        return {"user": user, "items": [{"item": i, "score": s} for i, s in items]}

    @app.get("/similar", response_model=Similar)
    def similar(item: UserId = Query(..., description="item id"), k: int = K):
        items = rec.similar_items(item, k, raw=raw)
        return {"item": item, "items": [{"item": i, "score": s} for i, s in items]}

    @app.get("/explain")
    def explain(user: UserId = Query(...), item: UserId = Query(...)) -> Dict[str, Any]:
        return {"user": user, "item": item, **rec.explain(user, item, raw=raw)}

    @app.post("/score", response_model=Scores)
    def score(body: ScoreRequest):
        return {"scores": rec.score(body.users, body.items, raw=raw).tolist()}

    return app


def run(rec: Recommender, host: str = "127.0.0.1", port: int = 8000, raw: bool = False) -> None:
    """Serve `rec` until interrupted."""
    import uvicorn

    uvicorn.run(create_app(rec, raw=raw), host=host, port=port, log_level="info")
