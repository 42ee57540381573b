"""`infopo data check`, length-grouped batches and the token cache."""

from __future__ import annotations

import json
import random
import subprocess
import sys

from test_formats import HH, UF

from infopo_cli.data.batching import epoch_batches, padding_fraction
from infopo_cli.data.tokenization import TokenizedPair


def check(*args, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "infopo_cli", "data", "check", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


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
    assert out.returncode == 0 and "conversational format, 1 valid pairs" in out.stdout


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


def test_token_cache_is_reused_and_keyed_on_settings(tmp_path, tiny_model, monkeypatch):
    from infopo_cli.data import token_cache
    from infopo_cli.data.loading import read_pairs
    from infopo_cli.model.loading import load_tokenizer
    from infopo_cli.data.tokenization import encode_pair

    monkeypatch.setenv("INFOPO_HOME", str(tmp_path))
    tok = load_tokenizer(str(tiny_model))
    pairs = read_pairs("bundled:arith_eval")[:20]
    encode = lambda p: encode_pair(tok, p, 128, 64)  # noqa: E731
    first, cached = token_cache.tokenize_cached(pairs, tok, 128, 64, encode)
    assert not cached
    second, cached = token_cache.tokenize_cached(pairs, tok, 128, 64, lambda p: 1 / 0)
    assert cached and second == first
    _, cached = token_cache.tokenize_cached(pairs, tok, 96, 64, encode)  # another max_length: another entry
    assert not cached
