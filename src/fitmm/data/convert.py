"""Raw interaction logs -> an MMRec dataset folder (`fitmm data convert`).

One pass from a CSV/TSV/JSONL log to `<name>.inter` + `u_id_mapping.tsv` + `i_id_mapping.tsv`:
read, keep ratings >= --min-rating, merge duplicate (user, item) pairs, k-core (iterated until it
holds), dense 0-based ids in raw-id order, per-user split, write through `mmrec.write_mmrec`,
validate with `mmrec.load_mmrec` (what `fitmm data info` runs). Everything is written into a
temporary folder beside --out that is renamed at the end, so bad input leaves nothing behind.

`read_table` is also the items-table reader of `fitmm data encode`.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError, quote
from .dataset import Dataset, interaction_matrix
from .mmrec import load_mmrec, write_mmrec

# Header names recognised when --user-col etc. are not given (compared case-insensitively).
ALIASES = {
    "user": ("user", "userid", "user_id", "uid"),
    "item": ("item", "itemid", "item_id", "iid", "movieid", "movie_id"),
    "rating": ("rating", "ratings", "score", "stars"),
    "timestamp": ("timestamp", "time", "ts"),
}
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


@dataclass
class Table:
    """A parsed input table: column name -> one value per row, and each row's line in the file."""

    path: Path
    columns: list[str]
    values: dict[str, list] = field(default_factory=dict)
    lines: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.lines)

    def column(self, name: str) -> list:
        return self.values[name]


def parse_sep(sep: str | None) -> str | None:
    """The separator a user typed: `\\t` (as the shell passes it) and 'tab' mean a TAB."""
    if sep is None:
        return None
    if sep.lower() == "tab":
        return "\t"
    try:
        sep = sep.encode("utf-8").decode("unicode_escape")
    except UnicodeDecodeError:
        pass
    if not sep or sep in ("\n", "\r", '"'):
        raise InputError(f"--sep {sep!r}: not a usable column separator; use e.g. --sep ',' or --sep '\\t'")
    return sep


def read_table(path: str | Path, sep: str | None = None, columns: list[str] | None = None) -> Table:
    """Read a CSV/TSV (first row = header unless `columns` names them) or a JSON-lines file.

    The separator, when not given, is a TAB if the first line has one, else a comma. Quoted
    fields (with doubled quotes inside) follow the CSV rules; a separator longer than one character
    (MovieLens-1M's '::') splits lines as plain text.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as UTF-8 "
            f"(e.g. iconv -f latin1 -t utf-8 {path.name} > fixed.{path.suffix.lstrip('.') or 'txt'})"
        ) from None
    stripped = text.lstrip()
    if not stripped:
        raise InputError(f"{path}: empty file")
    if path.suffix.lower() in JSONL_SUFFIXES or (stripped.startswith("{") and sep is None):
        if columns:
            raise InputError(f"{path}: --columns is for files without a header; JSON lines name their fields")
        return _read_jsonl(path, text)
    return _read_delimited(path, text, parse_sep(sep), columns)


def _read_jsonl(path: Path, text: str) -> Table:
    table = Table(path, [])
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}, line {number}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}, line {number}: a JSON {type(row).__name__}, expected an object like {{\"user\": 1, \"item\": 2}}")
        for key in row:
            if key not in table.values:
                table.columns.append(key)
                table.values[key] = [None] * len(rows)
        rows.append(row)
        table.lines.append(number)
        for key in table.columns:
            table.values[key].append(row.get(key))
    return table


def _read_delimited(path: Path, text: str, sep: str | None, columns: list[str] | None) -> Table:
    lines = text.splitlines()
    if sep is None:
        first = next(line for line in lines if line.strip())
        sep = "\t" if "\t" in first else ","
    if len(sep) == 1:
        records = csv.reader(lines, delimiter=sep)
        numbered = ((records.line_num, row) for row in records)
    else:
        numbered = ((n, line.split(sep)) for n, line in enumerate(lines, start=1))
    numbered = ((n, row) for n, row in numbered if any(f.strip() for f in row))
    if columns:
        header = list(columns)
    else:
        try:
            _, header = next(numbered)
        except StopIteration:  # pragma: no cover - empty files are caught earlier
            raise InputError(f"{path}: no header row") from None
        header = [name.strip() for name in header]
        if len(header) == 1:
            shown = "TAB" if sep == "\t" else repr(sep)
            raise InputError(
                f"{path}, line 1: the header has a single column {quote(header[0])} when split at {shown}; "
                f"pass the file's separator with --sep (e.g. --sep ',' or --sep '\\t'), "
                f"or --columns user,item,... if the file has no header"
            )
    duplicated = sorted(name for name, count in Counter(header).items() if count > 1)
    if duplicated:
        raise InputError(f"{path}: column name(s) {quote(', '.join(duplicated))} appear twice; give every column its own name")
    table = Table(path, header, {name: [] for name in header})
    cells = [table.values[name] for name in header]
    width = len(header)
    for number, row in numbered:
        if columns and not table.lines and [f.strip() for f in row[:width]] == header:
            raise InputError(
                f"{path}, line {number}: a header row ({column_list(table)}) although --columns says the file has "
                f"none; leave out --columns (name columns with --user-col etc. if needed)"
            )
        if len(row) < width:
            raise InputError(
                f"{path}, line {number}: {len(row)} field(s), but there are {width} columns "
                f"({column_list(table)}); fix the line, or check --sep and --columns"
            )
        for out, value in zip(cells, row):
            out.append(value.strip())
        table.lines.append(number)
    return table


def column_list(table: Table, limit: int = 200) -> str:
    """The table's column names for a message, cut at `limit` characters (a header may be huge)."""
    text = ", ".join(table.columns)
    return text if len(text) <= limit else text[:limit] + "…"


