"""Typed, flat configuration: defaults, YAML files and `--set key=value` overrides.

A run's configuration is one flat dict. Its keys are the trainer's and the data's (below) plus the
chosen model's own defaults (each model class carries them). Flat keys keep every setting
reachable from the command line with `--set key=value`, as in RecBole. Values are checked against
the type of their default, and an unknown key is an error that suggests the closest known one.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError

# Keys every run has, whatever the model. Models add their own (and may override `lr`).
BASE_DEFAULTS: dict[str, Any] = {
    "model": "fitmm",
    "data": "synthetic",  # a dataset folder in MMRec format, or "synthetic"
    "inter_file": "",  # the .inter file inside `data`; "" = the only *.inter there
    "modalities": {},  # modality name -> .npy file inside `data`; {} = every *_feat.npy
    "seed": 999,
    "epochs": 300,
    "patience": 20,  # evaluations without a strictly better validation metric before stopping
    "eval_every": 1,  # epochs between evaluations
    "batch_size": 2048,
    "eval_batch_size": 1024,  # users scored at once during full-ranking evaluation
    "lr": 1e-3,
    "weight_decay": 0.0,
    "device": "auto",
    "threads": 0,  # torch intra-op threads; 0 = all cores
    "selection": "clean",  # clean: test once at the end on the best checkpoint; mmrec: test every evaluation
    "topk": [5, 10, 20, 50],
    "valid_metric": "recall@20",
    "progress": True,
    "cache_dir": "auto",  # where derived graphs are cached; "auto" = ~/.cache/fitmm, "none" = no cache
    # The built-in synthetic dataset (used when data == "synthetic").
    "synthetic_users": 1500,
    "synthetic_items": 1000,
    "synthetic_clusters": 12,
    "synthetic_latent_dim": 16,
    "synthetic_mean_interactions": 24,
    "synthetic_popularity": 0.8,  # Zipf exponent of item popularity
    "synthetic_feature_dims": {"image": 128, "text": 64},
    "synthetic_feature_noise": 0.5,  # noise std relative to the signal in each feature matrix
}

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
        return InputError(f"config key '{key}' ({where}): expected {expected}, got {value!r}")

    if default is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
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


def parse_set(items: list[str]) -> dict[str, Any]:
    """`["lr=1e-4", "topk=[10, 20]"]` -> {"lr": "1e-4"..}: values are read as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set {item!r}: expected key=value, e.g. --set epochs=50")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise InputError(f"--set {item!r}: the value is not valid YAML ({exc.__class__.__name__})") from None
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {path}: not found; pass an existing YAML file to --config")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise InputError(f"config file {path}: not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise InputError(f"config file {path}: expected a mapping of key: value at the top level")
    return loaded


def resolve(layers: list[tuple[str, dict[str, Any]]], model_defaults_for) -> dict[str, Any]:
    """Merge `layers` (name, values) over the defaults, later layers winning.

    `model_defaults_for(name)` returns the chosen model's defaults (it raises for unknown models);
    the model is whatever the layers finally say `model` is.
    """
    model = BASE_DEFAULTS["model"]
    for _, values in layers:
        model = values.get("model", model)
    defaults = {**BASE_DEFAULTS, **model_defaults_for(str(model))}
    config = dict(defaults)
    for where, values in layers:
        for key, value in values.items():
            if key not in defaults:
                raise InputError(
                    f"unknown config key '{key}' ({where}){suggest(key, defaults)}; "
                    f"`fitmm config` lists every key"
                )
            config[key] = coerce(key, value, defaults[key], where)
    validate(config)
    return config


def validate(config: dict[str, Any]) -> None:
    for key, options in CHOICES.items():
        if key in config and config[key] not in options:
            raise InputError(f"config key '{key}': {config[key]!r} is not one of {', '.join(options)}")
    for key in ("epochs", "threads"):
        if config[key] < 0:
            raise InputError(f"config key '{key}': must be >= 0, got {config[key]}")
    for key in ("patience", "eval_every", "batch_size", "eval_batch_size"):
        if config[key] < 1:
            raise InputError(f"config key '{key}': must be >= 1, got {config[key]}")
    ks = config["topk"]
    if not ks or not all(isinstance(k, int) and k >= 1 for k in ks):
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
