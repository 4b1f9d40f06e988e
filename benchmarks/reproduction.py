"""The reproduction report (issue 14): every claim of FITMM's abstract tested on the real datasets,
from runs this script makes, written to docs/reproduction.md (plots in docs/img/).

    python benchmarks/reproduction.py --set threads=1                 # everything, both datasets
    python benchmarks/reproduction.py --datasets ml100k_mm --stages a --set threads=1   # one piece
    python benchmarks/reproduction.py --stages e                      # the report from what finished
    python benchmarks/reproduction.py --quick                         # the whole pipeline in ~1 min
                                                                      # on two tiny synthetic datasets

Every run is a `fitmm` command (run in this process through fitmm.cli.main, so the command in the
report is exactly what ran; each is also appended to OUT/commands.jsonl with the git commit it ran
at). Re-running the same command continues: a finished run (summary.json) is never trained again,
an interrupted one is resumed from its last checkpoint, `fitmm bench` and `fitmm search` resume
their own way. Stages (--stages, default all; each one skips a dataset whose folder is absent):

  a. main table: `fitmm bench --models fitmm,<baselines> --seeds 5 --grid --grid-max 8` per dataset
     into OUT/bench-<dataset> (docs/benchmarks.md's layout): every baseline selected on validation,
     FITMM at its released defaults (its search space has ranges, which a grid cannot list).
  b. FITMM tuned: `fitmm bench --models fitmm --search 40 --seeds 5` per dataset into
     OUT/tuned-<dataset>: a `fitmm search` of 40 trials on validation only (its trials never
     evaluate test) with the first seed, then the winner with every seed, test evaluated once per
     run. Then: does one configuration serve both datasets? Each dataset's winner (made portable:
     without modality_weights when the datasets' modalities differ) is trained with the first seed
     on every dataset (OUT/cross/) and judged on VALIDATION Recall@20 against each dataset's own
     winner; the candidate whose worst ratio is highest is proposed in OUT/fitmm-tuned.proposed.yaml
     when that ratio is >= 1 - --tolerance. configs/fitmm-tuned.yaml is written only with
     --write-tuned-config (never silently).
  c. ablations: `fitmm train` per variant and seed (--ablation-seeds, default 3) around ONE base
     configuration per dataset (--ablation-base): configs/fitmm-tuned.yaml when it exists, else the
     released defaults; or, with `winner`, each dataset's own search winner (its searched keys,
     written to OUT/tuned-<dataset>/winner.yaml once stage b has finished there, so one dataset's
     ablations can start while the other's search still runs; the base's runs are then stage b's
     runs of the winner, not trained twice); into
     OUT/ablations-<dataset>/<base>/<variant>/s<seed>. A variant equal to the base is the base's runs.
  d. plots: test Recall@20 against the number of bands; the singular-value energy per band and the
     gate distributions of a trained model (the ablation base's first seed, else released FITMM's);
     each dataset's main table as bars.
  e. the report, from whatever finished (missing evidence is "not run"), with a verdict per claim.

Statistics are `fitmm bench`'s own (fitmm.bench): mean ± sample std over seeds, two-sided paired
Wilcoxon signed-rank test on per-user test Recall@20, each user's value averaged over the seeds.

Verdict rule (Recall@20, significance level --alpha, default 0.05), per dataset: "better" when the
mean with the component (or FITMM against EVERY baseline) is higher and p < alpha, "worse" when it
is lower and p < alpha (for the baselines: when ANY baseline is significantly higher), otherwise
"no significant difference". A claim is supported when it is better on every dataset; not supported
when it is worse on any dataset, or better on none; unclear otherwise (mixed, or a dataset missing);
not run without evidence. p-values are not corrected for the number of comparisons, and the test's unit
is the user, not the seed: a small p with a difference below the seed-to-seed std is weak evidence.

Run records: the default OUT, benchmarks/results/reproduction/, is committed to the repository
without its checkpoints (*.pt), hidden files and curve images (.gitignore): configs, summaries,
per-epoch logs, per-user test metrics, the search studies and the bench tables. So anyone can re-make
the report from a clone (--stages e) and check each number against its run, and a pipeline that a
change of machine interrupted goes on from what was committed: finished runs are kept, a search
resumes from its study.db, an unfinished run starts again (its checkpoint was not kept). Stage d's
spectrum plot needs a trained model's best.pt: where it is absent, the plot already in --img-dir
stays and a message says so. To stop part-way and carry on elsewhere: stop it (Ctrl-C; a copy
started in the background by a script ignores SIGINT, so send it SIGTERM), commit
benchmarks/results/, and run the same commands from the clone: the run it was training starts
again, and a search trial it was running is failed and its parameters run first.

For a 2-core machine: pass --set threads=1 and run two copies at once on different --datasets with
the same --out (their folders are disjoint), then one `--stages b,d,e` over both datasets for the
cross-dataset check and the report.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fitmm import bench, runio
from fitmm import cli as fitmm_cli
from fitmm.config import RESULT_NEUTRAL_KEYS, format_point, parse_set, read_config_file
from fitmm.errors import InputError
from fitmm.models import model_class

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO.parent / "shared" / "data"
TUNED_CONFIG = REPO / "configs" / "fitmm-tuned.yaml"
RECORDS = REPO / "benchmarks" / "results" / "reproduction"  # the runs' committed records (module docstring)
DEFAULT_DATASETS = ["ml100k_mm", "tiktok_mmssl"]
BASELINES = [m for m in bench.DEFAULT_MODELS if m != "fitmm"]
METRIC = bench.SIGNIFICANCE_METRIC  # recall@20: the metric of the tests and the verdicts
SHOWN = ["recall@20", "ndcg@20"]
STAGES = "abcde"
REAL = {"seeds": 5, "ablation_seeds": 3, "trials": 40, "grid_max": 8, "models": ",".join(BASELINES), "ablations": None}
# --quick: two tiny synthetic datasets, 2 epochs per run. Like ml100k_mm (image, text) and
# tiktok_mmssl (image, audio) they differ in their modalities, so the shared-configuration check
# meets the same problem (one dataset's modality_weights do not fit the other). Modalities are
# listed in name order: run dirs save config.yaml with sorted keys, and the generator draws the
# features in the order given, so another order would not re-load as the same data.
QUICK_DATA = ["synthetic_users=150", "synthetic_items=100", "synthetic_mean_interactions=12"]
QUICK_DATASETS = {"synthetic-a": [*QUICK_DATA, "synthetic_clusters=4", "synthetic_feature_dims={image: 16, text: 8}"],
                  "synthetic-b": [*QUICK_DATA, "synthetic_clusters=8", "synthetic_feature_dims={audio: 8, image: 16}"]}
QUICK = {"seeds": 2, "ablation_seeds": 2, "trials": 3, "grid_max": 2, "models": "vbpr,pop",
         "sets": ["epochs=2", "progress=false"],
         # the ablations the verdicts and the bands plot need (the others show as "not run")
         "ablations": "num_bands=1,num_bands=2,num_bands=4,num_bands=6,gate=off,ib_weight=0.0,consistency=none,"
                      "item_graph=false"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the ablations and the claims ---------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One ablation: FITMM's config key `key` set to `value` on top of the base configuration."""

    group: str
    key: str
    value: Any

    @property
    def slug(self) -> str:
        return f"{self.key}={str(self.value).lower() if isinstance(self.value, bool) else self.value}"


GROUPS = {
    "bands": "number of spectral bands per modality chunk (1 = no decomposition)",
    "gate": "residual task-adaptive gate: off (every gate 1), 'pos' (sigmoid), 'dual' (tanh)",
    "ib": "frequency-domain information bottleneck: off, and its shut-off threshold φ+",
    "consistency": "spectral consistency loss: none, across bands (as released), across modalities (the paper's "
                   "wording)",
    "item_graph": "graph-enhanced item view H_I (item-item kNN graph)",
    "user_graph": "user-user kNN graph over mean content features",
    "features": "raw item features frozen or trainable (as released)",
    "loss": "recommendation loss: BCE (as released) or BPR",
}
ABLATIONS = [
    Variant("bands", "num_bands", 1), Variant("bands", "num_bands", 2), Variant("bands", "num_bands", 3),
    Variant("bands", "num_bands", 4), Variant("bands", "num_bands", 6),
    Variant("gate", "gate", "off"), Variant("gate", "gate", "pos"), Variant("gate", "gate", "dual"),
    Variant("ib", "ib_weight", 0.0), Variant("ib", "ib_phi", 0.0), Variant("ib", "ib_phi", 0.1),
    Variant("ib", "ib_phi", 0.3),
    Variant("consistency", "consistency", "none"), Variant("consistency", "consistency", "cross_band"),
    Variant("consistency", "consistency", "cross_modal"),
    Variant("item_graph", "item_graph", False),
    Variant("user_graph", "user_graph", True),
    Variant("features", "train_features", False), Variant("features", "train_features", True),
    Variant("loss", "loss", "bce"), Variant("loss", "loss", "bpr"),
]


