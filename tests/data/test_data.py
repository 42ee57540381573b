"""Reading preference files: good rows load, every bad row is one line naming file, line and field."""

from __future__ import annotations

import json

import pytest

from infopo_cli.data.loading import read_pairs, resolve
from infopo_cli.errors import DataError, InfopoError

GOOD = {"prompt": "p", "chosen": "c", "rejected": "r"}


def write(tmp_path, content: bytes | str, name: str = "d.jsonl"):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def rows(*items) -> str:
    return "".join((json.dumps(i) if not isinstance(i, str) else i) + "\n" for i in items)


def test_reads_rows_and_skips_blank_lines(tmp_path):
    path = write(tmp_path, rows(GOOD, "", {**GOOD, "prompt": "q"}))
    pairs = read_pairs(str(path))
    assert [p.prompt for p in pairs] == ["p", "q"]


def test_bom_and_crlf_are_accepted(tmp_path):
    path = write(tmp_path, b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\r\n" + json.dumps(GOOD) + "\r\n").encode())
    assert len(read_pairs(str(path))) == 2


def test_extra_fields_are_ignored(tmp_path):
    assert read_pairs(str(write(tmp_path, rows({**GOOD, "score": 3}))))[0].chosen == "c"


@pytest.mark.parametrize("row, field, problem", [
    ({"prompt": "p", "chosen": "c"}, "rejected", "missing"),
    ({**GOOD, "chosen": 3}, "chosen", "expected a string, got a number"),
    ({**GOOD, "prompt": None}, "prompt", "null"),  # not read as a row without its prompt (an implicit pair)
    ({**GOOD, "rejected": ["x"]}, "rejected", "expected a string, got an array"),
    ({**GOOD, "chosen": "   ", "rejected": ""}, "chosen", "both replies are empty"),
    ({**GOOD, "prompt": " "}, "prompt", "empty"),
    ({**GOOD, "rejected": "c"}, "rejected", "identical to 'chosen'"),
])
def test_bad_field_names_file_line_and_field(tmp_path, row, field, problem):
    path = write(tmp_path, rows(GOOD, GOOD, row))
    with pytest.raises(DataError) as err:
        read_pairs(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}:3: field '{field}': ")
    assert problem in message and "\n" not in message


@pytest.mark.parametrize("content, problem", [
    (rows(GOOD) + '{"prompt": "p", "chosen": \n', "not valid JSON"),
    (rows(GOOD) + "[1, 2]\n", "expected an object"),
])
def test_malformed_lines(tmp_path, content, problem):
    path = write(tmp_path, content)
    with pytest.raises(DataError, match=rf"^{path}:2: {problem}"):
        read_pairs(str(path))


def test_invalid_utf8_names_the_line(tmp_path):
    path = write(tmp_path, rows(GOOD).encode() + b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r":2: not valid UTF-8"):
        read_pairs(str(path))


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(InfopoError, match="no preference pairs"):
        read_pairs(str(write(tmp_path, "\n\n")))
    with pytest.raises(InfopoError, match="no such file"):
        read_pairs(str(tmp_path / "nope.jsonl"))


def test_bundled_data_resolves_inside_the_package():
    assert resolve("bundled:arith_train").is_file()
    assert len(read_pairs("bundled:arith_eval")) >= 100
    with pytest.raises(InfopoError, match="available: bundled:arith_eval"):
        resolve("bundled:nope")
