"""Turn a preference pair into token ids: prompt, chosen response, rejected response.

With a chat template the response tokens are exactly the assistant turn's tokens as the template
writes them (end-of-turn included); without one, the response is followed by EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

from infopo_cli.data.formats import PreferencePair, Text


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _split_response(tokenizer, prompt_text: str, full_text: str) -> list[int]:
    """Response tokens = tokens of the full conversation after the prompt's tokens.

    Tokenising the whole conversation and cutting at the prompt keeps the boundary exactly as the
    model sees it at inference; if the prompt's tokens are not a prefix (a merge across the boundary),
    fall back to tokenising the response text on its own.
    """
    prompt_ids, full_ids = _ids(tokenizer, prompt_text), _ids(tokenizer, full_text)
    if full_ids[: len(prompt_ids)] == prompt_ids:
        return full_ids[len(prompt_ids):]
    return _ids(tokenizer, full_text[len(prompt_text):])


def _as_messages(text: Text, role: str) -> list[dict[str, str]]:
    return [{"role": role, "content": text}] if isinstance(text, str) else [{"role": r, "content": c} for r, c in text]


def _plain(text: Text, generation_prompt: bool) -> str:
    """Text for a tokenizer without a chat template; messages are written in Anthropic HH style."""
    if isinstance(text, str):
        return text
    names = {"user": "Human", "assistant": "Assistant", "tool": "Tool"}
    out = "".join(f"{c}\n\n" if r == "system" else f"\n\n{names[r]}: {c}" for r, c in text)
    return out + "\n\nAssistant:" if generation_prompt else out


def encode_pair(tokenizer, pair: PreferencePair, max_length: int, max_prompt_length: int) -> TokenizedPair:
    if getattr(tokenizer, "chat_template", None):
        messages = _as_messages(pair.prompt, "user")
        prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        responses = []
        for response in (pair.chosen, pair.rejected):
            full = tokenizer.apply_chat_template(messages + _as_messages(response, "assistant"), tokenize=False)
            if not full.startswith(prompt_text):  # templates that rewrite earlier turns: cut at the prompt anyway
                full = prompt_text + full[len(prompt_text):]
            responses.append(_split_response(tokenizer, prompt_text, full))
        prompt_ids = _ids(tokenizer, prompt_text)
        chosen_ids, rejected_ids = responses
    else:
        prompt_ids = list(tokenizer(_plain(pair.prompt, True))["input_ids"])  # adds BOS where the tokenizer does
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        chosen_ids, rejected_ids = ([*_ids(tokenizer, _response_text(r)), *eos] for r in (pair.chosen, pair.rejected))
    return truncate(prompt_ids, chosen_ids, rejected_ids, max_length, max_prompt_length)


def _response_text(response: Text) -> str:
    if isinstance(response, str):
        return response
    return " " + _plain(response, False).removeprefix("\n\nAssistant: ")


def truncate(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int,
             max_prompt_length: int) -> TokenizedPair:
    """Keep the end of the prompt (the question) and the start of each response."""
    if len(prompt) + max(len(chosen), len(rejected)) <= max_length:
        return TokenizedPair(prompt, chosen, rejected)
    if len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:]
    room = max_length - len(prompt)
    return TokenizedPair(prompt, chosen[:room], rejected[:room], truncated=True)
