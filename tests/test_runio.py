"""Run-directory writes: whole files, and a Ctrl-C during a write is raised once the file is whole."""

import os
import signal

import pytest
import torch
import yaml

from fitmm import runio


@pytest.fixture
def ctrl_c_raises():
    """SIGINT handled as in a Python started normally: raise KeyboardInterrupt. Python installs that
    handler only when SIGINT is not ignored at startup, and it is in a background job of a script
    (`nohup pytest &`) or under any parent that ignores SIGINT, so the test sets the handler itself
    and puts the previous disposition back afterwards."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_during_a_checkpoint_write_leaves_the_file_whole_then_interrupts(tmp_path, ctrl_c_raises):
    path = tmp_path / "last.pt"
    state = {"weights": torch.arange(100_000, dtype=torch.float32)}

    def save_with_ctrl_c(handle):
        os.kill(os.getpid(), signal.SIGINT)  # delivered while torch.save is writing
        torch.save(state, handle)

    with pytest.raises(KeyboardInterrupt):
        runio.atomic_write(path, save_with_ctrl_c)
    assert torch.equal(torch.load(path)["weights"], state["weights"])
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "summary.json"
    runio.write_json(path, {"epoch": 1})

    def fail(handle):
        handle.write(b"{\"epo")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        runio.atomic_write(path, fail)
    assert path.read_text() == '{\n  "epoch": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_write_yaml_sorts_top_level_keys_but_keeps_the_order_of_nested_mappings(tmp_path):
    # A `modalities` mapping's order is the dataset's modality order: sorting it on disk made a
    # run given {image, audio} reload as {audio, image} and refuse its own data.
    path = tmp_path / "config.yaml"
    runio.write_yaml(path, {"seed": 1, "modalities": {"image": "image_feat.npy", "audio": "audio_feat.npy"}})
    text = path.read_text()
    assert text.index("modalities") < text.index("seed")
    assert list(yaml.safe_load(text)["modalities"]) == ["image", "audio"]
