"""Datasets: the MMRec folder format, the synthetic generator, training batches."""

from __future__ import annotations

from .dataset import Dataset
from .mmrec import load_mmrec, write_mmrec
from . import synthetic


def load(config: dict) -> Dataset:
    """The dataset a run's config names: "synthetic" or an MMRec folder."""
    if config["data"] == "synthetic":
        return synthetic.from_config(config)
    return load_mmrec(config["data"], config["modalities"], config["inter_file"])


__all__ = ["Dataset", "load", "load_mmrec", "write_mmrec", "synthetic"]
