"""Typed, flat configuration: defaults, YAML files and `--set key=value` overrides.

A run's configuration is one flat dict. Its keys are the trainer's and the data's (below) plus the
chosen model's own defaults (each model class carries them). Flat keys keep every setting
reachable from the command line with `--set key=value`, as in RecBole. Values are checked against
the type of their default and against the key's declared bounds, and an unknown key is an error
that suggests the closest known one (or names the model that has it).

Each key is declared in one place with three facts: its default (`BASE_DEFAULTS` here, a model's
`defaults`), the range a number must lie in (`BASE_BOUNDS`, a model's `bounds`: every numeric key
has one) and a one-line meaning (`KEY_HELP`, a model's `key_help`), printed by `fitmm config`.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError, quote


@dataclass(frozen=True)
class Bound:
    """The range a numeric config key must lie in; `low_open`/`high_open` exclude the end itself."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            if not (self.low_open or self.high_open):
                return f"between {self.low} and {self.high}"
            return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"{'<' if self.high_open else '<='} {self.high}"

    def holds(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True


AT_LEAST_0 = Bound(low=0)
AT_LEAST_1 = Bound(low=1)
POSITIVE = Bound(low=0, low_open=True)
FRACTION = Bound(0, 1, high_open=True)  # dropout-like: 1 would drop everything

# Keys every run has, whatever the model. Models add their own (and may override `lr`).
BASE_DEFAULTS: dict[str, Any] = {
    "model": "fitmm",
    "data": "synthetic",
    "inter_file": "",
    "modalities": {},
    "seed": 999,
    "epochs": 300,
    "patience": 20,
    "eval_every": 1,
    "batch_size": 2048,
    "eval_batch_size": 1024,
    "lr": 1e-3,
    "weight_decay": 0.0,
    "device": "auto",
    "threads": 0,
    "selection": "clean",
    "topk": [5, 10, 20, 50],
    "valid_metric": "recall@20",
    "progress": True,
    "cache_dir": "auto",
    "tracking_uri": "mlruns",
    # The built-in synthetic dataset (used when data == "synthetic").
    "synthetic_users": 1500,
    "synthetic_items": 1000,
    "synthetic_clusters": 12,
    "synthetic_latent_dim": 16,
    "synthetic_mean_interactions": 24,
    "synthetic_popularity": 0.8,
    "synthetic_feature_dims": {"image": 128, "text": 64},
    "synthetic_feature_noise": 0.5,
}

BASE_BOUNDS: dict[str, Bound] = {
    "seed": Bound(0, 2**32 - 1),  # numpy's seeds
    "epochs": AT_LEAST_0,  # 0: evaluate the model as built
    "patience": AT_LEAST_1,
    "eval_every": AT_LEAST_1,
    "batch_size": AT_LEAST_1,
    "eval_batch_size": AT_LEAST_1,
    "lr": POSITIVE,
    "weight_decay": AT_LEAST_0,
    "threads": AT_LEAST_0,
    "synthetic_users": AT_LEAST_1,
    "synthetic_items": Bound(low=10),  # each user draws 5 or more items from at most half of them
    "synthetic_clusters": AT_LEAST_1,
    "synthetic_latent_dim": AT_LEAST_1,
    "synthetic_mean_interactions": Bound(low=5),  # every user has at least 5
    "synthetic_popularity": AT_LEAST_0,
    "synthetic_feature_noise": AT_LEAST_0,
}

KEY_HELP: dict[str, str] = {
    "model": "the model to train (every model and its keys: `fitmm config`)",
    "data": "an MMRec dataset folder, or 'synthetic' (the built-in generator)",
    "inter_file": "the .inter file inside the dataset folder; '' = the only *.inter there",
    "modalities": "modality name -> .npy file inside the dataset folder; {} = every <name>_feat.npy",
    "seed": "random seed of the model's initialisation and of negative sampling (0 .. 2^32-1)",
    "epochs": "most training epochs (early stopping may end the run sooner)",
    "patience": "evaluations without a strictly better validation metric tolerated; the next one stops (MMRec's rule)",
    "eval_every": "epochs between validation evaluations",
    "batch_size": "training interactions per optimiser step",
    "eval_batch_size": "users scored at once during full-ranking evaluation",
    "lr": "Adam's learning rate",
    "weight_decay": "Adam's weight decay (L2 on every trainable parameter)",
    "device": "auto (a GPU when one is visible), cpu or cuda",
    "threads": "torch threads of this run; 0 = all cores (use 1-2 when other jobs share the machine)",
    "selection": "clean: test once at the end on the best checkpoint; mmrec: test at every evaluation",
    "topk": "the cutoffs K of every metric@K (each at most the number of items)",
    "valid_metric": "metric@K that early stopping and the best checkpoint follow; K must be in topk",
    "progress": "show a progress bar",
    "cache_dir": "folder of cached kNN graphs; auto = $XDG_CACHE_HOME/fitmm or ~/.cache/fitmm, none = no cache",
    "tracking_uri": "with --track mlflow: a folder (local MLflow file store) or an MLflow server's URI",
    "synthetic_users": "synthetic data: number of users",
    "synthetic_items": "synthetic data: number of items",
    "synthetic_clusters": "synthetic data: taste clusters users and items are drawn around",
    "synthetic_latent_dim": "synthetic data: dimension of the latent taste vectors",
    "synthetic_mean_interactions": "synthetic data: mean interactions per user (at least 5 each)",
    "synthetic_popularity": "synthetic data: Zipf exponent of item popularity (0 = uniform)",
    "synthetic_feature_dims": "synthetic data: modality name -> feature columns",
    "synthetic_feature_noise": "synthetic data: feature noise std relative to the signal",
}

# Keys that never change a run's numbers (display, speed, where caches and logs live): `fitmm bench`
# leaves them out of a cell's name, `fitmm search` out of a study's definition, and `fitmm report`
# pools runs that differ only in these and the seed.
RESULT_NEUTRAL_KEYS = frozenset({"progress", "threads", "device", "cache_dir", "eval_batch_size", "tracking_uri"})

CHOICES: dict[str, tuple[str, ...]] = {
    "device": ("auto", "cpu", "cuda"),
    "selection": ("clean", "mmrec"),
}


def suggest(name: str, known) -> str:
    """' (did you mean 'x'?)' for the closest known name, or ''."""
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def coerce(key: str, value: Any, default: Any, where: str) -> Any:
    """Check `value` against the type of `default`; return it converted (int -> float, '1e-4' -> float)."""
    def bad(expected: str) -> InputError:
        return InputError(f"config key '{key}' ({where}): expected {expected}, got {quote(value)}")

    if default is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in YAML_BOOL_WORDS:  # a word parse_set kept
            return YAML_BOOL_WORDS[value.lower()]
        raise bad("true or false")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad("an integer")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad("a number")
    if isinstance(default, str):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # only YAML 1.1's bare words make a bool of a string key
            raise bad(f"a string (YAML reads a bare on/off/yes/no as true/false: quote it, e.g. {key}: 'off')")
        raise bad("a string")
    if isinstance(default, list):
        if isinstance(value, list):
            return value
        raise bad("a list, e.g. [1, 2]")
    if isinstance(default, dict):
        if isinstance(value, dict):
            return value
        raise bad("a mapping, e.g. {a: 1}")
    return value


# YAML 1.1 reads these bare words as booleans; `--set gate=off` means the string (true and false
# stay booleans).
YAML_BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False, "y": True, "n": False}


