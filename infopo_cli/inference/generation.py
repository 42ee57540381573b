"""Replies from a transformers model: batched (left padding) for evaluation, streamed token by token for chat.

Prompts are rendered by the tokenizer's chat template with the generation prompt; without a template a
single user turn is its plain text with the tokenizer's special tokens (BOS), and a conversation is written
in the Human:/Assistant: style, as training renders such data. A reply ends at EOS or an end-of-turn token
(`stop_ids`) or after `max_new_tokens`. Greedy by default; `temperature` > 0 samples.

Both go through one KV-cached loop (`decode`) in which a row leaves the batch at its stop token, so a batch
of replies costs the tokens they have, not its longest reply times its size. Left padding with the attention
mask and mask-derived positions leaves every greedy answer as it is one prompt at a time: padding is never read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import torch

from infopo_cli.model import attention
from infopo_cli.errors import ConfigError
from infopo_cli.data.tokenization import _plain, render_chat, template_of
from jinja2.exceptions import TemplateError
import inspect

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Sampling:
    """How replies are generated: length limit, temperature (0: greedy), top-p, top-k and seed."""

    max_new_tokens: int = 256
    temperature: float = 0.0   # 0: greedy (the same reply every time)
    top_p: float = 1.0         # 1: off
    top_k: int = 0             # 0: off
    seed: int = 0              # for sampling

    def check(self) -> Sampling:
        """Itself, or a ConfigError naming every setting out of range."""
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        if not 0 <= self.temperature < math.inf:  # inf would be uniform noise over the vocabulary
            problems.append(f"--temperature must be 0 (greedy) or a finite number above it (got {self.temperature})")
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
    """One generated reply, how many tokens it took, and whether it stopped by itself."""

    text: str
    new_tokens: int   # tokens generated, the stop token included
    stopped: bool     # ended with EOS or end-of-turn (not cut at max_new_tokens)


def stop_ids(tokenizer) -> set[int]:
    """The token ids that end a reply: EOS and the chat templates' end-of-turn markers this tokenizer knows."""
    ids = {tokenizer.eos_token_id}
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return ids - {None}


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

    if len(messages) == 1 and messages[0]["role"] == "user":
        text = messages[0]["content"]
    else:
        text = _plain(tuple((m["role"], m["content"]) for m in messages), True)
    return list(tokenizer(text)["input_ids"])  # with BOS where the tokenizer adds one


def _render(tokenizer, messages: Messages) -> str:
    try:
        return render_chat(tokenizer, messages, add_generation_prompt=True)
    except TemplateError as err:  # e.g. a template without a system role, given --system
        hint = " (this template may take no system message: drop --system)" if messages[0]["role"] == "system" else ""
        raise ConfigError(f"{template_of(tokenizer)} rejects these messages: {' '.join(str(err).split())}{hint}") from None


def _device(model) -> torch.device:
    return next(model.parameters()).device


def to_reply(tokenizer, tokens: list[int], stopped: bool) -> Reply:
    """A row's generated tokens (its stop token last when `stopped`) as a reply."""
    text = tokenizer.decode(tokens[:-1] if stopped else tokens, skip_special_tokens=True)
    return Reply(text, len(tokens), stopped)


def context_of(model) -> int | None:
    """The most positions the model was built for (prompt and reply together), or None where its config does not say."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class ContextFull(ConfigError):
    """A prompt that leaves the model no position for a reply (chat says so and goes on: /reset starts over)."""


def budget_note(context: int | None, max_new_tokens: int, option: str = "--max-new-tokens") -> str | None:
    """What to tell the user of a reply budget at or past the model's whole `context` (None when it fits or is not
    known): replies end at the context's end, as `decode` stops them, not where the budget says."""
    if context is None or max_new_tokens < context:
        return None
    return (f"{option} {max_new_tokens} is past the model's context of {context} tokens (the prompt and the reply "
            "together): each reply ends where its prompt and reply fill it")


def _takes(model, argument: str) -> bool:
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return argument in inspect.signature(causal_lm.forward).parameters


