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
peak_rss_mb (the process's peak resident memory, everything included, read after the
evaluation), gflop_per_step (the dense matrix-product FLOPs of one training step, per dtype;
sparse graph products and element-wise work are not counted), product_gflops (this machine's
float32 / bfloat16 / float64 rate on a 4096^2 product at the run's thread count, measured in
the same run, best of 3), floor_seconds (the epoch's dense-FLOP floor: each dtype's FLOPs x
steps / its rate) and floor_ratio (seconds_per_epoch / floor_seconds; 1.0 would mean every
counted product at peak and everything else free). --profile N prints torch.profiler's top
operators over N training steps. --compile trains through torch.compile(model.loss) (its
compilation falls in the warm-up epoch). --against-release DIR also trains the authors' released FITMM
(a checkout of github arkina3931/FITMM, MMRec-based; run with --release-python, an interpreter
whose environment has what the release imports: torch, pandas, torch_geometric, lmdb,
torchvision) on the same interactions, features and threads, and prints both side by side.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
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
from fitmm.malloc import environ_with_malloc_defaults, keep_freed_memory, restart_without_malloc_caches
from fitmm.train import build_model, make_optimizer, run_epoch, train_step

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


def step_flops(model, sampler, optimizer, config, device) -> dict[str, float]:
    """Dense matrix-product FLOPs of one training step (forward + backward + optimiser), per
    dtype of the product ({"float32": ..., "bfloat16": ..., "float64": ...}).

    Counted from the shapes of every mm/bmm/addmm/baddbmm whose operands are all dense (2 FLOPs
    per multiply-add); products with a sparse graph are left out (torch's own FlopCounterMode
    would count them as if the graph were a dense N x N matrix). Split by dtype because each
    dtype has its own peak rate (bfloat16 feature MLPs, float64 Grams)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    products = {aten.mm.default: 0, aten.bmm.default: 0, aten.addmm.default: 1, aten.baddbmm.default: 1}
    flops: dict[str, float] = {}

    class DenseProducts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in products and all(t.layout == torch.strided for t in args if isinstance(t, torch.Tensor)):
                a, b = args[products[func]], args[products[func] + 1]
                dtype = str(a.dtype).removeprefix("torch.")
                flops[dtype] = flops.get(dtype, 0) + 2 * a.numel() * b.shape[-1]
            return func(*args, **(kwargs or {}))

    batch = next(iter(sampler.batches(config["batch_size"], model.uses_negatives, device)))
    with DenseProducts():
        train_step(model, batch, optimizer)
    return flops


def step_gflop(model, sampler, optimizer, config, device) -> float:
    """All dense matrix-product GFLOP of one training step, whatever their dtype."""
    return sum(step_flops(model, sampler, optimizer, config, device).values()) / 1e9


def product_rates(dtypes=("float32", "bfloat16", "float64"), n: int = 4096, repeats: int = 3,
                  device="cpu") -> dict[str, float]:
    """This machine's dense product rate (GFLOP/s) per dtype, measured now at the current thread
    count: the best of `repeats` n x n @ n x n products (a large square product is the fastest
    shape a BLAS runs, so the floor computed from it is a true lower bound)."""
    rates = {}
    for name in dtypes:
        dtype = getattr(torch, name)
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.mm(a, b)  # warm-up: thread pool, BLAS kernels, page faults of the output
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        rates[name] = 2 * n**3 / best / 1e9
        del a, b
    return rates


def floor_seconds(flops: dict[str, float], rates: dict[str, float], steps: int) -> float:
    """The epoch's dense-FLOP floor: every counted product run at its dtype's measured peak.
    A dtype without a measured rate is charged at the float32 rate."""
    return steps * sum(count / 1e9 / rates.get(dtype, rates["float32"]) for dtype, count in flops.items())


TABLE_HEADER = ("| model | scale (features synthetic) | s/epoch | floor s | s/epoch / floor | eval s | graph s "
                "| peak RSS MB | GFLOP/step | fp32 / bf16 GFLOP/s | threads |")


def table_row(result: dict) -> str:
    graph = f"{result['graph_seconds']:.1f}" if result["graph_seconds"] is not None else "-"
    rates = result["product_gflops"]
    return (f"| {result['model']} | {result['scale']} | {result['seconds_per_epoch']:.2f} | {result['floor_seconds']:.2f} "
            f"| {result['floor_ratio']:.2f} | {result['eval_seconds']:.2f} | {graph} | {result['peak_rss_mb']:.0f} "
            f"| {result['gflop_per_step']:.1f} | {rates['float32']:.0f} / {rates['bfloat16']:.0f} | {result['threads']} |")


def print_profile(model, sampler, optimizer, config, device, steps: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    batches = sampler.batches(config["batch_size"], model.uses_negatives, device)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _, batch in zip(range(steps), batches):
            train_step(model, batch, optimizer)
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=28, max_shapes_column_width=60))


# Runs inside the release's own interpreter (--release-python), cwd a scratch folder: the release
# reads configs/ from its working directory and writes log/ and saved/ there, so its checkout is
# only read. Times each call of the release trainer's own _train_epoch and _valid_epoch (its
# per-epoch validation and test rankings) by wrapping them; nothing of the release is changed.
RELEASE_LAUNCHER = """
import json, resource, sys, time
src, threads, epochs, data_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
sys.path.insert(0, src)
import torch
if threads:
    torch.set_num_threads(threads)
