"""The bundled arithmetic preference data: in sync with its generator, and objectively ordered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infopo_cli.bundled import arithmetic as gen
from conftest import ROOT

KEYS = {"prompt", "chosen", "rejected"}


def _load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def fresh() -> tuple[list[dict], list[dict]]:
    return gen.generate()


@pytest.fixture(scope="module")
def annotated() -> tuple[list[dict], list[dict]]:
    return gen.generate_with_answers()


def test_committed_files_match_generator(fresh: tuple[list[dict], list[dict]]) -> None:
    train, evals = fresh
    assert _load(gen.TRAIN_FILE) == train, "rerun: python -m infopo_cli.bundled.arithmetic"
    assert _load(gen.EVAL_FILE) == evals, "rerun: python -m infopo_cli.bundled.arithmetic"


def test_main_writes_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gen, "TRAIN_FILE", tmp_path / "train.jsonl")
    monkeypatch.setattr(gen, "EVAL_FILE", tmp_path / "eval.jsonl")
    gen.main()
    assert (tmp_path / "train.jsonl").read_bytes() == Path(gen.__file__).with_name("arith_train.jsonl").read_bytes()
    assert (tmp_path / "eval.jsonl").read_bytes() == Path(gen.__file__).with_name("arith_eval.jsonl").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.jsonl", "train.jsonl"]  # no temp left


def test_independent_of_hash_seed(fresh: tuple[list[dict], list[dict]]) -> None:
    code = "import json; from infopo_cli.bundled.arithmetic import generate; print(json.dumps(generate()))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=ROOT)
    assert [list(s) for s in json.loads(out.stdout)] == [list(s) for s in fresh]


def test_counts_keys_and_values(fresh: tuple[list[dict], list[dict]]) -> None:
    train, evals = fresh
    assert (len(train), len(evals)) == (600, 150)
    for row in train + evals:
        assert set(row) == KEYS
        assert all(isinstance(row[k], str) and row[k].strip() for k in KEYS)
        assert row["chosen"] != row["rejected"]


def test_prompts_unique_and_splits_disjoint(fresh: tuple[list[dict], list[dict]]) -> None:
    train, evals = fresh
    tp, ep = [r["prompt"] for r in train], [r["prompt"] for r in evals]
    assert len(set(tp)) == len(tp)
    assert len(set(ep)) == len(ep)
    assert not set(tp) & set(ep)


def test_chosen_correct_rejected_wrong(annotated: tuple[list[dict], list[dict]]) -> None:
    for row in annotated[0] + annotated[1]:
        assert gen.final_answer(row["chosen"]) == row["answer"], row
        got = gen.final_answer(row["rejected"])
        assert got is not None and got != row["answer"], row


def test_generate_strips_annotations(annotated: tuple[list[dict], list[dict]],
                                     fresh: tuple[list[dict], list[dict]]) -> None:
    for with_ans, plain in zip(annotated[0] + annotated[1], fresh[0] + fresh[1]):
        assert {k: with_ans[k] for k in KEYS} == plain


def test_at_least_twelve_families(annotated: tuple[list[dict], list[dict]]) -> None:
    train, evals = annotated
    assert len({r["family"] for r in train}) >= 12
    assert len({r["family"] for r in evals}) >= 12


def test_response_lengths(fresh: tuple[list[dict], list[dict]]) -> None:
    for row in fresh[0] + fresh[1]:
        for key in ("chosen", "rejected"):
            assert 5 <= len(row[key].split()) <= 60, row[key]


@pytest.mark.parametrize(("text", "want"), [
    ("So 3 + 4 = 7. The answer is 7.", "7"),
    ("The answer is $1,250.", "1250"),
    ("The answer is 3. No wait, the answer is 5.", "5"),
    ("No final line here.", None),
])
def test_final_answer(text: str, want: str | None) -> None:
    assert gen.final_answer(text) == want


def test_other_seed_differs_but_is_valid() -> None:
    train, evals = gen.generate_with_answers(seed=7, n_train=60, n_eval=20)
    assert (len(train), len(evals)) == (60, 20)
    assert [r["prompt"] for r in train] != [r["prompt"] for r in gen.generate_with_answers(n_train=60, n_eval=20)[0]]
    for row in train + evals:
        assert gen.final_answer(row["rejected"]) != row["answer"]
