"""The data readers never misread, never hang and never read without bound: every problem is one line naming the
file (and line, and field), raised before any model or tokenizer is loaded."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import infopo as run_infopo
from infopo_cli.data import row_checks, sources, streams
from infopo_cli.data.loading import DataOptions, load_pairs, read_pairs
from infopo_cli.data.mixing import load_mix
from infopo_cli.errors import DataError, InfopoError

GOOD = {"prompt": "p", "chosen": "c", "rejected": "r"}


def jsonl(path: Path, *rows: dict | str) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def numbered(n: int, **extra) -> list[dict]:
    return [{"prompt": f"q{i}", "chosen": "a", "rejected": "b", **extra} for i in range(n)]


def infopo(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return run_infopo(*args, timeout=timeout)


def one_line_error(err: pytest.ExceptionInfo, start: str) -> str:
    message = str(err.value)
    assert message.startswith(start) and "\n" not in message, message
    return message


# --- 1. duplicate keys -----------------------------------------------------------------------------------------------

FLIPPED = '{"prompt": "2+2?", "chosen": "4", "rejected": "5", "chosen": "5", "rejected": "4"}'


def test_a_key_given_twice_is_an_error_not_the_last_value(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", GOOD, FLIPPED)
    with pytest.raises(DataError) as err:
        read_pairs(path)
    assert str(err.value) == f"{path}:2: key 'chosen' given twice"
    assert len(load_pairs(path, DataOptions(skip_invalid=True)).pairs) == 1  # the other rows still load


def test_a_key_given_twice_in_a_json_array_and_in_a_message(tmp_path):
    array = tmp_path / "d.json"
    array.write_text(f"[{json.dumps(GOOD)},\n {FLIPPED}]")
    with pytest.raises(DataError, match=r"d.json:row 2: key 'chosen' given twice$"):
        read_pairs(str(array))
    message = ('{"prompt": [{"role": "user", "content": "Hi", "content": "Bye"}], '
               '"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}')
    with pytest.raises(DataError) as err:
        read_pairs(jsonl(tmp_path / "m.jsonl", message))
    one_line_error(err, f"{tmp_path}/m.jsonl:1: field 'prompt': [0]: key 'content' given twice")


# --- 2. CSV ------------------------------------------------------------------------------------------------------------

def write_csv(path: Path, *records: list[str]) -> str:
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(records)
    return str(path)


def test_csv_unterminated_quote_does_not_swallow_the_rows_after_it(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,chosen,rejected\np1,c,r\n"p2,c,r\np3,c,r\np4,c,r\n')
    with pytest.raises(DataError) as err:
        read_pairs(str(path))
    one_line_error(err, f"{path}:3: not valid CSV: a quote opened in this row is not closed")
    path.write_text('prompt,chosen,rejected\np1,c,r\n"p2,c,r\np3,c",r\np4,c,r\n')  # closed lines later: one 2-value row
    with pytest.raises(DataError) as err:
        read_pairs(str(path))
    one_line_error(err, f"{path}:3: 2 values for the 3 columns of the header (it spans lines 3-4")


def test_csv_shifted_columns_and_repeated_header_are_errors(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected\nq,hello, world,bad\n")  # an unquoted comma: chosen/rejected shifted
    with pytest.raises(DataError, match=rf"^{path}:2: 4 values for the 3 columns of the header"):
        read_pairs(str(path))
    path.write_text("prompt,chosen,rejected,chosen\nq,a,b,c\n")
    with pytest.raises(DataError) as err:
        read_pairs(str(path))
    assert str(err.value) == f"{path}:1: column 'chosen' given twice"
    tsv = tmp_path / "d.tsv"
    tsv.write_text('prompt\tchosen\trejected\nq\t"Hi," she said\tno\n')  # csv would drop the quotes, silently
    with pytest.raises(DataError) as err:
        read_pairs(str(tsv))
    one_line_error(err, f"{tsv}:2: not valid CSV: '\\t' expected after '\"' (a value that starts with a quote")
    path.write_text("prompt\tchosen\trejected\nq\ta\tb\n")  # tab-separated in a .csv: one column named with tabs
    with pytest.raises(DataError) as err:
        read_pairs(str(path))
    assert str(err.value) == f"{path}:1: the columns are separated by tabs: name the file .tsv"


def test_csv_line_numbers_after_long_and_multi_line_fields(tmp_path):
    long = "x" * (200 * 1024)  # over csv's default field limit (128 KiB)
    path = write_csv(tmp_path / "d.csv", ["prompt", "chosen", "rejected"], ["q", "a\nb\nc", "r"], ["q", long, "r"],
                     ["", "y", "x"])
    with pytest.raises(DataError) as err:
        read_pairs(path)
    assert str(err.value) == f"{path}:6: field 'prompt': empty"
    pairs = load_pairs(path, DataOptions(skip_invalid=True)).pairs
    assert [p.chosen for p in pairs] == ["a\nb\nc", long] and pairs[1].where == f"{path}:5"


def test_csv_row_over_the_limit_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(streams, "MAX_ROW_BYTES", 1024)
    path = write_csv(tmp_path / "d.csv", ["prompt", "chosen", "rejected"], ["q", "a", "r"], ["q", "y" * 2000, "r"])
    with pytest.raises(DataError) as err:
        read_pairs(path)
    assert str(err.value) == f"{path}:3: row longer than 1 KiB"


# --- 3. a folder of data files -----------------------------------------------------------------------------------------

def mixed_folder(folder: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    jsonl(folder / "a.jsonl", *numbered(20))
    write_csv(folder / "b.csv", ["prompt", "chosen", "rejected"], ["csv q", "a", "b"], ["csv q2", "a", "b"])
    pq.write_table(pa.Table.from_pylist([{"prompt": "parquet q", "chosen": "a", "rejected": "b"}]), folder / "c.parquet")
    (folder / ".hidden.jsonl").write_text("not read\n")
    (folder / "README.md").write_text("# notes\n")
    return folder


def test_a_folder_of_data_files_reads_every_file(tmp_path):
    folder = mixed_folder(tmp_path / "data")
    loaded = load_pairs(str(folder))
    assert len(loaded.pairs) == 23 and loaded.rows == 23
    assert [p.where for p in loaded.pairs][::10] == [f"{folder}/a.jsonl:{n}" for n in (1, 11)] + [f"{folder}/b.csv:2"]
    assert loaded.pairs[-1].where == f"{folder}/c.parquet:row 1"
    assert loaded.info == [f"read 3 files of {folder}: a.jsonl 20 rows, b.csv 2 rows, c.parquet 1 row; "
                           "not read: README.md (not a data file)"]
    out = infopo("data", "check", str(folder), "--no-tokenizer")
    printed = " ".join(out.stdout.split())  # rich wraps long lines
    assert out.returncode == 0 and loaded.info[0] in printed and "23 valid pairs of 23 rows" in printed


def test_a_folder_whose_files_name_splits_reads_the_split(tmp_path):
    folder = tmp_path / "data"
    (folder / "data").mkdir(parents=True)
    jsonl(folder / "data" / "train-00000-of-00001.jsonl", *numbered(3))
    jsonl(folder / "test.jsonl", *numbered(2))
    assert len(load_pairs(str(folder)).pairs) == 3
    assert len(load_pairs(str(folder), DataOptions(split="eval")).pairs) == 2  # 'eval' names the test split
    with pytest.raises(InfopoError) as err:
        load_pairs(str(folder), DataOptions(split="validation"))
    one_line_error(err, f"{folder}: no split 'validation'; available: test, train")
    jsonl(folder / "extra.jsonl", *numbered(1))
    with pytest.raises(InfopoError, match="extra.jsonl name no split while the other files do"):
        load_pairs(str(folder))


def test_an_empty_folder_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InfopoError) as err:
        load_pairs(str(tmp_path / "empty"))
    one_line_error(err, f"{tmp_path}/empty: a folder with no data files")


# --- 4. the same data twice ------------------------------------------------------------------------------------------

def test_the_same_source_twice_is_a_warning_with_the_repeats(tmp_path, monkeypatch):
    jsonl(tmp_path / "a.jsonl", *numbered(20))
    jsonl(tmp_path / "b.jsonl", *numbered(5, chosen="other"))
    monkeypatch.chdir(tmp_path)
    loaded = load_mix(["a.jsonl", "./a.jsonl", str(tmp_path / "b.jsonl")])
    assert len(loaded.pairs) == 45
    assert loaded.notes == ["a.jsonl is given 2 times (as a.jsonl, ./a.jsonl): 20 of the 40 pairs the mix takes from "
                            "it are repeats (give it once, or weight it: --data FILE:0.5)"]
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "b.jsonl")
    assert "b.jsonl is given 2 times" in load_mix(["b.jsonl", "link.jsonl"]).notes[0]


def test_pairs_that_two_sources_of_a_mix_share_are_a_warning(tmp_path, monkeypatch):
    jsonl(tmp_path / "a.jsonl", *numbered(20))
    jsonl(tmp_path / "c.jsonl", *numbered(3), {"prompt": "new", "chosen": "a", "rejected": "b"})  # 3 of a's, 1 new
    monkeypatch.chdir(tmp_path)
    said = "3 pairs of c.jsonl are also in a.jsonl (the same prompt, chosen and rejected): the mix may train on them twice"
    assert any(note.startswith(said) for note in load_mix(["a.jsonl", "c.jsonl:0.3"]).notes)
    out = infopo("data", "check", "a.jsonl", "c.jsonl:0.3", "--no-tokenizer")
    assert out.returncode == 0 and said in " ".join(out.stdout.split())


def test_held_out_pairs_that_are_trained_on_are_counted():
    from infopo_cli.data.formats import PreferencePair
    from infopo_cli.data.overlap import eval_overlap_note

    train = [PreferencePair(f"q{i}", "a", "b") for i in range(10)]
    held_out = [PreferencePair("q1", "a", "b", where="eval.jsonl:1"), PreferencePair("q2", "a", "b"),
                PreferencePair("q1", "b", "a"), PreferencePair("new", "a", "b")]
    assert eval_overlap_note(train, held_out).startswith("2 of the 4 held-out pairs are also training pairs")
    assert eval_overlap_note(train, train).startswith("the held-out pairs are the training pairs (all 10)")
    assert eval_overlap_note(train, held_out[2:]) is None


# --- 5. text that is not valid Unicode ----------------------------------------------------------------------------------

@pytest.mark.parametrize("row, field, inner", [
    ('{"prompt": "p", "chosen": "a\\ud800b", "rejected": "r"}', "chosen", ""),
    ('{"prompt": [{"role": "user", "content": "\\udfff"}], "chosen": "a", "rejected": "b"}', "prompt", "[0].content: "),
    ('{"prompt": "p", "chosen": "a", "rejected": "r", "note": "\\ud83d"}', "note", ""),
])
def test_lone_surrogates_are_refused_with_their_field(tmp_path, row, field, inner):
    path = jsonl(tmp_path / "d.jsonl", GOOD, row)
    with pytest.raises(DataError) as err:
        read_pairs(path)
    one_line_error(err, f"{path}:2: field '{field}': {inner}not valid Unicode text: a lone surrogate '\\")


def test_data_check_without_tokenizer_catches_lone_surrogates(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", '{"prompt": "p", "chosen": "\\ud800", "rejected": "r"}')
    out = infopo("data", "check", path, "--no-tokenizer")
    assert out.returncode == 2 and out.stderr.strip() == (f"error: {path}:1: field 'chosen': not valid Unicode text: "
                                                          "a lone surrogate '\\ud800' at character 1")


# --- 6. bounded, streaming reads -------------------------------------------------------------------------------------

def test_json_array_is_read_element_by_element(tmp_path, monkeypatch):
    monkeypatch.setattr(streams, "CHUNK_BYTES", 64)  # many chunk boundaries, inside strings, numbers and escapes
    rows = numbered(30, chosen="é\u00e9 \"quoted\" \\ " * 3, score=12345678901234)
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows, indent=2, ensure_ascii=False))
    assert [p.prompt for p in read_pairs(str(path))] == [r["prompt"] for r in rows]
    path.write_text(json.dumps({"data": rows}))
    assert len(read_pairs(str(path))) == 30
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read the whole file"))
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: pytest.fail("read the whole file"))
    assert len(read_pairs(str(path))) == 30
    assert len(read_pairs(jsonl(tmp_path / "d.jsonl", *rows))) == 30
    assert len(read_pairs(write_csv(tmp_path / "d.csv", ["prompt", "chosen", "rejected"], ["q", "a", "b"]))) == 1


@pytest.mark.parametrize("text, start", [
    ('[{"prompt": "p", "chosen": "c", "rejected": "r"},\n {"prompt": "p" "chosen": "c"}]', ":2: not valid JSON: Expecting ',' delimiter (column 17)"),
    ('[{"prompt": "p", "chosen": "c", "rejected": "r"}\n\n {"prompt": "q"}]', ":3: not valid JSON: Expecting ',' delimiter (column 2)"),
    ('{"train": [], "test": []}', ":1: expected a JSON array of rows"),
    ('{"prompt": "p", "chosen": "c", "rejected": "r"}', ":1: expected a JSON array of rows"),
    ('{"prompt": [{"role": "user", "content": "p"}], "chosen": [], "rejected": []}',
     ":1: expected a JSON array of rows (or JSON Lines in a .jsonl file): this file holds one row (its 'prompt' is not"),
    ('[{"prompt": "p", "chosen": "c", "rejected": "r"}] []', ":1: not valid JSON: Extra data"),
    ("", ":1: not valid JSON: Expecting value"),
    ('[{"prompt": "unterminated}]', ":1: not valid JSON: Unterminated string"),
])
def test_broken_json_arrays_name_the_line(tmp_path, monkeypatch, text, start):
    monkeypatch.setattr(streams, "CHUNK_BYTES", 8)
    path = tmp_path / "d.json"
    path.write_text(text)
    with pytest.raises(DataError) as err:
        read_pairs(str(path))
    one_line_error(err, f"{path}{start}")


def test_invalid_utf8_in_a_json_array_names_its_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'\xef\xbb\xbf[\n' + json.dumps(GOOD).encode() + b',\n{"prompt": "\xff"}]')
    with pytest.raises(DataError) as err:
        read_pairs(str(path))
    assert str(err.value) == f"{path}:3: not valid UTF-8 (byte 13)"


@pytest.mark.parametrize("name", ["d.jsonl", "d.json"])
def test_a_row_over_the_limit_is_one_line(tmp_path, monkeypatch, name):
    monkeypatch.setattr(streams, "MAX_ROW_BYTES", 4096)
    monkeypatch.setattr(streams, "CHUNK_BYTES", 512)
    big = {**GOOD, "chosen": "x" * 5000}
    path = tmp_path / name
    if name.endswith(".jsonl"):
        jsonl(path, GOOD, big, GOOD)
    else:
        path.write_text("[\n" + ",\n".join(json.dumps(r) for r in (GOOD, big, GOOD)) + "\n]")  # big on line 3
    with pytest.raises(DataError) as err:
        read_pairs(str(path))
    line = 2 if name.endswith("l") else 3
    assert str(err.value) == f"{path}:{line}: row longer than 4 KiB"
    if name.endswith("l"):  # a JSON Lines file goes on after the long line
        assert len(load_pairs(str(path), DataOptions(skip_invalid=True)).pairs) == 2


@pytest.mark.parametrize("name", ["d.jsonl", "d.json"])
@pytest.mark.parametrize("depth", [150, 10_000])
def test_deep_nesting_is_one_line(tmp_path, name, depth):
    nested = "[" * depth + "]" * depth
    path = tmp_path / name
    path.write_text(f'{{"prompt": "p", "chosen": {nested}, "rejected": "r"}}\n' if name.endswith("l")
                    else f'[{json.dumps(GOOD)},\n {{"prompt": "p", "chosen": {nested}, "rejected": "r"}}]')
    with pytest.raises(DataError) as err:
        read_pairs(str(path))
    message = str(err.value)
    assert "\n" not in message and message.endswith(f"nested deeper than {row_checks.MAX_DEPTH} levels")
    assert message.startswith(f"{path}:1" if name.endswith("l") else f"{path}:") and len(message) < 300


def test_very_long_numbers_are_one_line(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", '{"prompt": "p", "chosen": "c", "rejected": "r", "n": ' + "9" * 5000 + "}")
    with pytest.raises(DataError) as err:
        read_pairs(path)
    one_line_error(err, f"{path}:1: not valid JSON: Exceeds the limit")


# --- 7. non-regular files -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, kind", [
    (lambda p: os.mkfifo(p), "a FIFO"),
    (lambda p: p.symlink_to("/dev/zero"), "a character device"),
])
@pytest.mark.parametrize("name", ["x.jsonl", "x.json", "x.csv"])
def test_non_regular_files_are_refused_unopened(tmp_path, make, kind, name):
    path = tmp_path / name
    make(path)
    code = ("import sys; from infopo_cli.data.loading import read_pairs\n"
            "try: read_pairs(sys.argv[1])\nexcept Exception as err: print(type(err).__name__, err)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=20)
    assert out.stdout.strip() == f"InfopoError {path}: not a regular file ({kind})"


def test_a_fifo_in_a_folder_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    jsonl(tmp_path / "data" / "a.jsonl", GOOD)
    os.mkfifo(tmp_path / "data" / "b.jsonl")
    with pytest.raises(InfopoError, match=rf"^{tmp_path}/data/b.jsonl: not a regular file \(a FIFO\)$"):
        load_pairs(str(tmp_path / "data"))


# --- 8. local first, the hub on purpose ---------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["missing/train.jsonl", "./missing", "~/no-such-infopo-data", "sub/nothing"])
def test_a_missing_path_is_not_looked_up_on_the_hub(tmp_path, monkeypatch, spec):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sources, "_hub", lambda *a: pytest.fail("looked up on the hub"))
    with pytest.raises(InfopoError) as err:
        load_pairs(spec)
    assert str(err.value).endswith(": no such file")


def test_an_unreachable_hub_fails_fast_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "infopo_cli", "data", "check", "someone/no-such-dataset",
                          "--no-tokenizer"], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env={**env, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "https://hub.invalid"})
    assert time.monotonic() - start < 15
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("error: cannot load dataset 'someone/no-such-dataset' split 'train': tried the hub at "
                                 "https://hub.invalid: cannot connect to hub.invalid:443") and out.stderr.count("\n") == 1
    assert out.stderr.rstrip().endswith("and it is not in the local cache (nor is there a local file or folder of that name)")


# --- 9. every other problem a user can cause: one line, exit 2 --------------------------------------------------------------

def test_an_unreadable_file_is_one_line(tmp_path, monkeypatch):
    path = Path(jsonl(tmp_path / "d.jsonl", GOOD))
    opened = Path.open

    def denied(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return opened(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(InfopoError) as err:
        read_pairs(str(path))
    assert str(err.value) == f"{path}: cannot read (Permission denied)"


def test_a_damaged_save_to_disk_folder_is_one_line(tmp_path):
    from datasets import Dataset

    Dataset.from_list([GOOD]).save_to_disk(tmp_path / "ds")
    for arrow in (tmp_path / "ds").glob("*.arrow"):
        arrow.write_bytes(b"garbage")
    with pytest.raises(InfopoError) as err:
        read_pairs(str(tmp_path / "ds"))
    one_line_error(err, f"{tmp_path}/ds: not a readable save_to_disk folder (")
    for arrow in (tmp_path / "ds").glob("*.arrow"):
        arrow.unlink()
    with pytest.raises(InfopoError) as err:
        read_pairs(str(tmp_path / "ds"))
    one_line_error(err, f"{tmp_path}/ds: not a readable save_to_disk folder (")


@pytest.mark.parametrize("setup, args, start", [
    (lambda d: (d / "x.parquet").write_bytes(b"PAR1 not really"), ["x.parquet"], "{d}/x.parquet: not a readable Parquet file"),
    (lambda d: (d / "e.jsonl").write_text("\n"), ["e.jsonl"], "{d}/e.jsonl: no preference pairs (the source is empty)"),
    (lambda d: None, ["bundled:nope"], "unknown bundled data 'bundled:nope'; available:"),
    (lambda d: (d / "data").mkdir() or jsonl(d / "data" / "train.jsonl", GOOD), ["data", "--split", "test"],
     "{d}/data: no split 'test'; available: train"),
    (lambda d: None, ["nope.jsonl"], "{d}/nope.jsonl: no such file"),
])
def test_data_check_errors_are_one_line_exit_2(tmp_path, setup, args, start):
    setup(tmp_path)
    args = [str(tmp_path / a) if i == 0 and not a.startswith("bundled:") else a for i, a in enumerate(args)]
    out = infopo("data", "check", *args, "--no-tokenizer")
    assert out.returncode == 2, out.stderr
    line = out.stderr.strip()
    assert line.startswith("error: " + start.format(d=tmp_path)) and "\n" not in line, line
    assert "Traceback" not in out.stderr and "Error:" not in line.split(": ", 1)[1]