def parse_set(items: list[str]) -> dict[str, Any]:
    """`["lr=1e-4", "topk=[10, 20]"]` -> {"lr": "1e-4"..}: values are read as YAML, except that a
    bare word YAML would turn into a boolean stays a word (`gate=off`); `coerce` turns it back into
    a boolean for the keys that are booleans."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set {item!r}: expected key=value, e.g. --set epochs=50")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
            if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
                value = raw.strip()
            out[key.strip()] = value
        except yaml.YAMLError as exc:
            raise InputError(f"--set {item!r}: the value is not valid YAML ({exc.__class__.__name__})") from None
    return out


def format_value(value: Any) -> str:
    """A config value for people to read (tables, logs): floats to 4 significant digits, mappings
    in --set's YAML flow style. Display only: runs are named and compared by the exact values."""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)  # true/false/null, ints, lists, as YAML writes them


def format_point(point: dict[str, Any]) -> str:
    """key=value, ... of a grid or search point; "defaults" for the empty point."""
    return ", ".join(f"{k}={format_value(v)}" for k, v in point.items()) or "defaults"


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {path}: not found; pass an existing YAML file to --config")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"config file {path}: cannot read it ({exc.strerror}); check its permissions") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        raise InputError(f"config file {path}: a binary file, not YAML text; pass a UTF-8 text file of key: value lines")
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"config file {path}: not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise InputError(f"config file {path}: expected a mapping of key: value at the top level")
    return loaded


