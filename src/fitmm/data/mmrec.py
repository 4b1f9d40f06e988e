"""Read, validate and write datasets in the MMRec folder format (see README, "Data format").

Every problem a user can have with a dataset raises `InputError` naming the file, the row or
field, and what to do. Loading never writes anything.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InputError, quote
from .dataset import Dataset, interaction_matrix

REQUIRED_COLUMNS = ("userID", "itemID", "x_label")
FEATURE_SUFFIX = "_feat.npy"
NPY_MAGIC = b"\x93NUMPY"  # the first bytes of every .npy file
ZIP_MAGIC = b"PK\x03\x04"  # an .npz archive is a zip file
# MMRec ids are dense: 0..n-1. Arrays are sized max id + 1, so one stray huge id (10^8) would cost
# gigabytes. Ids may leave gaps (a few removed users), but max id + 1 may be at most twice the number
# of distinct ids plus this slack (so that small hand-written files with gaps load). Every real
# dataset in ../shared/data has max id + 1 == distinct ids.
ID_SLACK = 1000


def os_error_message(path: Path, exc: OSError, what: str) -> str:
    """The message for an OSError met while reading `path` (`what`: 'read the interaction file')."""
    if isinstance(exc, PermissionError):
        return f"{path}: permission denied (cannot {what}); make it readable for this user (e.g. chmod a+rX)"
    if isinstance(exc, IsADirectoryError):
        return f"{path}: is a folder, not a file; cannot {what}"
    return f"{path}: cannot {what} ({exc.strerror or exc.__class__.__name__})"


def inside_folder(folder: Path, name: str, key: str) -> Path:
    """`folder / name` for a config path (`inter_file`, a `modalities` file), refusing relative
    paths that climb out of the dataset folder ('../x'): a dataset is the folder it names. An
    absolute path is taken as meant and used as given."""
    path = Path(name).expanduser()
    if path.is_absolute():
        return path
    if os.path.normpath(path).split(os.sep)[0] == os.pardir:
        raise InputError(
            f"config key '{key}': {quote(name)} points outside the dataset folder {folder}; "
            f"name a file inside it, or give an absolute path if you mean a file elsewhere"
        )
    return folder / path


def list_folder(folder: Path) -> list[str]:
    """The folder's entries, sorted. (glob() reports an unreadable folder as an empty one; this names the cause.)"""
    try:
        return sorted(os.listdir(folder))
    except OSError as exc:
        raise InputError(os_error_message(folder, exc, "list the dataset folder")) from None


def find_inter_file(folder: Path, inter_file: str = "") -> Path:
    if inter_file:
        path = inside_folder(folder, inter_file, "inter_file")
        if not path.is_file():
            raise InputError(f"{path}: interaction file not found; check the config key 'inter_file'")
        return path
    found = [folder / name for name in list_folder(folder) if name.endswith(".inter") and (folder / name).is_file()]
    if not found:
        raise InputError(
            f"{folder}: no .inter file in this folder; an MMRec dataset needs a tab-separated "
            f"<name>.inter file with columns userID, itemID, x_label"
        )
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise InputError(f"{folder}: several .inter files ({names}); choose one with --set inter_file=NAME")
    return found[0]


def _parse_int_column(values: list[str], column: str, path: Path, rows: list[int]) -> np.ndarray:
    """Whole numbers written with the digits 0-9 only. Python's int() would also take '1_0' (as
    10), '+1', ' 1' and other Unicode digits; a strict reading keeps a typo from becoming an id."""
    bad = next((row for row, value in enumerate(values) if not (value.isascii() and value.isdigit())), None)
    if bad is not None:
        value = values[bad]
        where = f"{path}, row {rows[bad]}, column {column}"
        if value[:1] == "-" and value[1:].isascii() and value[1:].isdigit():
            raise InputError(f"{where}: negative id {value}; ids are 0-based")
        raise InputError(
            f"{where}: {quote(value)} is not a whole number; ids and x_label must be written with the "
            f"digits 0-9 only (no sign, spaces, underscores or decimal point)"
        )
    try:
        return np.array(values, dtype=np.int64)
    except OverflowError:
        index = next(index for index, value in enumerate(values) if int(value) >= 2**63)
        raise InputError(
            f"{path}, row {rows[index]}, column {column}: {quote(values[index])} is too large for an id; "
            f"re-map ids to 0..n-1 (fitmm data convert does this)"
        ) from None


def _check_dense_ids(values: np.ndarray, column: str, path: Path, rows: list[int]) -> None:
    """Refuse ids far beyond the number of distinct ids (see ID_SLACK) before any array is sized by them."""
    size = int(values.max()) + 1
    distinct = np.unique(values).size
    if size > 2 * distinct + ID_SLACK:
        index = int(np.argmax(values))
        raise InputError(
            f"{path}, row {rows[index]}, column {column}: id {values[index]} is far beyond the {distinct} distinct "
            f"ids in the file; MMRec ids must be dense (0..n-1) because arrays are sized by the largest id. "
            f"Re-map ids to 0..n-1 (fitmm data convert does this)"
        )


