"""Unpaired feedback rows (a completion and a thumbs up/down label): read from every shape, checked row by row,
kept apart from preference pairs, tokenised, cached, reported by `data check`, and used for reference answers."""

from __future__ import annotations

import csv
import json
import re

import pytest
from conftest import build_tokenizer, infopo

from infopo_cli.data.check import check
from infopo_cli.data.formats import Fields, PreferencePair, detect, parse_label, unpaired_row, with_system
from infopo_cli.data.loading import DataOptions, data_kind, load_pairs, unpair
from infopo_cli.data.token_cache import cache_key, tokenize_cached
from infopo_cli.data.tokenization import encode_pair, encode_pairs, truncate
from infopo_cli.errors import ConfigError, DataError
from infopo_cli.inference.prompts import is_prompt_only, rows_from_pairs

Q = "What is 2 + 3?"
GOOD = {"prompt": Q, "completion": "2 + 3 = 5. The answer is 5.", "label": True}
BAD = {"prompt": Q, "completion": "2 + 3 = 6. The answer is 6.", "label": False}
USER = [{"role": "user", "content": Q}]
CONVERSATIONAL = {"prompt": USER, "completion": [{"role": "assistant", "content": "It is 5."}], "label": 1}
PAIR = {"prompt": Q, "chosen": "2 + 3 = 5.", "rejected": "2 + 3 = 6."}


