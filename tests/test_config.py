import re

import pytest

from fitmm.cli import main
from fitmm.config import BASE_DEFAULTS, coerce, parse_set, resolve
from fitmm.errors import InputError
from fitmm.models import model_class


def test_layers_override_in_order_and_model_defaults_apply():
    config = resolve([("file", {"model": "bpr", "epochs": 5}), ("--set", {"epochs": 7, "lr": "1e-4"})])
    assert config["model"] == "bpr"
    assert config["epochs"] == 7
    assert config["lr"] == pytest.approx(1e-4)  # '1e-4' (a YAML 1.1 string) is read as a number
    assert config["embedding_size"] == 64  # BPR's own default
    assert config["patience"] == BASE_DEFAULTS["patience"]


def test_unknown_key_suggests_the_closest():
    with pytest.raises(InputError, match=r"unknown config key 'epoch' \(--set\) \(did you mean 'epochs'\?\)"):
        resolve([("--set", {"epoch": 3})])


def test_model_keys_exist_only_for_that_model():
    with pytest.raises(InputError, match=r"n_layers is a bm3, fitmm and lightgcn key; bpr has no such key"):
        resolve([("--set", {"model": "bpr", "n_layers": 2})])
    assert resolve([("--set", {"model": "lightgcn", "n_layers": 2})])["n_layers"] == 2


@pytest.mark.parametrize("key,value,expected", [
    ("epochs", "ten", "expected an integer"),
    ("epochs", 2.5, "expected an integer"),
    ("progress", 1, "expected true or false"),
    ("lr", "fast", "expected a number"),
    ("topk", 5, "expected a list"),
])
def test_wrong_types_are_named(key, value, expected):
    with pytest.raises(InputError, match=f"config key '{key}' \\(--set\\): {expected}"):
        coerce(key, value, BASE_DEFAULTS[key], "--set")


def test_invalid_choices_and_ranges():
    with pytest.raises(InputError, match="'selection': 'test' is not one of clean, mmrec"):
        resolve([("--set", {"selection": "test"})])
    with pytest.raises(InputError, match="'valid_metric'"):
        resolve([("--set", {"valid_metric": "recall@15"})])
    with pytest.raises(InputError, match="'batch_size': must be >= 1"):
        resolve([("--set", {"batch_size": 0})])


def test_parse_set_reads_yaml_values():
    assert parse_set(["topk=[10, 20]", "modalities={image: a.npy}", "data=x"]) == {
        "topk": [10, 20], "modalities": {"image": "a.npy"}, "data": "x"}
    with pytest.raises(InputError, match="expected key=value"):
        parse_set(["epochs"])


def test_unknown_model_suggests(capsys, tmp_path):
    assert main(["train", "--model", "lightgnc", "--out", str(tmp_path / "run")]) == 2
    assert "unknown model 'lightgnc' (did you mean 'lightgcn'?)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cli_unknown_key_exits_2(capsys, tmp_path):
    assert main(["train", "--set", "patienc=3", "--out", str(tmp_path / "run")]) == 2
    assert "did you mean 'patience'?" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_config_file_is_read(tmp_path):
    from fitmm.config import read_config_file

    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\nlr: 0.01\n")
    assert read_config_file(path) == {"epochs": 3, "lr": 0.01}
    path.write_text("- a\n- b\n")
    with pytest.raises(InputError, match="expected a mapping"):
        read_config_file(path)
    with pytest.raises(InputError, match="not found"):
        read_config_file(tmp_path / "nope.yaml")


def all_key_tables():
    """(where, defaults, bounds, help) for the base keys and for every model's own keys."""
    from fitmm.config import BASE_BOUNDS, KEY_HELP
    from fitmm.models import REGISTRY

    yield "base", BASE_DEFAULTS, BASE_BOUNDS, KEY_HELP
    for name, cls in REGISTRY.items():
        yield name, cls.defaults, {**BASE_BOUNDS, **cls.bounds}, {**KEY_HELP, **cls.key_help}


def test_every_numeric_key_has_a_bound_and_every_key_a_meaning():
    for where, defaults, bounds, help_ in all_key_tables():
        for key, value in defaults.items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            assert not numeric or key in bounds, f"{where}: numeric key '{key}' has no declared bound"
            assert help_.get(key), f"{where}: key '{key}' has no one-line meaning"
            assert key not in bounds or bounds[key].holds(value), f"{where}: default of '{key}' is out of bounds"
        assert set(bounds) <= set(defaults) | set(BASE_DEFAULTS), f"{where}: a bound for an unknown key"


