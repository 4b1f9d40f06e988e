"""The bad-input corpus: every way a careless or hostile user can get input wrong, in one table.

Each case builds its bad input under a fresh temporary folder, runs the command, and checks the
contract of README "Exit codes": exit 2, a message that names the cause (the fragment), and
nothing written: the temporary folder (which holds the dataset, the would-be run or output
folder and the kNN cache) is byte-for-byte as it was before the command.
(Checkpoint, log and run-directory cases live in test_run_safety.py.)
"""

from __future__ import annotations

import os
import pathlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from conftest import read_inter_lines, small_args, write_inter_lines
from fitmm.cli import main


@dataclass
class Case:
    name: str
    # make(tmp, ds, monkeypatch) builds the bad input (ds: a valid small MMRec folder) and returns
    # the argv; "{ds}", "{run}", "{tmp}" in it are filled in.
    make: Callable
    fragment: str
    code: int = 2
    extra: Callable[[str], None] | None = field(default=None)  # further checks on the message
    # A broken dataset: `fitmm data info` on it must fail with the very same message as train.
    data_info: bool = False


def data_case(name, make, fragment, **kwargs) -> Case:
    return Case(name, make, fragment, data_info=True, **kwargs)


RUN = ["--out", "{run}", "--set", "cache_dir={tmp}/cache"]


def train(model="bpr", *sets, data="{ds}"):
    """argv of `fitmm train` on `data` with the small test settings and extra `--set`s."""
    return ["train", "--model", model, "--data", data, *RUN, *small_args(*sets)]


def edit_inter(edit):
    """A `make` that rewrites the .inter lines with `edit(lines) -> lines`, then trains BPR."""
    def make(tmp, ds, monkeypatch):
        write_inter_lines(ds, edit(read_inter_lines(ds)))
        return train()
    return make


def set_field(row: int, column: int, value: str):
    def edit(lines):
        fields = lines[row].split("\t")
        fields[column] = value
        lines[row] = "\t".join(fields)
        return lines
    return edit


def held_out_copy_of_a_train_row(lines):
    train_row = next(line for line in lines[1:] if line.endswith("\t0"))
    return lines + [train_row[:-1] + "2"]


def long_header(lines):
    return ["userID\titemID\t" + "x" * 500] + lines[1:]


def with_file(name: str, content, then=None):
    """A `make` that writes `content` (bytes, or a callable(path)) to ds/name and trains BPR."""
    def make(tmp, ds, monkeypatch):
        path = ds / name
        if callable(content):
            content(path)
        else:
            path.write_bytes(content)
        return then or train()
    return make


def npz_as_npy(path: Path):
    with open(path, "wb") as handle:  # np.savez_compressed would append .npz to a str path
        np.savez_compressed(handle, arr_0=np.zeros((200, 4), np.float32))


def text_symlink(path: Path):
    target = path.parent.parent / "notes.txt"
    target.write_text("not numbers\n")
    path.unlink()
    path.symlink_to(target)


def unreadable_inter(tmp, ds, monkeypatch):
    """The .inter file's read fails with EACCES. Simulated: tests run as root, who reads anything
    (test_data.py::test_real_permission_errors does it with chmod when not root)."""
    path = ds / "synthetic.inter"
    real = pathlib.Path.read_text

    def read_text(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)
    monkeypatch.setattr(pathlib.Path, "read_text", read_text)
    return train()


def unreadable_folder(tmp, ds, monkeypatch):
    """Listing the dataset folder fails with EACCES (simulated, as above)."""
    real = os.listdir

    def listdir(folder="."):
        if Path(folder) == ds:
            raise PermissionError(13, "Permission denied", str(folder))
        return real(folder)
    monkeypatch.setattr(os, "listdir", listdir)
    return train()


def argv(*args):
    return lambda tmp, ds, monkeypatch: list(args)


