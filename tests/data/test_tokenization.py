"""Prompt/response token boundaries: exactly what the model sees at inference."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from conftest import CHATML, build_tokenizer

from infopo_cli.data.formats import PreferencePair
from infopo_cli.data.loading import load_pairs
from infopo_cli.data.tokenization import encode_pair, truncate
from infopo_cli.errors import DataError

PAIR = PreferencePair("What is 2 + 3?", "2 + 3 = 5.", "2 + 3 = 6.")

# Templates that write the earlier turns one way for a generation prompt and another once the
# conversation ends with the assistant's reply: an extra header, or a system line of another length.
FINISHED_HEADER = ("{% if messages[-1]['role'] == 'assistant' %}{{ '<|im_start|>system\nA finished conversation."
                   "<|im_end|>\n' }}{% endif %}" + CHATML)
STATE_LINE = ("{{ '<|im_start|>system\n' + ('Replied.' if messages[-1]['role'] == 'assistant' else 'Awaiting a reply.')"
              " + '<|im_end|>\n' }}" + CHATML)
# The earlier turns depend on what the reply says: no prompt fits both a reply that apologises and one that does not.
APOLOGY_NOTE = ("{% if 'Sorry' in messages[-1]['content'] %}{{ '<|im_start|>system\nThe reply apologises.<|im_end|>\n' }}"
                "{% endif %}" + CHATML)


def conversation_ids(tok, prompt, response) -> list[int]:
    """The template's own tokenisation of the whole conversation: prompt turns, then the reply."""
    as_dicts = lambda text, role: [{"role": role, "content": text}] if isinstance(text, str) else [  # noqa: E731
        {"role": r, "content": c} for r, c in text]
    text = tok.apply_chat_template(as_dicts(prompt, "user") + as_dicts(response, "assistant"), tokenize=False)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def rows_file(tmp_path, *rows) -> str:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


FITS = {"prompt": "What is 2 + 3?", "chosen": "5.", "rejected": "6."}
APOLOGISES = {"prompt": "What is 2 + 3?", "chosen": "Sorry, it is 5.", "rejected": "6."}


def test_chat_template_prompt_plus_response_is_the_whole_conversation():
    tok = build_tokenizer()
    enc = encode_pair(tok, PAIR, max_length=512, max_prompt_length=256)
    for response, ids in ((PAIR.chosen, enc.chosen_ids), (PAIR.rejected, enc.rejected_ids)):
        messages = [{"role": "user", "content": PAIR.prompt}, {"role": "assistant", "content": response}]
        full = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
        assert enc.prompt_ids + ids == list(full)
    assert tok.decode(enc.prompt_ids).endswith("<|im_start|>assistant\n")
    assert tok.decode(enc.chosen_ids).startswith("2 + 3 = 5.<|im_end|>")  # end-of-turn is trained


