"""Cold-start items: how well FITMM ranks items it never saw in training, from their content alone.

Holds a seeded fraction of the items out of training entirely (all their rows, in every split),
trains FITMM on the rest, then adds the held-out items with `Recommender.add_items` (content
branches + item kNN graph to the catalogue). For every user with at least one held-out row, the
held-out items alone are ranked and Recall@20 is taken against that user's held-out rows, for:

    fitmm cold-start   the scores of the added items
    content kNN        cosine of the item's content to the user's profile (the mean of the
                       L2-normalised, concatenated modality features of the user's training items)
    fitmm, one list    the cold items by their mean FITMM score over users, the same list for
                       every user (how much of FITMM's figure is not personal)
    random             a seeded random ranking (its expectation, 20 / #held-out items, is shown too)

    python benchmarks/cold_start.py --data ../shared/data/ml100k_mm --out runs/cold_start \
        --set epochs=40 --set lr=1e-3 --set threads=1

The warm dataset and the run are kept in --out; a second call reuses a finished run.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp

import fitmm
from fitmm.data import load_mmrec, write_mmrec
from fitmm.data.dataset import Dataset


def split_cold(dataset: Dataset, fraction: float, seed: int):
    """(warm dataset, cold item ids, kept user ids): the cold items' rows removed from every split,
    items renumbered densely, users without any remaining row dropped (MMRec ids are dense)."""
    rng = np.random.default_rng(seed)
    n_cold = int(round(fraction * dataset.n_items))
    cold = np.sort(rng.choice(dataset.n_items, n_cold, replace=False))
    warm = np.setdiff1d(np.arange(dataset.n_items), cold)
    rows_left = sum(dataset.split(s)[:, warm] for s in ("train", "valid", "test"))
    users = np.flatnonzero(np.diff(rows_left.tocsr().indptr) > 0)
    splits = {s: sp.csr_matrix(dataset.split(s)[users][:, warm]) for s in ("train", "valid", "test")}
    warm_set = Dataset(
        name=f"{dataset.name}_warm", n_users=len(users), n_items=len(warm), **splits,
        features={m: np.asarray(f)[warm] for m, f in dataset.features.items()},
    )
    return warm_set, cold, warm, users


def recall_at(scores: np.ndarray, truth: sp.csr_matrix, k: int) -> float:
    """Mean over rows of |top-k of scores ∩ truth| / |truth| (rows without truth are skipped)."""
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    hits = np.take_along_axis(truth.toarray(), top, axis=1).sum(1)
    counts = np.asarray(truth.sum(1)).ravel()
    keep = counts > 0
    return float((hits[keep] / counts[keep]).mean())


def content_profile_scores(dataset: Dataset, users, warm, cold) -> np.ndarray:
    """Cosine of each cold item's content to each user's mean training-item content."""
    blocks = []
    for f in dataset.features.values():
        f = np.asarray(f, dtype=np.float64)
        blocks.append(f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12))
    content = np.concatenate(blocks, axis=1)
    train = dataset.train[users][:, warm]
    counts = np.maximum(np.asarray(train.sum(1)), 1)
    profile = (train @ content[warm]) / counts
    profile /= np.maximum(np.linalg.norm(profile, axis=1, keepdims=True), 1e-12)
    items = content[cold] / np.maximum(np.linalg.norm(content[cold], axis=1, keepdims=True), 1e-12)
    return profile @ items.T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "ml100k_mm"))
    parser.add_argument("--out", default="runs/cold_start")
    parser.add_argument("--fraction", type=float, default=0.1, help="share of items held out (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out draw and the random ranking")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training config keys")
    args = parser.parse_args()

    out = Path(args.out)
    full = load_mmrec(args.data)
    warm_set, cold, warm, users = split_cold(full, args.fraction, args.seed)
    data_dir, run_dir = out / "data", out / "run"
    if not (run_dir / "summary.json").is_file():
        write_mmrec(warm_set, data_dir)
        sets = [x for item in ["progress=false", *args.set] for x in ("--set", item)]
        subprocess.run([sys.executable, "-m", "fitmm", "train", "--data", str(data_dir), "--out", str(run_dir), *sets],
                       check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((run_dir / "summary.json").read_text())

    # Truth: every row (any split) of a cold item, for the users the warm run knows.
    truth = sum(full.split(s) for s in ("train", "valid", "test")).tocsr()[users][:, cold]
    truth.data[:] = 1.0
    evaluated = np.flatnonzero((np.diff(truth.indptr) > 0) & (np.diff(warm_set.train.indptr) > 0))
    truth = truth[evaluated]

    rec = fitmm.load(run_dir)
    new_ids = rec.add_items({m: np.asarray(f)[cold] for m, f in full.features.items()})
    pairs_u = np.repeat(evaluated, len(new_ids))
    pairs_i = np.tile(new_ids, len(evaluated))
    fitmm_scores = rec.score(pairs_u.tolist(), pairs_i.tolist()).reshape(len(evaluated), len(new_ids))
    knn_scores = content_profile_scores(full, users[evaluated], warm, cold)
    random_scores = np.random.default_rng(args.seed).random((len(evaluated), len(cold)))

    k = args.k
    print(f"{full.name}: {len(cold)} of {full.n_items} items held out (seed {args.seed}), {len(evaluated)} users with "
          f"held-out rows; FITMM trained on the rest ({summary['epochs_run']} epochs, best {summary['best_epoch']}, "
          f"warm test recall@20 {summary['test']['recall@20']:.4f})\n")
    print(f"| ranking of the held-out items | Recall@{k} |")
    print("|---|---|")
    # The same list for every user (cold items by their mean FITMM score): how much is not personal.
    fitmm_global = np.tile(fitmm_scores.mean(0), (len(evaluated), 1))
    for name, scores in (("fitmm cold-start (add_items)", fitmm_scores),
                         ("fitmm cold-start, one list for all users (mean score)", fitmm_global),
                         ("content kNN (user profile)", knn_scores), ("random", random_scores)):
        print(f"| {name} | {recall_at(scores, truth, k):.4f} |")
    print(f"| random, expectation ({k} / {len(cold)}) | {k / len(cold):.4f} |")


if __name__ == "__main__":
    main()
