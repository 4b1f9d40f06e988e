"""Tiny trained runs for the API and server tests: the small synthetic set, a few epochs, 1 thread."""

from pathlib import Path

from conftest import small_dataset
from fitmm.cli import main
from fitmm.data import write_mmrec


def dataset_with_raw_ids(folder: Path) -> Path:
    """The small synthetic set as an MMRec folder with raw-id mapping files in both column orders:
    users as MMRec writes them (raw id first), items as ml100k_mm does (dense id first, extra columns)."""
    dataset = small_dataset()
    write_mmrec(dataset, folder)
    users = ["user_raw\tuserID"] + [f"U{u:04d}\t{u}" for u in range(dataset.n_users)]
    items = ["itemID\tasin\ttitle"] + [f"{i}\tB{i:05d}\tItem number {i}" for i in range(dataset.n_items)]
    (folder / "u_id_mapping.tsv").write_text("\n".join(users) + "\n")
    (folder / "i_id_mapping.tsv").write_text("\n".join(items) + "\n")
    return folder


def train_tiny(data: Path, out: Path, *sets: str) -> Path:
    args = ["train", "--data", str(data), "--out", str(out)]
    for item in ("epochs=3", "lr=1e-3", "threads=1", "progress=false", "cache_dir=none", *sets):
        args += ["--set", item]
    assert main(args) == 0
    return out