from common import trainer
timings = {"train": [], "valid": []}
def timed(name, method):
    def run(*args, **kwargs):
        start = time.perf_counter()
        out = method(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        timings[name].append(time.perf_counter() - start)
        return out
    return run
trainer.Trainer._train_epoch = timed("train", trainer.Trainer._train_epoch)
trainer.Trainer._valid_epoch = timed("valid", trainer.Trainer._valid_epoch)
from utils.quick_start import quick_start
quick_start(model="FITMM", dataset="baby", save_model=False, config_dict={
    "gpu_id": 0, "ablation_variant": "full", "epochs": epochs, "data_path": data_path, "stopping_step": 10**6})
print("RELEASE-TIMINGS " + json.dumps({**timings, "threads": torch.get_num_threads(),
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def time_release(release: Path, dataset: Dataset, inter_file: Path, epochs: int, threads: int, python: str) -> dict:
    """Train the authors' released FITMM (an MMRec-based checkout at `release`, never copied here)
    on the same interactions and stand-in features: warm-up + `epochs` epochs, each followed by
    the release's own validation and test ranking. Returns its seconds per epoch (median after
    the warm-up), seconds per evaluation (validation + test, as ours), and peak RSS."""
    src = release / "src"
    if not (src / "models" / "fitmm.py").is_file() or not (src / "configs" / "model" / "FITMM.yaml").is_file():
        sys.exit(f"speed.py: {release} is not the FITMM release (no src/models/fitmm.py and src/configs/model/FITMM.yaml)")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        folder = scratch / "data" / "baby"  # the release names its dataset config after the folder
        folder.mkdir(parents=True)
        (folder / "baby.inter").symlink_to(inter_file.resolve())
        np.save(folder / "image_feat.npy", dataset.features["image"])
        np.save(folder / "text_feat.npy", dataset.features["text"])
        (scratch / "configs").symlink_to((src / "configs").resolve())
        done = subprocess.run(
            [python, "-c", RELEASE_LAUNCHER, str(src.resolve()), str(threads), str(epochs + 1), str(scratch / "data") + "/"],
            cwd=scratch, capture_output=True, text=True, env=environ_with_malloc_defaults(),  # glibc as the release runs
        )
    line = next((l for l in done.stdout.splitlines() if l.startswith("RELEASE-TIMINGS ")), None)
    if done.returncode or line is None:
        sys.exit(f"speed.py: the release run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    t = json.loads(line.removeprefix("RELEASE-TIMINGS "))
    # the trainer validates, then tests, after every epoch: pair them up per epoch
    evals = [a + b for a, b in zip(t["valid"][::2], t["valid"][1::2])]
    return {
        "seconds_per_epoch": statistics.median(t["train"][1:]) if len(t["train"]) > 1 else t["train"][0],
        "epoch_seconds": t["train"],
        "eval_seconds": statistics.median(evals),
        "peak_rss_mb": t["peak_rss_mb"],
        "threads": t["threads"],
    }


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
    parser.add_argument("--compile", action="store_true",
                        help="train through torch.compile(model.loss) (needs a C++ compiler on CPU; the warm-up "
                             "epoch absorbs the compilation: see its time in epoch_seconds)")
    parser.add_argument("--against-release", type=Path, metavar="DIR",
                        help="also time the authors' released FITMM (a checkout of its MMRec-based code; baby only)")
    parser.add_argument("--release-python", default=sys.executable,
                        help="the interpreter to run the release with (its environment: pandas, torch_geometric, ...)")
    args = parser.parse_args(argv)
    if args.against_release and (args.scale != "baby" or args.model != "fitmm"):
        sys.exit("speed.py: --against-release compares FITMM at --scale baby")
    if argv is None:  # a process of its own: re-executed with the tcache off, as `fitmm train` is
        restart_without_malloc_caches()
    keep_freed_memory()
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
    # torch's compiler, for the record (docs/performance.md): on this 2-core CPU it moved the epoch
    # by about 5% either way and added ~225 MB of peak memory
    loss_fn = torch.compile(model.loss) if args.compile else None
    epoch_seconds, epoch_cpu = [], []
    for epoch in range(args.epochs + 1):
        start, cpu = time.perf_counter(), time.process_time()
        run_epoch(model, sampler, optimizer, epoch + 1, config["batch_size"], device, loss_fn=loss_fn)
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_seconds.append(time.perf_counter() - start)
        epoch_cpu.append(time.process_time() - cpu)
        # CPU seconds well below threads x wall seconds: something else shared the cores
        print(f"epoch {epoch + 1}{' (warm-up)' if epoch == 0 else ''}: {epoch_seconds[-1]:.2f} s "
              f"({epoch_cpu[-1]:.1f} CPU s)", flush=True)
    start = time.perf_counter()
    evaluate(model, dataset, ["valid", "test"], config["topk"], config["eval_batch_size"])
    eval_seconds = time.perf_counter() - start
    peak_rss = peak_rss_mb()  # before the rate measurement below allocates its own matrices
    flops = step_flops(model, sampler, optimizer, config, device)
    if args.profile:
        print_profile(model, sampler, optimizer, config, device, args.profile)
    rates = product_rates(device=device)
    steps = -(-int(dataset.train.nnz) // config["batch_size"])
    seconds_per_epoch = statistics.median(epoch_seconds[1:]) if len(epoch_seconds) > 1 else epoch_seconds[0]
    floor = floor_seconds(flops, rates, steps)

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
        "seconds_per_epoch": seconds_per_epoch,
        "epoch_seconds": epoch_seconds,
        "epoch_cpu_seconds": epoch_cpu,  # this process's user + system time per epoch
        "eval_seconds": eval_seconds,
        "compiled": args.compile,
        "graph_seconds": graph_seconds,
        "peak_rss_mb": peak_rss,
        "gflop_per_step": sum(flops.values()) / 1e9,
        "gflop_per_step_by_dtype": {k: v / 1e9 for k, v in flops.items()},
        "steps_per_epoch": steps,
        "product_gflops": rates,  # measured in this run, n x n products, best of 3
        "floor_seconds": floor,
        "floor_ratio": seconds_per_epoch / floor,
    }
    print()
    print(f"dense product rate, 4096^2, {result['threads']} threads (GFLOP/s): "
          + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()))
    print(TABLE_HEADER)
    print("|" + "---|" * TABLE_HEADER.count(" | ") + "---|")
    print(table_row(result))
    if args.against_release:
        release = time_release(args.against_release, dataset, args.data_root / AMAZON["baby"] / "baby.inter",
                               args.epochs, torch.get_num_threads(), args.release_python)
        result["release"] = release
        print()
        print("| FITMM, Baby, same data and threads | s/epoch | eval s (valid + test) | peak RSS MB | threads |")
        print("|---|---|---|---|---|")
        print(f"| authors' release | {release['seconds_per_epoch']:.2f} | {release['eval_seconds']:.2f} "
              f"| {release['peak_rss_mb']:.0f} | {release['threads']} |")
        print(f"| fitmm (this run) | {seconds_per_epoch:.2f} | {eval_seconds:.2f} | {peak_rss:.0f} | {result['threads']} |")
        print(f"| release / fitmm | {release['seconds_per_epoch'] / seconds_per_epoch:.2f}x "
              f"| {release['eval_seconds'] / eval_seconds:.2f}x | {release['peak_rss_mb'] / peak_rss:.2f}x | |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
