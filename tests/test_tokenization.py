"""Prompt/response token boundaries: exactly what the model sees at inference."""

from __future__ import annotations

from conftest import CHATML, build_tokenizer

from infopo_cli.data.formats import PreferencePair
from infopo_cli.data.tokenization import encode_pair, truncate

PAIR = PreferencePair("What is 2 + 3?", "2 + 3 = 5.", "2 + 3 = 6.")


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
