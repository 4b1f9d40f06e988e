"""`fitmm data convert`: raw logs -> MMRec folder (k-core, id maps, both splits, bad input)."""

import csv
import random

import numpy as np
import pytest

from conftest import shared_dataset
from fitmm.cli import main
from fitmm.data import load_mmrec


def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def inter_rows(folder):
    """{(raw user, raw item): x_label} read back through the id mappings."""
    users = dict(line.split("\t") for line in (folder / "u_id_mapping.tsv").read_text().splitlines()[1:])
    items = dict(line.split("\t") for line in (folder / "i_id_mapping.tsv").read_text().splitlines()[1:])
    (inter,) = folder.glob("*.inter")
    rows = [line.split("\t") for line in inter.read_text().splitlines()[1:]]
    return {(users[u], items[i]): int(label) for u, i, label in rows}


def convert(tmp_path, capsys, *args, out="out"):
    code = main(["data", "convert", *map(str, args), "--out", str(tmp_path / out)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_nothing_written(tmp_path, out="out"):
    assert not (tmp_path / out).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out}.")]  # no temp folder left


def test_kcore_is_iterated_until_it_holds(tmp_path, capsys):
    # 2-core. Round 1 drops (c, z): item z has one user. That leaves user c with one item, so
    # round 2 drops (c, x); a single pass would have kept it.
    log = write(tmp_path / "log.csv", ["user,item", "a,x", "a,y", "b,x", "b,y", "c,x", "c,z"])
    code, out, _ = convert(tmp_path, capsys, log, "--kcore", 2)
    assert code == 0
    assert inter_rows(tmp_path / "out").keys() == {("a", "x"), ("a", "y"), ("b", "x"), ("b", "y")}
    assert "2 interaction(s) by the 2-core (2 round(s))" in out
    assert "2 users, 2 items, 4 interactions" in out


def test_id_maps_are_dense_in_raw_id_order(tmp_path, capsys):
    # Integer raw ids sort as numbers (2 before 10), others as text; the .inter uses the dense ids.
    log = write(tmp_path / "log.tsv", ["10\tb\t5", "2\ta\t3", "2\tc\t4", "10\ta\t1", "7\tb\t2"])
    code, _, _ = convert(tmp_path, capsys, log, "--columns", "user,item,rating", "--sep", r"\t")
    assert code == 0
    folder = tmp_path / "out"
    assert (folder / "u_id_mapping.tsv").read_text() == "userID\tuser\n0\t2\n1\t7\n2\t10\n"
    assert (folder / "i_id_mapping.tsv").read_text() == "itemID\titem\n0\ta\n1\tb\n2\tc\n"
    assert inter_rows(folder).keys() == {("10", "b"), ("2", "a"), ("2", "c"), ("10", "a"), ("7", "b")}
    assert (folder / "out.inter").read_text().splitlines()[0] == "userID\titemID\tx_label"
    ds = load_mmrec(folder)
    assert (ds.n_users, ds.n_items) == (3, 3)


def test_raw_id_column_named_like_the_dense_one_is_renamed(tmp_path, capsys):
    log = write(tmp_path / "log.csv", ["userID,itemID", "u1,i1", "u2,i1"])
    assert convert(tmp_path, capsys, log)[0] == 0
    assert (tmp_path / "out" / "u_id_mapping.tsv").read_text().splitlines()[0] == "userID\traw_userID"


def per_user_sizes(rows):
    sizes = {}
    for (user, _), label in rows.items():
        sizes.setdefault(user, [0, 0, 0])[label] += 1
    return {user: tuple(s) for user, s in sizes.items()}


# rows per user -> (train, valid, test): round(10%) each, at least 1 from 3 rows on, half to even.
EXPECTED_SIZES = {1: (1, 0, 0), 2: (2, 0, 0), 3: (1, 1, 1), 4: (2, 1, 1), 14: (12, 1, 1),
                  15: (11, 2, 2), 25: (21, 2, 2), 35: (27, 4, 4), 36: (28, 4, 4)}


def sized_log(tmp_path):
    lines = ["user,item,timestamp"]
    for n in EXPECTED_SIZES:
        lines += [f"u{n},i{k},{1000 + 7 * k % n}" for k in range(n)]
    return write(tmp_path / "log.csv", lines)


@pytest.mark.parametrize("split", ["random", "time"])
def test_every_users_split_sizes(tmp_path, capsys, split):
    code, out, _ = convert(tmp_path, capsys, sized_log(tmp_path), "--split", split)
    assert code == 0
    sizes = per_user_sizes(inter_rows(tmp_path / "out"))
    assert sizes == {f"u{n}": expected for n, expected in EXPECTED_SIZES.items()}
    total = sum(EXPECTED_SIZES)
    valid = sum(v for _, v, _ in EXPECTED_SIZES.values())
    assert f"(train {total - 2 * valid} / valid {valid} / test {valid}; split {split}" in out


def test_time_split_holds_out_each_users_latest_rows(tmp_path, capsys):
    # Timestamps out of file order; items 5 and 6 tie at t=50 (the item id breaks the tie);
    # the duplicate (u, 1) counts at its earliest time (t=10), not t=99.
    rows = [(1, 10), (4, 40), (2, 20), (3, 30), (6, 50), (5, 50), (7, 5), (8, 60), (9, 25), (0, 15), (1, 99)]
    log = write(tmp_path / "log.jsonl", [f'{{"user": "u", "item": {i}, "timestamp": {t}}}' for i, t in rows])
    code, out, _ = convert(tmp_path, capsys, log, "--split", "time")
    assert code == 0
    labels = {item: label for (_, item), label in inter_rows(tmp_path / "out").items()}
    # 10 distinct items in time order: 7 1 0 2 9 3 4 5 6 8 -> the last one test, the one before valid.
    assert labels == {"7": 0, "1": 0, "0": 0, "2": 0, "9": 0, "3": 0, "4": 0, "5": 0, "6": 1, "8": 2}
    assert "1 duplicate row(s) merged" in out


def test_random_split_depends_on_the_seed_only(tmp_path, capsys):
    log = sized_log(tmp_path)
    lines = log.read_text().splitlines()
    shuffled = [lines[0]] + random.Random(0).sample(lines[1:], len(lines) - 1)
    write(tmp_path / "shuffled.csv", shuffled)

    def labels(source, seed, out):
        assert convert(tmp_path, capsys, source, "--seed", seed, out=out)[0] == 0
        return inter_rows(tmp_path / out)

    first = labels(log, 1, "a")
    assert labels(log, 1, "b") == first
    assert labels(tmp_path / "shuffled.csv", 1, "c") == first  # the file's line order does not matter
    assert labels(log, 2, "d") != first


def test_min_rating_header_names_and_quoted_csv(tmp_path, capsys):
    # MovieLens-style header names are recognised; a quoted field may hold the separator.
    log = write(tmp_path / "ratings.csv", [
        "userId,movieId,rating,timestamp", '1,"10,a",5,1', "1,11,2,2", "2,10,4,3", '2,"10,a",3.5,4', "2,12,1,5",
    ])
    code, out, _ = convert(tmp_path, capsys, log, "--min-rating", 3.5)
    assert code == 0
    assert inter_rows(tmp_path / "out").keys() == {("1", "10,a"), ("2", "10"), ("2", "10,a")}
    assert "2 row(s) below --min-rating 3.5" in out


def test_explicit_columns_of_a_header_file(tmp_path, capsys):
    log = write(tmp_path / "log.csv", ["who,what,when", "a,x,3", "a,y,1", "a,z,2"])
    code, _, _ = convert(tmp_path, capsys, log, "--user-col", "who", "--item-col", "what", "--time-col", "when",
                         "--split", "time")
    assert code == 0
    assert inter_rows(tmp_path / "out") == {("a", "y"): 0, ("a", "z"): 1, ("a", "x"): 2}
    assert (tmp_path / "out" / "i_id_mapping.tsv").read_text().splitlines()[0] == "itemID\twhat"


@pytest.mark.parametrize("lines, args, message", [
    (["user,rating", "a,1"], [],
     "log.csv: no item column among user, rating; every row needs an item: name it with --item-col NAME"),
    (["user,item", "a,x"], ["--user-col", "nope"],
     "log.csv: no column 'nope' (--user-col); the columns are user, item"),
    (["user,item,timestamp", "a,x,1", "a,y,yesterday"], ["--split", "time"],
     "log.csv, line 3, column timestamp: 'yesterday' is not a number; --split time needs numeric timestamps"),
    (["user,item", "a,x"], ["--split", "time"],
     "log.csv: no timestamp column among user, item; --split time needs timestamps: name it with --time-col NAME"),
    (["user,item", "a,x", "a,y", "b,x"], ["--kcore", "2"],
     "log.csv: no interactions left after --kcore 2 (2 round(s) of dropping users and items with fewer than 2"),
    (["user,item", "a,x", "b"], [],
     "log.csv, line 3: 1 field(s), but there are 2 columns (user, item); fix the line, or check --sep and --columns"),
    (["user,item,rating", "a,x,1"], ["--min-rating", "4"],
     "log.csv: no row has rating >= 4.0 (--min-rating); lower --min-rating"),
    (["user;item", "a;x"], [], "log.csv, line 1: the header has a single column 'user;item' when split at ','"),
    (["user,item", "a,"], [], "log.csv, line 2, column item: empty id; every row needs one"),
    (["user,item", "a,x"], ["--columns", "user,item"],
     "log.csv, line 1: a header row (user, item) although --columns says the file has none; leave out --columns"),
])
def test_bad_input_exits_2_naming_the_cause_and_writes_nothing(tmp_path, capsys, lines, args, message):
    log = write(tmp_path / "log.csv", lines)
    code, _, err = convert(tmp_path, capsys, log, *args)
    assert code == 2
    assert message in err
    assert_nothing_written(tmp_path)


def test_bad_json_line_is_named(tmp_path, capsys):
    log = write(tmp_path / "log.jsonl", ['{"user": 1, "item": 2}', '{"user": 1, "item": }'])
    code, _, err = convert(tmp_path, capsys, log)
    assert code == 2 and "log.jsonl, line 2: not valid JSON" in err
    assert_nothing_written(tmp_path)


def test_existing_output_is_never_overwritten(tmp_path, capsys):
    log = write(tmp_path / "log.csv", ["user,item", "a,x"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, _, err = convert(tmp_path, capsys, log)
    assert code == 2 and "already exists and is not empty" in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_raw_movielens_converts_to_a_valid_folder(tmp_path, capsys):
    raw = shared_dataset("ml100k_mm") / "raw" / "u.data"
    code, out, _ = convert(tmp_path, capsys, raw, "--columns", "user,item,rating,timestamp", "--sep", r"\t",
                           "--kcore", 5, "--split", "time")
    assert code == 0, out
    assert main(["data", "info", str(tmp_path / "out")]) == 0
    stats = load_mmrec(tmp_path / "out").stats()
    assert stats["users"] == 943 and stats["interactions"] < 100_000
    assert stats["users_without_valid"] == stats["users_without_test"] == 0  # every user has >= 5 rows


def test_shipped_ml100k_split_is_reproduced_from_the_raw_ratings(tmp_path, capsys):
    """u.data restricted to the shipped folder's users and items, 5-core, time split -> the very same
    interactions and labels as the shipped ml100k.inter (it was made with the same per-user rule)."""
    folder = shared_dataset("ml100k_mm")

    def second_column(name):
        with open(folder / name, encoding="utf-8") as handle:
            return [row[1] for row in csv.reader(handle, delimiter="\t")][1:]

    users, items = set(second_column("u_id_mapping.tsv")), set(second_column("i_id_mapping.tsv"))
    kept = [line for line in (folder / "raw" / "u.data").read_text().splitlines()
            if line.split("\t")[0] in users and line.split("\t")[1] in items]
    log = write(tmp_path / "u.data", kept)
    code, _, _ = convert(tmp_path, capsys, log, "--columns", "user,item,rating,timestamp", "--kcore", 5,
                         "--split", "time")
    assert code == 0
    ours = np.loadtxt(tmp_path / "out" / "out.inter", dtype=np.int64, skiprows=1)
    shipped = np.loadtxt(folder / "ml100k.inter", dtype=np.int64, skiprows=1, usecols=(0, 1, 4))
    # The shipped mappings number users and items in raw-id order too, so dense ids agree.
    assert second_column("i_id_mapping.tsv") == (tmp_path / "out" / "i_id_mapping.tsv").read_text().split()[3::2]
    sort = lambda a: a[np.lexsort((a[:, 1], a[:, 0]))]  # noqa: E731
    np.testing.assert_array_equal(sort(ours), sort(shipped))
