"""Seconds to encode ml100k_mm's items (text and posters) with `fitmm data encode`'s encoders.

    python benchmarks/encode_speed.py [--data ../shared/data/ml100k_mm] [--items N] [--precision float32,bfloat16]
                                      [--threads T] [--system-malloc]

Per precision: model load, text encoding, image encoding (decoding included) and their sum, as
wall-clock seconds and process CPU seconds (all threads), plus the cosine of each row with the
shipped features (min for text, mean for images: the acceptance criteria). CPU seconds tell a
loaded machine from a slow one: on an idle machine wall ~ CPU / threads. On a loaded machine
torch's worker threads spin while waiting for a descheduled sibling, which inflates CPU seconds
with 2+ threads; `--threads 1` measures the work itself. glibc malloc is set as the CLI sets it
(`fitmm.malloc`: tcache and fastbins off, freed blocks kept) unless --system-malloc.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch

from fitmm.data import encode as E

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml100k_mm"


class Clock:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT)
    parser.add_argument("--items", type=int, default=0, help="only the first N items (default: all)")
    parser.add_argument("--precision", default="float32,bfloat16")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice, all cores)")
    parser.add_argument("--system-malloc", action="store_true", help="leave glibc malloc's defaults (measures their cost)")
    args = parser.parse_args()
    if not args.system_malloc:
        from fitmm.malloc import keep_freed_memory, restart_without_malloc_caches

        restart_without_malloc_caches()
        keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)

    with open(args.data / "item_text.tsv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    rows = rows[: args.items] if args.items else rows
    texts = [r["text"] for r in rows]
    paths = [args.data / "posters_w92" / f"{r['movie_id']}.jpg" for r in rows]
    shipped_text = np.load(args.data / "text_feat.npy")[[int(r["itemID"]) for r in rows]]
    shipped_image = np.load(args.data / "image_feat.npy")[[int(r["itemID"]) for r in rows]]

    malloc = "glibc defaults" if args.system_malloc else "keep_freed_memory"
    print(f"{len(rows)} items, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, malloc {malloc}")
    print("| precision | load s | text s (cpu) | images s (cpu) | total s (cpu) | text cos min | image cos mean |")
    print("|---|---|---|---|---|---|---|")
    for precision in args.precision.split(","):
        with Clock() as load:
            text_encoder, image_encoder = E.MiniLM(precision=precision), E.EfficientNetLite0(precision=precision)
        with Clock() as text:
            text_feat = E.encode_texts(text_encoder, texts, args.batch_size, progress=False)
        with Clock() as image:
            image_feat, _ = E.encode_images(image_encoder, paths, args.batch_size, progress=False)
        total_wall = load.wall + text.wall + image.wall
        total_cpu = load.cpu + text.cpu + image.cpu
        print(f"| {precision} | {load.wall:.1f} | {text.wall:.1f} ({text.cpu:.0f}) | {image.wall:.1f} ({image.cpu:.0f}) "
              f"| {total_wall:.1f} ({total_cpu:.0f}) | {cosines(text_feat, shipped_text).min():.5f} "
              f"| {cosines(image_feat, shipped_image).mean():.5f} |", flush=True)


if __name__ == "__main__":
    main()
