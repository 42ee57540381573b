"""`infopo data check`, length-grouped batches and the token cache."""

from __future__ import annotations

import json
import random
import re
import subprocess

import pytest
from conftest import build_tokenizer, infopo, tiny_cfg
from test_formats import HH, UF
from test_tokenization import APOLOGISES, APOLOGY_NOTE, FITS, rows_file

from infopo_cli.data.batching import epoch_batches, padding_fraction
from infopo_cli.data.tokenization import TokenizedPair
from infopo_cli.errors import DataError, InfopoError


def check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return infopo("data", "check", *args, env=env)


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_names_the_format_and_shows_token_statistics(tmp_path, tiny_model):
    hh = write(tmp_path / "hh.jsonl", [HH, HH | {"rejected": HH["rejected"] + " Sorry."}, HH])
    out = check(hh, "--model", str(tiny_model), "--max-length", "64")
    assert out.returncode == 0, out.stderr
    assert "implicit format, 3 valid pairs of 3 rows, 1 duplicate pairs" in out.stdout
    assert "prompt" in out.stdout and "p90" in out.stdout and "would be truncated" in out.stdout
    uf = write(tmp_path / "uf.jsonl", [UF])
    out = check(uf, "--model", str(tiny_model))
    assert out.returncode == 0 and "rated conversational format, 1 valid pairs" in out.stdout


def test_bad_rows_one_line_and_non_zero(tmp_path):
    bad = write(tmp_path / "bad.jsonl", [UF, {"prompt": "p", "chosen": "c"}])
    out = check(bad, "--no-tokenizer")
    assert out.returncode == 2 and out.stderr.strip() == f"error: {bad}:2: field 'rejected': missing"
    out = check(bad, "--no-tokenizer", "--skip-invalid")
    assert out.returncode == 1 and "1 invalid rows" in out.stderr and ":2: field 'rejected': missing" in out.stderr


def test_length_grouping_keeps_every_pair_once_and_pads_less():
    rng = random.Random(0)
    lengths = [rng.randint(1, 200) for _ in range(500)]  # chosen and rejected of a pair have similar lengths
    pairs = [TokenizedPair([1] * rng.randint(5, 50), [2] * n, [3] * max(1, n + rng.randint(-5, 5))) for n in lengths]
    grouped = epoch_batches(pairs, 8, random.Random(1))
    assert sorted(id(p) for b in grouped for p in b) == sorted(id(p) for p in pairs)
    assert padding_fraction(grouped) < 0.5 * padding_fraction(epoch_batches(pairs, 8, random.Random(1), group=1))
    assert epoch_batches(pairs, 8, random.Random(2)) != grouped  # a new order each epoch


def test_token_cache_is_reused_and_keyed_on_settings(tmp_path, tiny_model, pairs_file, monkeypatch):
    from infopo_cli.data import token_cache
    from infopo_cli.data.loading import read_pairs
    from infopo_cli.model.stack import load_tokenizer

    monkeypatch.setenv("INFOPO_HOME", str(tmp_path))
    tok = load_tokenizer(str(tiny_model))
    pairs = read_pairs(str(pairs_file))[:20]
    first = token_cache.tokenize_cached(pairs, tok, 128, 64)
    assert not first.cached and len(first.pairs) == 20 and first.skipped == []
    with monkeypatch.context() as m:
        m.setattr(token_cache, "encode_pairs", lambda *args: 1 / 0)  # a cache hit encodes nothing
        second = token_cache.tokenize_cached(pairs, tok, 128, 64)
    assert second.cached and second.pairs == first.pairs
    assert not token_cache.tokenize_cached(pairs, tok, 96, 64).cached  # another max_length: another entry


def test_where_a_pair_was_read_is_not_part_of_the_cache_key():
    from infopo_cli.data.formats import PreferencePair
    from infopo_cli.data.token_cache import cache_key

    tok = build_tokenizer()
    here, there = PreferencePair("Q?", "A", "B", where="a.jsonl:1"), PreferencePair("Q?", "A", "B", where="b.jsonl:9")
    assert cache_key([here], tok, 128, 64) == cache_key([there], tok, 128, 64)
    assert cache_key([here], tok, 128, 64) != cache_key([PreferencePair("Q?", "A", "C")], tok, 128, 64)


