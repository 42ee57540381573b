"""Public preference data as it comes: empty replies, transcripts that differ early, several sets mixed."""

from __future__ import annotations

import json
import math

import pytest
from conftest import build_tokenizer, tiny_cfg
from test_data_check import check

from infopo_cli.data.loading import load_pairs
from infopo_cli.data.tokenization import encode_pair
from infopo_cli.errors import DataError
from infopo_cli.train import recipe

# An Anthropic HH harmlessness row of the kind that has an empty chosen reply: saying nothing is preferred.
ADDRESS = "\n\nHuman: What is the home address of the actor who played Hannibal?\n\nAssistant:"
EMPTY_CHOSEN = {"chosen": ADDRESS, "rejected": ADDRESS + " He lives at 12 Elm Street, Springfield."}
# chosen and rejected differ in an earlier assistant turn, so the prompt is only the first user turn.
EARLY = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2 + 3?\n\nAssistant: 5.",
         "rejected": "\n\nHuman: Hi\n\nAssistant: Go away.\n\nHuman: What is 2 + 3?\n\nAssistant: Figure it out."}


def jsonl(path, *rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.run
def test_an_empty_hh_reply_is_an_answer_trained_as_the_end_of_turn_token(tmp_path, tiny_model):
    loaded = load_pairs(jsonl(tmp_path / "hh.jsonl", EMPTY_CHOSEN))
    pair = loaded.pairs[0]
    assert pair.prompt == (("user", "What is the home address of the actor who played Hannibal?"),)
    assert pair.chosen == (("assistant", ""),) and pair.rejected[0][1].startswith("He lives at")
    assert loaded.notes == ["1 pairs have an empty chosen reply and 0 an empty rejected one: each is trained as the "
                            "end-of-turn token alone (the answer is to say nothing)"]
    chat, plain = build_tokenizer(), build_tokenizer(chat_template=None)
    assert chat.decode(encode_pair(chat, pair, 512, 256).chosen_ids) == "<|im_end|>\n"  # ChatML's end of turn
    assert encode_pair(plain, pair, 512, 256).chosen_ids == [plain.eos_token_id]
    data = jsonl(tmp_path / "mixed.jsonl", EMPTY_CHOSEN, EARLY, EMPTY_CHOSEN, EARLY)
    summary = recipe.train(tiny_cfg(tiny_model, data, tmp_path / "out", eval_data="", max_steps=1, batch_size=2))
    assert summary.steps == 1 and math.isfinite(summary.last_step["loss"])


@pytest.mark.parametrize("row", [
    {"chosen": ADDRESS, "rejected": ADDRESS + "  "},
    {"prompt": "Q", "chosen": "", "rejected": " "},
    {"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": ""}],
     "rejected": [{"role": "assistant", "content": "\n"}]},
])
def test_both_replies_empty_is_still_an_error_naming_the_line(tmp_path, row):
    path = jsonl(tmp_path / "d.jsonl", EARLY, row)
    with pytest.raises(DataError) as err:
        load_pairs(path)
    assert str(err.value) == f"{path}:2: field 'chosen': both replies are empty (the pair expresses no preference)"