def test_bounds_describe_and_hold():
    from fitmm.config import AT_LEAST_1, FRACTION, POSITIVE, Bound

    assert (AT_LEAST_1.describe(), POSITIVE.describe(), FRACTION.describe()) == (">= 1", "> 0", "in [0, 1)")
    assert Bound(0, 1, low_open=True).describe() == "in (0, 1]" and Bound(0, 9).describe() == "between 0 and 9"
    assert FRACTION.holds(0.0) and not FRACTION.holds(1.0) and not POSITIVE.holds(0) and AT_LEAST_1.holds(1)


@pytest.mark.parametrize("model,key,value,expected", [
    ("lightgcn", "n_layers", -1, "'n_layers': must be >= 0, got -1"),
    ("fitmm", "embedding_size", 0, "'embedding_size': must be >= 1, got 0"),
    ("fitmm", "num_bands", 0, "'num_bands': must be >= 1, got 0"),
    ("lgmrec", "keep_rate", 0.0, "'keep_rate': must be in (0, 1], got 0.0"),
    ("smore", "tau", 0.0, "'tau': must be > 0, got 0.0"),
    ("freedom", "dropout", 1.0, "'dropout': must be in [0, 1), got 1.0"),
    ("vbpr", "embedding_size", 0, "'embedding_size': must be >= 1, got 0"),
    ("bpr", "reg_weight", "nan", "'reg_weight': must be a finite number, got nan"),
    ("bpr", "seed", 2**32, "'seed': must be between 0 and 4294967295"),
])
def test_out_of_bounds_values_are_refused_before_any_data_is_read(model, key, value, expected):
    with pytest.raises(InputError, match=re.escape(expected)):
        resolve([("--set", {"model": model, key: value})])


def test_a_key_of_another_model_names_that_model():
    with pytest.raises(InputError, match=re.escape(
            "config key 'num_bands' (--set): num_bands is a fitmm key; freedom has no such key "
            "(`fitmm config --model freedom` lists its keys)")):
        resolve([("--set", {"model": "freedom", "num_bands": 2})])
    # A key no model has still gets the closest spelling.
    with pytest.raises(InputError, match=r"unknown config key 'num_band' \(--set\) \(did you mean 'num_bands'\?\)"):
        resolve([("--set", {"num_band": 2})])


def test_config_model_prints_only_that_models_keys_with_meanings(capsys):
    import yaml

    assert main(["config", "--model", "freedom"]) == 0
    out = capsys.readouterr().out
    listed = yaml.safe_load(out)  # the listing is valid YAML: a --config file can start from it
    assert set(listed) == set(BASE_DEFAULTS) | set(model_class("freedom").defaults)
    assert listed["model"] == "freedom" and listed["knn_k"] == 10
    assert "num_bands" not in out  # fitmm's key
    line = next(l for l in out.splitlines() if l.startswith("dropout:"))
    assert line.endswith("# fraction of user-item edges pruned each epoch (must be in [0, 1))")
    threads = next(l for l in out.splitlines() if l.startswith("threads:"))
    assert "0 = all cores" in threads
    assert main(["config", "--model", "nope"]) == 2


def test_binary_config_file_is_named(tmp_path):
    from fitmm.config import read_config_file

    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xff\xfe\x00e\x00p")
    with pytest.raises(InputError, match="a binary file, not YAML text"):
        read_config_file(path)


def test_set_gate_off_is_the_word_and_boolean_keys_still_take_on_off():
    # YAML 1.1 reads a bare off as false: `--set gate=off` (README's ablation) once failed.
    config = resolve([("--set", parse_set(["model=fitmm", "gate=off", "item_graph=no", "train_features=on"]))])
    assert config["gate"] == "off" and config["item_graph"] is False and config["train_features"] is True
    assert parse_set(["progress=false"]) == {"progress": False}
    # in a config file the bare word is already a boolean: the error says to quote it
    with pytest.raises(InputError, match=r"expected a string \(YAML reads a bare on/off/yes/no as true/false: quote it"):
        resolve([("cfg.yaml", {"model": "fitmm", "gate": False})])
