"""Every source and format a user brings, normalised into the same pairs; every bad input one line."""

from __future__ import annotations

import json
import math

import pytest
from conftest import tiny_cfg
from hypothesis import HealthCheck, given, settings, strategies as st

from infopo_cli.data.loading import DataOptions, load_pairs
from infopo_cli.errors import DataError, InfopoError
from infopo_cli.data.formats import Fields, PreferencePair, row_system

EXPLICIT = {"prompt": "What is 2 + 3?", "chosen": "2 + 3 = 5.", "rejected": "2 + 3 = 6."}
UF = {"prompt": "What is 2 + 3?",
      "chosen": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."}],
      "rejected": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 6."}],
      "score_chosen": 8.0, "score_rejected": 3.0}
HH = {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2 + 3?\n\nAssistant: It is 5.",
      "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2 + 3?\n\nAssistant: It is 6."}
MULTI_TURN = ((("user", "Hi there"), ("assistant", "Hello!"), ("user", "What is 2 + 3?")),
              (("assistant", "It is 5."),), (("assistant", "It is 6."),))


def jsonl(tmp_path, *rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_explicit_strings(tmp_path):
    loaded = load_pairs(jsonl(tmp_path, EXPLICIT))
    assert loaded.format == "explicit" and loaded.pairs == [PreferencePair("What is 2 + 3?", "2 + 3 = 5.", "2 + 3 = 6.")]


def test_ultrafeedback_messages_with_prompt_repeated_inside(tmp_path):
    loaded = load_pairs(jsonl(tmp_path, UF))
    assert loaded.format == "rated conversational"  # its score_chosen > score_rejected
    assert loaded.pairs[0] == PreferencePair((("user", "What is 2 + 3?"),), (("assistant", "2 + 3 = 5."),),
                                             (("assistant", "2 + 3 = 6."),))


def test_conversational_without_prompt_splits_off_the_shared_turns(tmp_path):
    row = {"chosen": [{"role": r, "content": c} for r, c in MULTI_TURN[0] + MULTI_TURN[1]],
           "rejected": [{"role": r, "content": c} for r, c in MULTI_TURN[0] + MULTI_TURN[2]]}
    assert load_pairs(jsonl(tmp_path, row)).pairs[0] == PreferencePair(*MULTI_TURN)


def test_conversational_prompt_as_messages(tmp_path):
    row = {"prompt": [{"role": r, "content": c} for r, c in MULTI_TURN[0]],
           "chosen": [{"role": "assistant", "content": "It is 5."}], "rejected": [{"role": "assistant", "content": "It is 6."}]}
    assert load_pairs(jsonl(tmp_path, row)).pairs[0] == PreferencePair(*MULTI_TURN)


def test_anthropic_hh_implicit_prompt(tmp_path):
    loaded = load_pairs(jsonl(tmp_path, HH))
    assert loaded.format == "implicit" and loaded.pairs[0] == PreferencePair(*MULTI_TURN)


def test_hh_transcripts_that_differ_in_the_human_turn_are_refused_not_cut_mid_turn(tmp_path):
    row = {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: What is 3+3?\n\nAssistant: 4"}
    path = jsonl(tmp_path, HH, row)
    with pytest.raises(DataError) as err:
        load_pairs(path)
    assert str(err.value).startswith(f"{path}:2: field 'chosen/rejected': the transcripts differ before their first")
    kept = load_pairs(path, DataOptions(skip_invalid=True))
    assert kept.pairs == [PreferencePair(*MULTI_TURN)] and len(kept.skipped) == 1


def test_implicit_format_given_for_rows_with_a_prompt_is_refused_not_dropped(tmp_path):
    path = jsonl(tmp_path, EXPLICIT)
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'prompt': present, but --format implicit"):
        load_pairs(path, DataOptions(format="implicit"))


@pytest.mark.parametrize("mapped", [dict(chosen="prompt"), dict(prompt="chosen"), dict(rejected="chosen"),
                                    dict(completion="prompt"), dict(completion="chosen"),
                                    dict(completion="answer", label="answer")])
def test_one_column_for_two_roles_is_refused(mapped):
    with pytest.raises(InfopoError, match=r"^--\w+-field and --\w+-field both name the column '\w+': each role"):
        Fields(**mapped)


@pytest.mark.parametrize("mapped", [dict(prompt="label"), dict(prompt="completion"), dict(chosen="completion")])
def test_a_pair_column_named_like_an_unused_unpaired_default_is_no_clash(mapped):
    assert getattr(Fields(**mapped), next(iter(mapped))) == next(iter(mapped.values()))


def test_implicit_plain_text_cuts_at_a_line_boundary(tmp_path):
    row = {"chosen": "Question: 2 + 3?\nAnswer: 5", "rejected": "Question: 2 + 3?\nAnswer: 6"}
    pair = load_pairs(jsonl(tmp_path, row)).pairs[0]
    assert pair == PreferencePair("Question: 2 + 3?\nAnswer: ", "5", "6")


def test_field_mapping_and_system_prompt(tmp_path):
    row = {"question": "Q?", "good": "A", "bad": "B"}
    options = DataOptions(fields=Fields("question", "good", "bad"), system="Be brief.")
    pair = load_pairs(jsonl(tmp_path, row), options).pairs[0]
    assert pair == PreferencePair((("system", "Be brief."), ("user", "Q?")), (("assistant", "A"),), (("assistant", "B"),))
    own = {"question": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Q?"}],
           "good": "A", "bad": "B"}
    loaded = load_pairs(jsonl(tmp_path, row, own), options)
    assert loaded.pairs[1].prompt[0] == ("system", "Answer in French.")  # the row's own, and the user is told
    assert loaded.notes == ["1 rows have a system message of their own: kept, --system is added only to rows without one"]


def test_pairs_know_their_row_but_compare_and_hash_without_it(tmp_path):
    path = jsonl(tmp_path, EXPLICIT, UF, EXPLICIT)
    pairs = load_pairs(path).pairs
    assert [p.where for p in pairs] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    assert pairs[0] == pairs[2] and hash(pairs[0]) == hash(pairs[2]) and len(set(pairs)) == 2
    assert load_pairs(path, DataOptions(system="Be brief.")).pairs[1].where == f"{path}:2"


def test_forced_format_mismatch_names_the_field(tmp_path):
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'chosen': expected a string, got an array"):
        load_pairs(jsonl(tmp_path, UF), DataOptions(format="explicit"))


def test_missing_field_suggests_the_mapping_flag(tmp_path):
    with pytest.raises(DataError, match=r"field 'chosen': missing \(columns: question, good, bad; map yours with --chosen-field\)"):
        load_pairs(jsonl(tmp_path, {"question": "Q", "good": "A", "bad": "B"}))


@pytest.mark.parametrize("row, field, problem", [
    ({**UF, "chosen": [{"role": "user", "content": "What is 2 + 3?"}]}, "chosen", "no reply after the prompt"),
    ({**UF, "chosen": [{"role": "robot", "content": "x"}]}, "chosen", "unknown role 'robot'"),
    ({**UF, "rejected": [{"role": "assistant"}]}, "rejected", "expected an object with 'role' and 'content'"),
    ({**UF, "rejected": [{"role": "assistant", "content": 5}]}, "rejected", "content must be a string"),
    ({**UF, "rejected": UF["chosen"]}, "rejected", "identical to 'chosen'"),
    ({**UF, "chosen": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": " "}],
      "rejected": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": ""}]},
     "chosen", "both replies are empty"),
])
def test_bad_conversational_rows(tmp_path, row, field, problem):
    with pytest.raises(DataError) as err:
        load_pairs(jsonl(tmp_path, UF, row))
    assert str(err.value).startswith(f"{tmp_path}/d.jsonl:2: field '{field}': ") and problem in str(err.value)


def test_skip_invalid_drops_and_counts(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"".join([json.dumps(EXPLICIT).encode() + b"\n", b"{not json\n", b'{"prompt": "\xff"}\n',
                               json.dumps({**EXPLICIT, "prompt": " "}).encode() + b"\n",
                               json.dumps({**EXPLICIT, "prompt": "Other?"}).encode() + b"\n"]))
    loaded = load_pairs(str(path), DataOptions(skip_invalid=True))
    assert len(loaded.pairs) == 2 and loaded.rows == 5 and len(loaded.skipped) == 3
    assert loaded.skipped[0].startswith(f"{path}:2: not valid JSON")
    assert ":3: not valid UTF-8" in loaded.skipped[1] and ":4: field 'prompt': empty" in loaded.skipped[2]
    with pytest.raises(DataError, match=":2: not valid JSON"):
        load_pairs(str(path))


# --- sources --------------------------------------------------------------------------------------

def test_json_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([EXPLICIT, {**EXPLICIT, "prompt": "Q2"}], indent=2))
    assert len(load_pairs(str(path)).pairs) == 2
    path.write_text(json.dumps([EXPLICIT, {"prompt": "Q2"}]))
    with pytest.raises(DataError, match=r"d.json:row 2: field 'chosen': missing"):
        load_pairs(str(path))


def test_csv_with_quoted_newlines_and_message_cells(tmp_path):
    import csv

    path = tmp_path / "d.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerow({**EXPLICIT, "chosen": "line one\nline two"})
        writer.writerow({"prompt": UF["prompt"], "chosen": json.dumps(UF["chosen"]), "rejected": json.dumps(UF["rejected"])})
        writer.writerow({"prompt": "", "chosen": "y", "rejected": "x"})
    with pytest.raises(DataError, match=r"d.csv:5: field 'prompt': empty"):
        load_pairs(str(path))
    loaded = load_pairs(str(path), DataOptions(skip_invalid=True))
    assert loaded.pairs[0].chosen == "line one\nline two" and len(loaded.pairs) == 2


def test_a_csv_reply_that_is_json_stays_text_and_a_broken_message_list_is_an_error(tmp_path):
    import csv

    path = tmp_path / "d.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["prompt", "chosen", "rejected"])
        writer.writerow(["Give JSON for Alice", '[{"name": "Alice"}]', '[{"name": "Bob"}]'])
    pair = load_pairs(str(path)).pairs[0]
    assert (pair.chosen, pair.rejected) == ('[{"name": "Alice"}]', '[{"name": "Bob"}]')
    with path.open("a", newline="") as fh:  # a message list with a message lacking its content is no reply text
        csv.writer(fh).writerow(["Q", '[{"role": "assistant"}]', '[{"role": "assistant", "content": "x"}]'])
    with pytest.raises(DataError, match=r"d.csv:3: field 'chosen': message 1: expected an object with 'role' and 'content'"):
        load_pairs(str(path))
    with path.open("w", newline="") as fh:  # ShareGPT's messages are refused as in JSON Lines, not trained as text
        csv.writer(fh).writerows([["prompt", "chosen", "rejected"], ["Q", '[{"from": "gpt", "value": "x"}]', "y"]])
    with pytest.raises(DataError, match=r"d.csv:2: field 'chosen': message 1: expected an object with 'role'"):
        load_pairs(str(path))


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([UF, UF | {"score_chosen": 7.0}]), path)
    loaded = load_pairs(str(path))
    assert loaded.format == "rated conversational" and len(loaded.pairs) == 2


def test_save_to_disk_folder_and_split(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list([EXPLICIT]), "test": Dataset.from_list([HH])}).save_to_disk(tmp_path / "ds")
    assert load_pairs(str(tmp_path / "ds")).format == "explicit"
    assert load_pairs(str(tmp_path / "ds"), DataOptions(split="test")).format == "implicit"
    with pytest.raises(InfopoError, match="no split 'dev'; available: train, test"):
        load_pairs(str(tmp_path / "ds"), DataOptions(split="dev"))