@dataclass(frozen=True)
class Claim:
    name: str
    text: str  # what the abstract says
    without: Variant | None  # the ablation that removes the component; None: the baseline comparison


CLAIMS = [
    Claim("outperforms", "FITMM consistently and significantly outperforms advanced baselines", None),
    Claim("bands", "modality-wise spectral decomposition into orthogonal bands helps",
          Variant("bands", "num_bands", 1)),
    Claim("gate", "the residual, task-adaptive gate that aggregates the bands helps", Variant("gate", "gate", "off")),
    Claim("ib", "the frequency-domain IB term helps", Variant("ib", "ib_weight", 0.0)),
    Claim("consistency", "the cross-modal spectral consistency loss helps",
          Variant("consistency", "consistency", "none")),
    Claim("item_graph", "graph-enhanced item representations help", Variant("item_graph", "item_graph", False)),
]


def outcome(with_mean: float, without_mean: float, p: float | None, alpha: float) -> str:
    """"better" / "worse" when the means differ that way and p < alpha, else "same"."""
    if p is not None and p < alpha and with_mean != without_mean:
        return "better" if with_mean > without_mean else "worse"
    return "same"


def verdict(outcomes: dict[str, str | None]) -> str:
    """A claim's verdict from its per-dataset outcomes (None: no evidence on that dataset)."""
    present = [o for o in outcomes.values() if o is not None]
    if not present:
        return "not run"
    if "worse" in present:
        return "not supported"
    if len(present) < len(outcomes):
        return "unclear"
    if all(o == "better" for o in present):
        return "supported"
    if "better" not in present:
        return "not supported"
    return "unclear"


# -- the plan -----------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    """A config value as --set writes it (YAML): true/false, numbers, strings; a string YAML would
    read as something else is quoted (YAML 1.1 reads gate=off as false: gate='off')."""
    if isinstance(value, str) and yaml.safe_load(value) != value:
        return f"'{value}'"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


@dataclass
class Data:
    name: str
    data: str  # a dataset folder, or "synthetic"
    sets: list[str] = field(default_factory=list)  # --set values that define it (synthetic sizes)
    missing: str = ""  # why it cannot run (its folder is absent)


@dataclass
class Base:
    kind: str  # "released", "tuned" (one file for every dataset) or "winner" (each dataset's own)
    file: Path | None
    tag: str  # its folder name under OUT/ablations-<dataset>/; for "winner" see dataset_base

    @property
    def pending(self) -> bool:
        """A dataset's own winner not known yet (its stage b has not finished)."""
        return self.kind == "winner" and self.file is None


@dataclass
class Plan:
    out: Path
    datasets: list[Data]
    stages: str
    seeds: int
    ablation_seeds: int
    trials: int
    grid_max: int
    models: list[str]
    sets: list[str]
    ablations: list[Variant]
    base: Base
    report: Path
    img_dir: Path
    alpha: float
    tolerance: float
    write_tuned: Path | None
    argv: list[str]

    def set_args(self, d: Data) -> list[str]:
        return [arg for s in [*d.sets, *self.sets] for arg in ("--set", s)]

    def present(self) -> list[Data]:
        return [d for d in self.datasets if not d.missing]


def bench_dir(plan: Plan, d: Data) -> Path:
    return plan.out / f"bench-{d.name}"


def tuned_dir(plan: Plan, d: Data) -> Path:
    return plan.out / f"tuned-{d.name}"


def ablation_dir(plan: Plan, d: Data) -> Path:
    return plan.out / f"ablations-{d.name}" / dataset_base(plan, d).tag


def parse_datasets(text: str | None, quick: bool, root: Path) -> list[Data]:
    if quick:
        names = list(QUICK_DATASETS) if text is None else [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in QUICK_DATASETS]
        if unknown:
            raise InputError(f"--datasets with --quick: {unknown[0]} is not one of {', '.join(QUICK_DATASETS)}")
        return [Data(n, "synthetic", list(QUICK_DATASETS[n])) for n in names]
    names = DEFAULT_DATASETS if text is None else [n.strip() for n in text.split(",") if n.strip()]
    out = []
    for name in names:
        path = Path(name) if "/" in name else root / name
        missing = "" if path.is_dir() else f"{path} not found"
        out.append(Data(path.name, str(path), [], missing))
    return out


def parse_ablations(text: str | None) -> list[Variant]:
    if text is None:
        return list(ABLATIONS)
    by_slug = {v.slug: v for v in ABLATIONS}
    chosen = []
    for slug in (s.strip() for s in text.split(",") if s.strip()):
        if slug not in by_slug:
            raise InputError(f"--ablations: {slug!r} is not an ablation; choose from {', '.join(by_slug)}")
        chosen.append(by_slug[slug])
    return chosen


def parse_base(text: str) -> Base:
    """--ablation-base auto | released | tuned | winner | FILE.yaml."""
    if text == "auto":
        text = "tuned" if TUNED_CONFIG.is_file() else "released"
    if text == "released":
        return Base("released", None, "released")
    if text == "winner":
        return Base("winner", None, "winner")
    path = TUNED_CONFIG if text == "tuned" else Path(text)
    if not path.is_file():
        raise InputError(f"--ablation-base {text}: {path} not found; use released, or write it first "
                         f"(stage b proposes one; --write-tuned-config ships it)")
    return Base("tuned", path, f"tuned-{content_tag(path)}")


# -- running fitmm commands ---------------------------------------------------------------------


class CommandFailed(Exception):
    pass


_COMMIT: str | None = None


def commit() -> str:
    """The git commit the runs are made at ("+dirty" when tracked files differ from it). The run records
    under benchmarks/results/ are left out of that check: they change as runs finish, and the marker is
    about the code that made them."""
    global _COMMIT
    if _COMMIT is None:
        try:
            head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True, check=True).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no",
                                    "--", ".", ":(exclude)benchmarks/results"],
                                   capture_output=True, text=True, check=True).stdout.strip()
            _COMMIT = head + ("+dirty" if dirty else "")
        except (OSError, subprocess.CalledProcessError):
            _COMMIT = "unknown (not a git checkout)"
    return _COMMIT


def shell_quote(arg: str) -> str:
    """shlex.quote, but "gate='off'" rather than 'gate='"'"'off'"'"''."""
    if "'" in arg and not any(c in arg for c in '"$`\\!'):
        return f'"{arg}"'
    return shlex.quote(arg)


def command_text(argv: list[str]) -> str:
    return "fitmm " + " ".join(shell_quote(a) for a in argv)


class _Tee(io.TextIOBase):
    """stderr whose last characters are also kept (to quote a failed command's message; only a tail,
    since progress bars of hours-long runs go through it too)."""

    KEEP = 20_000

    def __init__(self, stream):
        self.stream, self.kept = stream, ""

    def write(self, text):
        self.kept = (self.kept + text)[-self.KEEP:]
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()


def run_fitmm(plan: Plan, argv: list[str]) -> None:
    """Run one `fitmm` command in this process; CommandFailed (with its message) unless it exits 0."""
    log(f"$ {command_text(argv)}")
    started = time.time()
    tee = _Tee(sys.stderr)
    with contextlib.redirect_stderr(tee):
        code = fitmm_cli.main(argv)
    plan.out.mkdir(parents=True, exist_ok=True)
    with open(plan.out / "commands.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"command": command_text(argv), "exit": code, "commit": commit(),
                                 "seconds": round(time.time() - started, 1)}) + "\n")
    if code == 130:
        raise KeyboardInterrupt
    if code != 0:
        lines = [line for line in tee.kept.splitlines() if line.startswith("fitmm: error")]
        raise CommandFailed(f"`{command_text(argv)}` exited {code}: " + (lines[-1] if lines else "see above"))


