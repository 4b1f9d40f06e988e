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