def test_dataset_folder_is_read_file_by_file(tmp_path):
    """A local folder of data files is read by the file readers, never sent to the hub loader."""
    folder = tmp_path / "my-dataset"
    folder.mkdir()
    jsonl(folder, EXPLICIT, {**EXPLICIT, "prompt": "Q2"}, name="train.jsonl")
    assert len(load_pairs(str(folder)).pairs) == 2


def test_unreachable_hub_dataset_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(InfopoError) as err:
        load_pairs("someone/no-such-dataset")
    assert str(err.value).startswith("cannot load dataset 'someone/no-such-dataset' split 'train'") and "\n" not in str(err.value)


def test_unknown_extension(tmp_path):
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(InfopoError, match="unknown file type '.txt'"):
        load_pairs(str(tmp_path / "d.txt"))


# --- fuzz -------------------------------------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=8)
rows = st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "role", "content", "x"]),
                       json_values | st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "bot"]),
                                                                     "content": json_values}), max_size=3), max_size=4)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=300) | st.lists(rows | json_values, max_size=4).map(
    lambda items: "\n".join(json.dumps(i) for i in items).encode()))
def test_fuzz_every_outcome_is_pairs_or_one_line(tmp_path, content):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(content)
    try:
        pairs = load_pairs(str(path)).pairs
    except InfopoError as err:
        message = str(err)
        assert message and "\n" not in message
        assert message.startswith(str(path))
    else:
        assert pairs and all(isinstance(p, PreferencePair) for p in pairs)


