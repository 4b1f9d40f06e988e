"""Run directories against hostile and careless use (issue 10): checkpoints never run code, a run
knows its data, one process per run directory, --resume changes nothing it should not, and every
bad case ends in exit 2 with a message, leaving nothing written or half-written."""

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch

from conftest import small_args, small_dataset
from fitmm import runio
from fitmm.cli import main
from fitmm.data import synthetic, write_mmrec

RUN = ["model=lightgcn", "epochs=3", "threads=1"]


def train(tmp_path, name, *extra, data=None):
    out = tmp_path / name
    args = ["train", "--out", str(out), *small_args(*RUN, *extra)]
    if data is not None:
        args += ["--data", str(data)]
    assert main(args) == 0
    return out


def snapshot(folder):
    """Every file's bytes (the lock file excepted: taking the lock writes the taker's pid)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != runio.LOCK_NAME}


def summary(run):
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 3-epoch LightGCN run on synthetic data; tests copy it before changing anything."""
    base = tmp_path_factory.mktemp("finished")
    return train(base, "run")


@pytest.fixture
def run(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


# -- 1. nothing executes from a checkpoint; bad checkpoints are exit 2 -----------------------------


class Evil:
    """Unpickling this calls os.system, which would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["best.pt", "last.pt"])
def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(run, tmp_path, capsys, name):
    marker = tmp_path / "pwned"
    torch.save({"model": Evil(marker), "epoch": 1, "optimizer": None, "sampler": {}, "torch_rng": None,
                "state": {}}, run / name)
    before = snapshot(run)
    command = ["evaluate", str(run)] if name == "best.pt" else ["train", "--resume", str(run)]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert f"{run / name}: not a checkpoint written by fitmm train" in err
    assert "system" in err and "could run code" in err
    assert not marker.exists()
    assert snapshot(run) == before


@pytest.fixture(scope="module")
def foreign_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("foreign")
    return {"other-model": train(base, "vbpr", "model=vbpr", "epochs=1"),
            "other-shapes": train(base, "small", "embedding_size=32", "epochs=1")}


@pytest.mark.parametrize("name", ["best.pt", "last.pt"])
@pytest.mark.parametrize("case, fragment", [
    ("empty", "the file is empty"),
    ("truncated", "truncated, corrupt or not a checkpoint"),
    ("garbage", "truncated, corrupt or not a checkpoint"),
    ("other-model", "written by a 'vbpr' run, and this run is 'lightgcn'"),
    ("other-shapes", "does not fit this run's model (size mismatch for user_emb"),  # embedding_size 32, not 64
])
def test_a_damaged_or_foreign_checkpoint_is_exit_2(run, foreign_runs, capsys, name, case, fragment):
    good = (run / name).read_bytes()
    if case in foreign_runs:
        content = (foreign_runs[case] / name).read_bytes()
    else:
        content = {"empty": b"", "truncated": good[: len(good) // 2], "garbage": b"not a checkpoint\n" * 20}[case]
    (run / name).write_bytes(content)
    before = snapshot(run)
    command = ["evaluate", str(run)] if name == "best.pt" else ["train", "--resume", str(run)]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert str(run / name) in err and fragment in err
    assert "Traceback" not in err
    assert snapshot(run) == before


@pytest.fixture(scope="module")
def bpr_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("bpr"), "bpr", "model=bpr", "epochs=1")


@pytest.mark.parametrize("name", ["best.pt", "last.pt"])
def test_a_checkpoint_of_a_model_with_the_same_shapes_is_exit_2(run, bpr_run, capsys, name):
    """BPR's and LightGCN's weights have the same names and shapes: the recorded model name tells them apart."""
    (run / name).write_bytes((bpr_run / name).read_bytes())
    before = snapshot(run)
    command = ["evaluate", str(run)] if name == "best.pt" else ["train", "--resume", str(run)]
    assert main(command) == 2
    assert f"{run / name}: written by a 'bpr' run, and this run is 'lightgcn'" in capsys.readouterr().err
    assert snapshot(run) == before


def test_a_checkpoint_missing_entries_is_exit_2(run, capsys):
    last = torch.load(run / "last.pt", weights_only=True)
    del last["sampler"]
    torch.save(last, run / "last.pt")
    before = snapshot(run)
    assert main(["train", "--resume", str(run)]) == 2
    assert "not a checkpoint written by fitmm train (no 'sampler' entry)" in capsys.readouterr().err
    assert snapshot(run) == before


def test_checkpoints_load_with_weights_only(run):
    """last.pt holds tensors and plain values only (the sampler's numpy state is a dict of ints)."""
    last = runio.load_torch(run / "last.pt")
    assert last["sampler"]["rng"]["bit_generator"] == "PCG64"
    assert last["state"]["epoch"] == 3
    assert runio.load_torch(run / "best.pt")["epoch"] >= 1


# -- 2. a run knows its data ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A finished run trained on an MMRec folder: (the base folder, the data folder, the run)."""
    base = tmp_path_factory.mktemp("folder")
    write_mmrec(small_dataset(), base / "ds")
    return base, train(base, "run", data=base / "ds")


@pytest.fixture
def data_and_run(folder_run, tmp_path):
    base, finished = folder_run
    shutil.copytree(base / "ds", tmp_path / "ds")
    shutil.copytree(finished, tmp_path / "run")
    # config.yaml names the data by absolute path: point the copy at the copied data
    config = (tmp_path / "run" / "config.yaml").read_text().replace(str(base / "ds"), str(tmp_path / "ds"))
    (tmp_path / "run" / "config.yaml").write_text(config)
    return tmp_path / "ds", tmp_path / "run"


def drop_train_rows(folder, n=5):
    lines = (folder / "synthetic.inter").read_text().splitlines()
    header, rows = lines[0], lines[1:]
    train_rows = [i for i, row in enumerate(rows) if row.split("\t")[-1] == "0"][:n]
    kept = [row for i, row in enumerate(rows) if i not in set(train_rows)]
    (folder / "synthetic.inter").write_text("\n".join([header, *kept]) + "\n")


def test_the_run_records_its_data(data_and_run):
    data, run = data_and_run
    record = json.loads((run / "data.json").read_text())
    assert record["fingerprint"] == summary(run)["data_fingerprint"]
    assert record["users"] == 300 and record["items"] == 200
    assert set(record["rows"]) == {"train", "valid", "test"}


@pytest.mark.parametrize("command", ["evaluate", "resume"])
def test_changed_data_is_refused_saying_what_changed(data_and_run, capsys, command):
    data, run = data_and_run
    rows = json.loads((run / "data.json").read_text())["rows"]["train"]
    drop_train_rows(data)
    before = snapshot(run)
    argv = ["evaluate", str(run)] if command == "evaluate" else ["train", "--resume", str(run)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "the data differs from the data this run was trained on" in err
    assert f"train rows {rows} -> {rows - 5}" in err
    assert "--allow-data-change" in err and "--data" in err
    assert snapshot(run) == before


@pytest.mark.parametrize("command", ["evaluate", "resume"])
def test_a_changed_item_count_is_exit_2_even_with_the_override(data_and_run, capsys, command):
    data, run = data_and_run
    shutil.rmtree(data)
    write_mmrec(synthetic.generate(users=300, items=201, mean_interactions=20,
                                   feature_dims={"image": 32, "text": 16}), data)
    before = snapshot(run)
    argv = ["evaluate", str(run)] if command == "evaluate" else ["train", "--resume", str(run)]
    assert main(argv) == 2
    assert "items 200 -> 201" in capsys.readouterr().err
    assert main([*argv, "--allow-data-change"]) == 2
    err = capsys.readouterr().err
    assert "does not fit this run's model" in err and "size mismatch" in err and "Traceback" not in err
    assert snapshot(run) == before


def test_a_moved_data_folder_is_accepted_with_data(data_and_run, tmp_path, capsys):
    data, run = data_and_run
    moved = tmp_path / "moved"
    data.rename(moved)
    before = snapshot(run)
    assert main(["evaluate", str(run)]) == 2
    assert "is not there any more; if the dataset folder moved, pass its new place with --data" in capsys.readouterr().err
    assert main(["train", "--resume", str(run)]) == 2
    capsys.readouterr()
    assert snapshot(run) == before

    assert main(["evaluate", str(run), "--data", str(moved)]) == 0
    assert json.loads(capsys.readouterr().out)["test"] == summary(run)["test"]
    expected = summary(run)
    assert main(["train", "--resume", str(run), "--data", str(moved)]) == 0
    assert summary(run)["test"] == expected["test"]
    assert summary(run)["data"] == str(moved)
    assert str(moved) in (run / "config.yaml").read_text()  # the run now knows where its data is
    assert json.loads((run / "data.json").read_text())["path"] == str(moved)
    assert main(["evaluate", str(run)]) == 0  # without --data from now on


def test_the_override_goes_on_and_is_recorded(data_and_run, capsys):
    data, run = data_and_run
    old = json.loads((run / "data.json").read_text())
    drop_train_rows(data)
    assert main(["evaluate", str(run), "--allow-data-change"]) == 0
    assert "train rows" in json.loads(capsys.readouterr().out)["data_changed"]
    assert main(["train", "--resume", str(run), "--allow-data-change"]) == 0
    assert "resuming on different data" in capsys.readouterr().err
    changes = summary(run)["data_changes"]
    assert len(changes) == 1 and changes[0]["from"] == old["fingerprint"]
    assert f"train rows {old['rows']['train']} -> {old['rows']['train'] - 5}" in changes[0]["change"]
    assert main(["evaluate", str(run)]) == 0  # the new data is now the run's


def test_a_run_from_before_data_records_is_checked_from_now_on(run, capsys):
    (run / "data.json").unlink()
    assert main(["evaluate", str(run)]) == 0
    assert "records no data fingerprint (written by an older fitmm)" in capsys.readouterr().err
    assert not (run / "data.json").exists()  # evaluate writes nothing
    assert main(["train", "--resume", str(run)]) == 0
    assert json.loads((run / "data.json").read_text())["fingerprint"] == summary(run)["data_fingerprint"]


# -- 3. one process per run directory --------------------------------------------------------------


def test_a_new_run_on_a_held_directory_names_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    held = runio.create_run_dir(out)  # this process plays the running training
    try:
        assert main(["train", "--out", str(out), *small_args(*RUN)]) == 2
        assert f"{out}: in use by another fitmm process (pid {os.getpid()})" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == [runio.LOCK_NAME]
    finally:
        held.release()


def test_resume_of_a_held_run_names_the_holder(run, capsys):
    held = runio.lock_run_dir(run)
    try:
        before = snapshot(run)
        assert main(["train", "--resume", str(run)]) == 2
        assert f"{run}: in use by another fitmm process (pid {os.getpid()})" in capsys.readouterr().err
        assert snapshot(run) == before
    finally:
        held.release()
    assert main(["train", "--resume", str(run)]) == 0  # the lock died with its holder's file


def test_two_trainings_started_on_one_directory_one_trains(tmp_path):
    """Two real processes, same --out, started together: exactly one trains, the other exits 2."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "fitmm", "train", "--out", str(out), *small_args("model=lightgcn", "epochs=15",
                                                                                   "threads=1")]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.pid, *p.communicate(timeout=300), p.returncode) for p in procs]
    codes = sorted(code for *_, code in results)
    assert codes == [0, 2], results
    (winner, *_), (_, _, err, _) = sorted(results, key=lambda r: r[3])
    assert (f"in use by another fitmm process (pid {winner})" in err
            or "already exists and is not empty" in err), err  # the loser came after the winner finished
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(1, 16))  # one run's log, not two interleaved
    assert summary(out)["seed"] == 999


# -- 4. --resume changes nothing it should not -----------------------------------------------------


@pytest.mark.parametrize("flags, fragment", [
    (["--set", "lr=0.1"], "--set lr cannot change a run being resumed"),
    (["--model", "bpr"], "--model cannot be combined with --resume"),
    (["--out", "elsewhere"], "--out cannot be combined with --resume"),
    (["--seed", "3"], "--seed cannot be combined with --resume"),
    (["--config", "c.yaml"], "--config cannot be combined with --resume"),
])
def test_resume_refuses_flags_that_change_the_run(run, capsys, flags, fragment):
    before = snapshot(run)
    assert main(["train", "--resume", str(run), *flags]) == 2
    assert fragment in capsys.readouterr().err
    assert snapshot(run) == before


def test_resume_with_more_epochs_extends_the_run(run, tmp_path, capsys):
    reference = train(tmp_path, "five", "epochs=5")
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "epochs=5"]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4, 5]
    assert summary(run)["test"] == summary(reference)["test"]  # as if it had been a 5-epoch run
    assert "epochs: 5" in (run / "config.yaml").read_text()
    assert main(["train", "--resume", str(run), "--set", "epochs=4"]) == 2
    assert "has already trained 5 epochs; --set epochs must be at least 5" in capsys.readouterr().err


def test_extending_a_run_that_stopped_early_says_so(tmp_path, capsys):
    out = train(tmp_path, "stopped", "model=bpr", "epochs=60", "patience=1", "lr=0.05")
    done = summary(out)["epochs_run"]
    assert done < 60
    before = snapshot(out)
    assert main(["train", "--resume", str(out), "--set", "epochs=80"]) == 2
    assert f"this run stopped early at epoch {done}" in capsys.readouterr().err
    assert snapshot(out) == before


# -- 5. damaged logs, bad --out, failures before the first checkpoint -------------------------------


def test_resume_drops_a_cut_last_log_line(run):
    expected = summary(run)
    lines = (run / "log.jsonl").read_text()
    (run / "log.jsonl").write_text(lines + '{"epoch": 4, "loss": 0.69')  # killed mid-append
    assert main(["train", "--resume", str(run)]) == 0
    assert (run / "log.jsonl").read_text() == lines
    assert summary(run)["test"] == expected["test"]


def test_a_damaged_line_inside_the_log_is_exit_2_naming_it(run, capsys):
    lines = (run / "log.jsonl").read_text().splitlines()
    lines[1] = lines[1][:20]
    (run / "log.jsonl").write_text("\n".join(lines) + "\n")
    before = snapshot(run)
    assert main(["train", "--resume", str(run)]) == 2
    assert f"{run / 'log.jsonl'}: line 2 is not an epoch record" in capsys.readouterr().err
    assert snapshot(run) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder_is_exit_2(tmp_path, capsys):
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o555)
    assert main(["train", "--out", str(locked / "run"), *small_args(*RUN)]) == 2
    assert f"{locked} is not writable for this user" in capsys.readouterr().err


def test_a_refused_creation_is_exit_2(tmp_path, capsys, monkeypatch):
    """What the read-only folder test checks, where the checks pass and the mkdir itself fails (root)."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(runio.tempfile, "mkdtemp", refuse)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *small_args(*RUN)]) == 2
    assert f"{out}: cannot be created (Permission denied)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failure, code", [(RuntimeError("boom"), 1), (KeyboardInterrupt(), 130)])
def test_a_run_failing_before_its_first_checkpoint_leaves_no_directory(tmp_path, capsys, monkeypatch, failure, code):
    from fitmm import train as train_module

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(train_module, "run_epoch", fail)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *small_args(*RUN)]) == code
    err = capsys.readouterr().err
    assert not out.exists()
    assert "--resume" not in err
    monkeypatch.undo()
    assert main(["train", "--out", str(out), *small_args(*RUN)]) == 0  # the same command simply works