def numbers(table: Table, column: str, what: str) -> np.ndarray:
    """A column as finite float64 values; a bad value is reported with its line and `what` to do."""
    values = table.column(column)
    try:
        out = np.array(values, dtype=np.float64)
        if np.isfinite(out).all():
            return out
    except (ValueError, TypeError):
        pass
    for row, value in enumerate(values):  # slow path, only to name the bad line
        try:
            ok = np.isfinite(float(value))
        except (ValueError, TypeError):
            ok = False
        if not ok:
            raise InputError(f"{table.path}, line {table.lines[row]}, column {column}: {quote(value)} is not a number; {what}")
    raise AssertionError("unreachable")  # pragma: no cover


def ids(table: Table, column: str) -> np.ndarray:
    """A raw-id column as strings (JSON numbers too); an empty id is an error naming its line."""
    out = np.array(["" if v is None else str(v).strip() for v in table.column(column)], dtype=object)
    for row, value in enumerate(out):
        if not value or "\t" in value or "\n" in value or "\r" in value:
            problem = "empty id; every row needs one" if not value else f"id {quote(value)} holds a TAB or line break; remove it"
            raise InputError(f"{table.path}, line {table.lines[row]}, column {column}: {problem}")
    return out


def raw_id_order(vocab: np.ndarray) -> np.ndarray:
    """Sorted raw ids: as numbers when every id is written with the digits 0-9 only (so '2' comes
    before '10'; '02' after '2'), else as text."""
    if all(v.isascii() and v.isdigit() for v in vocab):
        return np.array(sorted(vocab, key=lambda v: (int(v), v)), dtype=object)
    return np.sort(vocab)


def find_column(table: Table, role: str, given: str | None, needed_for: str) -> str | None:
    """The column that plays `role`: the one named by --<role>-col, else a known header name."""
    flag = "--time-col" if role == "timestamp" else f"--{role}-col"
    if given:
        if given not in table.values:
            raise InputError(f"{table.path}: no column {given!r} ({flag}); the columns are {column_list(table)}")
        return given
    lowered = {name.lower(): name for name in table.columns}
    for alias in ALIASES[role]:
        if alias in lowered:
            return lowered[alias]
    if needed_for:
        raise InputError(
            f"{table.path}: no {role} column among {column_list(table)}; {needed_for}: name it with {flag} NAME, "
            f"or, for a file without a header, list the columns in order with --columns user,item[,rating][,timestamp]"
        )
    return None