def config_file(content: bytes):
    def make(tmp, ds, monkeypatch):
        (tmp / "c.yaml").write_bytes(content)
        return ["train", "--config", str(tmp / "c.yaml"), *RUN, *small_args()]
    return make


def existing_file_as_synth_out(tmp, ds, monkeypatch):
    (tmp / "taken").write_text("keep me\n")
    return ["data", "synth", "--out", "{tmp}/taken"]


def out_at_a_file(out: str):
    """A `make` that puts a file at {tmp}/afile and trains into `out`."""
    def make(tmp, ds, monkeypatch):
        (tmp / "afile").write_text("x")
        return ["train", "--model", "bpr", "--data", "{ds}", "--out", out, *small_args()]
    return make


def short_message(err: str) -> None:
    """The 500 x's of the bad field are quoted cut to 80 characters and marked '…'."""
    assert "x" * 60 in err and "x" * 81 not in err and "…" in err, err


SYN = ["--data", "synthetic", *RUN]

def remove(name):
    def make(tmp, ds, monkeypatch):
        target = ds / name if name else ds
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        return train()
    return make


def nan_feature(path: Path):
    feat = np.ones((200, 4), np.float32)
    feat[17, 2] = np.nan
    np.save(path, feat)


CASES = [
    # -- the dataset folder and its .inter file -------------------------------------------------------
    Case("dataset folder missing", remove(""), "dataset folder not found"),
    data_case("no .inter file", remove("synthetic.inter"), "no .inter file in this folder"),
    data_case("column missing", edit_inter(lambda lines: ["userID\titem\tx_label"] + lines[1:]),
              "synthetic.inter, header row: missing column(s) itemID"),
    data_case("id not a number", edit_inter(set_field(5, 1, "abc")),
              "synthetic.inter, row 6, column itemID: 'abc' is not a whole number"),
    data_case("negative id", edit_inter(set_field(7, 0, "-1")), "row 8, column userID: negative id -1; ids are 0-based"),
    data_case("x_label not 0, 1 or 2", edit_inter(set_field(3, 2, "7")), "row 4, column x_label: 7 is not 0, 1 or 2"),
    data_case("no training rows", edit_inter(lambda lines: [lines[0]] + [l for l in lines[1:] if not l.endswith("\t0")]),
              "the training split is empty"),
    data_case("held-out row repeats a training pair", edit_inter(held_out_copy_of_a_train_row),
              "is a test row and also a training row (1 held-out row(s) repeat a training pair)"),
    data_case("id with underscore 1_0", edit_inter(set_field(3, 1, "1_0")), "row 4, column itemID: '1_0' is not a whole number"),
    data_case("id with sign +1", edit_inter(set_field(3, 0, "+1")), "row 4, column userID: '+1' is not a whole number"),
    data_case("id with leading space", edit_inter(set_field(3, 0, " 1")), "row 4, column userID: ' 1' is not a whole number"),
    data_case("id written 1.0", edit_inter(set_field(3, 1, "1.0")), "'1.0' is not a whole number"),
    data_case("x_label written 0.0", edit_inter(set_field(3, 2, "0.0")), "column x_label: '0.0' is not a whole number"),
    data_case("huge item id 10^12", edit_inter(lambda lines: lines + ["0\t1000000000000\t0"]),
              "Re-map ids to 0..n-1 (fitmm data convert does this)"),
    data_case("huge user id 10^8", edit_inter(lambda lines: lines + ["100000000\t1\t0"]),
              "column userID: id 100000000 is far beyond the 301 distinct ids"),
    data_case("id beyond int64", edit_inter(lambda lines: lines + ["0\t" + "9" * 30 + "\t0"]), "is too large for an id"),
    data_case("500-character header", edit_inter(long_header), "missing column(s) x_label", extra=short_message),
    data_case("500-character id", edit_inter(set_field(2, 0, "7" * 10 + "x" * 490)), "is not a whole number",
              extra=short_message),
    data_case(".inter unreadable (permissions)", unreadable_inter, "synthetic.inter: permission denied"),
    data_case("dataset folder unreadable (permissions)", unreadable_folder, "ds: permission denied (cannot list"),
    Case("data info given a file", lambda tmp, ds, mp: ["data", "info", str(ds / "synthetic.inter")],
         "synthetic.inter: is a file; pass the dataset folder"),
    Case("train --data given a file", lambda tmp, ds, mp: train(data=str(ds / "synthetic.inter")),
         "is a file; pass the dataset folder"),
    Case("inter_file climbs out of the folder", argv("data", "info", "{ds}", "--set", "inter_file=../x.inter"),
         "config key 'inter_file': '../x.inter' points outside the dataset folder"),
    Case("modality file climbs out of the folder",
         argv("data", "info", "{ds}", "--set", "modalities={image: sub/../../image_feat.npy}"),
         "config key 'modalities': 'sub/../../image_feat.npy' points outside the dataset folder"),
    # -- feature files -----------------------------------------------------------------------------
    data_case("feature rows != items", with_file("image_feat.npy", lambda p: np.save(p, np.zeros((199, 4), np.float32))),
              "image_feat.npy: 199 feature rows, but the interactions have 200 items"),
    data_case("NaN feature", with_file("text_feat.npy", nan_feature),
              "text_feat.npy, row 17 (item 17), column 2: nan is not finite"),
    Case("mapped feature file missing", argv("data", "info", "{ds}", "--set", "modalities={image: nope.npy}"),
         "nope.npy: feature file not found"),
    data_case("feature matrix with 0 columns", with_file("image_feat.npy", lambda p: np.save(p, np.zeros((200, 0), np.float32))),
              "image_feat.npy: the matrix has 0 columns"),
    data_case(".npz saved as _feat.npy", with_file("image_feat.npy", npz_as_npy),
              "image_feat.npy: is an .npz archive, not a .npy file"),
    data_case("text file named _feat.npy", with_file("image_feat.npy", b"1 2 3\n4 5 6\n"), "image_feat.npy: not a .npy file"),
    data_case("symlink to text named _feat.npy", with_file("image_feat.npy", text_symlink), "image_feat.npy: not a .npy file"),
    # -- config values -----------------------------------------------------------------------------
    Case("n_layers=-1", argv("train", "--model", "lightgcn", *SYN, "--set", "n_layers=-1"),
         "config key 'n_layers': must be >= 0, got -1"),
    Case("embedding_size=0", argv("train", "--model", "bpr", *SYN, "--set", "embedding_size=0"),
         "config key 'embedding_size': must be >= 1, got 0"),
    Case("embedding_size negative", argv("train", "--model", "fitmm", *SYN, "--set", "embedding_size=-8"),
         "config key 'embedding_size': must be >= 1, got -8"),
    Case("dropout=1", argv("train", "--model", "bm3", *SYN, "--set", "dropout=1.0"),
         "config key 'dropout': must be in [0, 1), got 1.0"),
    Case("lr negative", argv("train", *SYN, "--set", "lr=-0.001"), "config key 'lr': must be > 0, got -0.001"),
    Case("lr NaN", argv("train", *SYN, "--set", "lr=nan"), "config key 'lr': must be a finite number, got nan"),
    Case("lr infinite", argv("train", *SYN, "--set", "lr=.inf"), "config key 'lr': must be a finite number, got inf"),
    Case("weight_decay negative", argv("train", *SYN, "--set", "weight_decay=-1"),
         "config key 'weight_decay': must be >= 0, got -1.0"),
    Case("--seed negative", argv("train", *SYN, "--seed", "-1"), "config key 'seed': must be between 0 and 4294967295, got -1"),
    Case("--seed 2^32", argv("train", *SYN, "--seed", "4294967296"), "must be between 0 and 4294967295, got 4294967296"),
    Case("synthetic_users=0", argv("train", *SYN, "--set", "synthetic_users=0"), "'synthetic_users': must be >= 1, got 0"),
    Case("synthetic_items=3", argv("data", "synth", "--out", "{run}", "--set", "synthetic_items=3"),
         "'synthetic_items': must be >= 10, got 3"),
    Case("synthetic_mean_interactions=2", argv("train", *SYN, "--set", "synthetic_mean_interactions=2"),
         "'synthetic_mean_interactions': must be >= 5, got 2"),
    Case("synthetic_popularity NaN", argv("train", *SYN, "--set", "synthetic_popularity=nan"),
         "'synthetic_popularity': must be a finite number"),
    Case("synthetic_feature_dims with 0 columns", argv("train", *SYN, "--set", "synthetic_feature_dims={image: 0}"),
         "config key 'synthetic_feature_dims': expected modality name -> a whole number of columns >= 1"),
    Case("key of another model", argv("train", "--model", "freedom", *SYN, "--set", "num_bands=2"),
         "num_bands is a fitmm key; freedom has no such key"),
    Case("binary --config file", config_file(bytes(range(256)) * 4), "a binary file, not YAML text"),
    Case("--config file with NUL bytes", config_file(b"epochs: 3\n\x00\x00\n"), "a binary file, not YAML text"),
    # -- config values that need the data -----------------------------------------------------------
    Case("knn_k above the item count (freedom)", lambda tmp, ds, mp: train("freedom", "knn_k=201"),
         "config key 'knn_k': must be at most the number of items (200), got 201"),
    Case("knn_k above the item count (fitmm)", lambda tmp, ds, mp: train("fitmm", "knn_k=500"),
         "config key 'knn_k': must be at most the number of items (200), got 500"),
    Case("user_knn_k above the user count", lambda tmp, ds, mp: train("fitmm", "user_graph=true", "user_knn_k=301"),
         "config key 'user_knn_k': must be at most the number of users (300), got 301"),
    Case("topk cutoff above the item count", lambda tmp, ds, mp: train("bpr", "topk=[10, 20, 500]"),
         "config key 'topk': cutoff 500 is above the number of items (200)"),
    Case("valid_metric cutoff above the item count", lambda tmp, ds, mp: train("pop", "topk=[20, 300]", "valid_metric=ndcg@300"),
         "cutoff 300 is above the number of items (200)"),
    # -- output folders --------------------------------------------------------------------------------
    Case("data synth --out an existing file", existing_file_as_synth_out, "taken: already exists and is a file"),
    Case("train --out under a file", out_at_a_file("{tmp}/afile/run"), "afile is a file, not a directory"),
    Case("train --out an existing file", out_at_a_file("{tmp}/afile"), "afile: exists and is not a directory"),
    Case("--allow-data-change without --resume", lambda tmp, ds, mp: train("bpr") + ["--allow-data-change"],
         "--allow-data-change only goes with --resume"),
]


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every path under `folder` with its size and modification time (symlinks not followed)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            st = path.lstat()
            out[str(path.relative_to(folder))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_exits_2_with_the_cause_and_writes_nothing(case, dataset_dir, tmp_path, monkeypatch, capsys):
    args = case.make(tmp_path, dataset_dir, monkeypatch)
    args = [a.replace("{ds}", str(dataset_dir)).replace("{run}", str(tmp_path / "run")).replace("{tmp}", str(tmp_path))
            for a in args]
    before = snapshot(tmp_path)
    code = main(args)
    err = capsys.readouterr().err
    assert code == case.code, err
    assert case.fragment in err
    assert "Traceback" not in err
    if case.extra:
        case.extra(err)
    assert snapshot(tmp_path) == before  # no run dir, no output folder, no cache, no file touched
    assert not (tmp_path / "run").exists()
    if case.data_info:  # `fitmm data info` is the same validator
        assert main(["data", "info", str(dataset_dir)]) == 2
        assert capsys.readouterr().err == err