@pytest.mark.run
@pytest.mark.parametrize("kind", ["uf.parquet", "hh.jsonl", "explicit.csv", "messages.json"])
def test_trains_on_each_source_and_format(tiny_model, tmp_path, kind):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / kind
    rows = {"uf.parquet": [UF] * 4, "hh.jsonl": [HH] * 4, "explicit.csv": [EXPLICIT] * 4,
            "messages.json": [{"chosen": UF["chosen"], "rejected": UF["rejected"]}] * 4}[kind]
    if kind.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind.endswith(".csv"):
        path.write_text("prompt,chosen,rejected\n" + "".join(f'"{r["prompt"]}","{r["chosen"]}","{r["rejected"]}"\n' for r in rows))
    elif kind.endswith(".json"):
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from infopo_cli.train import recipe

    summary = recipe.train(tiny_cfg(tiny_model, path, tmp_path / "out", eval_data="", max_steps=1, batch_size=2))
    assert summary.steps == 1 and math.isfinite(summary.last_step["loss"])


# --- the field flags in every shape; a prompt never dropped for a guess --------------------------------------------

def test_a_renamed_prompt_in_rated_pairs_is_read_and_their_ratings_still_checked(tmp_path):
    """argilla/distilabel-intel-orca: `input` holds the prompt; the second row is rated the wrong way round."""
    path = jsonl(tmp_path, {"input": "Capital of France?", "chosen": "The capital is Paris.",
                            "rejected": "The capital is Rome.", "chosen_rating": 9, "rejected_rating": 3},
                 {"input": "2+2?", "chosen": "It is 4.", "rejected": "It is 5.", "chosen_rating": 3, "rejected_rating": 9})
    for fmt in ("auto", "rated"):
        loaded = load_pairs(path, DataOptions(format=fmt, fields=Fields(prompt="input")))
        assert [(p.prompt, p.chosen) for p in loaded.pairs] == [("Capital of France?", "The capital is Paris.")]
        assert loaded.format == "rated explicit" and any("rejected is rated above chosen" in n for n in loaded.notes)