def _check_held_out_not_in_train(users, items, labels, path: Path, rows: list[int]) -> None:
    """Refuse a (user, item) pair that is both a training row and a validation/test row.

    The evaluator masks a user's training items before ranking, so such a held-out row can never
    be hit: it silently lowers recall. Rejected rather than dropped with a warning: none of the
    real datasets in ../shared/data has such a row (their splits are disjoint), so one appearing
    means the split itself is broken, and quietly repairing it would hide that."""
    n_items = int(items.max()) + 1
    pairs = users * n_items + items  # fits int64: ids were checked dense first
    train = np.unique(pairs[labels == 0])
    held_out = np.flatnonzero(labels > 0)
    clash = held_out[np.isin(pairs[held_out], train)]
    if clash.size:
        first = int(clash[0])
        split = "validation" if labels[first] == 1 else "test"
        raise InputError(
            f"{path}, row {rows[first]}: user {users[first]}, item {items[first]} is a {split} row and also a "
            f"training row ({clash.size} held-out row(s) repeat a training pair); a held-out item the user "
            f"trained on is masked at evaluation and can never be recommended. Keep each pair in one split only"
        )


def read_inter(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, items, labels) from an .inter file, validated; CRLF line ends and extra columns are fine."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise InputError(os_error_message(path, exc, "read the interaction file")) from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise InputError(f"{path}: empty file; expected a header row 'userID<TAB>itemID<TAB>x_label' and data rows")
    header = [name.strip() for name in lines[0].split("\t")]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        hint = " (the file must be TAB-separated)" if len(header) == 1 else ""
        raise InputError(
            f"{path}, header row: missing column(s) {', '.join(missing)}{hint}; found {quote(lines[0])}. "
            f"Required columns: {', '.join(REQUIRED_COLUMNS)}"
        )
    where = [header.index(c) for c in REQUIRED_COLUMNS]
    width = max(where) + 1
    columns: list[list[str]] = [[], [], []]
    rows: list[int] = []  # the file's row number (1 = header) of each data row, for messages
    for row, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        rows.append(row)
        fields = line.split("\t")
        if len(fields) < width:
            raise InputError(
                f"{path}, row {row}: {len(fields)} field(s), but the header needs at least {width}; "
                f"check for missing values or spaces instead of TABs"
            )
        for out, index in zip(columns, where):
            out.append(fields[index])
    if not rows:
        raise InputError(f"{path}: no interaction rows below the header")
    users, items, labels = (_parse_int_column(col, name, path, rows) for col, name in zip(columns, REQUIRED_COLUMNS))
    bad = np.flatnonzero(labels > 2)
    if bad.size:
        raise InputError(
            f"{path}, row {rows[bad[0]]}, column x_label: {labels[bad[0]]} is not 0, 1 or 2 "
            f"(0 = train, 1 = validation, 2 = test)"
        )
    _check_dense_ids(users, "userID", path, rows)
    _check_dense_ids(items, "itemID", path, rows)
    _check_held_out_not_in_train(users, items, labels, path, rows)
    return users, items, labels


def detect_modalities(folder: Path) -> dict[str, str]:
    """Every `<name>_feat.npy` in the folder, as {name: file name}, sorted by name."""
    return {name[: -len(FEATURE_SUFFIX)]: name for name in list_folder(folder) if name.endswith(FEATURE_SUFFIX)}


def load_features(path: Path, n_items: int) -> np.ndarray:
    """A float32 (items x dim) matrix; float16/float64 files are converted."""
    if not path.is_file():
        raise InputError(f"{path}: feature file not found; fix the 'modalities' mapping or add the file")
    # Look at the first bytes before numpy does: given a text file it says "pickled data", given
    # an .npz archive it returns an archive object instead of an array.
    try:
        with open(path, "rb") as handle:
            magic = handle.read(len(NPY_MAGIC))
    except OSError as exc:
        raise InputError(os_error_message(path, exc, "read the feature file")) from None
    if magic.startswith(ZIP_MAGIC):
        raise InputError(
            f"{path}: is an .npz archive, not a .npy file; save the one matrix with numpy.save "
            f"(e.g. numpy.save(path, numpy.load(npz)['arr_0']))"
        )
    if magic != NPY_MAGIC:
        raise InputError(f"{path}: not a .npy file (it does not start with numpy's header); save the matrix with numpy.save")
    try:
        feat = np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises several types for corrupt files
        raise InputError(f"{path}: cannot read as a .npy array ({quote(str(exc))}); re-save it with numpy.save") from None
    if feat.ndim != 2:
        raise InputError(f"{path}: expected a 2-D (items x dim) matrix, got shape {feat.shape}")
    if not np.issubdtype(feat.dtype, np.number) or np.issubdtype(feat.dtype, np.complexfloating):
        raise InputError(f"{path}: expected a real numeric matrix, got dtype {feat.dtype}")
    if feat.shape[1] == 0:
        raise InputError(f"{path}: the matrix has 0 columns (shape {feat.shape}); each item needs at least one feature")
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
    if folder.is_file():
        raise InputError(f"{folder}: is a file; pass the dataset folder (the folder holding the .inter file) to --data")
    if not folder.is_dir():
        raise InputError(f"{folder}: dataset folder not found; pass an MMRec dataset folder or 'synthetic' to --data")
    path = find_inter_file(folder, inter_file)
    users, items, labels = read_inter(path)
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
        features[str(name)] = load_features(inside_folder(folder, file_name, "modalities"), n_items)
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
