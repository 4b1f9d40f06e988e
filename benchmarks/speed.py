"""Speed and memory of one model at the paper's data sizes: seconds per epoch, evaluation, graph, peak RSS.

    python benchmarks/speed.py --model fitmm --scale baby [--data-root ../shared/data] [--epochs 3] [--json FILE]

Datasets (every output labels the features synthetic):
  baby | sports | clothing  the REAL interaction graphs of ../shared/data/amazon_* with STAND-IN
                            features of MMRec's shapes: image I x 4096 (non-negative), text I x 384
                            (unit-norm rows), seeded random;
  elec                      a synthetic set of MMRec Elec's sizes (192,403 users, 63,001 items,
                            1,689,188 interactions, split 8:1:1 per user) with the same feature shapes.
Measured: graph_seconds (building the item kNN graph, no cache), seconds_per_epoch (median over
--epochs epochs after one warm-up epoch), eval_seconds (one full validation + test ranking),
peak_rss_mb (the process's peak resident memory, everything included), gflop_per_step (the
dense matrix-product FLOPs of one training step; sparse graph products and element-wise work
are not counted). --profile N prints torch.profiler's top operators over N training steps.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fitmm import knn
from fitmm.config import parse_set, resolve
from fitmm.data import load_mmrec
from fitmm.data.dataset import Dataset, interaction_matrix
from fitmm.data.sampling import TrainSampler
from fitmm.data.synthetic import split_per_user
from fitmm.evaluate import evaluate
from fitmm.models import model_class
from fitmm.train import build_model, keep_freed_memory, make_optimizer, run_epoch, train_step

AMAZON = {"baby": "amazon_baby", "sports": "amazon_sports", "clothing": "amazon_clothing"}
ELEC = {"users": 192_403, "items": 63_001, "interactions": 1_689_188}


def stand_in_features(n_items: int, seed: int = 0) -> dict[str, np.ndarray]:
    """MMRec's feature shapes: image I x 4096 non-negative (like ReLU CNN features), text I x 384 unit-norm."""
    rng = np.random.default_rng(seed)
    image = np.abs(rng.standard_normal((n_items, 4096), dtype=np.float32))
    text = rng.standard_normal((n_items, 384), dtype=np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    return {"image": image, "text": text}


def elec_interactions(seed: int = 0) -> Dataset:
    """Elec-sized interactions: >= 5 per user, Zipf item popularity, exactly ELEC's counts."""
    rng = np.random.default_rng(seed)
    n_users, n_items, total = ELEC["users"], ELEC["items"], ELEC["interactions"]
    counts = 5 + rng.poisson(total / n_users - 5, size=n_users)
    while counts.sum() != total:  # adjust random users until the total is exact
        diff = total - counts.sum()
        who = rng.integers(n_users, size=abs(diff))
        np.add.at(counts, who, np.sign(diff))
        counts = np.maximum(counts, 5)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
    popularity = popularity[rng.permutation(n_items)]
    popularity /= popularity.sum()
    users = np.repeat(np.arange(n_users), counts)
    items = rng.choice(n_items, size=total, p=popularity)
    for _ in range(50):  # redraw the duplicates of a (user, item) pair
        keys = users * n_items + items
        _, first = np.unique(keys, return_index=True)
        dup = np.setdiff1d(np.arange(total), first)
        if dup.size == 0:
            break
        items[dup] = rng.choice(n_items, size=dup.size, p=popularity)
    labels = split_per_user(users, items, rng)
    splits = {
        name: interaction_matrix(users[labels == k], items[labels == k], n_users, n_items)
        for k, name in enumerate(("train", "valid", "test"))
    }
    return Dataset(name="elec-synthetic", n_users=n_users, n_items=n_items, source="synthetic (Elec sizes)", **splits)


def load_scale(scale: str, data_root: Path) -> Dataset:
    if scale == "elec":
        dataset = elec_interactions()
    else:
        folder = data_root / AMAZON[scale]
        if not folder.is_dir():
            sys.exit(f"speed.py: {folder} not found; pass --data-root (the folder holding amazon_{scale}/)")
        dataset = load_mmrec(folder)
    dataset.features = stand_in_features(dataset.n_items)
    dataset.name += " + synthetic stand-in features"
    return dataset


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def step_gflop(model, sampler, optimizer, config, device) -> float:
    """Dense matrix-product GFLOP of one training step (forward + backward + optimiser).

    Counted from the shapes of every mm/bmm/addmm/baddbmm whose operands are all dense (2 FLOPs
    per multiply-add); products with a sparse graph are left out (torch's own FlopCounterMode
    would count them as if the graph were a dense N x N matrix)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    products = {aten.mm.default: 0, aten.bmm.default: 0, aten.addmm.default: 1, aten.baddbmm.default: 1}

    class DenseProducts(TorchDispatchMode):
        flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in products and all(t.layout == torch.strided for t in args if isinstance(t, torch.Tensor)):
                a, b = args[products[func]], args[products[func] + 1]
                DenseProducts.flops += 2 * a.numel() * b.shape[-1]
            return func(*args, **(kwargs or {}))

    batch = next(iter(sampler.batches(config["batch_size"], model.uses_negatives, device)))
    with DenseProducts():
        train_step(model, batch, optimizer)
    return DenseProducts.flops / 1e9


def print_profile(model, sampler, optimizer, config, device, steps: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    batches = sampler.batches(config["batch_size"], model.uses_negatives, device)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _, batch in zip(range(steps), batches):
            train_step(model, batch, optimizer)
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=28, max_shapes_column_width=60))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fitmm")
    parser.add_argument("--scale", choices=["baby", "sports", "clothing", "elec"], default="baby")
    parser.add_argument("--data-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up epoch")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--json", type=Path, help="write the measurements here")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="profile N training steps and print the top operators")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as `fitmm train` does
    if args.threads:
        torch.set_num_threads(args.threads)

    dataset = load_scale(args.scale, args.data_root)
    dataset.lend_features = True  # as `fitmm train` does: one model, features fine-tuned in place
    with tempfile.TemporaryDirectory() as cache:
        overrides = {"model": args.model, "progress": False, "cache_dir": cache, **parse_set(args.set)}
        config = resolve([("speed.py", overrides)])
        graph_seconds = None
        if "knn_k" in config:  # time the item kNN graph alone; the model then reads it from the cache
            weights = config.get("modality_weights") or knn.default_modality_weights(dataset.modalities)
            start = time.perf_counter()
            knn.cached_mixed_knn_graph(dataset.features, config["knn_k"], weights, dataset.fingerprint, cache)
            graph_seconds = time.perf_counter() - start
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = build_model(config, dataset, device)
    sampler = TrainSampler(dataset.train, seed=config["seed"])
    optimizer = make_optimizer(model, config)
    epoch_seconds = []
    for epoch in range(args.epochs + 1):
        start = time.perf_counter()
        run_epoch(model, sampler, optimizer, epoch + 1, config["batch_size"], device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_seconds.append(time.perf_counter() - start)
        print(f"epoch {epoch + 1}{' (warm-up)' if epoch == 0 else ''}: {epoch_seconds[-1]:.2f} s", flush=True)
    start = time.perf_counter()
    evaluate(model, dataset, ["valid", "test"], config["topk"], config["eval_batch_size"])
    eval_seconds = time.perf_counter() - start
    gflop = step_gflop(model, sampler, optimizer, config, device)
    if args.profile:
        print_profile(model, sampler, optimizer, config, device, args.profile)

    result = {
        "model": args.model,
        "scale": args.scale,
        "dataset": dataset.name,
        "users": dataset.n_users,
        "items": dataset.n_items,
        "train_interactions": int(dataset.train.nnz),
        "features": {k: list(v.shape) for k, v in dataset.features.items()},
        "features_are_synthetic": True,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "seconds_per_epoch": statistics.median(epoch_seconds[1:]) if len(epoch_seconds) > 1 else epoch_seconds[0],
        "epoch_seconds": epoch_seconds,
        "eval_seconds": eval_seconds,
        "graph_seconds": graph_seconds,
        "peak_rss_mb": peak_rss_mb(),
        "gflop_per_step": gflop,
        "steps_per_epoch": -(-int(dataset.train.nnz) // config["batch_size"]),
    }
    print()
    print("| model | scale (features synthetic) | s/epoch | eval s | graph s | peak RSS MB | GFLOP/step | threads |")
    print("|---|---|---|---|---|---|---|---|")
    graph = f"{graph_seconds:.1f}" if graph_seconds is not None else "-"
    print(f"| {args.model} | {args.scale} | {result['seconds_per_epoch']:.2f} | {eval_seconds:.2f} | {graph} "
          f"| {result['peak_rss_mb']:.0f} | {gflop:.1f} | {result['threads']} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