def test_ctrl_c_before_the_run_directory_exists_suggests_no_resume(tmp_path, capsys, monkeypatch):
    from fitmm import data

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "load", interrupted)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *small_args(*RUN)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" not in err
    assert not out.exists()


def test_a_run_killed_before_its_first_checkpoint_resumes_from_epoch_1(run, tmp_path, capsys):
    expected = summary(run)
    for name in ("last.pt", "best.pt", "summary.json", "per_user.npz", "curves.png"):
        (run / name).unlink(missing_ok=True)
    lines = (run / "log.jsonl").read_text().splitlines()
    (run / "log.jsonl").write_text(lines[0] + "\n")  # epoch 1 logged, killed before its checkpoint
    assert main(["train", "--resume", str(run)]) == 0
    epochs = [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    assert summary(run)["test"] == expected["test"]


# -- 6. permissions and leftovers --------------------------------------------------------------------


def test_run_files_get_the_users_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        out = train(tmp_path, "run")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert set(modes.values()) == {0o644}, modes


def test_resume_removes_temporary_files_left_by_a_killed_write(run):
    (run / ".last.pt.k3x9_q0a").write_bytes(b"half a checkpoint")
    (run / ".summary.json.abcdefgh").write_text("{")
    assert main(["train", "--resume", str(run)]) == 0
    assert not [p.name for p in run.iterdir() if p.name.startswith(".") and p.name != runio.LOCK_NAME]


# -- 7. what a run prints ---------------------------------------------------------------------------


def test_train_ends_with_one_readable_line(tmp_path, capsys):
    out = train(tmp_path, "run")
    lines = capsys.readouterr().out.splitlines()
    s = summary(out)
    assert lines == [
        f"lightgcn: best epoch {s['best_epoch']} of 3; "
        f"valid recall@20 {s['valid']['recall@20']:.4f} ndcg@20 {s['valid']['ndcg@20']:.4f}; "
        f"test recall@20 {s['test']['recall@20']:.4f} ndcg@20 {s['test']['ndcg@20']:.4f}; "
        f"run {out} (all metrics in summary.json)"
    ]
    assert main(["train", "--out", str(tmp_path / "json"), "--json", *small_args(*RUN)]) == 0
    assert json.loads(capsys.readouterr().out) == summary(tmp_path / "json")


def test_progress_into_a_file_is_one_plain_line_per_evaluation(tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "fitmm", "train", "--out", str(out), *small_args(*RUN, "progress=true")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr
    lines = done.stderr.splitlines()
    assert lines[0] == "fitmm: training lightgcn, 1 thread: epochs 1..3"
    assert [line.split()[:2] for line in lines[1:]] == [["epoch", "1/3"], ["epoch", "2/3"], ["epoch", "3/3"]]