def numbers(config: dict[str, Any]) -> dict[str, Any]:
    """A config without the keys that never change a run's numbers (threads, progress...)."""
    return {k: v for k, v in config.items() if k not in RESULT_NEUTRAL_KEYS}


def intended_config(argv: list[str]) -> dict[str, Any]:
    """The resolved config a `fitmm train` argv would run (the CLI's own resolution)."""
    return fitmm_cli.build_config(fitmm_cli.make_parser().parse_args(argv))


def train_run(plan: Plan, argv: list[str], run_dir: Path) -> None:
    """`fitmm train ARGV --out RUN_DIR`, resumable: a finished run is kept, an interrupted one is
    resumed, one that never checkpointed starts again. A run dir holding another configuration is
    an error (never silently reused)."""
    if (run_dir / "config.yaml").is_file():
        bench.check_same_config(run_dir, intended_config(argv))
    if (run_dir / "summary.json").is_file():
        return
    if (run_dir / "last.pt").is_file():
        run_fitmm(plan, ["train", "--resume", str(run_dir)])
        return
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    run_fitmm(plan, [*argv, "--out", str(run_dir)])


# -- stage a: the main table ----------------------------------------------------------------------


def bench_argv(plan: Plan, d: Data) -> list[str]:
    return ["bench", "--models", ",".join(["fitmm", *plan.models]), "--data", d.data, "--seeds", str(plan.seeds),
            "--grid", "--grid-max", str(plan.grid_max), *plan.set_args(d), "--out", str(bench_dir(plan, d))]


def stage_a(plan: Plan, d: Data) -> None:
    run_fitmm(plan, bench_argv(plan, d))


# -- stage b: FITMM tuned on validation --------------------------------------------------------------


def tuned_argv(plan: Plan, d: Data) -> list[str]:
    return ["bench", "--models", "fitmm", "--search", str(plan.trials), "--data", d.data, "--seeds", str(plan.seeds),
            *plan.set_args(d), "--out", str(tuned_dir(plan, d))]


def stage_b(plan: Plan, d: Data) -> None:
    run_fitmm(plan, tuned_argv(plan, d))


def winner_point(plan: Plan, d: Data) -> dict[str, Any] | None:
    """The searched keys of the dataset's best trial (search/fitmm/best.yaml), or None."""
    path = tuned_dir(plan, d) / "search" / "fitmm" / "best.yaml"
    if not path.is_file():
        return None
    best = read_config_file(path)
    pinned = parse_set([*d.sets, *plan.sets])
    return {k: best[k] for k in model_class("fitmm").search_space if k in best and k not in pinned}


def portable(points: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The winners as candidates for every dataset: modality_weights dropped (the dataset's default
    then applies) when the datasets' modalities differ, since one dataset's weights name modalities
    the other lacks."""
    names = {tuple(sorted((p.get("modality_weights") or {}).keys())) for p in points.values()}
    if len(names) <= 1:
        return {name: dict(p) for name, p in points.items()}
    return {name: {k: v for k, v in p.items() if k != "modality_weights"} for name, p in points.items()}


def candidate_file(plan: Plan, name: str) -> Path:
    return plan.out / "cross" / f"candidate-{name}.yaml"


def tag(mapping: dict[str, Any]) -> str:
    """A short stable hash of a configuration mapping (names the folders of its runs)."""
    import hashlib

    return hashlib.sha256(json.dumps(mapping, sort_keys=True, default=str).encode()).hexdigest()[:8]


def content_tag(path: Path) -> str:
    return tag(read_config_file(path))


def cross_argv(plan: Plan, source: str, target: Data) -> list[str]:
    return ["train", "--config", str(candidate_file(plan, source)), "--data", target.data, *plan.set_args(target),
            "--seed", "1"]


@dataclass
class Cross:
    """Stage b's cross-dataset check: each (portable) winner on every dataset, seed 1."""

    datasets: list[Data]
    points: dict[str, dict[str, Any]]  # each dataset's winner (its searched keys)
    candidates: dict[str, dict[str, Any]]  # the same, portable
    runs: dict[tuple[str, str], Path | None]  # (source, target) -> its run dir; None: the tuned seed-1 run

    def argv(self, plan: Plan, source: str, target: Data) -> list[str]:
        return [*cross_argv(plan, source, target), "--out", str(self.runs[source, target.name])]


def cross_plan(plan: Plan) -> Cross | None:
    """None until at least two datasets' searches have finished. A candidate's runs are named by
    its content, so a search extended to another winner makes new runs instead of reusing old ones."""
    datasets = [d for d in plan.present() if winner_point(plan, d) is not None]
    if len(datasets) < 2:
        return None
    points = {d.name: winner_point(plan, d) for d in datasets}
    candidates = portable(points)
    runs = {}
    for source in datasets:
        name = tag({"model": "fitmm", **candidates[source.name]})
        for target in datasets:
            same = source is target and candidates[source.name] == points[source.name]
            folder = plan.out / "cross" / f"candidate-{name}-on-{target.name}"  # equal candidates share runs
            runs[source.name, target.name] = None if same else folder
    return Cross(datasets, points, candidates, runs)


def stage_b_cross(plan: Plan) -> None:
    """Each dataset's (portable) winner trained with seed 1 on every dataset; validation decides."""
    cross = cross_plan(plan)
    if cross is None:
        log("stage b: one configuration for every dataset needs the searches of at least two datasets; skipped")
        return
    for d in cross.datasets:
        path = candidate_file(plan, d.name)
        dropped = "; modality_weights left at the default" if cross.candidates[d.name] != cross.points[d.name] else ""
        text = (f"# FITMM tuned on {d.name} (the searched keys of {tuned_dir(plan, d)}/search/fitmm/best.yaml"
                f"{dropped})\n"
                + yaml.safe_dump({"model": "fitmm", **cross.candidates[d.name]}, sort_keys=False))
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_text() != text:
            runio.atomic_write(path, lambda h: h.write(text.encode()))
    for source in cross.datasets:
        for target in cross.datasets:
            run_dir = cross.runs[source.name, target.name]
            if run_dir is None:
                continue  # the winner itself on its own dataset: the tuned seed-1 run
            failure = run_dir.with_suffix(".failed.json")
            argv = cross_argv(plan, source.name, target)
            try:
                train_run(plan, argv, run_dir)
                failure.unlink(missing_ok=True)
            except CommandFailed as exc:  # e.g. the candidate does not fit that dataset
                runio.write_json(failure, {"command": command_text(argv), "error": str(exc)})
                log(f"  {source.name}'s winner cannot run on {target.name}: {exc}")
    proposal = propose(plan)
    proposed = plan.out / "fitmm-tuned.proposed.yaml"
    if proposal is None or not proposal["serves"]:
        proposed.unlink(missing_ok=True)
        return
    text = proposal_yaml(plan, proposal)
    runio.atomic_write(proposed, lambda h: h.write(text.encode()))
    log(f"stage b: proposed {proposed} (from {proposal['source']}'s winner; worst validation ratio "
        f"{proposal['worst']:.3f})")
    if plan.write_tuned is not None:
        target = plan.write_tuned
        if target.is_file() and target.read_text() == text:
            log(f"  {target}: already this configuration")
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_file():
                log(f"  {target}: replaced (asked by --write-tuned-config); it was:\n{target.read_text()}")
            runio.atomic_write(target, lambda h: h.write(text.encode()))
            log(f"  wrote {target}")


# -- stage c: ablations -------------------------------------------------------------------------------


def winner_file(plan: Plan, d: Data) -> Path:
    return tuned_dir(plan, d) / "winner.yaml"


def winner_runs(plan: Plan, d: Data) -> dict[int, Path]:
    """{seed: run dir} of stage b's runs of the dataset's winner, once its bench wrote its table."""
    return {seed: run for _, _, runs in bench_table(tuned_dir(plan, d)) for seed, run in runs.items()}


def dataset_base(plan: Plan, d: Data) -> Base:
    """The ablation base on dataset d. For "winner": the dataset's search winner, written to
    winner_file as a config file (kept in step with search/fitmm/best.yaml, so a search extended to
    another winner gets new ablation folders, named by the winner's content); until stage b has
    finished there (the search and the winner's seeds, which are the base's runs), a base with no
    file and the tag "winner-pending", whose runs are all "not run"."""
    if plan.base.kind != "winner":
        return plan.base
    point = winner_point(plan, d)
    if point is None or not winner_runs(plan, d):
        return Base("winner", None, "winner-pending")
    path = winner_file(plan, d)
    text = (f"# FITMM's search winner on {d.name} (the searched keys of "
            f"{tuned_dir(plan, d)}/search/fitmm/best.yaml)\n"
            + yaml.safe_dump({"model": "fitmm", **point}, sort_keys=False))
    if not path.is_file() or path.read_text() != text:
        runio.atomic_write(path, lambda h: h.write(text.encode()))
    return Base("winner", path, f"winner-{content_tag(path)}")


def ablation_argv(plan: Plan, d: Data, variant: Variant | None, seed: int) -> list[str]:
    argv = ["train", "--model", "fitmm", "--data", d.data]
    base = dataset_base(plan, d)
    if base.file is not None:
        argv += ["--config", str(base.file)]
    argv += plan.set_args(d)
    if variant is not None:
        argv += ["--set", f"{variant.key}={fmt(variant.value)}"]
    return [*argv, "--seed", str(seed)]


def ablation_cells(plan: Plan, d: Data, variants: list[Variant]) -> list[tuple[Variant | None, bool]]:
    """(variant, same as the base?) for the base (None) and each variant FITMM has a key for."""
    keys = model_class("fitmm").defaults
    base = numbers(intended_config(ablation_argv(plan, d, None, 1)))
    cells: list[tuple[Variant | None, bool]] = [(None, True)]
    for v in variants:
        if v.key not in keys:
            continue
        cells.append((v, numbers(intended_config(ablation_argv(plan, d, v, 1))) == base))
    return cells


def ablation_runs(plan: Plan, d: Data, variant: Variant | None, same: bool) -> list[tuple[int, Path]]:
    slug = "base" if variant is None or same else variant.slug
    runs = [(s, ablation_dir(plan, d) / slug / f"s{s}") for s in range(1, plan.ablation_seeds + 1)]
    if slug == "base" and plan.base.kind == "winner":
        # The winner's seeds from stage b are the base's runs (the same command: train_run checks
        # it), not trained a second time.
        tuned = winner_runs(plan, d)
        runs = [(s, tuned.get(s, run)) for s, run in runs]
    return runs


def stage_c(plan: Plan, d: Data) -> None:
    if dataset_base(plan, d).pending:
        log(f"stage c: {d.name}: --ablation-base winner needs stage b (the search and the winner's seeds) "
            "finished there first; skipped")
        return
    for variant, same in ablation_cells(plan, d, plan.ablations):
        if variant is not None and same:
            continue
        for seed, run_dir in ablation_runs(plan, d, variant, same):
            train_run(plan, ablation_argv(plan, d, variant, seed), run_dir)


# -- reading the evidence back (every number comes from a run directory's summary.json) ---------------


@dataclass
class Row:
    label: str
    config: str
    runs: list[Path]
    summaries: list[dict]
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float | None] = field(default_factory=dict)
    p: float | None = None
    n_users: int = 0
    ref: int = 0  # its number in the report's list of run directories
    note: str = ""

    @property
    def seeds(self) -> list[int]:
        return [s["seed"] for s in self.summaries]


