"""Replies from a transformers model: batched (left padding) for evaluation, streamed token by token for chat.

Prompts are rendered by the tokenizer's chat template with the generation prompt; without a template a
single user turn is its plain text with the tokenizer's special tokens (BOS), and a conversation is written
in the Human:/Assistant: style, as training renders such data. A reply ends at EOS or an end-of-turn token
(`export.check.stop_ids`) or after `max_new_tokens`. Greedy by default; `temperature` > 0 samples.

Left padding with the attention mask (and the positions transformers derives from it) leaves every greedy
answer as it is one prompt at a time: padding is never read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from infopo_cli.errors import ConfigError, ModelError
from infopo_cli.export.check import stop_ids

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0   # 0: greedy (the same reply every time)
    top_p: float = 1.0         # 1: off
    top_k: int = 0             # 0: off
    seed: int = 0              # for sampling

    def check(self) -> Sampling:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        if not self.temperature >= 0:
            problems.append(f"--temperature must be 0 (greedy) or more (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            problems.append(f"--top-k must be 0 (off) or more (got {self.top_k})")
        if problems:
            raise ConfigError("; ".join(problems))
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Reply:
    text: str
    new_tokens: int   # tokens generated, the stop token included
    stopped: bool     # ended with EOS or end-of-turn (not cut at max_new_tokens)


def as_messages(prompt: str | Sequence[Any], system: str | None = None) -> Messages:
    """A prompt (a string, or (role, content) / {role, content} turns) as chat messages, `system` first."""
    if isinstance(prompt, str):
        turns = [{"role": "user", "content": prompt}]
    else:
        turns = [dict(m) if isinstance(m, dict) else {"role": m[0], "content": m[1]} for m in prompt]
    if system and not (turns and turns[0]["role"] == "system"):
        turns = [{"role": "system", "content": system}, *turns]
    return turns


def prompt_ids(tokenizer, messages: Messages) -> list[int]:
    """The tokens the model reads before its reply."""
    if getattr(tokenizer, "chat_template", None):
        text = _render(tokenizer, messages)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    from infopo_cli.data.tokenization import _plain  # training's rendering of turns without a template

    if len(messages) == 1 and messages[0]["role"] == "user":
        text = messages[0]["content"]
    else:
        text = _plain(tuple((m["role"], m["content"]) for m in messages), True)
    return list(tokenizer(text)["input_ids"])  # with BOS where the tokenizer adds one


def _render(tokenizer, messages: Messages) -> str:
    from jinja2.exceptions import TemplateError, TemplateSyntaxError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateSyntaxError as err:
        raise ModelError(f"the tokenizer's chat template does not parse: {' '.join(str(err).split())}") from None
    except TemplateError as err:  # e.g. a template without a system role, given --system
        hint = " (this template may take no system message: drop --system)" if messages[0]["role"] == "system" else ""
        raise ConfigError(f"the chat template rejects these messages: {' '.join(str(err).split())}{hint}") from None


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _generation_config(tokenizer, sampling: Sampling, stops: list[int]):
    from transformers import GenerationConfig

    # Settings given here win over the model's generation_config.json (whose sampling defaults must not leak in);
    # greedy takes no sampling settings at all (transformers warns about those it would ignore).
    chosen = {} if sampling.greedy else {"temperature": sampling.temperature, "top_p": sampling.top_p,
                                         "top_k": sampling.top_k}
    return GenerationConfig(max_new_tokens=sampling.max_new_tokens, do_sample=not sampling.greedy, eos_token_id=stops,
                            pad_token_id=tokenizer.pad_token_id, use_cache=True, **chosen)


def to_reply(tokenizer, tokens: list[int], stops: set[int]) -> Reply:
    """A generated row cut at its first stop token (what follows is padding)."""
    for k, token in enumerate(tokens):
        if token in stops:
            return Reply(tokenizer.decode(tokens[:k], skip_special_tokens=True), k + 1, True)
    return Reply(tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), False)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[Messages], sampling: Sampling = Sampling(),
             batch_size: int = 8) -> list[Reply]:
    """One reply per prompt, `batch_size` prompts at a time, in the prompts' order."""
    encoded = [prompt_ids(tokenizer, messages) for messages in prompts]
    stops = stop_ids(tokenizer)
    config = _generation_config(tokenizer, sampling, sorted(stops))
    pad, device = tokenizer.pad_token_id, _device(model)
    if not sampling.greedy:
        torch.manual_seed(sampling.seed)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths together: less padding
    replies: list[Reply | None] = [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        for row, i in enumerate(chunk):
            replies[i] = to_reply(tokenizer, out[row, width:].tolist(), stops)
    return replies  # type: ignore[return-value]


def _cache_argument(model) -> str:
    """The KV cache's name in forward() and its output: `cache` in newer transformers 5 releases, else `past_key_values`."""
    import inspect

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(causal_lm.forward).parameters else "past_key_values"


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> int:
    """The next token from one position's logits: argmax, or a sample after temperature, top-k and top-p."""
    if sampling.greedy:
        return int(logits.argmax())
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        ordered, index = logits.sort(descending=True)
        probs = ordered.softmax(-1)
        beyond = probs.cumsum(-1) - probs > sampling.top_p  # tokens after the nucleus is full (the first always stays)
        logits = logits.scatter(0, index, ordered.masked_fill(beyond, float("-inf")))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


@torch.no_grad()
def stream(model, tokenizer, messages: Messages, sampling: Sampling = Sampling()) -> Iterator[str]:
    """The reply as text pieces, as each token comes (a KV-cached loop, one token per forward pass).

    Stopping early (Ctrl-C, `close()`) loses nothing but the rest of the reply. A character split across
    tokens is held back until it is whole.
    """
    device = _device(model)
    inputs = torch.tensor([prompt_ids(tokenizer, messages)], device=device)
    stops = stop_ids(tokenizer)
    generator = None if sampling.greedy else torch.Generator(device).manual_seed(sampling.seed)
    cache_name, cache = _cache_argument(model), None
    tokens, shown = [], ""
    for _ in range(sampling.max_new_tokens):
        out = model(input_ids=inputs, use_cache=True, **({cache_name: cache} if cache is not None else {}))
        cache = getattr(out, cache_name)
        token = next_token(out.logits[0, -1], sampling, generator)
        if token in stops:
            break
        tokens.append(token)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd") and len(text) > len(shown):
            yield text[len(shown):]
            shown = text
        inputs = torch.tensor([[token]], device=device)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if len(text) > len(shown):
        yield text[len(shown):]
