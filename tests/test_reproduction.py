"""benchmarks/reproduction.py: the --quick pipeline end to end on two tiny synthetic datasets (every
section written, every table number recomputed from the run directories the report lists, test
never evaluated for a search trial, a second invocation training and evaluating nothing), the
verdict rule on hand-made outcomes, a report made before anything ran, and a run folder of another
configuration refused."""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

pytest.importorskip("optuna")
pytest.importorskip("matplotlib")

import fitmm.evaluate as evaluate_module  # noqa: E402
import fitmm.plots  # noqa: E402
from fitmm.config import RESULT_NEUTRAL_KEYS, read_config_file, resolve  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "reproduction.py"
REPO_TUNED = REPO / "configs" / "fitmm-tuned.yaml"
VERDICTS = {"supported", "not supported", "unclear", "not run"}
RUN_FILES = ("summary.json", "log.jsonl", "best.pt", "last.pt")


def load_script():
    spec = importlib.util.spec_from_file_location("reproduction", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduction"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


repro = load_script()


def quick_args(out: Path, *extra: str) -> list[str]:
    return ["--quick", "--out", str(out), "--ablation-base", "released", "--set", "threads=1",
            "--set", f"cache_dir={out.parent / 'cache'}", *extra]


def run_files(out: Path) -> dict[str, int]:
    """{path: mtime_ns} of every run directory's result and checkpoint files."""
    return {str(p): p.stat().st_mtime_ns for name in RUN_FILES for p in out.rglob(name)}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The quick pipeline run twice in the same --out, with every ranking evaluation recorded."""
    root = tmp_path_factory.mktemp("repro")
    out = root / "out"
    tuned_before = REPO_TUNED.read_bytes() if REPO_TUNED.is_file() else None
    calls = []
    real = evaluate_module.rank_splits

    def spy(model, embeddings, dataset, splits, *a, **k):
        calls.append(tuple(splits))
        return real(model, embeddings, dataset, splits, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate_module, "rank_splits", spy)
        # Each run's curves.png is half of this test's time and no part of the report.
        mp.setattr(fitmm.plots, "plot_training_curves", lambda *a, **k: False)
        assert repro.main(quick_args(out)) == 0
        first = list(calls)
        files = run_files(out)
        report = (out / "reproduction.md").read_text()
        calls.clear()
        assert repro.main(quick_args(out)) == 0
        second = list(calls)
    return {"out": out, "report": report, "first": first, "second": second, "files": files,
            "again": (out / "reproduction.md").read_text(), "tuned_before": tuned_before}


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """(header cells, rows of cells) of every markdown table."""
    found, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            rows, j = [], i + 2
            while j < len(lines) and lines[j].startswith("|"):
                rows.append([c.strip() for c in lines[j].strip("|").split("|")])
                j += 1
            found.append(([c.strip() for c in line.strip("|").split("|")], rows))
    return found


def run_lists(text: str) -> dict[int, list[Path]]:
    """The report's "Run directories" list: {n: [run dir, ...]}."""
    section = text.split("## Run directories", 1)[1].split("\n## ", 1)[0]
    return {int(m.group(1)): [Path(p) for p in re.findall(r"`([^`]+)`", m.group(2))]
            for m in re.finditer(r"^- \[(\d+)\] [^:]+: (.*)$", section, flags=re.M)}


def per_user(runs: list[Path]) -> dict[int, float]:
    """Per-user test Recall@20 averaged over the runs, computed here without fitmm.bench."""
    sums, counts = {}, {}
    for run in runs:
        with np.load(run / "per_user.npz") as arrays:
            for user, value in zip(arrays["test/user"].tolist(), arrays["test/recall@20"].tolist()):
                sums[user] = sums.get(user, 0.0) + value
                counts[user] = counts.get(user, 0) + 1
    return {u: sums[u] / counts[u] for u in sums if counts[u] == len(runs)}


# -- the quick pipeline ----------------------------------------------------------------------------


def test_quick_report_has_every_section_and_a_verdict_per_claim(quick):
    report = quick["report"]
    for heading in ("# Reproduction", "## Verdicts on the abstract's claims", "## Main table", "### synthetic-a",
                    "### synthetic-b", "## FITMM tuned on validation", "### One configuration for both datasets?",
                    "## Ablations", "## Plots", "## Run directories", "## Commands"):
        assert heading in report, heading
    header, rows = next(t for t in tables(report) if t[0][0] == "claim (abstract)")
    assert [r[0] for r in rows] == [c.text for c in repro.CLAIMS]
    for row in rows:
        assert row[1].strip("*") in VERDICTS - {"not run"}  # every stage ran: each claim has evidence
        assert "synthetic-a:" in row[2] and "synthetic-b:" in row[2]
    # The ablations quick mode leaves out are reported as such, not invented.
    assert "| user_graph | user_graph=true | not run |" in report
    # Plots exist where the report points.
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (quick["out"] / image).is_file(), image
    assert len(re.findall(r"!\[", report)) == 5  # bands, 2 spectra, 2 main-table charts


def test_every_table_number_comes_from_the_run_dirs_it_lists(quick):
    report, out = quick["report"], quick["out"]
    runs = run_lists(report)
    checked = 0
    for header, rows in tables(report):
        if "runs" not in header:
            continue
        metric_at = next(i for i, h in enumerate(header) if h in ("Recall@20", "test Recall@20"))
        for row in rows:
            refs = re.findall(r"\[(\d+)\]", row[-1])
            if not refs:
                continue  # "= base" or "not run" rows carry no number
            dirs = runs[int(refs[0])]
            assert dirs and all(d.is_dir() and out in d.parents for d in dirs)
            summaries = [json.loads((d / "summary.json").read_text()) for d in dirs]
            mean = float(row[metric_at].split(" ± ")[0])
            assert mean == pytest.approx(np.mean([s["test"]["recall@20"] for s in summaries]), abs=5e-5)
            checked += 1
    assert checked == len(runs) >= 8 + 2 * 9  # 4 main rows per dataset, base + 8 ablations per dataset


def test_main_table_p_values_pair_users_against_the_first_fitmm_row(quick):
    report = quick["report"]
    runs = run_lists(report)
    main_tables = [t for t in tables(report) if t[0][0] == "model"]
    assert len(main_tables) == 2
    for header, rows in main_tables:
        assert header[-2] == "p vs FITMM tuned" and rows[0][0] == "**FITMM tuned**" and rows[1][0] == "FITMM released"
        reference = per_user(runs[int(rows[0][-1].strip("[]"))])
        for row in rows[1:]:
            other = per_user(runs[int(row[-1].strip("[]"))])
            users = sorted(set(reference) & set(other))
            x, y = [reference[u] for u in users], [other[u] for u in users]
            if row[-2] == "–":
                assert x == y  # undefined only when every difference is zero
            else:
                assert row[-2] == f"{scipy.stats.wilcoxon(x, y).pvalue:.3g}"


def test_search_trials_never_evaluate_test_and_every_other_run_once(quick):
    out = quick["out"]
    trials = [p.parent for p in out.glob("tuned-*/search/fitmm/trials/*/summary.json")]
    assert len(trials) == 2 * 3
    for trial in trials:
        assert json.loads((trial / "summary.json").read_text())["test"] is None
        with np.load(trial / "per_user.npz") as arrays:
            assert not [k for k in arrays.files if k.startswith("test/")]
    others = [p.parent for p in out.rglob("summary.json") if "trials" not in p.parts]
    assert all(json.loads((run / "summary.json").read_text())["test"] for run in others)
    # One test evaluation per run outside the searches, none anywhere else.
    assert sum("test" in splits for splits in quick["first"]) == len(others)


def test_second_invocation_trains_and_evaluates_nothing(quick):
    assert quick["second"] == []  # not one ranking evaluation: nothing trained, nothing re-evaluated
    assert run_files(quick["out"]) == quick["files"]  # every result and checkpoint file untouched
    assert quick["again"] == quick["report"]  # the same report, from the same runs


def committed_part(out: Path, tmp_path: Path) -> Path:
    """A copy of `out` holding only what the repository's .gitignore lets be committed of the run
    records (benchmarks/results/reproduction/): what a clone of them has."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a git checkout to read .gitignore's rules")
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    records = "benchmarks/results/reproduction/"
    checked = subprocess.run(["git", "-C", str(REPO), "check-ignore", "--no-index", "--stdin"],
                             input="\n".join(records + f for f in files), capture_output=True, text=True)
    assert checked.returncode in (0, 1), checked.stderr
    ignored = {line[len(records):] for line in checked.stdout.splitlines()}
    clone = tmp_path / "clone"
    for name in files:
        if name not in ignored:
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(out / name, clone / name)
    return clone


def test_committed_records_alone_remake_the_report_and_train_nothing(quick, tmp_path, capsys):
    """What .gitignore keeps of the records (no checkpoints, locks, curve images or trials'
    per-user metrics): the whole pipeline run on them trains nothing and writes the same report;
    the spectrum plots, which need a checkpoint, are left as they were."""
    clone = committed_part(quick["out"], tmp_path)
    assert not list(clone.rglob("*.pt")) and not list(clone.rglob(".lock")) and list(clone.rglob("per_user.npz"))
    assert not list(clone.rglob("trials/*/per_user.npz")) and list(clone.rglob("study.db"))
    spectra = {p.name: p.read_bytes() for p in (quick["out"] / "img").glob("reproduction-spectrum-*.png")}
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate_module, "rank_splits", lambda *a, **k: calls.append(a) or {})
        assert repro.main(quick_args(clone)) == 0
    assert calls == []  # nothing trained, nothing evaluated
    expected = quick["report"].replace(str(quick["out"]), str(clone))
    expected = expected.replace(str(quick["out"].parent / "cache"), str(clone.parent / "cache"))  # quick_args'
    assert (clone / "reproduction.md").read_text() == expected
    assert {p.name: p.read_bytes() for p in (clone / "img").glob("reproduction-spectrum-*.png")} == spectra
    assert "has no best.pt (checkpoints are not committed)" in capsys.readouterr().err


def test_shared_configuration_is_proposed_with_evidence_not_shipped(quick):
    out, report = quick["out"], quick["report"]
    section = report.split("### One configuration for both datasets?", 1)[1].split("\n## ", 1)[0]
    header, rows = tables(section)[0]
    assert header[:2] == ["candidate", "on"] and len(rows) == 4
    # synthetic-a has image + text, synthetic-b image + audio: the winners' modality weights cannot
    # cross over, so the candidates leave them at the default and are trained on both datasets.
    assert "modality_weights dropped" in section
    assert all(Path(row[-1]).parent == out / "cross" for row in rows)
    for name in ("synthetic-a", "synthetic-b"):
        assert "modality_weights" not in read_config_file(out / "cross" / f"candidate-{name}.yaml")
    proposed = out / "fitmm-tuned.proposed.yaml"
    if "**Proposed**" in section:
        config = resolve([("proposal", read_config_file(proposed))])  # what `fitmm train --config` reads
        assert config["model"] == "fitmm"
        assert all(line.startswith("#") for line in proposed.read_text().splitlines()[:4])  # the evidence
    else:
        assert not proposed.exists()
    # Never written into the repository without --write-tuned-config.
    assert (REPO_TUNED.read_bytes() if REPO_TUNED.is_file() else None) == quick["tuned_before"]


def test_write_tuned_config_writes_the_proposal_where_asked(quick, tmp_path):
    target = tmp_path / "fitmm-tuned.yaml"
    # A loose tolerance, so that a candidate serves both datasets and is proposed.
    args = quick_args(quick["out"], "--stages", "b", "--tolerance", "0.5", "--write-tuned-config", str(target))
    assert repro.main(args) == 0
    proposed = quick["out"] / "fitmm-tuned.proposed.yaml"
    assert target.read_text() == proposed.read_text()
    text = proposed.read_text()
    assert "synthetic-a:" in text and "synthetic-b:" in text  # the evidence, one line per dataset
    config = resolve([("proposal", read_config_file(proposed))])  # what `fitmm train --config` reads
    assert config["model"] == "fitmm" and "modality_weights" not in read_config_file(proposed)
    assert run_files(quick["out"]) == quick["files"]  # decided from the finished runs


def test_a_run_folder_of_another_configuration_is_refused(quick, capsys):
    assert repro.main(quick_args(quick["out"], "--stages", "c", "--set", "epochs=3")) == 2
    assert "holds a run of another configuration (epochs: 2 there, 3 now" in capsys.readouterr().err
    assert run_files(quick["out"]) == quick["files"]


def test_winner_base_ablates_each_dataset_around_its_own_search_winner(quick, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(quick["out"], out)
    (out / "tuned-synthetic-b" / "results.csv").unlink()  # as if its stage b still ran
    args = quick_args(out, "--stages", "c,e", "--ablation-base", "winner", "--ablations", "gate=off",
                      "--ablation-seeds", "1")
    assert repro.main(args) == 0
    best = read_config_file(out / "tuned-synthetic-a" / "search" / "fitmm" / "best.yaml")
    winner = read_config_file(out / "tuned-synthetic-a" / "winner.yaml")
    searched = set(repro.model_class("fitmm").search_space)
    assert winner["model"] == "fitmm" and set(winner) - {"model"} <= searched
    assert {k: best[k] for k in winner if k != "model"} == {k: v for k, v in winner.items() if k != "model"}
    [base_dir] = (out / "ablations-synthetic-a").glob("winner-*")
    # The base's runs are stage b's runs of the winner, not trained again; the variant is the winner
    # with one key changed.
    assert not (base_dir / "base").exists() and (base_dir / "gate=off" / "s1" / "summary.json").is_file()
    [tuned_s1] = (out / "tuned-synthetic-a" / "runs" / "fitmm").glob("*-s1")
    ran = read_config_file(base_dir / "gate=off" / "s1" / "config.yaml")
    neutral = lambda c: {k: v for k, v in c.items() if k not in RESULT_NEUTRAL_KEYS}  # noqa: E731
    assert neutral(ran) == neutral({**read_config_file(tuned_s1 / "config.yaml"), "gate": "off"})
    assert ran["gate"] != winner["gate"] and all(ran[k] == v for k, v in winner.items() if k not in ("model", "gate"))
    report = (out / "reproduction.md").read_text()
    assert "Base configuration: **each dataset's own search winner**" in report
    assert f"Base: {out / 'tuned-synthetic-a' / 'winner.yaml'} (" in report
    refs = run_lists(report)
    base_ref = int(re.search(r"\| base \| \*\*base\*\* \| 1 \|.*\[(\d+)\] \|$", report, flags=re.M).group(1))
    assert refs[base_ref] == [tuned_s1]
    # The other dataset's stage b has not finished: nothing ran there, and the report says why.
    assert not list((out / "ablations-synthetic-b").glob("winner*"))
    assert ("Not run: the base is synthetic-b's search winner, and stage b (the search and the winner's seeds) "
            "has not finished there.") in report


# -- the verdict rule and a report without runs ---------------------------------------------------


def test_outcome_and_verdict_rule_on_hand_made_numbers():
    alpha = 0.05
    assert repro.outcome(0.20, 0.18, 0.01, alpha) == "better"
    assert repro.outcome(0.18, 0.20, 0.01, alpha) == "worse"
    assert repro.outcome(0.20, 0.18, 0.05, alpha) == "same"  # p must be below alpha
    assert repro.outcome(0.20, 0.18, None, alpha) == "same"  # undefined p: no evidence of a difference
    v = repro.verdict
    assert v({"ml": "better", "tt": "better"}) == "supported"
    assert v({"ml": "better", "tt": "same"}) == "unclear"
    assert v({"ml": "same", "tt": "same"}) == "not supported"
    assert v({"ml": "better", "tt": "worse"}) == "not supported"
    assert v({"ml": "better", "tt": None}) == "unclear"  # one dataset without evidence
    assert v({"ml": "worse", "tt": None}) == "not supported"
    assert v({"ml": None, "tt": None}) == "not run"


def test_report_before_anything_ran_marks_every_claim_not_run(tmp_path):
    out = tmp_path / "empty"
    assert repro.main(quick_args(out, "--stages", "e")) == 0
    report = (out / "reproduction.md").read_text()
    header, rows = next(t for t in tables(report) if t[0][0] == "claim (abstract)")
    assert [r[1] for r in rows] == ["**not run**"] * len(repro.CLAIMS)
    assert "Not run (neither stage a nor stage b has finished for this dataset)." in report
    assert not [p for p in out.rglob("summary.json")]


@pytest.mark.parametrize("bad_row, reason", [
    ("pop,defaults,cd34cd34cd,1 two", "invalid literal for int() with base 10: 'two'"),
    ("../../elsewhere,defaults,cd34cd34cd,1", "unknown model '../../elsewhere'"),
    ("pop,defaults,../../x,1", "config_hash '../../x' is not 10 hex digits"),
])
def test_a_hand_edited_bench_table_is_refused_naming_its_file_and_line(tmp_path, capsys, bad_row, reason):
    out = tmp_path / "edited"
    (out / "bench-synthetic-a").mkdir(parents=True)
    (out / "bench-synthetic-a" / "results.csv").write_text(
        f"model,config,config_hash,seeds\nvbpr,reg_weight=1.0,ab12ab12ab,1 2\n{bad_row}\n")
    assert repro.main(quick_args(out, "--stages", "e")) == 2
    err = capsys.readouterr().err
    assert f"{out / 'bench-synthetic-a' / 'results.csv'}, line 3: not a row as `fitmm bench` writes it" in err
    assert reason in err and "re-run that bench's command" in err
    assert not (out / "reproduction.md").exists()  # nothing half-written


def test_absent_datasets_are_skipped_cleanly(tmp_path):
    out = tmp_path / "real"
    args = ["--datasets", "ml100k_mm", "--data-root", str(tmp_path / "nowhere"), "--out", str(out),
            "--report", str(tmp_path / "r.md"), "--img-dir", str(tmp_path / "img"), "--ablation-base", "released"]
    assert repro.main(args) == 0
    report = (tmp_path / "r.md").read_text()
    assert f"ml100k_mm: not run ({tmp_path / 'nowhere' / 'ml100k_mm'} not found)" in report


def test_winners_are_made_portable_only_when_the_datasets_modalities_differ():
    ml = {"lr": 1e-3, "modality_weights": {"image": 0.2, "text": 0.8}}
    tt = {"lr": 1e-4, "modality_weights": {"image": 0.5, "audio": 0.5}}
    assert repro.portable({"ml": ml, "tt": tt}) == {"ml": {"lr": 1e-3}, "tt": {"lr": 1e-4}}
    same = {"image": 0.3, "text": 0.7}
    both = {"a": ml, "b": {"lr": 1e-2, "modality_weights": same}}
    assert repro.portable(both) == both