def make_row(label: str, config: str, runs: list[Path]) -> Row | None:
    """Mean ± std over the runs that finished (None when none has)."""
    done = [r for r in runs if (r / "summary.json").is_file()]
    if not done:
        return None
    summaries = [json.loads((r / "summary.json").read_text()) for r in done]
    row = Row(label, config, done, summaries)
    for metric in bench.METRICS:
        row.mean[metric], row.std[metric] = bench.mean_std([s["test"][metric] for s in summaries])
    if len(done) < len(runs):
        row.note = f"{len(done)} of {len(runs)} seeds finished"
    return row


def significance(a: Row, b: Row) -> tuple[float | None, int]:
    """bench's paired Wilcoxon on per-user test Recall@20 (each user averaged over the seeds)."""
    x, y = bench.paired(bench.per_user_mean(a.runs), bench.per_user_mean(b.runs))
    return bench.wilcoxon_p(x, y), len(x)


def bench_table(folder: Path) -> list[tuple[str, str, dict[int, Path]]]:
    """(model, configuration, {seed: run dir}) of each row of a finished `fitmm bench` folder's
    results.csv; [] before it is written."""
    path = folder / "results.csv"
    if not path.is_file():
        return []
    table = []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        for r in reader:
            try:  # a missing column, a bad value or a short row is refused below
                seeds = [int(s) for s in r["seeds"].split()]
                # model and config_hash name run folders: only a known model and bench's hex hash, never a path
                model_class(r["model"])
                if not re.fullmatch(f"[0-9a-f]{{{bench.HASH_DIGITS}}}", r["config_hash"] or ""):
                    raise ValueError(f"config_hash {r['config_hash']!r} is not {bench.HASH_DIGITS} hex digits")
                table.append((r["model"], r["config"],
                              {s: bench.hashed_cell_dir(folder, r["model"], r["config_hash"], s) for s in seeds}))
            except (KeyError, ValueError, AttributeError, InputError) as exc:
                raise InputError(
                    f"{path}, line {reader.line_num}: not a row as `fitmm bench` writes it (columns model, config, "
                    f"config_hash and space-separated integer seeds; {type(exc).__name__}: {exc}); re-run that "
                    "bench's command to rewrite the file from its runs") from None
    return table


def read_bench_rows(folder: Path) -> list[Row]:
    """The rows of a finished `fitmm bench` folder, re-read from their run dirs."""
    rows = [make_row(model, config, list(runs.values())) for model, config, runs in bench_table(folder)]
    return [row for row in rows if row is not None]


def main_rows(plan: Plan, d: Data) -> tuple[list[Row], Row | None]:
    """(rows: FITMM tuned, FITMM released, baselines; the reference row the p-values are against)."""
    rows = []
    tuned = read_bench_rows(tuned_dir(plan, d))
    for row in tuned:
        row.label = "FITMM tuned"
        rows.append(row)
    for row in read_bench_rows(bench_dir(plan, d)):
        if row.label == "fitmm":
            row.label = "FITMM released"
            rows.insert(len(tuned), row)
        else:
            rows.append(row)
    if not rows:
        return [], None
    ref = rows[0] if rows[0].label.startswith("FITMM") else None
    if ref is not None:
        for row in rows:
            if row is not ref:
                row.p, row.n_users = significance(ref, row)
    return rows, ref


def baselines_of(rows: list[Row]) -> list[Row]:
    return [r for r in rows if not r.label.startswith("FITMM")]


def ablation_rows(plan: Plan, d: Data) -> list[tuple[Variant | None, Row | None, bool]]:
    """(variant or None for the base, its row or None when not run, same as base?) with p against the base."""
    out = []
    for variant, same in ablation_cells(plan, d, ABLATIONS):
        runs = [r for _, r in ablation_runs(plan, d, variant, same)]
        label = "base" if variant is None else variant.slug
        out.append((variant, make_row(label, label, runs), same))
    base = out[0][1]
    for variant, row, same in out[1:]:
        if row is not None and base is not None and not same:
            row.p, row.n_users = significance(base, row)
    return out


def find_ablation(rows, variant: Variant):
    for v, row, same in rows:
        if v == variant:
            return row, same
    return None, False


# -- stage b's evidence: the search and the proposal -------------------------------------------------


def search_summary(plan: Plan, d: Data) -> dict | None:
    """States and best trials of the dataset's FITMM search (read from its Optuna study)."""
    folder = tuned_dir(plan, d) / "search" / "fitmm"
    if not (folder / "study.db").is_file():
        return None
    try:
        import optuna
    except ImportError:
        return {"error": f"optuna is not installed; see {folder}/trials.md"}
    from fitmm import search as hpsearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{(folder / 'study.db').resolve()}"
    names = optuna.get_all_study_names(storage)
    if not names:
        return None
    study = optuna.load_study(study_name=names[0], storage=storage)
    space = hpsearch.parse_space(dict(model_class("fitmm").search_space), "fitmm's search space")
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    complete = sorted((t for t in trials if t.state.name == "COMPLETE" and "same_as" not in t.user_attrs),
                      key=lambda t: -t.value)
    top = [{"number": t.number, "value": t.value, "point": hpsearch.point_of(t.params, space),
            "epochs": t.user_attrs.get("epochs")} for t in complete[:5]]
    return {"folder": folder, "study": names[0], "states": states, "top": top}


