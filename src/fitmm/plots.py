"""Figures for runs. matplotlib is an optional dependency (`pip install fitmm[plots]`)."""

from __future__ import annotations

import io
from pathlib import Path

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