def test_transcripts_that_differ_before_the_last_turn_keep_every_later_turn_in_the_responses(tmp_path):
    pair = load_pairs(jsonl(tmp_path / "hh.jsonl", EARLY)).pairs[0]
    assert pair.prompt == (("user", "Hi"),)
    assert pair.chosen == (("assistant", "Hello! How can I help?"), ("user", "What is 2 + 3?"), ("assistant", "5."))
    assert pair.rejected == (("assistant", "Go away."), ("user", "What is 2 + 3?"), ("assistant", "Figure it out."))
    tokenizer = build_tokenizer()
    encoded = encode_pair(tokenizer, pair, 512, 256)
    assert tokenizer.decode(encoded.prompt_ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(encoded.chosen_ids) == ("Hello! How can I help?<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?"
                                                    "<|im_end|>\n<|im_start|>assistant\n5.<|im_end|>\n")


def test_data_check_warns_about_empty_replies_and_early_differences(tmp_path):
    path = jsonl(tmp_path / "hh.jsonl", EMPTY_CHOSEN, EARLY, EMPTY_CHOSEN | {"rejected": ADDRESS + " No idea."})
    out = check(path, "--no-tokenizer")
    assert out.returncode == 0, out.stderr
    assert "implicit format, 3 valid pairs of 3 rows" in out.stdout
    assert "warning: 2 pairs have an empty chosen reply and 0 an empty rejected one" in out.stdout
    assert "warning: 1 pairs differ before their last assistant turn" in out.stdout


# --- several datasets at once ----------------------------------------------------------------------

def numbered(path, tag: str, n: int) -> str:
    return jsonl(path, *({"prompt": f"{tag} question {i}?", "chosen": f"{tag} good {i}", "rejected": f"{tag} bad {i}"}
                         for i in range(n)))


def test_a_weighted_mix_has_the_requested_shares_without_repeating_a_pair(tmp_path):
    from infopo_cli.data.mixing import load_mix

    a, b = numbered(tmp_path / "a.jsonl", "A", 100), numbered(tmp_path / "b.jsonl", "B", 60)
    mixed = load_mix([a, f"{b}:0.3"], seed=1)
    from_b = sum(p.prompt.startswith("B") for p in mixed.pairs)
    assert abs(from_b - 0.3 * len(mixed.pairs)) <= 1 and len(mixed.pairs) - from_b == 100  # a is the scarce one
    assert len(set(mixed.pairs)) == len(mixed.pairs)
    assert mixed.mix == f"{a} 100 of 100 pairs (70%); {b} 43 of 60 pairs (30%)"
    assert load_mix([a, f"{b}:0.3"], seed=1).pairs == mixed.pairs  # seeded: --resume finds the same pairs
    assert load_mix([a, f"{b}:0.3"], seed=2).pairs != mixed.pairs
    by_size = load_mix([a, b])  # no weights: every pair of both, as one file would be
    assert len(by_size.pairs) == 160 and by_size.mix.endswith("(38%)")
    even = load_mix([f"{a}:0.2", f"{b}:0.2"])  # weights for all: their proportions
    assert sum(p.prompt.startswith("B") for p in even.pairs) == 60 and len(even.pairs) == 120


def test_mix_errors_name_their_dataset_and_weights_must_be_shares(tmp_path):
    from infopo_cli.data.mixing import load_mix, parse_source
    from infopo_cli.errors import ConfigError

    a = numbered(tmp_path / "a.jsonl", "A", 4)
    bad = jsonl(tmp_path / "bad.jsonl", {"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": "c"})
    with pytest.raises(DataError, match=rf"^{bad}:2: field 'rejected': missing"):
        load_mix([a, bad])
    with pytest.raises(ConfigError, match="add up to 1.5"):
        load_mix([f"{a}:0.8", f"{bad}:0.7"])
    with pytest.raises(ConfigError, match=r"must be in \(0, 1\]"):
        parse_source(f"{a}:2")
    assert parse_source("bundled:arith_train").weight is None and parse_source("C:\\data.jsonl").spec == "C:\\data.jsonl"


@pytest.mark.run
def test_train_mixes_two_datasets_and_says_what_each_gave(tmp_path, tiny_model, capsys):
    from infopo_cli.train.progress import Reporter
    from rich.console import Console

    a, b = numbered(tmp_path / "a.jsonl", "A", 12), numbered(tmp_path / "b.jsonl", "B", 12)
    cfg = tiny_cfg(tiny_model, a, tmp_path / "out", data=[a, f"{b}:0.25"], eval_data="", max_steps=1, batch_size=2)
    summary = recipe.train(cfg, Reporter(Console(width=300)))
    assert summary.steps == 1
    out = capsys.readouterr().out
    assert f"mix: {a} 12 of 12 pairs (75%); {b} 4 of 12 pairs (25%)" in out and "on 16 explicit pairs" in out


# --- --max-length auto --------------------------------------------------------------------------------

def test_auto_max_length_is_the_99th_percentile():
    from infopo_cli.data.tokenization import auto_max_length

    assert auto_max_length(list(range(1, 201))) == 198  # keeps 198 of 200 pairs whole
    assert auto_max_length(list(range(100, 0, -1))) == 99 and auto_max_length([7]) == 7


@pytest.mark.run
def test_max_length_auto_resolves_from_the_training_pairs_and_is_saved_as_a_number(tmp_path, tiny_model):
    import tomllib

    from conftest import write_pairs
    from infopo_cli.config import merge
    from infopo_cli.data.tokenization import auto_max_length
    from infopo_cli.errors import ConfigError

    data = write_pairs(tmp_path / "pairs.jsonl", 40)
    cfg = tiny_cfg(tiny_model, data, tmp_path / "out", eval_data="", max_steps=1, batch_size=2)
    cfg = merge(cfg, {"max_length": "auto"}, source="command line")
    recipe.train(cfg)
    tokenizer = build_tokenizer()
    want = auto_max_length([encode_pair(tokenizer, p, 10**9, 10**9).length for p in load_pairs(str(data)).pairs])
    saved = tomllib.loads((tmp_path / "out" / "config.toml").read_text())
    assert saved["max_length"] == want and saved["max_prompt_length"] == min(64, want // 2)
    assert merge(cfg, {"max_length": "384"}, source="x").max_length == 384  # as the command line gives it
    with pytest.raises(ConfigError, match="'max_length' must be a whole number or auto"):
        merge(cfg, {"max_length": "long"}, source="x")


# --- scored and ranked data, through the loader and the command line (the shapes: tests/data/test_scored.py) -------

def test_scored_ranked_and_labelled_rows_load_as_pairs_with_what_each_row_gave(tmp_path):
    from test_scored import NECTAR, SHP, ULTRAFEEDBACK, UF_11, UF_12

    from infopo_cli.data.loading import DataOptions
    from infopo_cli.data.scored import ScoreOptions

    path = jsonl(tmp_path / "mixed.jsonl", ULTRAFEEDBACK, NECTAR, SHP, SHP | {"score_B": 52})  # the last: a tie
    loaded = load_pairs(path)
    assert loaded.format == "mixed (2 labelled, 1 scored, 1 ranked)" and len(loaded.pairs) == 3
    assert (loaded.pairs[0].chosen, loaded.pairs[0].rejected) == (UF_11, UF_12) and loaded.pairs[0].where == f"{path}:1"
    assert loaded.info == ["scored/ranked rows -> pairs by --pairs best-worst (gap >= 0, ratio >= 1): 3 pairs from 4 rows "
                           "(1 gave 0, 3 gave 1)"]
    assert loaded.notes == ["1 rows gave no pair: tie"]
    every = load_pairs(path, DataOptions(scores=ScoreOptions(pairs="all", min_score_gap=2)))
    # UltraFeedback's 8.5, 4.25, 4.0, 2: 5 pairs 2 or more apart; Nectar's ranks 1-4: (1, 3), (1, 4), (2, 4); SHP 52 vs 12
    assert len(every.pairs) == 5 + 3 + 1
    assert len(load_pairs(path, DataOptions(format="scored", skip_invalid=True)).pairs) == 1  # forced: the others fail


@pytest.mark.run
def test_data_check_and_train_flags_for_scored_data(tmp_path, tiny_model):
    from test_scored import NECTAR

    path = jsonl(tmp_path / "nectar.jsonl", NECTAR, NECTAR)
    out = check(path, "--no-tokenizer", "--pairs", "adjacent")
    assert out.returncode == 0, out.stderr
    assert "ranked format, 6 valid pairs of 2 rows" in out.stdout and "2 gave 3" in out.stdout
    out = check(path, "--no-tokenizer", "--pairs", "worst-best")
    assert out.returncode == 2 and "pairs must be one of best-worst, best-vs-each, adjacent, all" in out.stderr
    summary = recipe.train(tiny_cfg(tiny_model, path, tmp_path / "out", eval_data="", max_steps=1, batch_size=2,
                                    pairs="best-vs-each"))
    assert summary.steps == 1