def cross_evidence(plan: Plan) -> dict | None:
    """{candidate: {dataset: (valid, own winner's valid, run dir) or why not}}; None until two
    datasets' searches have finished."""
    cross = cross_plan(plan)
    if cross is None:
        return None
    own = {}
    for d in cross.datasets:
        rows = read_bench_rows(tuned_dir(plan, d))
        first = [(s, r) for s, r in zip(rows[0].summaries, rows[0].runs) if s["seed"] == 1] if rows else []
        own[d.name] = (first[0][0]["valid"][METRIC], first[0][1]) if first else None
    table: dict[str, dict[str, Any]] = {}
    for source in cross.datasets:
        table[source.name] = {}
        for target in cross.datasets:
            run = cross.runs[source.name, target.name]
            if own[target.name] is None:
                table[source.name][target.name] = "the tuned seed-1 run has not finished"
                continue
            if run is None:
                value, run = own[target.name]
            elif (run / "summary.json").is_file():
                value = json.loads((run / "summary.json").read_text())["valid"][METRIC]
            elif run.with_suffix(".failed.json").is_file():
                table[source.name][target.name] = json.loads(run.with_suffix(".failed.json").read_text())["error"]
                continue
            else:
                table[source.name][target.name] = "not run"
                continue
            table[source.name][target.name] = (value, own[target.name][0], run)
    return {"datasets": [d.name for d in cross.datasets], "points": cross.points, "candidates": cross.candidates,
            "table": table}


def propose(plan: Plan) -> dict | None:
    evidence = cross_evidence(plan)
    if evidence is None:
        return None
    best = None
    for source, results in evidence["table"].items():
        if not all(isinstance(v, tuple) for v in results.values()):
            continue
        worst = min(v[0] / v[1] if v[1] > 0 else 0.0 for v in results.values())
        if best is None or worst > best["worst"]:
            best = {"source": source, "worst": worst, "point": evidence["candidates"][source]}
    if best is None:
        return {"serves": False, "evidence": evidence, "source": None, "worst": None, "point": None}
    best["serves"] = best["worst"] >= 1 - plan.tolerance
    best["evidence"] = evidence
    return best


def proposal_yaml(plan: Plan, proposal: dict) -> str:
    dropped = proposal["point"] != proposal["evidence"]["points"][proposal["source"]]
    lines = [f"# FITMM tuned on validation (issue 14): {proposal['source']}'s search winner"
             f"{' without its modality_weights' if dropped else ''};",
             f"# its validation Recall@20 (seed 1) is at least {proposal['worst']:.3f} x each dataset's own winner's:"]
    for target, (value, own, run) in proposal["evidence"]["table"][proposal["source"]].items():
        lines.append(f"#   {target}: {value:.4f} vs {own:.4f} ({run})")
    lines.append("# made by benchmarks/reproduction.py; train it: "
                 "fitmm train --config configs/fitmm-tuned.yaml --data PATH")
    return "\n".join(lines) + "\n" + yaml.safe_dump({"model": "fitmm", **proposal["point"]}, sort_keys=False)


# -- stage d: plots -----------------------------------------------------------------------------------


def pyplot():
    from fitmm.plots import _pyplot

    return _pyplot()


def bands_plot_path(plan: Plan) -> Path:
    return plan.img_dir / "reproduction-bands.png"


def spectrum_plot_path(plan: Plan, d: Data) -> Path:
    return plan.img_dir / f"reproduction-spectrum-{d.name}.png"


def main_plot_path(plan: Plan, d: Data) -> Path:
    return plan.img_dir / f"reproduction-main-{d.name}.png"


def bands_curve(plan: Plan, d: Data) -> list[tuple[int, Row]]:
    """(num_bands, row) for every band count among the ablations that ran, the base's included."""
    rows = ablation_rows(plan, d)
    base_bands = numbers(intended_config(ablation_argv(plan, d, None, 1)))["num_bands"]
    points = {}
    for variant, row, same in rows:
        if row is None:
            continue
        if variant is None:
            points[base_bands] = row
        elif variant.key == "num_bands" and not same:
            points[variant.value] = row
    return sorted(points.items())


def diagnostics_run(plan: Plan, d: Data) -> Path | None:
    """The trained model whose spectrum is shown: the ablation base's first seed, else released FITMM's."""
    base = ablation_runs(plan, d, None, True)[0][1]
    if (base / "summary.json").is_file():
        return base
    released = [r for r in read_bench_rows(bench_dir(plan, d)) if r.label == "fitmm"]
    return released[0].runs[0] if released else None


def diagnostics_path(plan: Plan, d: Data) -> Path:
    return plan.out / f"diagnostics-{d.name}.json"


def diagnostics_summary(run: str, diag: dict[str, Any]) -> dict[str, Any]:
    """What the report's spectrum table shows of FITMM.diagnostics(), kept in OUT (committed, unlike
    the checkpoint it came from) so the report can be re-made from a clone. `run`: relative to OUT."""
    sides = {}
    for side in ("user", "item"):
        gates = diag["gates"][side]
        sides[side] = {"energy": diag["band_energy"][side].tolist(), "gate_mean": gates.mean(0).tolist(),
                       "gate_std": gates.std(0).tolist(), "band_weights": diag["band_weights"][side].tolist()}
    return {"run": run, "modalities": list(diag["modalities"]), "sides": sides}


def stage_d(plan: Plan) -> None:
    plt = pyplot()
    if plt is None:
        log("stage d: skipped: matplotlib is not installed (pip install fitmm[plots])")
        return
    import fitmm
    from fitmm.plots import band_diagnostics_figure, save_figure

    curves = {d.name: bands_curve(plan, d) for d in plan.present()}
    curves = {name: c for name, c in curves.items() if c}
    if curves:
        fig, axes = plt.subplots(1, len(curves), figsize=(4.6 * len(curves), 3.4), squeeze=False)
        for ax, (name, curve) in zip(axes[0], curves.items()):
            x = [b for b, _ in curve]
            ax.errorbar(x, [r.mean[METRIC] for _, r in curve], yerr=[r.std[METRIC] or 0.0 for _, r in curve],
                        marker="o", capsize=3)
            ax.set(title=name, xlabel="number of bands (num_bands)", ylabel="test Recall@20 (mean ± std)")
            ax.set_xticks(x)
            ax.grid(alpha=0.3)
        save_figure(fig, bands_plot_path(plan))
    for d in plan.present():
        run = diagnostics_run(plan, d)
        if run is not None and not (run / "best.pt").is_file():
            log(f"stage d: {d.name}: {run} has no best.pt (checkpoints are not committed): its spectrum plot "
                f"{spectrum_plot_path(plan, d)} is left as it is")
        elif run is not None:
            diag = fitmm.load(run).model.diagnostics()
            save_figure(band_diagnostics_figure(diag, f"{d.name}: {run}"), spectrum_plot_path(plan, d))
            runio.write_json(diagnostics_path(plan, d), diagnostics_summary(os.path.relpath(run, plan.out), diag))
        rows, _ = main_rows(plan, d)
        if rows:
            bench.plot_bench([{"model": r.label, "mean": r.mean, "std": r.std} for r in rows], main_plot_path(plan, d),
                             d.name)


# -- stage e: the report --------------------------------------------------------------------------------


class Report:
    """Markdown lines plus the numbered list of run directories the numbers came from."""

    def __init__(self, plan: Plan):
        self.plan, self.lines, self.refs = plan, [], []

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def ref(self, where: str, row: Row) -> str:
        row.ref = len(self.refs) + 1
        self.refs.append((where, row.runs))
        return f"[{row.ref}]"

    def link(self, path: Path) -> str:
        return os.path.relpath(path, self.plan.report.parent)


def cell(row: Row, metric: str) -> str:
    mean, std = row.mean[metric], row.std[metric]
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def p_text(p: float | None) -> str:
    return "–" if p is None else f"{p:.3g}"


def code_block(*commands: str) -> list[str]:
    return ["", "```", *commands, "```", ""]