def split_labels(users: np.ndarray, order_key: np.ndarray, items: np.ndarray, n_users: int) -> np.ndarray:
    """0/1/2 per row: each user's rows ordered by (`order_key`, item); the last round(10%) -> test (2),
    the round(10%) before -> validation (1), the rest train. Users with >= 3 rows get at least one
    of each; users with fewer keep all rows in train. round() is Python's, half to even (as the
    shipped ml100k_mm split was made: a user with 25 rows gets 2 test rows, with 35 rows 4)."""
    order = np.lexsort((items, order_key, users))
    counts = np.bincount(users, minlength=n_users)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    sorted_users = users[order]
    position = np.arange(len(users)) - starts[sorted_users]
    n = counts[sorted_users]
    held = np.where(n >= 3, np.maximum(1, np.rint(n / 10).astype(np.int64)), 0)
    labels = np.zeros(len(users), dtype=np.int64)
    labels[order] = np.where(position >= n - held, 2, np.where(position >= n - 2 * held, 1, 0))
    return labels


@dataclass
class Converted:
    """What `convert` did: the written dataset's statistics and the drop counts for the summary."""

    stats: dict
    rows_read: int
    below_min_rating: int
    duplicates: int
    kcore_rows: int
    kcore_rounds: int
    summary: str = ""


def convert(
    interactions: str | Path,
    out: str | Path,
    *,
    sep: str | None = None,
    columns: str | None = None,
    user_col: str | None = None,
    item_col: str | None = None,
    rating_col: str | None = None,
    time_col: str | None = None,
    min_rating: float | None = None,
    kcore: int = 0,
    split: str = "random",
    seed: int = 999,
    name: str | None = None,
) -> Converted:
    """Convert an interaction log into an MMRec folder at `out` (see the module docstring)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: already exists and is not empty; choose a new --out")
    if split not in ("random", "time"):
        raise InputError(f"--split {split!r}: choose 'random' (seeded, per user) or 'time' (per user, chronological)")
    if kcore < 0:
        raise InputError(f"--kcore {kcore}: must be 0 (off) or a positive number of interactions")
    names = [c.strip() for c in columns.split(",")] if columns else None
    if names is not None and not all(names):
        raise InputError(f"--columns {columns!r}: an empty column name; list them like user,item,rating,timestamp")

    table = read_table(interactions, sep, names)
    path = table.path
    user_col = find_column(table, "user", user_col, "every row needs a user")
    item_col = find_column(table, "item", item_col, "every row needs an item")
    rating_col = find_column(table, "rating", rating_col, "--min-rating needs ratings" if min_rating is not None else "")
    time_col = find_column(table, "timestamp", time_col, "--split time needs timestamps" if split == "time" else "")
    if len(table) == 0:
        raise InputError(f"{path}: no data rows")

    raw_users, raw_items = ids(table, user_col), ids(table, item_col)
    keep = np.ones(len(table), dtype=bool)
    if min_rating is not None:
        ratings = numbers(table, rating_col, "ratings must be numbers for --min-rating")
        keep = ratings >= min_rating
    below = int((~keep).sum())
    if not keep.any():
        raise InputError(f"{path}: no row has {rating_col} >= {min_rating} (--min-rating); lower --min-rating")
    timestamps = np.zeros(len(table))
    if split == "time":
        timestamps = numbers(
            table, time_col, "--split time needs numeric timestamps (e.g. Unix seconds); convert dates to numbers first, or use --split random"
        )
    user_vocab, users = np.unique(raw_users[keep], return_inverse=True)
    item_vocab, items = np.unique(raw_items[keep], return_inverse=True)
    timestamps, lines = timestamps[keep], np.asarray(table.lines)[keep]

    # Duplicate (user, item) rows -> one interaction, at its earliest time (first line on ties).
    order = np.lexsort((lines, timestamps, items, users))
    users, items, timestamps = users[order], items[order], timestamps[order]
    first = np.ones(len(users), dtype=bool)
    first[1:] = (users[1:] != users[:-1]) | (items[1:] != items[:-1])
    duplicates = int((~first).sum())
    users, items, timestamps = users[first], items[first], timestamps[first]

    # K-core: dropping a user can push one of its items below K, and dropping that item other
    # users, so repeat until a round drops nothing.
    rounds, before = 0, len(users)
    while kcore > 0:
        user_ok = np.bincount(users, minlength=len(user_vocab)) >= kcore
        item_ok = np.bincount(items, minlength=len(item_vocab)) >= kcore
        ok = user_ok[users] & item_ok[items]
        if ok.all():
            break
        rounds += 1
        users, items, timestamps = users[ok], items[ok], timestamps[ok]
        if len(users) == 0:
            raise InputError(
                f"{path}: no interactions left after --kcore {kcore} ({rounds} round(s) of dropping users and "
                f"items with fewer than {kcore}, from {before:,} distinct user-item pairs); lower --kcore"
            )
    kcore_rows = before - len(users)

    # Dense 0-based ids over the surviving users/items, in raw-id order.
    user_map, users = _dense(user_vocab, users)
    item_map, items = _dense(item_vocab, items)
    n_users, n_items = len(user_map), len(item_map)
    if split == "time":
        key = timestamps
    else:
        # One draw per interaction in (user, item) order: the split depends on the seed and the
        # set of interactions only, not on the order of the file's lines.
        canonical = np.lexsort((items, users))
        key = np.empty(len(users))
        key[canonical] = np.random.default_rng(seed).random(len(users))
    labels = split_labels(users, key, items, n_users)

    out_name = name or out.resolve().name
    dataset = Dataset(
        name=out_name,
        n_users=n_users,
        n_items=n_items,
        **{
            split_name: interaction_matrix(users[labels == label], items[labels == label], n_users, n_items)
            for label, split_name in enumerate(("train", "valid", "test"))
        },
    )
    user_header = _raw_header(user_col, "userID")
    item_header = _raw_header(item_col, "itemID")
    stats = _write_atomically(out, dataset, [
        ("u_id_mapping.tsv", "userID", user_header, user_map),
        ("i_id_mapping.tsv", "itemID", item_header, item_map),
    ])
    result = Converted(stats, len(table), below, duplicates, kcore_rows, rounds)
    result.summary = _summary(path, out, result, min_rating, kcore, split, seed)
    return result


def _dense(vocab: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(raw id of each dense id, the rows' dense ids): the used raw ids, numbered in raw-id order."""
    used = vocab[np.unique(codes)]
    ordered = raw_id_order(used)
    position = {raw: dense for dense, raw in enumerate(ordered)}
    remap = np.array([position.get(raw, -1) for raw in vocab], dtype=np.int64)
    return ordered, remap[codes]