def jsonl(tmp_path, *rows, name="rows.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def csv_file(tmp_path, header, *records, name="rows.csv") -> str:
    path = tmp_path / name
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows([header, *records])
    return str(path)


# --- detection and normalisation ----------------------------------------------------------------------------------

def test_explicit_rows_are_detected_and_keep_an_empty_rejected(tmp_path):
    loaded = load_pairs(jsonl(tmp_path, GOOD, BAD))
    assert loaded.format == "unpaired"
    assert loaded.pairs == [PreferencePair(Q, GOOD["completion"], "", label=True),
                            PreferencePair(Q, BAD["completion"], "", label=False)]
    assert [p.unpaired for p in loaded.pairs] == [True, True] and loaded.pairs[0].where.endswith("rows.jsonl:1")
    assert loaded.notes == []  # an unpaired row's empty rejected is no empty reply
    assert PreferencePair(Q, "A", "", label=True) != PreferencePair(Q, "A", "", label=False) != PreferencePair(Q, "A", "")


def test_conversational_rows_cut_a_repeated_prompt_and_take_string_sides(tmp_path):
    repeated = {"prompt": USER, "completion": USER + [{"role": "assistant", "content": "It is 5."}], "label": "good"}
    string_prompt = {"prompt": Q, "completion": [{"role": "assistant", "content": "It is 5."}], "label": "yes"}
    string_completion = {"prompt": USER, "completion": "It is 5.", "label": "up"}
    loaded = load_pairs(jsonl(tmp_path, CONVERSATIONAL, repeated, string_prompt, string_completion))
    expected = PreferencePair((("user", Q),), (("assistant", "It is 5."),), (), label=True)
    assert loaded.format == "unpaired" and loaded.pairs == [expected] * 4


@pytest.mark.parametrize("row, field, problem", [
    ({"prompt": USER, "completion": [{"role": "user", "content": "again"}], "label": 1}, "completion",
     "the reply after the prompt must be an assistant message, got role 'user'"),
    ({"prompt": USER + [{"role": "assistant", "content": "Hm"}], "completion": "5", "label": 1}, "prompt",
     "the prompt must end with a user (or tool) turn, not the assistant's"),
    ({"prompt": USER, "completion": USER, "label": 1}, "completion", "has no reply after the prompt"),
    ({"prompt": "  ", "completion": "5", "label": 1}, "prompt", "empty"),
    ({"prompt": [], "completion": "5", "label": 1}, "prompt", "empty"),
    ({"prompt": Q, "completion": 5, "label": 1}, "completion", "expected a list of messages or a string, got a number"),
])
def test_conversational_rules_hold_for_unpaired_rows(tmp_path, row, field, problem):
    path = jsonl(tmp_path, GOOD, row)
    with pytest.raises(DataError) as err:
        load_pairs(path)
    assert str(err.value) == f"{path}:2: field '{field}': {problem}"


def test_an_empty_completion_is_an_answer_and_noted(tmp_path):
    loaded = load_pairs(jsonl(tmp_path, GOOD | {"completion": ""}, BAD))
    assert loaded.pairs[0] == PreferencePair(Q, "", "", label=True)
    assert loaded.notes == ["1 unpaired rows have an empty completion: each is trained as the end-of-turn token alone "
                            "(the answer is to say nothing)"]


def test_detection_needs_no_chosen_and_format_can_be_forced(tmp_path):
    fields = Fields()
    assert detect(GOOD, fields) == "unpaired" and detect(PAIR, fields) == "explicit"
    assert detect({"prompt": Q, "completion": "5"}, fields) == "unpaired"  # then its missing label is named
    assert detect(PAIR | {"label": True}, fields) == "explicit"            # a pair with a label column is a pair
    renamed = {"question": Q, "answer": "5", "thumb": "👍"}
    options = DataOptions(format="unpaired", fields=Fields(prompt="question", completion="answer", label="thumb"))
    assert load_pairs(jsonl(tmp_path, renamed), options).pairs == [PreferencePair(Q, "5", "", label=True)]
    path = jsonl(tmp_path, PAIR, name="pairs.jsonl")
    with pytest.raises(DataError, match=re.escape(f"{path}:1: field 'completion': missing (columns: prompt, chosen, "
                                                  "rejected; map yours with --completion-field)")):
        load_pairs(path, DataOptions(format="unpaired"))


def test_a_system_prompt_keeps_the_rejected_side_empty(tmp_path):
    loaded = load_pairs(jsonl(tmp_path, GOOD), DataOptions(system="Be brief."))
    assert loaded.pairs == [PreferencePair((("system", "Be brief."), ("user", Q)), (("assistant", GOOD["completion"]),),
                                           (), label=True)]
    assert with_system(PreferencePair(Q, "A", "B"), "S").rejected == (("assistant", "B"),)  # a pair's stays a reply


# --- labels -------------------------------------------------------------------------------------------------------

UP = [True, 1, 1.0, "true", "True", " YES ", "1", "good", "up", "thumbs_up", "thumbsup", "Thumbs Up", "positive",
      "desirable", "accept", "accepted", "like", "👍", "👍️"]
DOWN = [False, 0, -1, -1.0, "false", "no", "0", "-1", "bad", "DOWN", "thumbs_down", "thumbsdown", "thumbs down",
        "negative", "undesirable", "reject", "rejected", "dislike", "👎"]


@pytest.mark.parametrize("value, expected", [(v, True) for v in UP] + [(v, False) for v in DOWN])
def test_every_label_spelling(value, expected):
    assert parse_label(value, "f.jsonl:3", "label") is expected


@pytest.mark.parametrize("value, got", [(2, "2"), (0.5, "0.5"), ("maybe", "'maybe'"), (None, "null"), ([1], "an array"),
                                        ("", "''"), ("up\ndown", "'up\\ndown'"), ({"up": 1}, "an object")])
def test_a_label_that_is_not_one_is_refused_never_guessed(value, got):
    with pytest.raises(DataError) as err:
        parse_label(value, "f.jsonl:3", "label")
    assert str(err.value) == f"f.jsonl:3: field 'label': expected a label: true/false, 1/0/-1, good/bad, up/down (got {got})"
    assert "\n" not in str(err.value)


def test_bad_labels_and_missing_fields_name_the_line_and_field_in_jsonl(tmp_path):
    for row, field, problem in [
        (GOOD | {"label": "maybe"}, "label", "expected a label: true/false, 1/0/-1, good/bad, up/down (got 'maybe')"),
        (GOOD | {"label": None}, "label", "expected a label: true/false, 1/0/-1, good/bad, up/down (got null)"),
        ({"prompt": Q, "completion": "5", "rating": 1}, "label",
         "missing (columns: prompt, completion, rating; map yours with --label-field)"),
        ({"prompt": Q, "response": "5", "label": 1}, "completion",
         "missing (columns: prompt, response, label; map yours with --completion-field)"),
        ({"completion": "5", "label": 1}, "prompt", "missing"),
    ]:
        path = jsonl(tmp_path, GOOD, BAD, row)
        with pytest.raises(DataError) as err:
            load_pairs(path)
        assert str(err.value) == f"{path}:3: field '{field}': {problem}"
        skipped = load_pairs(path, DataOptions(skip_invalid=True))
        assert len(skipped.pairs) == 2 and skipped.skipped == [str(err.value)]


def test_csv_labels_arrive_as_strings(tmp_path):
    path = csv_file(tmp_path, ["prompt", "completion", "label"], [Q, "5", "1"], [Q, "6", "-1"], [Q, "7", "thumbs down"],
                    [Q, "8", "True"])
    assert [(p.chosen, p.label) for p in load_pairs(path).pairs] == [("5", True), ("6", False), ("7", False), ("8", True)]
    bad = csv_file(tmp_path, ["prompt", "completion", "label"], [Q, "5", "1"], [Q, "6", "2"], name="bad.csv")
    with pytest.raises(DataError, match=rf"^{re.escape(bad)}:3: field 'label': expected a label: .* \(got '2'\)$"):
        load_pairs(bad)


# --- one kind per source, unpair, data_kind -----------------------------------------------------------------------

def test_a_source_mixing_pairs_and_unpaired_rows_is_refused_at_the_first_row_of_the_other_kind(tmp_path):
    path = jsonl(tmp_path, PAIR, PAIR, GOOD, BAD)
    with pytest.raises(DataError) as err:
        load_pairs(path)
    assert str(err.value) == (f"{path}:3: an unpaired row (completion, label) among preference pairs (first pair at "
                              f"{path}:1): keep each kind in its own dataset")
    path = jsonl(tmp_path, GOOD, GOOD, PAIR, name="b.jsonl")
    with pytest.raises(DataError) as err:
        load_pairs(path)
    assert str(err.value) == (f"{path}:3: a preference pair (chosen, rejected) among unpaired rows (first unpaired row "
                              f"at {path}:1): keep each kind in its own dataset")
    skipped = load_pairs(jsonl(tmp_path, GOOD | {"label": "?"}, PAIR, GOOD, name="c.jsonl"), DataOptions(skip_invalid=True))
    assert [p.unpaired for p in skipped.pairs] == [False] and len(skipped.skipped) == 2  # the first valid row decides


def test_unpair_splits_each_pair_into_two_labelled_rows():
    explicit = PreferencePair(Q, "5", "6", where="a.jsonl:4")
    conversational = PreferencePair((("user", Q),), (("assistant", "5"),), (("assistant", "6"),), where="b.jsonl:1")
    row = unpaired_row(Q, "7", False, "c.jsonl:2")
    out = unpair([explicit, conversational, row])
    assert out == [PreferencePair(Q, "5", "", label=True), PreferencePair(Q, "6", "", label=False),
                   PreferencePair((("user", Q),), (("assistant", "5"),), (), label=True),
                   PreferencePair((("user", Q),), (("assistant", "6"),), (), label=False), row]
    assert [p.where for p in out] == ["a.jsonl:4", "a.jsonl:4", "b.jsonl:1", "b.jsonl:1", "c.jsonl:2"]
    assert {(p.prompt, p.chosen) for p in out if p.label} == {(x.prompt, x.chosen) for x in (explicit, conversational)}
    assert {(p.prompt, p.chosen) for p in out[:4] if not p.label} == {(x.prompt, x.rejected) for x in (explicit, conversational)}
    assert unpair(out) == out and data_kind(out) == "unpaired"


def test_data_kind_refuses_a_list_of_both_kinds(tmp_path):
    pairs = load_pairs(jsonl(tmp_path, PAIR, name="pairs.jsonl")).pairs
    rows = load_pairs(jsonl(tmp_path, GOOD, name="rows.jsonl")).pairs
    assert data_kind(pairs) == "pairs" and data_kind(rows) == "unpaired" and data_kind([]) == "pairs"
    with pytest.raises(ConfigError, match=r"^the data mixes preference pairs \(e.g. .*pairs.jsonl:1\) and unpaired "
                                          r"feedback rows \(e.g. .*rows.jsonl:1\): train on one kind"):
        data_kind(pairs + rows)


def test_notes_for_unbalanced_and_contradictory_feedback(tmp_path):
    rows = [GOOD | {"completion": f"{i}"} for i in range(9)] + [BAD, BAD, GOOD | {"completion": "0", "label": "bad"}]
    loaded = load_pairs(jsonl(tmp_path, *rows))  # 9 : 3 is within 1 : 4; the completion "0" is labelled both ways
    assert loaded.notes == ["1 prompt+completion pairs appear with both labels (contradictory feedback)"]
    loaded = load_pairs(jsonl(tmp_path, *rows[:9], BAD, name="skewed.jsonl"))
    assert loaded.notes == ["unbalanced feedback: 9 desirable, 1 undesirable (9.00 : 1), beyond 1 : 4 either way"]
    loaded = load_pairs(jsonl(tmp_path, GOOD, *[BAD | {"completion": f"{i}"} for i in range(5)], name="down.jsonl"))
    assert loaded.notes == ["unbalanced feedback: 1 desirable, 5 undesirable (1 : 5.00), beyond 1 : 4 either way"]


# --- tokenisation and the token cache ----------------------------------------------------------------------------

@pytest.mark.parametrize("template", ["chat", None])
def test_an_unpaired_row_tokenises_as_a_chosen_reply_with_no_rejected_tokens(template):
    tok = build_tokenizer() if template else build_tokenizer(None)
    for prompt, good, bad in [(Q, "It is 5.", "It is 6."), ((("user", Q),), (("assistant", "It is 5."),), (("assistant", "6"),)),
                              (Q, "", "It is 6.")]:
        pair = encode_pair(tok, PreferencePair(prompt, good, bad), 512, 256)
        row = encode_pair(tok, unpaired_row(prompt, good, False), 512, 256)
        assert row.chosen_ids == pair.chosen_ids and row.prompt_ids == pair.prompt_ids and row.chosen_ids
        assert row.rejected_ids == [] and row.label is False and pair.label is None
        assert tok.convert_tokens_to_ids("<|im_end|>") in row.chosen_ids  # end-of-turn (or EOS) included


def test_truncation_keeps_the_label():
    out = truncate(list(range(100)), list(range(1000, 1050)), [], max_length=80, max_prompt_length=40, label=True)
    assert out.truncated and out.label is True and len(out.prompt_ids) == 40 and len(out.chosen_ids) == 40
    assert truncate([1, 2], [3], [], 10, 5, label=False).label is False and truncate([1], [2], [3], 10, 5).label is None
    tok = build_tokenizer()
    encoded, failed = encode_pairs(tok, [unpaired_row(Q, "x" * 300, True), PreferencePair(Q, "5", "6")], 64, 32)
    assert not failed and [t.label for t in encoded] == [True, None] and encoded[0].truncated


def test_the_token_cache_keys_on_and_restores_labels(tmp_path, monkeypatch):
    from infopo_cli.data import token_cache

    monkeypatch.setenv("INFOPO_HOME", str(tmp_path))
    tok = build_tokenizer()
    rows = [unpaired_row(Q, "It is 5.", True), unpaired_row(Q, "It is 6.", False), PreferencePair(Q, "5", "6")]
    assert cache_key(rows[:1], tok, 128, 64) != cache_key([unpaired_row(Q, "It is 5.", False)], tok, 128, 64)
    assert cache_key([PreferencePair(Q, "5", "")], tok, 128, 64) != cache_key([unpaired_row(Q, "5", True)], tok, 128, 64)
    first = tokenize_cached(rows, tok, 128, 64)
    with monkeypatch.context() as m:
        m.setattr(token_cache, "encode_pairs", lambda *args: 1 / 0)  # a cache hit encodes nothing
        second = tokenize_cached(rows, tok, 128, 64)
    assert not first.cached and second.cached and second.pairs == first.pairs
    assert [t.label for t in second.pairs] == [True, False, None] and second.pairs[0].rejected_ids == []


# --- data check ---------------------------------------------------------------------------------------------------

def test_data_check_counts_labels_and_reports_completion_lengths(tmp_path):
    rows = [GOOD | {"completion": f"It is {i}."} for i in range(5)] + [BAD, BAD | {"completion": "no"}]
    path = jsonl(tmp_path, *rows)
    report = check(path, DataOptions(), build_tokenizer(), 512, 256, 2)
    assert (report.desirable, report.undesirable, report.pairs, report.duplicates) == (5, 2, 7, 0)
    assert report.unpaired and report.unit == "rows" and report.balance == "5 desirable, 2 undesirable (2.50 : 1)"
    assert list(report.lengths) == ["prompt", "completion"] and len(report.lengths["completion"]) == 7
    assert min(report.lengths["completion"]) > 0 and 0 <= report.padding_grouped < 1
    paired = check(jsonl(tmp_path, PAIR, name="pairs.jsonl"), DataOptions(), build_tokenizer(), 512, 256, 2)
    assert not paired.unpaired and list(paired.lengths) == ["prompt", "chosen", "rejected"] and paired.balance == ""


def test_data_check_command_prints_the_balance(tmp_path, tiny_model):
    rows = [GOOD | {"completion": f"It is {i}."} for i in range(3)] + [BAD, BAD]
    path = jsonl(tmp_path, *rows)
    out = infopo("data", "check", path, "--model", str(tiny_model))
    assert out.returncode == 0, out.stderr
    assert f"{path}: unpaired format, 5 valid rows of 5 rows, 1 duplicate rows" in out.stdout
    assert "3 desirable, 2 undesirable (1.50 : 1)" in out.stdout
    assert "completion" in out.stdout and "rejected" not in out.stdout and "0 rows longer than max_length" in out.stdout
    renamed = jsonl(tmp_path, {"q": Q, "a": "5", "ok": "👎"}, name="renamed.jsonl")
    out = infopo("data", "check", renamed, "--no-tokenizer", "--prompt-field", "q", "--completion-field", "a",
                 "--label-field", "ok")
    assert out.returncode == 0, out.stderr
    assert "0 desirable, 1 undesirable (no desirable rows)" in out.stdout
    mixed = jsonl(tmp_path, PAIR, GOOD, name="mixed.jsonl")
    out = infopo("data", "check", mixed, "--no-tokenizer")
    assert out.returncode == 2 and out.stderr.strip() == (
        f"error: {mixed}:2: an unpaired row (completion, label) among preference pairs (first pair at {mixed}:1): "
        "keep each kind in its own dataset")
    pairs = jsonl(tmp_path, {"q": Q, "chosen": "5", "rejected": "6"}, name="pairs.jsonl")  # two kinds: as `train`
    out = infopo("data", "check", pairs, renamed, "--no-tokenizer", "--prompt-field", "q", "--completion-field", "a",
                 "--label-field", "ok")
    assert out.returncode == 2 and out.stderr.strip() == (
        f"error: these sources mix preference pairs and unpaired feedback rows ({pairs}: pairs, {renamed}: unpaired "
        "rows): train on one kind (--unpair splits each pair into two unpaired rows)")


# --- reference answers --------------------------------------------------------------------------------------------

def test_only_a_desirable_completion_gives_a_reference_answer(tmp_path):
    other = "What is 1 + 1?"
    rows = [BAD, GOOD, BAD | {"prompt": other}, {"prompt": other, "completion": "Two.", "label": True}]
    pairs = load_pairs(jsonl(tmp_path, *rows)).pairs
    found = rows_from_pairs(pairs, {})
    assert [(r.question, r.answer, r.answer_from) for r in found] == [(Q, "5", "chosen"), (other, None, "")]
    assert found[0].where.endswith(":1")  # the prompt's first row, with the answer of its desirable one
    assert rows_from_pairs(pairs[:1], {})[0].answer is None  # an undesirable "The answer is 6." is no reference
    assert rows_from_pairs(pairs[:1], {pairs[0].where: 7})[0].answer == 7  # the row's own answer field is
    assert not is_prompt_only(jsonl(tmp_path, GOOD, name="feedback.jsonl"))