def main_section(r: Report, plan: Plan) -> dict[str, dict]:
    """Writes the main tables; returns per dataset what the first claim's verdict needs."""
    r.add("## Main table (stage a: baselines; stage b: FITMM tuned)", "",
          "Test metrics, mean ± sample std over seeds (selection=clean: early stopping on validation Recall@20, "
          "test evaluated once per run on the best-validation checkpoint). Baselines: validation-selected by "
          f"`fitmm bench --grid --grid-max {plan.grid_max}` (each one's selection.md lists every point tried). "
          "FITMM released: the authors' configuration (the model's defaults). FITMM tuned: the winner of a "
          f"`fitmm search` of {plan.trials} trials on validation. p: paired Wilcoxon signed-rank test "
          "(two-sided) against the first FITMM row, on per-user test Recall@20 averaged over the seeds. The "
          "baselines are the code of the commit(s) listed at the end (after issue 13: docs/fidelity.md).")
    evidence = {}
    for d in plan.datasets:
        r.add("", f"### {d.name}", "")
        if d.missing:
            r.add(f"Not run: {d.missing}.")
            evidence[d.name] = None
            continue
        rows, ref = main_rows(plan, d)
        r.add("Commands:", *code_block(command_text(bench_argv(plan, d)), command_text(tuned_argv(plan, d))))
        if not rows:
            r.add("Not run (neither stage a nor stage b has finished for this dataset).")
            evidence[d.name] = None
            continue
        against = ref.label if ref else "–"
        head = ["model", "configuration", "seeds", *(bench.METRIC_LABELS[m] for m in bench.METRICS),
                f"p vs {against}", "runs"]
        r.add("| " + " | ".join(head) + " |", "|" + "---|" * len(head))
        for row in rows:
            name = f"**{row.label}**" if row is ref else row.label
            cells = [name, row.config + (f" ({row.note})" if row.note else ""), ", ".join(map(str, row.seeds)),
                     *(cell(row, m) for m in bench.METRICS), "" if row is ref else p_text(row.p),
                     r.ref(f"{d.name}, main table, {row.label}", row)]
            r.add("| " + " | ".join(cells) + " |")
        if main_plot_path(plan, d).is_file():
            r.add("", f"![{d.name}: main table]({r.link(main_plot_path(plan, d))})")
        labels = {x.label for x in rows}
        missing = [what for what, label in (("stage a (baselines, FITMM released)", "FITMM released"),
                                            ("stage b (FITMM tuned)", "FITMM tuned")) if label not in labels]
        if missing:
            r.add("", f"Not run yet: {'; '.join(missing)}.")
        base = baselines_of(rows)
        evidence[d.name] = None
        if ref is not None and base:
            best = max(base, key=lambda x: x.mean[METRIC])
            above = [x for x in base if x.mean[METRIC] > ref.mean[METRIC]]
            r.add("", f"{ref.label}'s mean test Recall@20 over {len(ref.runs)} seeds is {cell(ref, METRIC)}; the best "
                  f"baseline's, {best.label}'s ({best.config}), is {cell(best, METRIC)} (p = {p_text(best.p)}). "
                  + (f"{len(above)} of {len(base)} baselines have a higher mean ({', '.join(x.label for x in above)})."
                     if above else f"{ref.label}'s mean is above each of the {len(base)} baselines'."))
            outcomes = [outcome(ref.mean[METRIC], x.mean[METRIC], x.p, plan.alpha) for x in base]
            result = "worse" if "worse" in outcomes else "better" if all(o == "better" for o in outcomes) else "same"
            evidence[d.name] = {"outcome": result, "ref": ref, "best": best,
                                "worse": [x for x, o in zip(base, outcomes) if o == "worse"],
                                "same": [x for x, o in zip(base, outcomes) if o == "same"]}
    return evidence


def tuning_section(r: Report, plan: Plan) -> None:
    r.add("", "## FITMM tuned on validation (stage b)", "",
          f"`fitmm bench --models fitmm --search {plan.trials}` runs `fitmm search` (TPE, median pruning, seed 1) in "
          "<out>/tuned-<dataset>/search/fitmm/ on VALIDATION Recall@20 (its trials never evaluate test), then trains "
          f"the winner with seeds 1-{plan.seeds}, test evaluated once per run (the FITMM tuned rows above).")
    for d in plan.present():
        r.add("", f"### {d.name}", "")
        summary = search_summary(plan, d)
        if summary is None:
            r.add("Not run.")
            continue
        if "error" in summary:
            r.add(summary["error"])
            continue
        states = ", ".join(f"{n} {s}" for s, n in sorted(summary["states"].items()))
        total = sum(summary["states"].values())
        r.add(f"Study `{summary['study']}` in {summary['folder']}: {total} trials ({states}). "
              f"Best complete trials (validation {bench.METRIC_LABELS[METRIC]}, seed 1):", "",
              "| trial | valid Recall@20 | epochs | configuration |", "|---|---|---|---|")
        for t in summary["top"]:
            r.add(f"| {t['number']} | {t['value']:.4f} | {t['epochs'] if t['epochs'] is not None else ''} | "
                  f"{format_point(t['point'])} |")
    r.add("", "### One configuration for both datasets?", "")
    proposal = propose(plan)
    if proposal is None:
        r.add("Not run: needs the searches and the tuned runs of at least two datasets.")
        return
    evidence = proposal["evidence"]
    dropped = evidence["candidates"] != evidence["points"]
    r.add("Each dataset's winner, as a candidate for every dataset"
          f"{' (modality_weights dropped: the datasets have different modalities)' if dropped else ''}, "
          "trained with seed 1 and compared on VALIDATION Recall@20 with that dataset's own winner (seed 1). "
          f"Rule: a candidate serves every dataset when each ratio is >= {1 - plan.tolerance:.2f} (--tolerance "
          f"{plan.tolerance}).", "", "| candidate | on | valid Recall@20 | own winner's | ratio | run |",
          "|---|---|---|---|---|---|")
    for source, results in evidence["table"].items():
        for target, value in results.items():
            if isinstance(value, tuple):
                r.add(f"| {source}'s winner | {target} | {value[0]:.4f} | {value[1]:.4f} | "
                      f"{value[0] / value[1] if value[1] > 0 else float('nan'):.3f} | {value[2]} |")
            else:
                r.add(f"| {source}'s winner | {target} | – | – | – | {value} |")
    proposed = plan.out / "fitmm-tuned.proposed.yaml"
    if proposal["source"] is None:
        r.add("", "No candidate ran on every dataset, so none is proposed.")
    elif proposal["serves"]:
        r.add("", f"**Proposed**: {proposal['source']}'s winner ({format_point(proposal['point'])}), worst ratio "
              f"{proposal['worst']:.3f}, written to {proposed}. configs/fitmm-tuned.yaml is written only by "
              "`--write-tuned-config`" + (f" (present: {TUNED_CONFIG.relative_to(REPO)})." if TUNED_CONFIG.is_file()
                                         else " (not present)."))
    else:
        r.add("", f"No single configuration serves both: the best candidate, {proposal['source']}'s winner, reaches "
              f"only {proposal['worst']:.3f} of a dataset's own winner. Nothing is proposed; the per-dataset winners "
              "stand.")


