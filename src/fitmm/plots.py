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


def plot_training_curves(log: list[dict], metric: str, path: Path) -> bool:
    """Training loss and validation `metric` per epoch; returns False when matplotlib is missing."""
    plt = _pyplot()
    if plt is None or not log:
        return False
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
    ax_metric.set(xlabel="epoch", ylabel=metric, title=f"Validation {metric}")
    ax_metric.legend()
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
    save_figure(fig, path)
    return True
