"""Read, validate and write datasets in the MMRec folder format (see README, "Data format").

Every problem a user can have with a dataset raises `InputError` naming the file, the row or
field, and what to do. Loading never writes anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from .dataset import Dataset, interaction_matrix

REQUIRED_COLUMNS = ("userID", "itemID", "x_label")
FEATURE_SUFFIX = "_feat.npy"


def find_inter_file(folder: Path, inter_file: str = "") -> Path:
    if inter_file:
        path = folder / inter_file
        if not path.is_file():
            raise InputError(f"{path}: interaction file not found; check the config key 'inter_file'")
        return path
    found = sorted(folder.glob("*.inter"))
    if not found:
        raise InputError(
            f"{folder}: no .inter file in this folder; an MMRec dataset needs a tab-separated "
            f"<name>.inter file with columns userID, itemID, x_label"
        )
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise InputError(f"{folder}: several .inter files ({names}); choose one with --set inter_file=NAME")
    return found[0]


def _parse_int_column(values: list[str], column: str, path: Path) -> np.ndarray:
    try:
        return np.array(values, dtype=np.int64)
    except (ValueError, OverflowError):
        pass
    for row, value in enumerate(values):  # slow path, only to name the bad row
        try:
            int(value)
        except ValueError:
            raise InputError(
                f"{path}, row {row + 2}, column {column}: {value!r} is not an integer; "
                f"ids and x_label must be whole numbers"
            ) from None
    raise InputError(f"{path}, column {column}: values out of range")  # pragma: no cover


def read_inter(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, items, labels) from an .inter file; CRLF line ends and extra columns are fine."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise InputError(f"{path}: empty file; expected a header row 'userID<TAB>itemID<TAB>x_label' and data rows")
    header = [name.strip() for name in lines[0].split("\t")]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        hint = " (the file must be TAB-separated)" if len(header) == 1 else ""
        raise InputError(
            f"{path}, header row: missing column(s) {', '.join(missing)}{hint}; found {header}. "
            f"Required columns: {', '.join(REQUIRED_COLUMNS)}"
        )
    where = [header.index(c) for c in REQUIRED_COLUMNS]
    width = max(where) + 1
    columns: list[list[str]] = [[], [], []]
    for row, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < width:
            raise InputError(
                f"{path}, row {row}: {len(fields)} field(s), but the header needs at least {width}; "
                f"check for missing values or spaces instead of TABs"
            )
        for out, index in zip(columns, where):
            out.append(fields[index].strip())
    users, items, labels = (_parse_int_column(col, name, path) for col, name in zip(columns, REQUIRED_COLUMNS))
    for values, name in ((users, "userID"), (items, "itemID")):
        bad = np.flatnonzero(values < 0)
        if bad.size:
            raise InputError(f"{path}, row {bad[0] + 2}, column {name}: negative id {values[bad[0]]}; ids are 0-based")
    bad = np.flatnonzero((labels < 0) | (labels > 2))
    if bad.size:
        raise InputError(
            f"{path}, row {bad[0] + 2}, column x_label: {labels[bad[0]]} is not 0, 1 or 2 "
            f"(0 = train, 1 = validation, 2 = test)"
        )
    return users, items, labels


def detect_modalities(folder: Path) -> dict[str, str]:
    """Every `<name>_feat.npy` in the folder, as {name: file name}, sorted by name."""
    return {p.name[: -len(FEATURE_SUFFIX)]: p.name for p in sorted(folder.glob("*" + FEATURE_SUFFIX))}


def load_features(path: Path, n_items: int) -> np.ndarray:
    """A float32 (items x dim) matrix; float16/float64 files are converted."""
    if not path.is_file():
        raise InputError(f"{path}: feature file not found; fix the 'modalities' mapping or add the file")
    try:
        feat = np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises several types for corrupt files
        raise InputError(f"{path}: cannot read as a .npy array ({exc}); re-save it with numpy.save") from None
    if feat.ndim != 2:
        raise InputError(f"{path}: expected a 2-D (items x dim) matrix, got shape {feat.shape}")
    if not np.issubdtype(feat.dtype, np.number) or np.issubdtype(feat.dtype, np.complexfloating):
        raise InputError(f"{path}: expected a real numeric matrix, got dtype {feat.dtype}")
    if feat.shape[0] != n_items:
        raise InputError(
            f"{path}: {feat.shape[0]} feature rows, but the interactions have {n_items} items "
            f"(max itemID + 1); row i must hold item i's features"
        )
    feat = np.ascontiguousarray(feat, dtype=np.float32)
    finite = np.isfinite(feat)
    if not finite.all():
        row, col = np.argwhere(~finite)[0]
        raise InputError(
            f"{path}, row {row} (item {row}), column {col}: {feat[row, col]} is not finite; "
            f"replace NaN/inf features (e.g. with zeros) before training"
        )
    return feat


def load_mmrec(folder: str | Path, modalities: dict[str, str] | None = None, inter_file: str = "") -> Dataset:
    """Load and validate an MMRec dataset folder.

    `modalities` maps modality names to .npy files in the folder; None or {} picks up every
    `<name>_feat.npy` (zero of them = an ID-only dataset).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: dataset folder not found; pass an MMRec dataset folder or 'synthetic' to --data")
    path = find_inter_file(folder, inter_file)
    users, items, labels = read_inter(path)
    if users.size == 0:
        raise InputError(f"{path}: no interaction rows below the header")
    n_users, n_items = int(users.max()) + 1, int(items.max()) + 1
    splits = {}
    for label, name in enumerate(("train", "valid", "test")):
        keep = labels == label
        splits[name] = interaction_matrix(users[keep], items[keep], n_users, n_items)
    if splits["train"].nnz == 0:
        raise InputError(f"{path}: the training split is empty (no row has x_label = 0); a model needs training rows")

    mapping = modalities if modalities else detect_modalities(folder)
    features = {}
    for name, file_name in mapping.items():
        if not isinstance(file_name, str) or not file_name:
            raise InputError(f"config key 'modalities': modality {name!r} needs a .npy file name, got {file_name!r}")
        features[str(name)] = load_features(folder / file_name, n_items)
    return Dataset(
        name=folder.resolve().name,
        n_users=n_users,
        n_items=n_items,
        features=features,
        source=str(folder),
        **splits,
    )


def write_mmrec(dataset: Dataset, folder: str | Path) -> None:
    """Write `dataset` as an MMRec folder (<name>.inter plus <modality>_feat.npy)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, name in enumerate(("train", "valid", "test")):
        coo = dataset.split(name).tocoo()
        rows.append(np.stack([coo.row, coo.col, np.full(coo.nnz, label)], axis=1))
    table = np.concatenate(rows)
    table = table[np.lexsort((table[:, 1], table[:, 0]))]
    with open(folder / f"{dataset.name}.inter", "w", encoding="utf-8", newline="\n") as handle:
        handle.write("userID\titemID\tx_label\n")
        np.savetxt(handle, table, fmt="%d", delimiter="\t")
    for name, feat in dataset.features.items():
        np.save(folder / f"{name}{FEATURE_SUFFIX}", feat)