def test_pairs_that_cannot_be_tokenised_are_skipped_with_their_rows(tmp_path, monkeypatch):
    from infopo_cli.data.loading import read_pairs
    from infopo_cli.data.token_cache import tokenize_cached

    monkeypatch.setenv("INFOPO_HOME", str(tmp_path / "home"))
    tok = build_tokenizer(APOLOGY_NOTE)
    path = rows_file(tmp_path, FITS, APOLOGISES, FITS | {"rejected": "7."})
    pairs = read_pairs(path)
    with pytest.raises(DataError, match=rf"^{re.escape(path)}:2: the chat template renders"):
        tokenize_cached(pairs, tok, 128, 64)
    for cached in (False, True):
        out = tokenize_cached(pairs, tok, 128, 64, skip_invalid=True)
        assert out.cached is cached and len(out.pairs) == 2
        assert len(out.skipped) == 1 and out.skipped[0].startswith(f"{path}:2: the chat template renders")
    with pytest.raises(DataError, match=rf"^{re.escape(path)}:2: "):  # a cached entry with failures still stops the run
        tokenize_cached(pairs, tok, 128, 64)
    moved = rows_file(tmp_path / "home", FITS, APOLOGISES, FITS | {"rejected": "7."})  # same pairs, another file
    assert tokenize_cached(read_pairs(moved), tok, 128, 64, skip_invalid=True).skipped[0].startswith(f"{moved}:2: ")


def test_data_check_reports_pairs_that_cannot_be_tokenised_as_invalid_rows(tmp_path):
    from infopo_cli.data.check import check as data_check
    from infopo_cli.data.loading import DataOptions

    tok = build_tokenizer(APOLOGY_NOTE)
    path = rows_file(tmp_path, FITS, APOLOGISES, FITS)
    with pytest.raises(DataError, match=rf"^{re.escape(path)}:2: the chat template renders"):
        data_check(path, DataOptions(), tok, 128, 64, 2)
    path = rows_file(tmp_path, FITS, APOLOGISES, {"prompt": "p", "chosen": "c"}, FITS)  # rows are read before tokenised
    report = data_check(path, DataOptions(skip_invalid=True), tok, 128, 64, 2)
    assert (report.rows, report.pairs, report.duplicates) == (4, 2, 1)
    assert [line.split(": ", 1)[0] for line in report.skipped] == [f"{path}:3", f"{path}:2"]
    assert len(report.lengths["prompt"]) == 2
    with pytest.raises(InfopoError, match=r"no preference pairs \(1 invalid rows"):
        data_check(rows_file(tmp_path, APOLOGISES), DataOptions(skip_invalid=True), tok, 128, 64, 2)


@pytest.mark.run
def test_pairs_that_truncation_makes_the_same_are_named_and_left_out(tmp_path, tiny_model, capsys):
    from infopo_cli.train import recipe

    long = " ".join(["word"] * 300)
    rows = [{"prompt": f"Q{i}?", "chosen": f"{long} good", "rejected": f"{long} bad"} for i in range(2)]
    rows += [{"prompt": f"What is {i} + 1?", "chosen": f"{i + 1}", "rejected": f"{i + 2}"} for i in range(6)]
    data = write(tmp_path / "long.jsonl", rows)
    out = check(data, "--model", str(tiny_model), "--max-length", "128")
    assert out.returncode == 0, out.stderr
    assert "2 pairs are the same once truncated to max_length 128" in " ".join(out.stdout.split())
    recipe.train(tiny_cfg(tiny_model, data, tmp_path / "run", eval_data="", max_steps=1))  # max_length 128
    said = " ".join(capsys.readouterr().out.split())
    assert "warning: 2 training pairs are the same once truncated to max_length 128" in said
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["data"]["pairs"] == 6


@pytest.mark.run
def test_a_global_batch_larger_than_the_data_is_said(tmp_path, tiny_model, capsys):
    from conftest import write_pairs

    from infopo_cli.train import recipe

    recipe.train(tiny_cfg(tiny_model, write_pairs(tmp_path / "five.jsonl", 5), tmp_path / "run", eval_data="",
                          max_steps=1, batch_size=4, grad_accum=2))
    said = " ".join(capsys.readouterr().out.split())
    assert "warning: a step's global batch of 8 pairs is more than the 5 training pairs" in said