def test_system_prompt_goes_into_the_prompt():
    tok = build_tokenizer()
    pair = PreferencePair((("system", "Be brief."), ("user", PAIR.prompt)), (("assistant", PAIR.chosen),),
                          (("assistant", PAIR.rejected),))
    enc = encode_pair(tok, pair, 512, 256)
    assert tok.decode(enc.prompt_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")


MULTI = PreferencePair((("user", "Hi"), ("assistant", "Hello!"), ("user", "2 + 3?")), (("assistant", "5"),),
                       (("assistant", "6"),))


def test_multi_turn_prompt_plus_response_is_the_whole_conversation():
    tok = build_tokenizer()
    enc = encode_pair(tok, MULTI, 512, 256)
    as_dicts = lambda msgs: [{"role": r, "content": c} for r, c in msgs]  # noqa: E731
    full = tok(tok.apply_chat_template(as_dicts(MULTI.prompt + MULTI.chosen), tokenize=False), add_special_tokens=False)
    assert enc.prompt_ids + enc.chosen_ids == list(full["input_ids"])
    assert tok.decode(enc.rejected_ids) == "6<|im_end|>\n"


def test_template_with_bos_is_not_doubled():
    """Llama-3 style: the template writes BOS and the tokenizer would add another one by default."""
    from tokenizers.processors import TemplateProcessing

    tok = build_tokenizer(chat_template="{{ bos_token }}" + CHATML)
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # the tokenizer adds BOS on its own
    enc = encode_pair(tok, PAIR, 512, 256)
    assert enc.prompt_ids.count(tok.bos_token_id) == 1 and enc.prompt_ids[0] == tok.bos_token_id


def test_hh_messages_without_template_render_as_hh_text():
    tok = build_tokenizer(chat_template=None)
    enc = encode_pair(tok, MULTI, 512, 256)
    assert tok.decode(enc.prompt_ids) == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2 + 3?\n\nAssistant:"
    assert tok.decode(enc.chosen_ids) == " 5<|im_end|>"


def test_without_template_response_ends_with_eos():
    tok = build_tokenizer(chat_template=None)
    enc = encode_pair(tok, PAIR, 512, 256)
    assert enc.chosen_ids[-1] == tok.eos_token_id and tok.decode(enc.chosen_ids[:-1]) == PAIR.chosen
    assert tok.decode(enc.prompt_ids).endswith(PAIR.prompt)


def test_truncation_keeps_prompt_end_and_response_start():
    out = truncate(list(range(100)), list(range(1000, 1050)), list(range(2000, 2030)), max_length=80, max_prompt_length=40)
    assert out.truncated
    assert out.prompt_ids == list(range(60, 100))
    assert out.chosen_ids == list(range(1000, 1040)) and out.rejected_ids == list(range(2000, 2030))
    assert out.length <= 80
    assert not truncate([1, 2], [3], [4], 10, 5).truncated


@pytest.mark.parametrize("template", [FINISHED_HEADER, STATE_LINE], ids=["header", "system-line"])
@pytest.mark.parametrize("pair", [PAIR, MULTI], ids=["single-turn", "multi-turn"])
def test_template_rewriting_earlier_turns_is_tokenised_as_the_whole_conversation(template, pair):
    tok = build_tokenizer(template)
    enc = encode_pair(tok, pair, 512, 256)
    for response, ids in ((pair.chosen, enc.chosen_ids), (pair.rejected, enc.rejected_ids)):
        assert enc.prompt_ids + ids == conversation_ids(tok, pair.prompt, response)
        reply = response if isinstance(response, str) else response[0][1]
        assert tok.decode(ids) == f"{reply}<|im_end|>\n"  # exactly the assistant turn, end-of-turn included
    assert tok.decode(enc.prompt_ids).endswith("<|im_start|>assistant\n")


def test_earlier_turns_depending_on_the_reply_is_a_one_line_error_naming_the_row(tmp_path):
    tok = build_tokenizer(APOLOGY_NOTE)
    path = rows_file(tmp_path, FITS, APOLOGISES)
    fits, apologises = load_pairs(path).pairs
    assert encode_pair(tok, fits, 512, 256).prompt_ids == list(tok(tok.apply_chat_template(
        [{"role": "user", "content": FITS["prompt"]}], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False)["input_ids"])
    with pytest.raises(DataError) as err:
        encode_pair(tok, apologises, 512, 256)
    assert str(err.value).startswith(f"{path}:2: the chat template renders the earlier turns differently")
    assert "\n" not in str(err.value) and "Error" not in str(err.value)


def test_ordinary_template_keeps_the_generation_prompt_as_the_prompt():
    """A template whose generation prompt differs from the conversation's (an empty reasoning block written
    into every reply) but is a prefix of it: the prompt is what the model sees at inference."""
    tok = build_tokenizer(CHATML.replace("message['role'] + '\n' + message['content']",
                                         "message['role'] + '\n' + ('<think></think>' if message['role'] == 'assistant' "
                                         "else '') + message['content']"))
    enc = encode_pair(tok, PAIR, 512, 256)
    assert tok.decode(enc.prompt_ids).endswith("<|im_start|>assistant\n")
    assert tok.decode(enc.chosen_ids) == "<think></think>2 + 3 = 5.<|im_end|>\n"
    assert enc.prompt_ids + enc.rejected_ids == conversation_ids(tok, PAIR.prompt, PAIR.rejected)


def test_template_refusing_a_conversation_is_a_data_error():
    tok = build_tokenizer("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                          "{% endif %}" + CHATML)
    pair = replace(PreferencePair((("system", "Be brief."), ("user", "Q?")), (("assistant", "A"),), (("assistant", "B"),)),
                   where="d.jsonl:7")
    with pytest.raises(DataError, match=r"^d\.jsonl:7: the chat template rejects this conversation: System role not "
                                        r"supported \(this template may take no system message: --system-field '' reads "
                                        r"no system column, and drop --system\)$"):
        encode_pair(tok, pair, 512, 256)


def test_special_tokens_written_in_the_data_are_a_warning():
    """`<|im_end|>` typed in a reply is read as the end-of-turn token: the reply would end there."""
    from infopo_cli.data.tokenization import control_token_note

    tok = build_tokenizer()
    clean = PreferencePair("What is 2 + 3?", "5", "6", where="d.jsonl:1")
    marked = PreferencePair((("user", "Hi<|im_end|>\n<|im_start|>assistant"),), "a", "b", where="d.jsonl:2")
    assert control_token_note(tok, [clean]) is None
    assert control_token_note(tok, [clean, marked, replace(marked, where="d.jsonl:3")]) == (
        "2 pairs hold the tokenizer's special tokens as text (<|im_end|>, <|im_start|>; e.g. d.jsonl:2): they are read "
        "as those tokens, not as text")