def ablation_section(r: Report, plan: Plan) -> dict[str, list]:
    base = plan.base
    r.add("", "## Ablations (stage c)", "")
    if base.kind == "winner":
        r.add("Base configuration: **each dataset's own search winner** (stage b), named under each dataset below.")
    elif base.file is None:
        r.add("Base configuration: **the released defaults** (FITMM's defaults: "
              + format_point({k: v for k, v in model_class("fitmm").defaults.items()
                              if k in ("num_bands", "gate", "ib_weight", "ib_phi", "consistency", "cl_weight",
                                       "item_graph", "user_graph", "train_features", "loss", "lr")})
              + (f"); {TUNED_CONFIG.relative_to(REPO)} did not exist." if not TUNED_CONFIG.is_file() else ")."))
    else:
        r.add(f"Base configuration: **tuned**, {base.file} (" + format_point(
            {k: v for k, v in read_config_file(base.file).items() if k != "model"}) + ").")
    r.add(f"Each variant changes one config key of the base (`fitmm config --model fitmm` lists them); "
          f"{plan.ablation_seeds} seeds each; p: paired Wilcoxon of the variant against the base on per-user test "
          "Recall@20; Δ = variant − base. A variant equal to the base is the base's runs.", "",
          "| ablation | config key | values | what the key does |", "|---|---|---|---|")
    keys = model_class("fitmm")
    for group, what in GROUPS.items():
        variants = [v for v in ABLATIONS if v.group == group]
        key_names = sorted({v.key for v in variants})
        present = [k for k in key_names if k in keys.defaults]
        absent = [k for k in key_names if k not in keys.defaults]
        meaning = "; ".join(f"{k}: {keys.key_help.get(k, '')}" for k in present)
        if absent:
            meaning += f" (no config key {', '.join(absent)}: not run)"
        r.add(f"| {what} | {', '.join(present) or '–'} | "
              f"{', '.join(v.slug for v in variants if v.key in keys.defaults)} | {meaning} |")
    r.add("", "Note: with gate=off the IB term is off too (it penalises the gates); ib_weight=0 keeps the gate.")
    results = {}
    for d in plan.datasets:
        r.add("", f"### {d.name}", "")
        if d.missing:
            r.add(f"Not run: {d.missing}.")
            continue
        if base.kind == "winner":
            own = dataset_base(plan, d)
            if own.pending:
                r.add(f"Not run: the base is {d.name}'s search winner, and stage b (the search and the winner's "
                      "seeds) has not finished there.")
                continue
            r.add(f"Base: {own.file} (" + format_point(
                {k: v for k, v in read_config_file(own.file).items() if k != "model"}) + ").", "")
        rows = ablation_rows(plan, d)
        results[d.name] = rows
        example = Variant("gate", "gate", "off")
        argv = [*ablation_argv(plan, d, example, 1), "--out", str(ablation_runs(plan, d, example, False)[0][1])]
        r.add(f"Command of each run (here gate=off, seed 1; the base has no variant --set; runs in "
              f"{ablation_dir(plan, d)}/<variant>/s<seed>):", *code_block(command_text(argv)))
        if all(row is None for _, row, _ in rows):
            r.add("Not run.")
            continue
        r.add("| group | variant | seeds | test Recall@20 | test NDCG@20 | Δ Recall@20 | p vs base | runs |",
              "|---|---|---|---|---|---|---|---|")
        base_row = rows[0][1]
        for variant, row, same in rows:
            group = "base" if variant is None else variant.group
            name = "**base**" if variant is None else variant.slug
            if variant is not None and same:
                r.add(f"| {group} | {name} | = base | | | | | |")
                continue
            if row is None:
                r.add(f"| {group} | {name} | not run | | | | | |")
                continue
            delta = "" if variant is None or base_row is None else f"{row.mean[METRIC] - base_row.mean[METRIC]:+.4f}"
            seeds = ", ".join(map(str, row.seeds)) + (f" ({row.note})" if row.note else "")
            r.add(f"| {group} | {name} | {seeds} | {cell(row, 'recall@20')} | {cell(row, 'ndcg@20')} | {delta} | "
                  f"{'' if variant is None else p_text(row.p)} | {r.ref(f'{d.name}, ablation, {row.label}', row)} |")
    return results


def plots_section(r: Report, plan: Plan) -> None:
    r.add("", "## Plots (stage d)", "")
    if bands_plot_path(plan).is_file():
        r.add("Test Recall@20 (mean ± std over the ablation seeds) against the number of bands, the rest of the "
              "base configuration fixed (the runs of the bands rows above):", "",
              f"![metric vs number of bands]({r.link(bands_plot_path(plan))})")
    else:
        r.add("Metric vs number of bands: not run (needs stage c's band ablations and stage d).")
    for d in plan.present():
        run = diagnostics_run(plan, d)
        path = spectrum_plot_path(plan, d)
        r.add("", f"### {d.name}: what a trained model learned", "")
        summary = diagnostics_path(plan, d)
        diag = json.loads(summary.read_text()) if summary.is_file() else None
        if run is None or not path.is_file() or diag is None or diag["run"] != os.path.relpath(run, plan.out):
            r.add("Not run (needs a trained FITMM run from stage c or a and stage d).")
            continue
        r.add(f"Model: {run} (FITMM.diagnostics() of its best checkpoint, kept in {summary}). Energy: each band's "
              "share of the squared singular values of each modality chunk of the base view (band 1 holds the "
              "largest); gates: g_b over all users / items; w_b: learned band weights.", "",
              "| side | band | energy share (" + ", ".join(diag["modalities"]) + ") | gate mean ± std | w_b |",
              "|---|---|---|---|---|")
        for side, shown in diag["sides"].items():
            for b, weight in enumerate(shown["band_weights"]):
                r.add(f"| {side} | {b + 1} | {', '.join(f'{chunk[b]:.3f}' for chunk in shown['energy'])} | "
                      f"{shown['gate_mean'][b]:.3f} ± {shown['gate_std'][b]:.3f} | {weight:.3f} |")
        r.add("", f"![{d.name}: band energy, gates, band weights]({r.link(path)})")


def words(row: Row) -> str:
    return f"{row.mean[METRIC]:.4f}"


def verdict_section(r: Report, plan: Plan, main: dict[str, dict], ablations: dict[str, list]) -> None:
    names = [d.name for d in plan.datasets]
    r.add("## Verdicts on the abstract's claims (stage e)", "",
          f"Rule, on test Recall@20 with significance level α = {plan.alpha} (paired Wilcoxon, per-user, seeds "
          "averaged): on one dataset a component is *better* when the base configuration's mean is higher than the "
          "variant without it and p < α, *worse* when lower and p < α, else *no significant difference*; FITMM "
          "against the baselines is *better* when its mean is above every baseline's with p < α against each, "
          "*worse* when any baseline is significantly above it. A claim is **supported** when better on every "
          f"dataset ({', '.join(names)}), **not supported** when worse on any dataset or better on none, "
          "**unclear** otherwise (mixed, or a dataset without evidence), **not run** without any evidence. "
          "p-values are not corrected for the number of comparisons. The test's unit is the user (each user's value "
          "averaged over the seeds first): a small p says the difference holds across users for these seeds, not "
          "that other seeds would repeat it, so where |Δ| is smaller than the seed-to-seed std in the tables below, "
          "read the verdict as weak.", "", "| claim (abstract) | verdict | evidence |",
          "|---|---|---|")
    for claim in CLAIMS:
        outcomes, evidence = {}, []
        for name in names:
            if claim.without is None:
                e = main.get(name)
                if e is None:
                    outcomes[name] = None
                    evidence.append(f"{name}: not run")
                    continue
                outcomes[name] = e["outcome"]
                ref, best = e["ref"], e["best"]
                text = (f"{name}: {ref.label} {words(ref)} vs best baseline {best.label} {words(best)} "
                        f"(p = {p_text(best.p)})")
                if e["worse"]:
                    text += "; significantly below " + ", ".join(f"{x.label} (p = {p_text(x.p)})" for x in e["worse"])
                elif e["same"]:
                    text += "; not significantly above " + ", ".join(x.label for x in e["same"])
                else:
                    text += "; significantly above every baseline"
                evidence.append(text)
                continue
            rows = ablations.get(name)
            base = rows[0][1] if rows else None
            row, same = find_ablation(rows or [], claim.without)
            if base is None or row is None or same:
                outcomes[name] = None
                evidence.append(f"{name}: " + ("the base already has " + claim.without.slug if same else "not run"))
                continue
            outcomes[name] = outcome(base.mean[METRIC], row.mean[METRIC], row.p, plan.alpha)
            effect = {"better": "it helps", "worse": "it hurts", "same": "no significant difference"}[outcomes[name]]
            evidence.append(f"{name}: base {words(base)} vs {claim.without.slug} {words(row)} (the component adds "
                            f"{base.mean[METRIC] - row.mean[METRIC]:+.4f}, p = {p_text(row.p)}: {effect})")
        if claim.name == "consistency":
            for name in names:
                rows = ablations.get(name) or []
                modal, _ = find_ablation(rows, Variant("consistency", "consistency", "cross_modal"))
                none, _ = find_ablation(rows, Variant("consistency", "consistency", "none"))
                if modal is not None and none is not None:
                    p, _ = significance(modal, none)
                    evidence.append(f"(not in the verdict) {name}: cross_modal {words(modal)} vs none {words(none)}, "
                                    f"p = {p_text(p)}")
        r.add(f"| {claim.text} | **{verdict(outcomes)}** | {'; '.join(evidence)} |")
    r.add("")