def test_renamed_replies_of_a_rated_pair_and_a_renamed_prompt_of_a_scored_row(tmp_path):
    path = jsonl(tmp_path, {"prompt": "Q", "good": "yes", "bad": "no", "chosen_rating": 9, "rejected_rating": 3})
    pair, = load_pairs(path, DataOptions(format="rated", fields=Fields(chosen="good", rejected="bad"))).pairs
    assert (pair.prompt, pair.chosen, pair.rejected) == ("Q", "yes", "no")
    path = jsonl(tmp_path, {"question": "Q", "completions": ["a", "b"], "ratings": [1, 5]})
    for fmt in ("auto", "scored"):
        pair, = load_pairs(path, DataOptions(format=fmt, fields=Fields(prompt="question"))).pairs
        assert (pair.prompt, pair.chosen, pair.rejected) == ("Q", "b", "a")


@pytest.mark.parametrize("fmt", ["scored", "ranked", "labelled"])
def test_reply_field_flags_are_refused_where_the_answers_are_a_published_list(tmp_path, fmt):
    path = jsonl(tmp_path, {"prompt": "Q", "completions": ["a", "b"], "ratings": [1, 5]})
    with pytest.raises(InfopoError, match=rf"^--chosen-field: --format {fmt} reads its answers from the fields"):
        load_pairs(path, DataOptions(format=fmt, fields=Fields(chosen="good")))


def test_a_row_whose_prompt_is_in_another_column_is_not_read_off_the_replies(tmp_path):
    """Intel/orca_dpo_pairs: `system`, `question`, `chosen`, `rejected`; the replies share "The capital of France is "."""
    row = {"system": "", "question": "Capital of France?", "chosen": "The capital of France is Paris.",
           "rejected": "The capital of France is London."}
    path = jsonl(tmp_path, row)
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'prompt': missing \(columns: system, question, chosen, "
                                        r"rejected; map yours with --prompt-field, or read it off the start chosen and "
                                        r"rejected share with --format implicit\)$"):
        load_pairs(path)
    assert load_pairs(path, DataOptions(fields=Fields(prompt="question"))).pairs[0].prompt == (("user",
                                                                                              "Capital of France?"),)
    assert load_pairs(path, DataOptions(format="implicit")).pairs[0].prompt == "The capital of France is "
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'qestion': missing \(columns: .*--prompt-field\)$"):
        load_pairs(path, DataOptions(fields=Fields(prompt="qestion")))  # a misspelt column is no implicit prompt