@torch.no_grad()
def decode(model, ids: torch.Tensor, mask: torch.Tensor, sampling: Sampling, stops: set[int],
           generator: torch.Generator | None = None, any_going: Callable[[bool], bool] = bool
           ) -> Iterator[tuple[list[int], list[int]]]:
    """A KV-cached loop over a left-padded batch: per step, the rows still going and the token each chose.

    A row leaves the batch (and the KV cache) at its stop token, so a batch costs the tokens its replies
    have rather than its longest reply times its size; where a model's cache cannot drop rows, finished
    rows ride along unseen. Positions count only real tokens, as transformers derives them from the mask.
    `any_going(going)`: whether to go on, given whether any row here does (processes whose passes must match, a
    sharded run's, decode until all of theirs are done: rows that stopped ride along unseen).
    """
    cache_name = "cache" if _takes(model, "cache") else "past_key_values"  # the name changed within transformers 5
    last_only = {"logits_to_keep": 1} if _takes(model, "logits_to_keep") else {}  # no logits for prompt tokens
    stop = torch.tensor(sorted(stops), device=ids.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    rows = list(range(ids.shape[0]))      # the caller's row at each batch position
    going = torch.ones(len(rows), dtype=torch.bool, device=ids.device)
    cache, inputs, prune = None, ids, True
    # each row's positions left in the model's context: a row stops there (cut, as at max_new_tokens), never runs on
    # past the positions the model knows (garbage with rotary positions, an index error with learned ones)
    context = context_of(model)
    left = None if context is None else context - mask.sum(-1)
    if left is not None and (left < 1).any():
        raise ContextFull(f"a prompt of {context - int(left.min())} tokens fills the model's context of {context} tokens: "
                          "no room for a reply")
    # as many steps as the budget on every process (a sharded run's passes must match); `going` ends a row
    for step in range(1, sampling.max_new_tokens + 1):
        with attention.float32_scores():  # argmaxes flip on 16-bit attention scores (model/attention.py)
            out = model(input_ids=inputs, attention_mask=mask, position_ids=positions, use_cache=True,
                        **({cache_name: cache} if cache is not None else {}), **last_only)
        cache, logits = getattr(out, cache_name), out.logits[:, -1]
        tokens = logits.argmax(-1) if sampling.greedy else \
            torch.tensor([next_token(row, sampling, generator) for row in logits], device=ids.device)
        live = going.nonzero().squeeze(1).tolist()
        yield [rows[i] for i in live], tokens[live].tolist()
        going &= ~torch.isin(tokens, stop)
        if left is not None:
            going &= left > step
        if not any_going(bool(going.any())):
            return
        if prune and going.any() and not going.all():
            keep = going.nonzero().squeeze(1)
            try:
                cache.batch_select_indices(keep)
            except (AttributeError, NotImplementedError, TypeError):  # e.g. a recurrent layer's state
                prune = False
            else:
                rows = [rows[i] for i in keep.tolist()]
                tokens, mask, positions, going = tokens[keep], mask[keep], positions[keep], going[keep]
                left = left[keep] if left is not None else None
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
        positions = positions[:, -1:] + 1
        if context is not None:  # a row that ended rides along unseen where rows cannot leave: kept inside the model
            positions = positions.clamp(max=context - 1)
        inputs = tokens[:, None]


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


def _generator(sampling: Sampling, device: torch.device) -> torch.Generator | None:
    return None if sampling.greedy else torch.Generator(device).manual_seed(sampling.seed)


@overload
def generate(model, tokenizer, prompts: Sequence[Messages], sampling: Sampling = ..., batch_size: int = ...) -> list[Reply]:
    ...


@overload
def generate(model, tokenizer, prompts: Sequence[Messages], sampling: Sampling, batch_size: int,
             should_stop: Callable[[], bool], any_going: Callable[[bool], bool] = ...) -> list[Reply] | None:
    ...


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[Messages], sampling: Sampling = Sampling(),
             batch_size: int = 8, should_stop: Callable[[], bool] = lambda: False,
             any_going: Callable[[bool], bool] = bool) -> list[Reply] | None:
    """One reply per prompt, `batch_size` prompts at a time, in the prompts' order; None when `should_stop()` turns
    true between batches (a training run's stop request: it should not wait for hundreds of replies). `any_going`:
    as `decode` takes it."""
    encoded = [prompt_ids(tokenizer, messages) for messages in prompts]
    context = context_of(model)
    if context is not None and (full := next((i for i, ids in enumerate(encoded) if len(ids) >= context), None)) is not None:
        raise ContextFull(f"prompt {full + 1} of {len(encoded)} has {len(encoded[full])} tokens: it fills the model's "
                          f"context of {context} tokens, no room for a reply")
    stops = stop_ids(tokenizer)
    pad, device = tokenizer.pad_token_id, _device(model)
    generator = _generator(sampling, device)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths together: less padding
    replies: list[Reply | None] = [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        if should_stop():
            return None
        chunk = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        made: list[list[int]] = [[] for _ in chunk]
        for rows, tokens in decode(model, ids.to(device), mask.to(device), sampling, stops, generator, any_going):
            for row, token in zip(rows, tokens):
                made[row].append(token)
        for row, i in enumerate(chunk):
            replies[i] = to_reply(tokenizer, made[row], bool(made[row]) and made[row][-1] in stops)
    return replies  # type: ignore[return-value]


@torch.no_grad()
def stream(model, tokenizer, messages: Messages, sampling: Sampling = Sampling()) -> Iterator[str]:
    """The reply as text pieces, as each token comes (`decode` on a batch of one).

    Stopping early (Ctrl-C, `close()`) loses nothing but the rest of the reply. A character split across
    tokens is held back until it is whole.
    """
    device = _device(model)
    ids = torch.tensor([prompt_ids(tokenizer, messages)], device=device)
    stops = stop_ids(tokenizer)
    tokens, shown = [], ""
    for _, (token,) in decode(model, ids, torch.ones_like(ids), sampling, stops, _generator(sampling, device)):
        if token in stops:
            break
        tokens.append(token)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd") and len(text) > len(shown):
            yield text[len(shown):]
            shown = text
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if len(text) > len(shown):
        yield text[len(shown):]