def runs_section(r: Report) -> None:
    r.add("", "## Run directories", "", "Each [n] in the tables: the runs its numbers were computed from "
          "(their summary.json and per_user.npz).", "")
    for number, (where, runs) in enumerate(r.refs, start=1):
        r.add(f"- [{number}] {where}: " + ", ".join(f"`{run}`" for run in runs))


def commands_section(r: Report, plan: Plan) -> None:
    this = "python benchmarks/reproduction.py " + " ".join(shell_quote(a) for a in plan.argv)
    r.add("", "## Commands", "", "This report:", *code_block(this))
    commits = []
    path = plan.out / "commands.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if entry["commit"] not in commits:
                commits.append(entry["commit"])
    r.add(f"Code: the runs were made at commit(s) {', '.join(commits) if commits else '(none recorded)'} "
          f"(from {path}, one line per command the script ran); the report was written at commit {commit()}.")
    all_commands = []
    for d in plan.present():
        all_commands += [command_text(bench_argv(plan, d)), command_text(tuned_argv(plan, d))]
    cross = cross_plan(plan)
    if cross is not None:
        for source in cross.datasets:
            for target in cross.datasets:
                if cross.runs[source.name, target.name] is not None:
                    all_commands.append(command_text(cross.argv(plan, source.name, target)))
    for d in plan.present():
        if dataset_base(plan, d).pending:
            continue  # its base is not known yet
        folder = ablation_dir(plan, d)
        for variant, same in ablation_cells(plan, d, plan.ablations):
            if variant is not None and same:
                continue
            for seed, run_dir in ablation_runs(plan, d, variant, same):
                if not run_dir.is_relative_to(folder):
                    continue  # a stage b run, listed with stage b's command
                all_commands.append(command_text([*ablation_argv(plan, d, variant, seed), "--out", str(run_dir)]))
    r.add("", f"<details><summary>Every command of stages a-c ({len(all_commands)})</summary>",
          *code_block(*all_commands), "</details>")


def stage_e(plan: Plan) -> str:
    r = Report(plan)
    names = ", ".join(d.name for d in plan.datasets)
    r.add("# Reproduction: FITMM's claims on " + names, "",
          "Generated by `benchmarks/reproduction.py` from the runs it made (do not edit by hand; re-run it). "
          "Every number is read from the run directories listed at the end; commands are in the last section.", "")
    for d in plan.datasets:
        if d.missing:
            r.add(f"- {d.name}: not run ({d.missing}).")
    body = Report(plan)  # the tables come first in the numbering, the verdicts use their rows
    main = main_section(body, plan)
    tuning_section(body, plan)
    ablations = ablation_section(body, plan)
    plots_section(body, plan)
    verdict_section(r, plan, main, ablations)
    r.lines += body.lines
    r.refs = body.refs
    runs_section(r)
    commands_section(r, plan)
    text = "\n".join(r.lines).rstrip("\n") + "\n"
    plan.report.parent.mkdir(parents=True, exist_ok=True)
    runio.atomic_write(plan.report, lambda h: h.write(text.encode("utf-8")))
    log(f"wrote {plan.report}")
    return text


# -- the command ----------------------------------------------------------------------------------------


def make_plan(argv: list[str]) -> Plan:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", help=f"comma-separated names under --data-root, or folders given with a '/' (default "
                   f"{','.join(DEFAULT_DATASETS)}; with --quick: {','.join(QUICK_DATASETS)})")
    p.add_argument("--data-root", default=os.path.relpath(DATA_ROOT),  # relative: the report's commands stay portable
                   help="where dataset names are looked up (default: the shared/data folder beside the repository)")
    p.add_argument("--stages", default=STAGES, help="which stages to run, e.g. a,b or c (default a,b,c,d,e)")
    p.add_argument("--seeds", type=int, help="seeds 1..N of the main table and the tuned winner (default 5)")
    p.add_argument("--ablation-seeds", type=int, help="seeds 1..N of each ablation (default 3)")
    p.add_argument("--trials", type=int, help="finished trials of FITMM's search per dataset (default 40)")
    p.add_argument("--grid-max", type=int, help="grid points per baseline (default 8)")
    p.add_argument("--models", help=f"baselines of the main table (default {REAL['models']})")
    p.add_argument("--ablations", help="only these ablations, e.g. num_bands=1,gate=off (default all)")
    p.add_argument("--ablation-base", default="auto", help="auto (configs/fitmm-tuned.yaml if it exists, else "
                   "released) | released | tuned | winner (each dataset's own search winner) | FILE.yaml")
    p.add_argument("--set", action="append", default=[], metavar="key=value",
                   help="passed to every fitmm command, e.g. --set threads=1")
    p.add_argument("--out", help=f"folder of every run (default {os.path.relpath(RECORDS)}, committed; --quick: "
                   "runs/reproduction-quick)")
    p.add_argument("--report", help="the report (default docs/reproduction.md; --quick: OUT/reproduction.md)")
    p.add_argument("--img-dir", help="its plots (default docs/img; --quick: OUT/img)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the verdicts (default 0.05)")
    p.add_argument("--tolerance", type=float, default=0.02, help="stage b: a shared configuration may lose this "
                   "fraction of a dataset's own winner's validation Recall@20 (default 0.02)")
    p.add_argument("--write-tuned-config", nargs="?", const=str(TUNED_CONFIG), metavar="PATH",
                   help="stage b: write the proposed shared configuration to PATH (default configs/fitmm-tuned.yaml)")
    p.add_argument("--quick", action="store_true", help="the whole pipeline on two tiny synthetic datasets "
                   "(2 epochs, 3 trials, 2 seeds): a check that it works, not a result")
    args = p.parse_args(argv)
    preset = {**REAL, **(QUICK if args.quick else {})}

    def pick(name):
        value = getattr(args, name)
        return preset[name] if value is None else value

    stages = "".join(s for s in args.stages.replace(",", "") if s.strip())
    if not stages or any(s not in STAGES for s in stages):
        raise InputError(f"--stages {args.stages!r}: expected letters among a,b,c,d,e, e.g. --stages a,b")
    for name in ("seeds", "ablation_seeds", "trials", "grid_max"):
        if pick(name) < 1:
            raise InputError(f"--{name.replace('_', '-')}: must be >= 1, got {pick(name)}")
    if not 0 < args.alpha < 1:
        raise InputError(f"--alpha: a significance level between 0 and 1, got {args.alpha}")
    if not 0 <= args.tolerance < 1:
        raise InputError(f"--tolerance: a fraction in [0, 1), got {args.tolerance}")
    models = [m.strip() for m in pick("models").split(",") if m.strip()]
    for m in models:
        model_class(m)
    if "fitmm" in models:
        raise InputError("--models: list the baselines only; FITMM is always in the table")
    out = Path(args.out or ("runs/reproduction-quick" if args.quick else os.path.relpath(RECORDS)))
    sets = [*(QUICK["sets"] if args.quick else []), *args.set]
    parse_set(sets)  # a malformed --set is refused before anything runs
    return Plan(
        out=out, datasets=parse_datasets(args.datasets, args.quick, Path(args.data_root)), stages=stages,
        seeds=pick("seeds"), ablation_seeds=pick("ablation_seeds"), trials=pick("trials"), grid_max=pick("grid_max"),
        models=models, sets=sets, ablations=parse_ablations(pick("ablations")), base=parse_base(args.ablation_base),
        report=Path(args.report or (out / "reproduction.md" if args.quick else REPO / "docs" / "reproduction.md")),
        img_dir=Path(args.img_dir or (out / "img" if args.quick else REPO / "docs" / "img")),
        alpha=args.alpha, tolerance=args.tolerance,
        write_tuned=None if args.write_tuned_config is None else Path(args.write_tuned_config), argv=list(argv),
    )


def run(plan: Plan) -> None:
    for d in plan.datasets:
        if d.missing:
            log(f"{d.name}: skipped ({d.missing})")
    present = plan.present()
    if "a" in plan.stages:
        for d in present:
            stage_a(plan, d)
    if "b" in plan.stages:
        for d in present:
            stage_b(plan, d)
        stage_b_cross(plan)
    if "c" in plan.stages:
        for d in present:
            stage_c(plan, d)
    if "d" in plan.stages:
        stage_d(plan)
    if "e" in plan.stages:
        stage_e(plan)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        run(make_plan(argv))
    except (InputError, CommandFailed) as exc:
        print(f"reproduction: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reproduction: interrupted; finished runs are kept: run the same command to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