def test_rows_without_other_text_are_still_implicit(tmp_path):
    hh = {"id": "a1", "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}
    trl = {"chosen": "The sky is blue.", "rejected": "The sky is green.", "score": 3}
    pairs = load_pairs(jsonl(tmp_path, hh, trl)).pairs
    assert pairs[0].prompt == (("user", "Hi"),) and pairs[1].prompt == "The sky is "


def test_a_renamed_prompt_that_a_conversational_row_lacks_is_missing(tmp_path):
    path = jsonl(tmp_path, {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a"}],
                            "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "b"}]})
    assert load_pairs(path).pairs[0].prompt == (("user", "Hi"),)
    with pytest.raises(DataError, match=r"field 'question': missing"):
        load_pairs(path, DataOptions(fields=Fields(prompt="question")))


def test_a_message_list_prompt_with_string_replies_is_conversational(tmp_path):
    row = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
           "chosen": "4", "rejected": "5"}
    pair, = load_pairs(jsonl(tmp_path, row)).pairs
    assert pair.prompt == (("system", "Be brief."), ("user", "2+2?")) and pair.chosen == (("assistant", "4"),)


def test_a_prompt_that_chosen_does_not_repeat_exactly_says_so():
    from infopo_cli.data.formats import normalise

    turns = [{"role": "user", "content": "2+2? "}, {"role": "assistant", "content": "4"}]
    row = {"prompt": "2+2?", "chosen": turns, "rejected": [turns[0], {"role": "assistant", "content": "5"}]}
    with pytest.raises(DataError, match=r"field 'chosen': the reply after the prompt must be an assistant message, got "
                                        r"role 'user' \(chosen starts with other turns than the prompt field's"):
        normalise(row, "f:1", "conversational", Fields())


def test_a_prompt_that_is_an_hh_transcript_becomes_turns():
    """Dahoas/full-hh-rlhf and rm-static: `prompt` holds the turns so far, the replies follow `Assistant:`."""
    from infopo_cli.data.formats import normalise

    row = {"prompt": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant:", "response": " Why?",
           "chosen": " Why did the chicken cross the road?", "rejected": " No."}
    pair = normalise(row, "f:1", "explicit", Fields())
    assert pair.prompt == (("user", "Hi"), ("assistant", "Hello!"), ("user", "Tell me a joke"))
    assert (pair.chosen, pair.rejected) == ((("assistant", "Why did the chicken cross the road?"),), (("assistant", "No."),))
    quoted = {**row, "prompt": "Rate this chat:\n\nHuman: Hi\n\nAssistant:"}  # a prompt that only quotes a transcript
    assert normalise(quoted, "f:1", "explicit", Fields()).prompt == quoted["prompt"]


def test_text_before_an_hh_transcripts_first_turn_is_its_system_message():
    from infopo_cli.data.formats import normalise

    row = {"chosen": "Be nice.\n\nHuman: hi\n\nAssistant: hello", "rejected": "Be nice.\n\nHuman: hi\n\nAssistant: go"}
    assert normalise(row, "f:1", "implicit", Fields()).prompt == (("system", "Be nice."), ("user", "hi"))


def test_a_system_column_is_the_rows_system_message(tmp_path):
    """Intel/orca_dpo_pairs: the `system` column is each row's system message (an empty one is none); the row's own
    wins over --system; --system-field renames the column and '' reads none."""
    rows = [{"system": "You are an AI assistant.", "question": "2+2?", "chosen": "4", "rejected": "5"},
            {"system": "", "question": "3+3?", "chosen": "6", "rejected": "7"}]
    path = jsonl(tmp_path, *rows)
    loaded = load_pairs(path, DataOptions(fields=Fields(prompt="question"), system="Be brief."))
    first, second = loaded.pairs
    assert first.prompt == (("system", "You are an AI assistant."), ("user", "2+2?"))
    assert first.chosen == (("assistant", "4"),) and first.rejected == (("assistant", "5"),)
    assert second.prompt == (("system", "Be brief."), ("user", "3+3?"))
    assert any("1 rows have a system message in their 'system' column" in line for line in loaded.info)
    assert any("1 rows have a system message of their own" in line for line in loaded.notes)
    assert load_pairs(path, DataOptions(fields=Fields(prompt="question", system=""))).pairs[0].prompt == "2+2?"
    renamed = jsonl(tmp_path, {"sys": "Be kind.", "prompt": "Hi", "chosen": "Hello", "rejected": "Go"})
    assert load_pairs(renamed, DataOptions(fields=Fields(system="sys"))).pairs[0].prompt[0] == ("system", "Be kind.")


def test_a_system_column_that_holds_no_text_is_not_read_and_said(tmp_path):
    """A number, a list or one token (a model's or an MT system's name, as some sets keep in `system`) is no system
    message: not read (the data loaded before the column was read), with a warning."""
    rows = [{"system": 0, "prompt": "Hi", "chosen": "Hello", "rejected": "Go"},
            {"system": "gpt-4", "prompt": "Hey", "chosen": "Hello", "rejected": "Go"}]
    loaded = load_pairs(jsonl(tmp_path, *rows))
    assert [p.prompt for p in loaded.pairs] == [(("user", "Hi"),), (("user", "Hey"),)]
    assert any(n.startswith("2 rows have a 'system' column that is no system message") for n in loaded.notes)


def test_every_row_of_a_set_with_a_system_column_is_written_as_messages(tmp_path):
    """Without a chat template a row with a system message is written HH-style: a row of the same set whose system
    column is empty is too, not as plain text."""
    rows = [{"system": "Be brief.", "prompt": "2+2?", "chosen": "4", "rejected": "5"},
            {"system": "", "prompt": "3+3?", "chosen": "6", "rejected": "7"}]
    first, second = load_pairs(jsonl(tmp_path, *rows)).pairs
    assert first.prompt == (("system", "Be brief."), ("user", "2+2?"))
    assert second.prompt == (("user", "3+3?"),) and second.chosen == (("assistant", "6"),)


def test_a_system_column_joins_conversational_and_unpaired_rows(tmp_path):
    chat = {"system": "Be brief.", "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "b"}]}
    own = {"system": "Be brief.", "prompt": [{"role": "system", "content": "Mine."}, {"role": "user", "content": "Hi"}],
           "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}
    pairs = load_pairs(jsonl(tmp_path, chat, own)).pairs
    assert pairs[0].prompt == (("system", "Be brief."), ("user", "Hi"))
    assert pairs[1].prompt == (("system", "Mine."), ("user", "Hi"))  # the messages' own system message is kept
    row, = load_pairs(jsonl(tmp_path, {"system": "Be brief.", "prompt": "Hi", "completion": "a", "label": True})).pairs
    assert row.prompt == (("system", "Be brief."), ("user", "Hi")) and row.rejected == ()


def test_a_prompt_column_called_system_is_the_prompt():
    assert row_system({"system": "2+2?", "chosen": "4", "rejected": "5"}, Fields(prompt="system")) is None
    with pytest.raises(InfopoError, match="--prompt-field and --system-field both name the column 'q'"):
        Fields(prompt="q", system="q")


def test_metadata_columns_leave_a_row_implicit(tmp_path):
    """An id, a CSV's index column, where a row came from, the models that wrote it and one-word values are not a
    prompt kept elsewhere."""
    rows = [{"id": "alpaca_12", "chosen": "The sky is blue.", "rejected": "The sky is green."},
            {"Unnamed: 0": "3", "source": "evol instruct", "chosen_model": "gpt 4", "chosen": "The sky is blue.",
             "rejected": "The sky is grey."},
            {"origin": "web", "chosen": "The sky is blue.", "rejected": "The sky is red."}]
    assert [p.prompt for p in load_pairs(jsonl(tmp_path, *rows)).pairs] == ["The sky is "] * 3
    for text in ({"note": "asked twice"}, {"model_input": "What colour is the sky?"}, {"question": "天空是什么颜色"},
                 {"task": "Describe the sky."}):
        with pytest.raises(DataError, match=rf"field 'prompt': missing \(columns: {next(iter(text))}, chosen, rejected;"):
            load_pairs(jsonl(tmp_path, {**text, "chosen": "The sky is blue.", "rejected": "The sky is red."}))


def test_bundled_data_is_read_with_its_own_column_names(tmp_path):
    """`--prompt-field question` for one's own file must not make the bundled held-out set (or a bundled part of a
    mix) unreadable: its columns are ours."""
    options = DataOptions(format="explicit", fields=Fields(prompt="question", chosen="good", rejected="bad"))
    assert load_pairs("bundled:arith_eval", options).pairs == load_pairs("bundled:arith_eval").pairs