def _raw_header(column: str, dense_name: str) -> str:
    """The mapping file's raw-id column is named after the source column ('raw_userID' if they clash)."""
    return f"raw_{column}" if column == dense_name else column


def write_id_mapping(path: Path, dense_name: str, raw_name: str, raw_ids: np.ndarray) -> None:
    """`dense id<TAB>raw id` rows under a header, as the shipped ml100k_mm mappings; written with
    the csv module, as `api.read_id_mapping` reads them (a raw id with quotes round-trips)."""
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow([dense_name, raw_name])
        writer.writerows(enumerate(raw_ids))


def _write_atomically(out: Path, dataset: Dataset, mappings: list) -> dict:
    """Write into a temporary folder beside `out`, validate it as `fitmm data info` does, rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.parent / f".{out.name}.converting-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    try:
        write_mmrec(dataset, temp)
        for file_name, dense_name, raw_name, raw_ids in mappings:
            write_id_mapping(temp / file_name, dense_name, raw_name, raw_ids)
        stats = load_mmrec(temp).stats()
        if out.is_dir():
            out.rmdir()  # empty (checked at the start)
        temp.rename(out)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    stats["name"], stats["source"] = dataset.name, str(out)
    return stats


def _summary(path: Path, out: Path, r: Converted, min_rating, kcore: int, split: str, seed: int) -> str:
    s = r.stats
    per = s["per_split"]
    dropped = []
    if min_rating is not None:
        dropped.append(f"{r.below_min_rating:,} row(s) below --min-rating {min_rating:g}")
    dropped.append(f"{r.duplicates:,} duplicate row(s) merged")
    if kcore:
        dropped.append(f"{r.kcore_rows:,} interaction(s) by the {kcore}-core ({r.kcore_rounds} round(s))")
    how = "time" if split == "time" else f"random, seed {seed}"
    return (
        f"{path.name} -> {out}: {s['users']:,} users, {s['items']:,} items, {s['interactions']:,} interactions "
        f"(train {per['train']:,} / valid {per['valid']:,} / test {per['test']:,}; split {how}), "
        f"density {s['density']:.2%}; from {r.rows_read:,} rows, dropped: {'; '.join(dropped)}"
    )
