"""Public preference data as it comes: empty replies, transcripts that differ early, several sets mixed."""

from __future__ import annotations

import json
import math

import pytest
from conftest import build_tokenizer
from test_data_check import check
from test_train import tiny_cfg

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
