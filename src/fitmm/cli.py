"""The `fitmm` command. Exit codes: 0 success, 2 bad input or usage (message on stderr), 1 internal error."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
from pathlib import Path

from . import __version__
from .config import BASE_BOUNDS, BASE_DEFAULTS, KEY_HELP, model_keys, parse_set, read_config_file, resolve
from .errors import InputError


def build_config(args) -> dict:
    """defaults < model defaults < --config file < --set < explicit flags (--model/--data/--seed)."""
    layers = []
    if getattr(args, "config", None):
        layers.append((f"config file {args.config}", read_config_file(args.config)))
    if getattr(args, "set", None):
        layers.append(("--set", parse_set(args.set)))
    flags = {k: getattr(args, k) for k in ("model", "data", "seed") if getattr(args, k, None) is not None}
    if flags:
        layers.append(("command line", flags))
    config = resolve(layers)
    if config["data"] != "synthetic":
        # Stored absolute so that `fitmm evaluate RUN_DIR` works from any directory.
        config["data"] = str(Path(config["data"]).expanduser().resolve())
    return config


def run_config(run_dir: Path) -> dict:
    """The resolved configuration saved in a run directory (re-validated against today's keys)."""
    return resolve([(f"{run_dir}/config.yaml", read_config_file(run_dir / "config.yaml"))])


# What `train --resume` may change: `epochs` extends (or shortens) the run, `progress` only the display.
RESUME_SETTABLE = ("epochs", "progress")


def resume_overrides(args) -> dict:
    """The `--set` keys `train --resume` accepts; InputError for any flag that would change the run."""
    flags = {"--out": args.out, "--model": args.model, "--config": args.config, "--seed": args.seed}
    for flag, value in flags.items():
        if value is not None:
            raise InputError(
                f"--resume {args.resume}: {flag} cannot be combined with --resume, which continues the run "
                f"with the configuration saved in its config.yaml; start a new run with --out to change it"
            )
    overrides = parse_set(args.set or [])
    refused = [key for key in overrides if key not in RESUME_SETTABLE]
    if refused:
        raise InputError(
            f"--resume {args.resume}: --set {refused[0]} cannot change a run being resumed (only "
            f"{' and '.join(RESUME_SETTABLE)} can: --set epochs=N extends it); start a new run with --out"
        )
    return overrides


def data_path(run_dir: Path, config: dict, new_path: str | None) -> dict:
    """The run's config pointing at its data: `--data NEW_PATH` for a moved folder, else as saved."""
    if new_path is not None:
        return {**config, "data": new_path if new_path == "synthetic" else str(Path(new_path).expanduser().resolve())}
    if config["data"] != "synthetic" and not Path(config["data"]).exists():
        raise InputError(
            f"{run_dir}: its data {config['data']} is not there any more; if the dataset folder moved, "
            f"pass its new place with --data PATH"
        )
    return config


def launch_processes(args) -> int:
    """`fitmm train --nproc N ...`: the same command in N processes through torchrun's own launcher
    (standalone rendezvous on this machine); returns the exit code of the first rank that failed."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from .distributed import env_world_size

    if env_world_size() > 1:
        raise InputError("--nproc: this process already runs under torchrun; drop --nproc (torchrun's "
                         "--nproc_per_node sets the number of processes)")
    if args.nproc < 1:
        raise InputError(f"--nproc: must be at least 1, got {args.nproc}")
    argv, rest = [], list(args.argv)
    while rest:  # the same command line, less --nproc
        token = rest.pop(0)
        if token == "--nproc":
            rest.pop(0)
        elif not token.startswith("--nproc="):
            argv.append(token)
    # torchrun would give each process 1 thread (and say so); a fair share of the cores instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    try:
        run(parse_args(["--standalone", f"--nproc_per_node={args.nproc}", "-m", "fitmm", *argv]))
    except ChildFailedError as exc:
        return exc.get_first_failure()[1].exitcode or 1
    return 0


def cmd_train(args) -> int:
    import shutil

    from . import data, distributed, runio
    from .train import check_run, train

    if args.nproc is not None and args.nproc != 1:
        return launch_processes(args)
    if args.track:
        from .tracking import require_mlflow

        require_mlflow()  # a missing extra is known before anything loads
    lock, created, callbacks = None, False, []
    if args.resume:
        run_dir = Path(args.resume)
        overrides = resume_overrides(args)
        if not (run_dir / "config.yaml").is_file():
            raise InputError(f"{run_dir}: no resumable run here (no config.yaml); pass a run directory "
                             f"written by `fitmm train`")
        saved = read_config_file(run_dir / "config.yaml")
        config = resolve([(f"{run_dir}/config.yaml", saved), ("--set", overrides)])
        config = data_path(run_dir, config, args.data)
        context = distributed.setup(config["device"])  # under torchrun: join the other ranks
        if context.main:  # only the main rank holds the run directory
            lock = runio.lock_run_dir(run_dir)  # before the data loads: a second resume learns at once
    else:
        if args.allow_data_change:
            raise InputError("--allow-data-change only goes with --resume (or fitmm evaluate)")
        if not args.out:
            raise InputError("fitmm train: --out RUN_DIR is required (the folder the run is written to)")
        run_dir = Path(args.out)
        runio.check_new_run_dir(run_dir)  # cheap: before the data loads
        config = build_config(args)
        context = distributed.setup(config["device"])
    try:
        dataset = data.load(config)
        check_run(config, dataset)  # all validation happens before the run directory is created
        dataset.lend_features = True  # one run, one model: it may fine-tune the features without a copy
        context.barrier()  # every rank has checked the new run directory before the main rank creates it
        if lock is None and context.main:
            lock = runio.create_run_dir(run_dir)
            created = True
        if args.track and context.main:
            from .tracking import MlflowTracker

            callbacks.append(MlflowTracker(config, run_dir, resume=bool(args.resume)))
        summary = train(config, dataset, run_dir, resume=bool(args.resume), lock=lock,
                        allow_data_change=args.allow_data_change, callbacks=callbacks)
        # The main rank returns last (it writes the run's files): leaving the group together keeps
        # gloo from aborting a process whose peer is still at work.
        context.barrier()
    except BaseException:
        # A run that failed (or was interrupted) before its first checkpoint holds nothing of value
        # and could not be resumed: remove it, so the same command can simply be run again.
        if created and not (run_dir / "last.pt").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        for callback in callbacks:  # a tracked run that failed is marked so in MLflow
            callback.close("FAILED")
        raise
    finally:
        if lock is not None:
            lock.release()
        distributed.teardown()
    if context.main:
        print(json.dumps(summary, indent=2) if args.json else result_line(summary, config, run_dir))
    return 0


def result_line(summary: dict, config: dict, run_dir: Path) -> str:
    """One line: best epoch, valid and test recall@K / ndcg@K (K of valid_metric) and the run directory."""
    k = config["valid_metric"].partition("@")[2]
    names = list(dict.fromkeys([config["valid_metric"], f"recall@{k}", f"ndcg@{k}"]))

    def scores(split):
        return " ".join(f"{name} {summary[split][name]:.4f}" for name in names if name in summary[split])

    return (f"{summary['model']}: best epoch {summary['best_epoch']} of {summary['epochs_run']}; "
            f"valid {scores('valid')}; test {scores('test')}; run {run_dir} (all metrics in summary.json)")


def cmd_evaluate(args) -> int:
    from .api import load_run
    from .evaluate import evaluate
    from .train import use_threads

    run_dir = Path(args.run_dir)
    if (run_dir / "config.yaml").is_file():
        use_threads(run_config(run_dir))  # as the run was trained
    config, dataset, model, change = load_run(run_dir, data=args.data, allow_data_change=args.allow_data_change)
    results = evaluate(model, dataset, ["valid", "test"], config["topk"], config["eval_batch_size"])
    if change:
        results["data_changed"] = change
    print(json.dumps(results, indent=2))
    return 0


def _load_for_answers(run_dir: str):
    from .api import load
    from .train import use_threads

    rec = load(run_dir)
    use_threads(rec.config)  # as the run was trained
    return rec


def cmd_recommend(args) -> int:
    from .api import UnknownIdError

    rec = _load_for_answers(args.run_dir)
    user = args.user if args.raw else _dense_id(args.user, "--user")
    try:
        items = rec.recommend(user, k=args.k, exclude_seen=not args.include_seen, raw=args.raw)
    except UnknownIdError as exc:
        raise InputError(str(exc)) from None
    if args.json:
        print(json.dumps({"user": user, "items": [{"item": i, "score": s} for i, s in items]}, indent=2))
    else:
        print(f"{'rank':>4}  {'item':>10}  score")
        for rank, (item, score) in enumerate(items, start=1):
            print(f"{rank:>4}  {item!s:>10}  {score:.4f}")
    return 0


def _dense_id(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InputError(f"{flag}: {text!r} is not a dense (integer) id; pass --raw to use the dataset's raw ids") from None


def cmd_serve(args) -> int:
    from .serve import require_serve_extra, run

    require_serve_extra()  # before the model is loaded: a missing extra is known at once
    rec = _load_for_answers(args.run_dir)
    run(rec, host=args.host, port=args.port, raw=args.raw)
    return 0


def cmd_data_info(args) -> int:
    from . import data

    config = build_config(args)
    dataset = data.load(config)
    print(json.dumps(dataset.stats(), indent=2))
    print("validation: OK", file=sys.stderr)
    return 0


def cmd_data_synth(args) -> int:
    from . import data

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: already exists and is a file; choose a new --out folder")
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out}: already exists and is not empty; choose a new --out")
    config = build_config(args)
    dataset = data.synthetic.from_config({**config, "data": "synthetic"})
    data.write_mmrec(dataset, out)
    print(f"wrote {out}/synthetic.inter and {len(dataset.features)} feature file(s)")
    return 0


def cmd_data_convert(args) -> int:
    from .data.convert import convert

    result = convert(
        args.interactions, args.out, sep=args.sep, columns=args.columns, user_col=args.user_col,
        item_col=args.item_col, rating_col=args.rating_col, time_col=args.time_col, min_rating=args.min_rating,
        kcore=args.kcore, split=args.split, seed=args.seed, name=args.name,
    )
    print(result.summary)
    return 0


def cmd_data_encode(args) -> int:
    from .data.encode import encode

    print(encode(
        args.items, args.out, data=args.data, id_col=args.id_col, sep=args.sep, text_cols=args.text_cols,
        text_template=args.text_template, image_col=args.image_col, image_path=args.image_path,
        text_encoder=args.text_encoder, image_encoder=args.image_encoder, batch_size=args.batch_size,
        device=args.device, precision=args.precision,
    ))
    return 0


def cmd_report(args) -> int:
    from .report import markdown_table, read_summaries

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    summaries = read_summaries(args.run_dirs)
    for s in summaries:
        missing = [m for m in metrics if m not in s[args.split]]
        if missing:
            raise InputError(f"{s['run']}: no metric {missing[0]} in summary.json; choose from {', '.join(s[args.split])}")
    if args.html:
        from .report_html import write_html

        print(f"wrote {write_html(args.run_dirs, args.html, metrics)}")
        return 0
    print(markdown_table(summaries, metrics, args.split))
    return 0


def cmd_bench(args) -> int:
    from .bench import parse_models, parse_seeds, run_bench

    models = parse_models(args.models)
    seeds = parse_seeds(args.seeds, args.seed_list)
    shared = parse_set(args.set or [])
    tracked = contextlib.nullcontext()
    callbacks = None
    if args.track:
        from . import tracking

        tracking.require_mlflow()
        uri = shared.get("tracking_uri", BASE_DEFAULTS["tracking_uri"])
        # One parent run for the bench; each trained run is nested in it.
        tracked = tracking.parent_run(uri, f"bench {Path(args.out).name}",
                                      {"models": ",".join(models), "seeds": ",".join(map(str, seeds)),
                                       "data": args.data or "synthetic", "grid": args.grid, **shared})
        callbacks = tracking.nested_trackers
    try:
        with tracked:
            result = run_bench(args.out, models, seeds, shared, data=args.data or "synthetic", grid=args.grid,
                               grid_max=args.grid_max, search=args.search, callbacks=callbacks)
    except KeyboardInterrupt:
        print(f"fitmm: interrupted; finished runs are kept: run the same `fitmm bench` command to continue {args.out}",
              file=sys.stderr)
        return 130
    print(result["table"], end="")
    return 0


def cmd_search(args) -> int:
    from .search import DEFAULT_SEED, DEFAULT_TRIALS, search_command

    try:
        result = search_command(args.model, args.data, args.out, DEFAULT_TRIALS if args.trials is None else args.trials,
                                DEFAULT_SEED if args.seed is None else args.seed, parse_set(args.set or []),
                                space_file=args.space, storage=args.storage, study=args.study,
                                track=args.track == "mlflow")
    except KeyboardInterrupt:
        print(f"fitmm: interrupted; finished trials are kept: run the same `fitmm search` command to continue "
              f"{args.out}", file=sys.stderr)
        return 130
    print(f"{args.model}: best of {len(result['trials'])} trials: trial {result['best']}, valid "
          f"{result['config']['valid_metric']} {result['value']:.4f}; its config: {args.out}/best.yaml")
    print("re-run with test: " + result_line(result["summary"], result["config"], Path(args.out) / "best"))
    return 0


def _key_lines(defaults: dict, bounds: dict, help_: dict) -> list[str]:
    """`key: default  # meaning (range)`, one line per key, as YAML a --config file can start from."""
    lines = [f"{key}: {json.dumps(value)}" for key, value in defaults.items()]
    width = max(map(len, lines))
    out = []
    for line, key in zip(lines, defaults):
        bound = f" (must be {bounds[key].describe()})" if key in bounds else ""
        out.append(f"{line.ljust(width)}  # {help_[key]}{bound}")
    return out


def cmd_help_config(args) -> int:
    from .models import REGISTRY, model_class

    if args.model:  # that model's run: the base keys (with its overrides) and its own keys
        cls = model_class(args.model)
        defaults, bounds, help_ = model_keys(args.model)
        defaults["model"] = args.model
        own = [key for key in cls.defaults if key not in BASE_DEFAULTS]
        print(f"# keys of a '{args.model}' run (fitmm train --model {args.model} --set key=value)")
        lines = _key_lines(defaults, bounds, help_)
        print("\n".join(line for line, key in zip(lines, defaults) if key not in own))
        if own:
            print(f"\n# '{args.model}' keys")
            print("\n".join(line for line, key in zip(lines, defaults) if key in own))
        return 0
    print("# keys of every run (fitmm train --set key=value)")
    print("\n".join(_key_lines(BASE_DEFAULTS, BASE_BOUNDS, KEY_HELP)))
    for name, cls in sorted(REGISTRY.items()):
        print(f"\n# model '{name}' (its keys, and the defaults it changes)")
        print("\n".join(_key_lines(cls.defaults, {**BASE_BOUNDS, **cls.bounds}, {**KEY_HELP, **cls.key_help})))
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fitmm", description="Multimodal recommendation: FITMM and baselines.")
    parser.add_argument("--version", action="version", version=f"fitmm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def config_options(p, with_model=True):
        if with_model:
            p.add_argument("--model", help="model name (default: fitmm); see `fitmm config`")
        p.add_argument("--data", help="MMRec dataset folder, or 'synthetic' (default)")
        p.add_argument("--config", help="YAML file of config keys")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config key (repeatable)")
        p.add_argument("--seed", type=int, help="random seed (default 999)")

    p = sub.add_parser("train", help="train a model and write a run directory")
    config_options(p)
    p.add_argument("--out", help="run directory to create")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint, "
                   "with its saved configuration; only --set epochs=N (extend it), --set progress=..., "
                   "--data PATH (its data, moved) and --allow-data-change go with it")
    p.add_argument("--allow-data-change", action="store_true",
                   help="with --resume: go on although the data differs from the run's (recorded in summary.json)")
    p.add_argument("--json", action="store_true", help="print the whole summary as JSON instead of one line")
    p.add_argument("--nproc", type=int, metavar="N", help="train in N processes (data-parallel, through "
                   "torchrun's launcher on this machine; each takes batch_size rows of every N x batch_size "
                   "batch); same as `torchrun --standalone --nproc_per_node=N -m fitmm train ...`")
    p.add_argument("--track", choices=["mlflow"], help="log params, per-epoch metrics and the run's files to "
                   "MLflow (extra 'track'; where: --set tracking_uri=..., default ./mlruns)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="re-evaluate a saved run's best checkpoint on validation and test")
    p.add_argument("run_dir")
    p.add_argument("--data", help="the run's dataset folder, if it moved (it must hold the same data)")
    p.add_argument("--allow-data-change", action="store_true",
                   help="evaluate although the data differs from the run's (the output says what changed)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("recommend", help="top-k items for one user from a saved run")
    p.add_argument("run_dir")
    p.add_argument("--user", required=True, help="user id (dense; raw with --raw)")
    p.add_argument("--k", type=int, default=10, help="number of items (default 10)")
    p.add_argument("--raw", action="store_true", help="raw ids of the dataset's u_id_mapping.tsv / i_id_mapping.tsv")
    p.add_argument("--include-seen", action="store_true", help="keep the user's training items in the list")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser("serve", help="HTTP server for a saved run (needs the 'serve' extra)")
    p.add_argument("run_dir")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--raw", action="store_true", help="requests and answers use the dataset's raw ids")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("report", help="markdown table of finished runs, with mean ± std per model and dataset")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--metrics", default="recall@20,ndcg@20", help="comma-separated, e.g. recall@10,ndcg@10")
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--html", metavar="OUT.html", help="write one self-contained page instead: comparison table, "
                   "training curves and, for FITMM, band energy, gate distributions and band weights")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("bench", help="train several models over several seeds; mean ± std table with significance tests")
    p.add_argument("--models", help="comma-separated, the first one compared with each other "
                   "(default: fitmm,freedom,smore,lgmrec,bm3,vbpr,lightgcn,bpr,pop)")
    p.add_argument("--data", help="MMRec dataset folder, or 'synthetic' (default)")
    p.add_argument("--seeds", type=int, help="run seeds 1..N (default 5)")
    p.add_argument("--seed-list", metavar="S1,S2,...", help="run these seeds instead, e.g. 1,2,3")
    p.add_argument("--grid", action="store_true", help="search each model's grid with the first seed and keep "
                   "the best on validation (keys given with --set are not searched)")
    p.add_argument("--grid-max", type=int, metavar="N", help="with --grid: search at most N points per model "
                   "(its defaults plus a fixed random sample of the rest), for grids too big to train in full")
    p.add_argument("--search", type=int, metavar="N", help="instead of --grid: tune each model with `fitmm search` "
                   "(Optuna, N finished trials on validation, the first seed; extra 'search'), then run every seed")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config key for every model (repeatable)")
    p.add_argument("--out", required=True, help="bench folder; re-run the same command to continue it")
    p.add_argument("--track", choices=["mlflow"], help="log the bench as one MLflow run with each trained run "
                   "nested in it (extra 'track'; where: --set tracking_uri=..., default ./mlruns)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("search", help="hyper-parameter search on validation with Optuna (extra 'search'); "
                       "best.yaml, trials.md, importance.png; resumable")
    p.add_argument("--model", required=True, help="the model to tune")
    p.add_argument("--data", required=True, help="MMRec dataset folder, or 'synthetic'")
    p.add_argument("--out", required=True, help="search folder; re-run the same command to continue it")
    p.add_argument("--space", metavar="SPACE.yaml", help="search space file (default: the model's own search_space)")
    p.add_argument("--trials", type=int, metavar="N", help="finished trials the study should hold (default 20)")
    p.add_argument("--storage", metavar="URL", help="Optuna storage URL shared by several machines, e.g. "
                   "postgresql://user:pw@host/db (default: sqlite file OUT/study.db)")
    p.add_argument("--study", metavar="NAME", help="study name in the storage (default: MODEL-DATASET)")
    p.add_argument("--track", choices=["mlflow"], help="log the search as one MLflow run with each trial "
                   "nested in it (extra 'track'; where: --set tracking_uri=..., default ./mlruns)")
    p.add_argument("--seed", type=int, help="seed of the sampler and of every trial's training (default 1)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config key fixed for every trial (repeatable); "
                   "a searched key given here is not searched")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("config", help="list every config key with its default, meaning and range")
    p.add_argument("--model", help="only the keys of this model's runs")
    p.set_defaults(func=cmd_help_config)

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("info", help="statistics of a dataset; exits 2 with the reason when it is invalid")
    q.add_argument("path", help="MMRec dataset folder or 'synthetic'")
    q.add_argument("--set", action="append", metavar="KEY=VALUE", help="e.g. modalities={image: img.npy}")
    q.set_defaults(func=cmd_data_info)
    q = data_sub.add_parser("synth", help="write the synthetic dataset as an MMRec folder")
    q.add_argument("--out", required=True)
    q.add_argument("--set", action="append", metavar="KEY=VALUE", help="e.g. synthetic_users=500")
    q.set_defaults(func=cmd_data_synth)
    q = data_sub.add_parser("convert", help="raw interaction log (CSV/TSV/JSONL) -> MMRec folder with id maps and a split")
    q.add_argument("interactions", help="the log: CSV/TSV with a header (or --columns), or JSON lines")
    q.add_argument("--out", required=True, help="dataset folder to create")
    q.add_argument("--sep", help="column separator, e.g. ',' or '\\t' (default: TAB if the first line has one, else ',')")
    q.add_argument("--columns", metavar="user,item[,rating][,timestamp]",
                   help="the columns in file order, for a file without a header row")
    q.add_argument("--user-col", help="user column (default: a header named user, userID, user_id, ...)")
    q.add_argument("--item-col", help="item column (default: a header named item, itemID, item_id, movieId, ...)")
    q.add_argument("--rating-col", help="rating column (for --min-rating)")
    q.add_argument("--time-col", help="timestamp column, numeric (for --split time)")
    q.add_argument("--min-rating", type=float, metavar="R", help="keep rows rated >= R (implicit feedback)")
    q.add_argument("--kcore", type=int, default=0, metavar="K",
                   help="keep users and items with >= K interactions, repeated until both hold (default 0: off)")
    q.add_argument("--split", choices=["random", "time"], default="random",
                   help="per user 8:1:1: random (seeded) or time (last 10%% test, previous 10%% validation)")
    q.add_argument("--seed", type=int, default=999, help="seed of --split random (default 999)")
    q.add_argument("--name", help="name of the .inter file (default: the --out folder's name)")
    q.set_defaults(func=cmd_data_convert)
    q = data_sub.add_parser("encode", help="item text and images -> text_feat.npy / image_feat.npy (offline encoders)")
    q.add_argument("items", help="items table: CSV/TSV with a header, or JSON lines")
    q.add_argument("--out", required=True, help="folder for the feature files (e.g. the dataset folder)")
    q.add_argument("--data", metavar="DATASET_DIR",
                   help="a `fitmm data convert` folder: --id-col holds raw ids, mapped through its i_id_mapping.tsv")
    q.add_argument("--id-col", default="itemID", help="item id column (default itemID: dense ids unless --data)")
    q.add_argument("--sep", help="column separator (default: TAB if the first line has one, else ',')")
    q.add_argument("--text-cols", metavar="C1,C2,...", help="text columns, joined as 'c1. c2'")
    q.add_argument("--text-template", metavar="TEMPLATE", help="text from a template, e.g. '{title}. Genres: {genres}.'")
    q.add_argument("--image-col", help="column with image file paths (relative to the table's folder, or absolute)")
    q.add_argument("--image-path", metavar="TEMPLATE", help="image path template, e.g. 'posters/{movie_id}.jpg'")
    q.add_argument("--text-encoder", default="all-MiniLM-L6-v2", help="text encoder (default all-MiniLM-L6-v2)")
    q.add_argument("--image-encoder", default="efficientnet-lite0", help="image encoder (default efficientnet-lite0)")
    q.add_argument("--batch-size", type=int, default=32)
    q.add_argument("--device", default="cpu", help="torch device for the encoders (default cpu)")
    q.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="auto (default): bfloat16 on CPUs with native bfloat16 units, float32 elsewhere; bfloat16 "
                   "rows stay within cosine 0.9999 (text) and 0.997 (images) of float32")
    q.set_defaults(func=cmd_data_encode)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `train --nproc` relaunches the same command
    if getattr(args, "path", None) is not None:
        args.data = args.path
    if getattr(args, "func", None) in (cmd_train, cmd_evaluate, cmd_bench, cmd_search, cmd_data_encode):
        from .malloc import keep_freed_memory, restart_without_malloc_caches

        if argv is None:  # a process of its own (not a call from Python): safe to re-execute
            restart_without_malloc_caches()
        keep_freed_memory()
    try:
        return args.func(args)
    except InputError as exc:
        rank = os.environ.get("RANK", "0")  # under torchrun every process reports; say which one
        print(f"fitmm: error{'' if rank == '0' else f' (rank {rank})'}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = getattr(args, "resume", None) or getattr(args, "out", None)
        hint = ""
        if args.func is cmd_train and out:
            # Only a run with a checkpoint can be resumed; a new one stopped before it was removed.
            if getattr(args, "resume", None) or (Path(out) / "last.pt").is_file():
                hint = f"; continue with: fitmm train --resume {out}"
            else:
                hint = " before the run's first checkpoint; nothing was kept"
        print(f"fitmm: interrupted{hint}", file=sys.stderr)
        return 130
    except Exception:  # an internal error: show the traceback, exit 1
        traceback.print_exc()
        print("fitmm: internal error (exit 1); please report it with the traceback above", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
