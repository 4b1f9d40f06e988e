"""A trained run as answers: `fitmm.load(RUN_DIR)` -> `Recommender`.

This is the one place that turns a run directory into recommendations: `fitmm recommend`,
`fitmm serve` (serve.py, a thin HTTP layer) and Python users all go through it.

    rec = fitmm.load("runs/demo")
    rec.recommend(42, k=10)            # [(item, score), ...], the user's training items left out
    rec.similar_items(7, k=10)         # [(item, cosine), ...]
    rec.score([1, 2], [7, 9])          # numpy array, one score per (user, item) pair
    rec.explain(42, 7)                 # {"score": s, "bands": {...}, "modalities": {...}} (FITMM)
    rec.add_items({"image": img, "text": txt})  # cold-start items: new ids, recommendable at once

Ids are the dataset's dense ids (0 .. n-1) by default; with `raw=True` they are the raw ids of the
dataset folder's `u_id_mapping.tsv` / `i_id_mapping.tsv` (tab-separated, a header naming the
dense column `userID` / `itemID`; the raw id is the first other column; raw ids are strings).
An id that does not exist raises `UnknownIdError` (a KeyError).

Embeddings are computed once, when the run is loaded (one graph forward); every answer after
that is a product with the cached tables.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .errors import InputError


class UnknownIdError(KeyError):
    """A user or item id that the loaded run does not know."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


