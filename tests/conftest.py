from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fitmm.data import synthetic, write_mmrec

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# A small synthetic problem: trains in seconds, still big enough for models to differ.
SMALL = [
    "synthetic_users=300", "synthetic_items=200", "synthetic_mean_interactions=20",
    "synthetic_feature_dims={image: 32, text: 16}", "progress=false",
]


def small_args(*extra: str) -> list[str]:
    out: list[str] = []
    for item in [*SMALL, *extra]:
        out += ["--set", item]
    return out


def small_dataset():
    return synthetic.generate(users=300, items=200, mean_interactions=20, feature_dims={"image": 32, "text": 16})


@pytest.fixture
def dataset_dir(tmp_path) -> Path:
    """A valid MMRec folder (the small synthetic set written to disk)."""
    folder = tmp_path / "ds"
    write_mmrec(small_dataset(), folder)
    return folder


def shared_dataset(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data not available at {path}")
    return path


def read_inter_lines(folder: Path) -> list[str]:
    return (folder / "synthetic.inter").read_text().splitlines()


def write_inter_lines(folder: Path, lines: list[str], newline: str = "\n") -> None:
    (folder / "synthetic.inter").write_bytes(newline.join(lines).encode() + newline.encode())


__all__ = ["SHARED_DATA", "small_args", "small_dataset", "shared_dataset", "read_inter_lines", "write_inter_lines", "np"]
