"""`fitmm report RUN_DIR... --html OUT.html`: one self-contained page (every figure embedded as a
base64 PNG) with a comparison table of the runs, each run's training curves (every loss part,
validation metrics per epoch) and, for FITMM runs, what the model learned about its bands: the
singular-value energy of each band per modality, the distribution of gate values per band and the
learned band weights (FITMM.diagnostics(), read from the run's best checkpoint and its data).
Needs matplotlib (extra 'plots').
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from . import runio
from .errors import InputError
from .report import read_summaries

# Log keys that are not loss parts (besides the split dictionaries).
NOT_LOSSES = ("epoch", "steps", "train_seconds", "eval_seconds")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("report --html draws its figures with matplotlib, which is not installed; "
                         "pip install 'fitmm[plots]'") from None
    return plt


def _png(fig) -> str:
    """A figure as an <img> with a data: URI (and the figure freed)."""
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def curves_figure(log: list[dict], metrics: list[str], title: str) -> str:
    """One panel per loss part, then one with the validation metrics, per epoch."""
    plt = _pyplot()
    parts = [k for k in dict.fromkeys(["loss", *(k for r in log for k in r)])
             if k not in NOT_LOSSES and isinstance(log[0].get(k), (int, float))]
    fig, axes = plt.subplots(1, len(parts) + 1, figsize=(3.2 * (len(parts) + 1), 2.8), squeeze=False)
    for ax, part in zip(axes[0], parts):
        rows = [r for r in log if part in r]
        ax.plot([r["epoch"] for r in rows], [r[part] for r in rows], marker=".", color="tab:blue")
        ax.set(title="total loss" if part == "loss" else f"loss part: {part}", xlabel="epoch")
        ax.grid(alpha=0.3)
    ax = axes[0][-1]
    evaluated = [r for r in log if "valid" in r]
    for metric in metrics:
        ax.plot([r["epoch"] for r in evaluated], [r["valid"].get(metric) for r in evaluated], marker=".", label=metric)
    ax.set(title="validation", xlabel="epoch")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def bands_figures(diag: dict[str, Any]) -> str:
    """FITMM: band energy per modality, gate distributions per band and band weights, users and items."""
    from .plots import band_diagnostics_figure

    _pyplot()  # a missing matplotlib is an InputError here
    return _png(band_diagnostics_figure(diag))


def _diagnostics(run: dict) -> tuple[dict | None, str]:
    """FITMM.diagnostics() of a run's best checkpoint, or (None, why not)."""
    from .api import load_run

    try:
        _, _, model, _ = load_run(Path(run["run"]), device="cpu")
    except InputError as exc:
        return None, f"band diagnostics unavailable: {exc}"
    return model.diagnostics(), ""


def _table(summaries: list[dict], metrics: list[str]) -> str:
    head = ["run", "model", "dataset", "seed", "processes", "best epoch", "epochs", "s/epoch"]
    head += [f"{split} {m}" for split in ("valid", "test") for m in metrics]
    rows = []
    for s in summaries:
        cells = [s["run"], s["model"], s["dataset"], s["seed"], s.get("world_size", 1), s["best_epoch"],
                 s["epochs_run"], f"{s['seconds_per_epoch']:.2f}"]
        cells += [f"{s[split][m]:.4f}" if m in s[split] else "—" for split in ("valid", "test") for m in metrics]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    header = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
    return f"<table>{header}{''.join(rows)}</table>"


STYLE = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;display:block;margin:8px 0}
section{border-top:2px solid #ddd;margin-top:24px}.note{color:#666;font-size:13px}"""


def render(run_dirs: list[str | Path], metrics: list[str]) -> str:
    """The whole page for these runs, as one HTML string."""
    _pyplot()  # a missing matplotlib is known before any work
    from .train import read_log

    summaries = read_summaries(run_dirs)
    sections = []
    for s in summaries:
        run = s["run"]
        log = read_log(Path(run) / "log.jsonl")
        valid_metric = s["config"].get("valid_metric", metrics[0])
        shown = list(dict.fromkeys([valid_metric, *metrics]))
        body = [f"<h2>{html.escape(run)}</h2>",
                f"<p class='note'>{html.escape(s['model'])} on {html.escape(s['dataset'])}, seed {s['seed']}, "
                f"{s.get('world_size', 1)} process(es); best epoch {s['best_epoch']} of {s['epochs_run']}</p>"]
        if log:
            body.append(curves_figure(log, shown, f"{s['model']} on {s['dataset']}: {Path(run).name}"))
        else:
            body.append("<p class='note'>no epochs logged (nothing trained)</p>")
        if s["model"] == "fitmm":
            diag, why = _diagnostics(s)
            body.append(bands_figures(diag) if diag is not None else f"<p class='note'>{html.escape(why)}</p>")
        sections.append("<section>" + "".join(body) + "</section>")
    title = f"fitmm report: {len(summaries)} run(s)"
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<h2>Comparison</h2>{_table(summaries, metrics)}{''.join(sections)}</body></html>")


def write_html(run_dirs: list[str | Path], out: str | Path, metrics: list[str]) -> Path:
    page = render(run_dirs, metrics)
    out = Path(out)
    if out.parent != Path("") and not out.parent.is_dir():
        raise InputError(f"--html {out}: the folder {out.parent} does not exist; create it or choose another path")
    runio.atomic_write(out, lambda h: h.write(page.encode("utf-8")))
    return out
