"""Figures for runs. matplotlib is an optional dependency (`pip install fitmm[plots]`)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from . import runio


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure as PNG atomically, and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    runio.atomic_write(path, lambda h: h.write(buffer.getvalue()))


def best_epoch(log: list[dict], metric: str) -> int | None:
    """The epoch the trainer keeps: the first with the highest validation `metric` (strictly better wins)."""
    best, epoch = None, None
    for record in log:
        if "valid" in record and (best is None or record["valid"][metric] > best):
            best, epoch = record["valid"][metric], record["epoch"]
    return epoch


def plot_training_curves(log: list[dict], metric: str, path: Path, title: str = "") -> bool:
    """Training loss and validation `metric` per epoch, the best epoch marked, `title` (e.g. 'fitmm on
    ml100k_mm') above both; returns False when matplotlib is missing."""
    plt = _pyplot()
    if plt is None or not log:
        return False
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.6))
    epochs = [r["epoch"] for r in log if "loss" in r]
    ax_loss.plot(epochs, [r["loss"] for r in log if "loss" in r], color="tab:blue")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    evaluated = [r for r in log if "valid" in r]
    ax_metric.plot([r["epoch"] for r in evaluated], [r["valid"][metric] for r in evaluated],
                   color="tab:green", label="validation")
    if evaluated and "test" in evaluated[0]:
        ax_metric.plot([r["epoch"] for r in evaluated], [r["test"][metric] for r in evaluated],
                       color="tab:red", alpha=0.6, label="test (mmrec mode)")
    best = best_epoch(log, metric)
    if best is not None:
        score = next(r["valid"][metric] for r in evaluated if r["epoch"] == best)
        ax_metric.plot([best], [score], marker="*", markersize=12, color="tab:orange", linestyle="none",
                       label=f"best: epoch {best} ({score:.4f})")
        ax_loss.axvline(best, color="tab:orange", linestyle=":", label=f"best epoch {best}")
        ax_loss.legend()
    ax_metric.set(xlabel="epoch", ylabel=metric, title=f"Validation {metric}")
    ax_metric.legend()
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    if title:
        fig.suptitle(title)
    save_figure(fig, path)
    return True


def band_diagnostics_figure(diag: dict[str, Any], title: str = ""):
    """A FITMM model's `diagnostics()` as one figure (2 x 3 panels, users above items): the
    singular-value energy of each band per modality, the distribution of gate values per band, the
    learned band weights. Used by `fitmm report --html` and benchmarks/reproduction.py; needs
    matplotlib (the caller checks)."""
    import numpy as np

    plt = _pyplot()
    names = diag["modalities"]
    m = diag["band_weights"]["user"].shape[0]
    bands = [f"band {b + 1}" for b in range(m)]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.4))
    for row, side in enumerate(("user", "item")):
        energy = diag["band_energy"][side]  # chunks x M
        ax = axes[row][0]
        width = 0.8 / m
        for b in range(m):
            ax.bar(np.arange(len(names)) + b * width, energy[:, b], width, label=bands[b])
        ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
        ax.set(title=f"{side}s: singular-value energy per band", ylabel="share of sum of sigma^2", ylim=(0, 1))
        ax.legend(fontsize=8)
        gates = diag["gates"][side]  # nodes x M
        ax = axes[row][1]
        ax.boxplot([gates[:, b] for b in range(m)], showfliers=False)
        ax.violinplot([gates[:, b] for b in range(m)], showextrema=False)
        ax.set_xticks(range(1, m + 1), bands)
        ax.set(title=f"{side} gate values per band ({gates.shape[0]} {side}s)", ylabel="gate g_b")
        ax = axes[row][2]
        ax.bar(bands, diag["band_weights"][side], color="tab:purple")
        ax.set(title=f"{side} band weights w_b", ylim=(0, 1))
        for axis in axes[row]:
            axis.grid(alpha=0.3, axis="y")
    if title:
        fig.suptitle(title)
    return fig