def model_keys(name: str) -> tuple[dict[str, Any], dict[str, Bound], dict[str, str]]:
    """(defaults, bounds, help) of a run of model `name`: the base keys' merged with the model's own."""
    from .models import model_class  # here, not at the top: models import this module

    cls = model_class(name)
    return {**BASE_DEFAULTS, **cls.defaults}, {**BASE_BOUNDS, **cls.bounds}, {**KEY_HELP, **cls.key_help}


def unknown_key_message(key: str, where: str, model: str, known) -> str:
    """Names the models that have `key` when the chosen one does not, else the closest spelling."""
    from .models import REGISTRY

    owners = sorted(name for name, cls in REGISTRY.items() if key in cls.defaults)
    if owners:
        names = owners[0] if len(owners) == 1 else f"{', '.join(owners[:-1])} and {owners[-1]}"
        return (f"config key '{key}' ({where}): {key} is a {names} key; {model} has no such key "
                f"(`fitmm config --model {model}` lists its keys)")
    return f"unknown config key '{key}' ({where}){suggest(key, known)}; `fitmm config` lists every key"


def resolve(layers: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Merge `layers` (name, values) over the defaults, later layers winning, and validate.

    The model is whatever the layers finally say `model` is; its keys join the base keys.
    """
    model = BASE_DEFAULTS["model"]
    for _, values in layers:
        model = values.get("model", model)
    defaults, bounds, _ = model_keys(str(model))
    config = dict(defaults)
    for where, values in layers:
        for key, value in values.items():
            if key not in defaults:
                raise InputError(unknown_key_message(key, where, str(model), defaults))
            config[key] = coerce(key, value, defaults[key], where)
    validate(config, bounds)
    return config


def check_bounds(config: dict[str, Any], bounds: dict[str, Bound]) -> None:
    """Every number finite (NaN and inf never make sense here) and inside its key's bound."""
    for key, value in config.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"config key '{key}': must be a finite number, got {value}")
        bound = bounds.get(key)
        if bound is not None and not bound.holds(value):
            raise InputError(f"config key '{key}': must be {bound.describe()}, got {value}")


def validate(config: dict[str, Any], bounds: dict[str, Bound] = BASE_BOUNDS) -> None:
    """Everything about a config that does not need the data; raises InputError before any write."""
    for key, options in CHOICES.items():
        if key in config and config[key] not in options:
            raise InputError(f"config key '{key}': {config[key]!r} is not one of {', '.join(options)}")
    check_bounds(config, bounds)
    dims = config["synthetic_feature_dims"]
    if not all(isinstance(n, str) and n and isinstance(d, int) and not isinstance(d, bool) and d >= 1
               for n, d in dims.items()):
        raise InputError(
            f"config key 'synthetic_feature_dims': expected modality name -> a whole number of columns >= 1, "
            f"got {dims!r}"
        )
    ks = config["topk"]
    if not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise InputError(f"config key 'topk': expected a list of positive integers, got {ks!r}")
    metric, _, k = str(config["valid_metric"]).partition("@")
    if metric not in ("recall", "ndcg", "precision", "map", "hit") or not k.isdigit() or int(k) not in ks:
        raise InputError(
            f"config key 'valid_metric': {config['valid_metric']!r} must be metric@K with metric one of "
            f"recall, ndcg, precision, map, hit and K in topk {ks}"
        )


def cache_dir(config: dict[str, Any]) -> Path | None:
    """Where derived data (kNN graphs) is cached: config key 'cache_dir' ('auto', 'none' or a folder)."""
    import os

    value = config["cache_dir"]
    if value == "none":
        return None
    if value == "auto":
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fitmm"
    return Path(value).expanduser()