def read_id_mapping(path: Path, dense_column: str, n: int) -> tuple[list[str], dict[str, int]] | None:
    """(raw id per dense id, raw id -> dense id) from a mapping file, or None when it is absent."""
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))
    if not rows or dense_column not in rows[0]:
        raise InputError(f"{path}: the header must name the dense id column '{dense_column}'")
    header = rows[0]
    dense_at = header.index(dense_column)
    raw_at = 0 if dense_at != 0 else 1
    if raw_at >= len(header):
        raise InputError(f"{path}: needs a raw id column beside '{dense_column}'")
    raw_of: list[str | None] = [None] * n
    dense_of: dict[str, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        try:
            dense = int(row[dense_at])
            raw = row[raw_at]
        except (ValueError, IndexError):
            raise InputError(f"{path}, line {line}: expected an integer {dense_column} and a raw id") from None
        if not 0 <= dense < n:
            continue  # an id the interactions never use: no embedding, nothing to map
        if raw in dense_of or raw_of[dense] is not None:
            raise InputError(f"{path}, line {line}: {dense_column} {dense} or raw id {raw!r} appears twice; each must appear once")
        raw_of[dense] = raw
        dense_of[raw] = dense
    return [r if r is not None else "" for r in raw_of], dense_of


def load_run(run_dir: Path, device: str | torch.device | None = None, data: str | None = None,
             allow_data_change: bool = False):
    """(config, dataset, model in eval mode with the best weights, data change or None) of a run.

    The one place a trained run is read back (`fitmm evaluate`, `recommend`, `serve`, `load`): the
    run's files, its data against the fingerprint it recorded (`data` = the folder's new place
    after a move; `allow_data_change` goes on with other data and reports the change), and its
    checkpoint, read as tensors only. `device` None = the run's configured device."""
    from . import data as data_module
    from .cli import data_path, run_config
    from .train import build_model, check_data, load_weights, pick_device

    for name in ("config.yaml", "best.pt"):
        if not (run_dir / name).is_file():
            raise InputError(f"{run_dir}: missing {name}; pass a run directory written by `fitmm train`")
    config = data_path(run_dir, run_config(run_dir), data)
    dataset = data_module.load(config)
    _, change = check_data(run_dir, dataset, allow_data_change)
    device = pick_device(config["device"]) if device is None else torch.device(device)
    model = build_model(config, dataset, device)
    load_weights(run_dir / "best.pt", model, device, config["model"])
    model.eval()
    return config, dataset, model, change


def load(run_dir: str | Path, device: str = "cpu", data: str | None = None) -> "Recommender":
    """The trained model of `run_dir` (its best checkpoint), ready to answer; `data` = the dataset
    folder's new place if it moved since training."""
    config, dataset, model, _ = load_run(Path(run_dir), device, data)
    return Recommender(model, dataset, config)


class Recommender:
    """A trained model with its dataset: recommendations, similar items, scores, explanations.

    (Not to be confused with `fitmm.models.Recommender`, the contract models implement.)
    Thread-safe for concurrent reads; `add_items` must not run concurrently with them."""

    def __init__(self, model, dataset, config: dict[str, Any]):
        self.model, self.dataset, self.config = model, dataset, config
        self.model_name = config["model"]
        with torch.no_grad():
            users, items = model.embed()
        self.user_vectors, self.item_vectors = users.detach(), items.detach()
        self.seen = dataset.train  # CSR users x items: masked by recommend(exclude_seen=True)
        self._parts: tuple[torch.Tensor, torch.Tensor] | None = None  # explanation parts, on demand
        self._new_parts: list[torch.Tensor] = []  # explanation parts of items added by add_items
        folder = Path(config["data"]) if config["data"] != "synthetic" else None
        self._user_ids = read_id_mapping(folder / "u_id_mapping.tsv", "userID", dataset.n_users) if folder else None
        self._item_ids = read_id_mapping(folder / "i_id_mapping.tsv", "itemID", dataset.n_items) if folder else None

    # -- sizes and ids ----------------------------------------------------------------------------

    @property
    def n_users(self) -> int:
        return self.user_vectors.shape[0]

    @property
    def n_items(self) -> int:
        """Catalogue items plus any added with add_items."""
        return self.item_vectors.shape[0]

    def has_raw_ids(self) -> bool:
        return self._user_ids is not None and self._item_ids is not None

    def _mapping(self, kind: str):
        mapping = self._user_ids if kind == "user" else self._item_ids
        if mapping is None:
            name = "u_id_mapping.tsv" if kind == "user" else "i_id_mapping.tsv"
            raise InputError(f"raw ids need {name} in the dataset folder ({self.config['data']}); use dense ids")
        return mapping

    def _dense(self, kind: str, value, raw: bool) -> int:
        n = self.n_users if kind == "user" else self.n_items
        if raw:
            dense = self._mapping(kind)[1].get(str(value))
            if dense is None:
                raise UnknownIdError(f"unknown raw {kind} id {value!r}")
            return dense
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise UnknownIdError(f"{kind} id must be an integer dense id, got {value!r} (raw ids need raw=True)")
        if not 0 <= int(value) < n:
            raise UnknownIdError(f"unknown {kind} id {value}: dense {kind} ids run from 0 to {n - 1}")
        return int(value)

    def _item_out(self, dense: int, raw: bool):
        if not raw:
            return dense
        return self._mapping("item")[0][dense]

    def _check_k(self, k) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.n_items:
            raise InputError(f"k must be an integer from 1 to the number of items ({self.n_items}), got {k!r}")
        return int(k)

    # -- answers ----------------------------------------------------------------------------------

    def recommend(self, user, k: int = 10, exclude_seen: bool = True, raw: bool = False) -> list[tuple[Any, float]]:
        """The k best items for `user`, best first, as (item, score); training items left out
        when exclude_seen (fewer than k when the user has seen almost everything)."""
        u = self._dense("user", user, raw)
        k = self._check_k(k)
        with torch.no_grad():
            scores = self.model.score(self.user_vectors[u:u + 1], self.item_vectors)[0].clone()
        if exclude_seen:
            seen = self.seen.indices[self.seen.indptr[u]:self.seen.indptr[u + 1]]
            scores[torch.from_numpy(seen.astype(np.int64)).to(scores.device)] = -torch.inf
        values, items = torch.topk(scores, k)
        keep = torch.isfinite(values)
        return [(self._item_out(int(i), raw), float(v)) for i, v in zip(items[keep].tolist(), values[keep].tolist())]

    def similar_items(self, item, k: int = 10, raw: bool = False) -> list[tuple[Any, float]]:
        """The k items whose embeddings are most cosine-similar to `item`'s (itself left out)."""
        i = self._dense("item", item, raw)
        k = min(self._check_k(k), self.n_items - 1)
        table = torch.nn.functional.normalize(self.item_vectors, dim=1)
        sims = table @ table[i]
        sims[i] = -torch.inf
        values, items = torch.topk(sims, k)
        return [(self._item_out(int(j), raw), float(v)) for j, v in zip(items.tolist(), values.tolist())]

    def score(self, users: Sequence, items: Sequence, raw: bool = False) -> np.ndarray:
        """Scores of the pairs (users[n], items[n]): a float32 array of len(users)."""
        if len(users) != len(items):
            raise InputError(f"users and items must have the same length, got {len(users)} and {len(items)}")
        u = torch.tensor([self._dense("user", x, raw) for x in users], dtype=torch.int64)
        i = torch.tensor([self._dense("item", x, raw) for x in items], dtype=torch.int64)
        uv, iv = self.user_vectors[u], self.item_vectors[i]
        with torch.no_grad():
            if type(self.model).score is _model_base().score:  # dot product: pairwise without the full matrix
                out = (uv * iv).sum(1)
            else:
                out = torch.stack([self.model.score(uv[n:n + 1], iv[n:n + 1])[0, 0] for n in range(len(u))])
        return out.cpu().numpy().astype(np.float32)

    def prepare_explanations(self) -> None:
        """Compute the explanation parts of every user and item now (one graph forward)."""
        if self._parts is None:
            with torch.no_grad():
                users, items = self.model.explain_parts()
            self._parts = (users.detach(), items.detach())

    def explain(self, user, item, raw: bool = False) -> dict[str, Any]:
        """The model's breakdown of score(user, item): always "score"; FITMM adds "bands",
        "modalities" and "band_table", each adding up to the score (see FITMM.explain)."""
        u, i = self._dense("user", user, raw), self._dense("item", item, raw)
        self.prepare_explanations()
        users, items = self._parts
        n_catalogue = items.shape[0]
        item_part = items[i] if i < n_catalogue else self._new_parts[i - n_catalogue]
        with torch.no_grad():
            return self.model.explain(users[u], item_part)

    def add_items(self, features: dict[str, np.ndarray], ids: Sequence[str] | None = None) -> list:
        """Add items known only by their content: `features[modality]` has one row per new item
        for every modality of the dataset. They get the next dense ids (returned) and, when the
        dataset has raw ids, the raw `ids` given (default "new:<dense id>"); they are
        recommendable and explainable at once, and the catalogue's own scores do not change.
        FITMM scores them through its content branches and the item kNN graph to the catalogue
        (see FITMM.cold_items)."""
        expected = self.dataset.modalities
        if not expected:
            raise InputError("this run's dataset has no content modalities, so new items cannot be scored from content")
        if set(features) != set(expected):
            raise InputError(f"add_items needs features for exactly the modalities {expected}, got {sorted(features)}")
        arrays = {}
        for name in expected:
            a = np.asarray(features[name])
            width = self.dataset.features[name].shape[1]
            if a.ndim != 2 or a.shape[1] != width or not np.issubdtype(a.dtype, np.number):
                raise InputError(f"add_items: features[{name!r}] must be a numeric (n_new x {width}) array, got shape {a.shape}")
            if not np.isfinite(a).all():
                raise InputError(f"add_items: features[{name!r}] contains NaN or infinite values")
            arrays[name] = a.astype(np.float32)
        counts = {a.shape[0] for a in arrays.values()}
        if len(counts) != 1 or 0 in counts:
            raise InputError(f"add_items: every modality needs the same, non-zero number of rows, got {sorted(counts)}")
        n_new = counts.pop()
        if ids is not None:
            mapping = self._mapping("item")
            ids = [str(x) for x in ids]
            if len(ids) != n_new or len(set(ids)) != n_new or any(x in mapping[1] for x in ids):
                raise InputError(f"add_items: ids must be {n_new} new, distinct raw ids")
        try:
            vectors, parts = self.model.cold_items(self.dataset, arrays)
        except NotImplementedError as exc:
            raise InputError(f"{exc}; cold-start items are offered by: fitmm") from None
        first = self.n_items
        self.item_vectors = torch.cat([self.item_vectors, vectors.detach().to(self.item_vectors.device)])
        self._new_parts.extend(parts.detach())
        self.seen = self.seen.copy()
        self.seen.resize((self.seen.shape[0], self.n_items))
        new = list(range(first, self.n_items))
        if self._item_ids is not None:  # raw ids keep working: the given ones, else "new:<dense id>"
            raw_of, dense_of = self._item_ids
            names = ids if ids is not None else [f"new:{d}" for d in new]
            raw_of.extend(names)
            dense_of.update(zip(names, new))
        return new

def _model_base():
    from .models.base import Recommender as ModelBase

    return ModelBase
