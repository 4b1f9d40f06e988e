"""`fitmm report RUN_DIR... --html OUT.html`: one self-contained page for tiny runs."""

import base64
import re

import pytest

from conftest import small_args
from fitmm.cli import main

pytest.importorskip("matplotlib")


def _train(out, *sets):
    args = ["train", "--out", str(out), *small_args("epochs=2", "lr=1e-3", "threads=1", "cache_dir=none", *sets)]
    assert main(args) == 0
    return out


def test_the_html_report_embeds_every_figure_and_names_every_run(tmp_path, capsys):
    fitmm_run = _train(tmp_path / "fitmm-run")
    bpr_run = _train(tmp_path / "bpr-run", "model=bpr")
    out = tmp_path / "report.html"
    assert main(["report", str(fitmm_run), str(bpr_run), "--html", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert str(fitmm_run) in page and str(bpr_run) in page
    # Self-contained: every image is a data: URI holding a PNG, nothing is fetched.
    sources = re.findall(r'<img[^>]*src="([^"]+)"', page)
    assert len(sources) == 3  # curves of both runs, and FITMM's band figure
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'(src|href)="(?!data:)', page)
    # The comparison table has one row per run with its test recall@20.
    rows = re.findall(r"<tr><td>(.*?)</td>", page)
    assert rows == [str(fitmm_run), str(bpr_run)]


def test_fitmm_diagnostics_describe_its_bands(tmp_path):
    import numpy as np

    from fitmm.api import load_run

    run = _train(tmp_path / "run")
    _, dataset, model, _ = load_run(run, device="cpu")
    diag = model.diagnostics()
    assert diag["modalities"] == ["id", *dataset.modalities]
    for side, n in (("user", dataset.n_users), ("item", dataset.n_items)):
        energy = diag["band_energy"][side]
        assert energy.shape == (1 + len(dataset.modalities), 3)
        np.testing.assert_allclose(energy.sum(1), 1.0, rtol=1e-9)
        assert (energy[:, 0] >= energy[:, 1]).all()  # band 1 holds the largest singular values (22 vs 21 of them)
        assert diag["gates"][side].shape == (n, 3)
        scale = float(getattr(model, f"{side}_gate").scale.detach())
        assert ((diag["gates"][side] >= 1.0) & (diag["gates"][side] <= 1.0 + scale)).all()  # pos gates: 1 + s sigma(.)
        weights = diag["band_weights"][side]
        assert weights.shape == (3,) and ((weights > 0) & (weights < 1)).all()


def test_html_report_into_a_missing_folder_is_exit_2(tmp_path, capsys):
    run = _train(tmp_path / "run", "model=pop")
    assert main(["report", str(run), "--html", str(tmp_path / "nowhere" / "r.html")]) == 2
    assert "does not exist" in capsys.readouterr().err
