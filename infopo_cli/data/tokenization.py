"""Turn a preference pair into token ids: prompt, chosen response, rejected response.

With a chat template the response tokens are exactly the assistant turn's tokens as the template
writes them (end-of-turn included); without one, the response is followed by EOS. A conversation whose
reply tokens cannot be told apart from the prompt's is a `DataError` naming its row, never a guess.
An unpaired feedback row is its prompt and its completion, tokenised as a chosen reply is, and no rejected tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import signal
import sys
import threading
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

from infopo_cli.data.formats import PreferencePair, Text
from infopo_cli.errors import DataError, ModelError
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError

# Stands in for the reply to find where the template puts it; plain letters, so no template escapes,
# trims or splits it, and a rendering that holds it more than once (the data contains it) is refused.
SENTINEL = "INFOPOREPLYSENTINELd41f7c0e"


@dataclass(frozen=True)
class TokenizedPair:
    """A pair as token ids: the prompt once, then each response's ids (without the prompt). An unpaired row (`label`
    set) holds its completion as `chosen_ids`, and `rejected_ids` is empty."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False
    label: bool | None = None  # an unpaired row's label (True: desirable); None for a pair

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def control_token_note(tokenizer, pairs: Sequence[PreferencePair], unit: str = "pairs") -> str | None:
    """A warning when the data's text holds the tokenizer's special tokens as text (`<|im_end|>` written in a reply):
    they are read as those tokens, so a prompt can gain a turn or a reply end early. None when none does."""
    marks = [t for t in getattr(tokenizer, "all_special_tokens", []) if len(t) > 2]  # too short to mark anything: left out
    if not marks:
        return None
    pattern = re.compile("|".join(map(re.escape, sorted(marks, key=len, reverse=True))))
    found: list[PreferencePair] = []
    seen: set[str] = set()
    for pair in pairs:
        hits = {m.group() for part in (pair.prompt, pair.chosen, pair.rejected)
                for text in ([part] if isinstance(part, str) else [content for _, content in part])
                for m in pattern.finditer(text)}
        if hits:
            found.append(pair)
            seen |= hits
    if not found:
        return None
    return (f"{len(found)} {unit} hold the tokenizer's special tokens as text ({', '.join(sorted(seen)[:3])}; e.g. "
            f"{found[0].where or 'a row'}): they are read as those tokens, not as text")


def same_once_truncated(pairs: Sequence[TokenizedPair]) -> list[int]:
    """Indices of the pairs whose chosen and rejected tokens are the same (their replies differed only past the cut
    of max_length): such a pair prefers nothing, yet a loss that is not a difference of the two (InfoPO's, an SFT
    term) would still train on it."""
    return [i for i, p in enumerate(pairs) if p.label is None and p.truncated and p.chosen_ids == p.rejected_ids]


def pairs_digest(pairs: Sequence[TokenizedPair]) -> str:
    """sha256 of every pair's token ids and label, in order: what a run trains on, as a resume checks it."""
    digest = hashlib.sha256()
    for pair in pairs:
        for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
            digest.update(len(ids).to_bytes(4, "little"))  # lengths first: no two splits of the ids hash alike
            digest.update(array("q", ids).tobytes())
        digest.update(b"n" if pair.label is None else b"1" if pair.label else b"0")
    return digest.hexdigest()


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
    """Token ids of one pair, truncated; raises DataError (naming the row) if the reply cannot be located."""
    replies = {"completion": pair.chosen} if pair.unpaired else {"chosen": pair.chosen, "rejected": pair.rejected}
    if getattr(tokenizer, "chat_template", None):
        prompt_ids, reply_ids = _chat_ids(tokenizer, pair, list(replies.values()))
    else:
        prompt_ids = list(tokenizer(_plain(pair.prompt, True))["input_ids"])  # adds BOS where the tokenizer does
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        reply_ids = [[*_ids(tokenizer, _response_text(r)), *eos] for r in replies.values()]
    for name, ids in zip(replies, reply_ids):
        if not ids:  # an empty reply is its end-of-turn token; a template (or tokenizer) that writes none leaves nothing to score
            raise DataError(place_of(pair), name, "the reply is empty and the chat template writes no end-of-turn "
                                                 "token for it (and the tokenizer has no EOS)")
    chosen_ids, rejected_ids = reply_ids if len(reply_ids) == 2 else (reply_ids[0], [])
    return truncate(prompt_ids, chosen_ids, rejected_ids, max_length, max_prompt_length, label=pair.label)


def encode_pairs(tokenizer, pairs: Sequence[PreferencePair], max_length: int, max_prompt_length: int,
                 skip_invalid: bool = False) -> tuple[list[TokenizedPair], dict[int, DataError]]:
    """(encoded pairs, {index: error} of those that failed); without skip_invalid the first failure is raised."""
    encoded, failed = [], {}
    for i, pair in enumerate(pairs):
        try:
            encoded.append(encode_pair(tokenizer, pair, max_length, max_prompt_length))
        except DataError as err:
            if not skip_invalid:
                raise
            failed[i] = err
    return encoded, failed


def _chat_ids(tokenizer, pair: PreferencePair, replies: list[Text]) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, each reply's ids) of the pair's prompt followed by each of `replies`."""
    messages = _as_messages(pair.prompt, "user")
    prompt_text = _render(tokenizer, pair, messages, add_generation_prompt=True)
    fulls = [_render(tokenizer, pair, messages + _as_messages(r, "assistant")) for r in replies]
    if not all(full.startswith(prompt_text) for full in fulls):
        # The template writes the earlier turns differently once a reply follows them: the prompt is then
        # what it renders before a reply inside the whole conversation, shared by chosen and rejected.
        prompt_text = _prompt_in_conversation(tokenizer, pair, messages)
        if not all(full.startswith(prompt_text) for full in fulls):
            raise DataError(place_of(pair), None, "the chat template renders the earlier turns differently depending "
                                                "on the reply that follows them; cannot tell which tokens are the reply")
    return _ids(tokenizer, prompt_text), [_split_response(tokenizer, prompt_text, full) for full in fulls]


def _prompt_in_conversation(tokenizer, pair: PreferencePair, messages: list[dict[str, str]]) -> str:
    """Everything the template writes before an assistant reply's content, in a conversation ending with one."""
    rendered = _render(tokenizer, pair, [*messages, {"role": "assistant", "content": SENTINEL}])
    if rendered.count(SENTINEL) != 1:
        raise DataError(place_of(pair), None, "cannot find where the chat template puts the reply, so cannot tell "
                                            "which tokens are the reply")
    return rendered[:rendered.index(SENTINEL)]


def _render(tokenizer, pair: PreferencePair, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    try:
        return render_chat(tokenizer, messages, add_generation_prompt)
    except TemplateError as err:  # the template refuses this conversation (roles out of order, no system role, ...)
        hint = (" (this template may take no system message: --system-field '' reads no system column, and drop "
                "--system)") if messages[0]["role"] == "system" else ""
        raise DataError(place_of(pair), None,
                        f"{template_of(tokenizer)} rejects this conversation: {_words(err)}{hint}") from None


# --- rendering a chat template: a template is code from the model folder, run in jinja2's sandbox and on a clock ---

RENDER_LIMIT_S = 5.0  # one conversation; a real chat template renders one in milliseconds
_TEMPLATE_FILE = "<template>"  # the file name jinja2 compiles a template from a string under (transformers' way)


class _RenderTimeout(BaseException):
    """Raised inside a rendering that ran past its time: a BaseException, so that no `except Exception` in a library
    between the interruption and `render_chat` can swallow it."""


def template_of(tokenizer) -> str:
    """Whose chat template it is, for messages: the model or tokenizer folder it was read from."""
    source = getattr(tokenizer, "name_or_path", "") or ""
    return f"the chat template of {source}" if source else "the chat template"


def _words(err: BaseException) -> str:
    return " ".join(str(err).split()) or "no reason given"


def _timer_free() -> bool:
    return (hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
            and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0))


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Stop the block with _RenderTimeout once `seconds` have passed.

    jinja2 compiles a template to Python, so a runaway template spins in Python code, where a signal handler runs
    between two bytecodes: in the main thread (where infopo tokenizes) a one-shot SIGALRM timer interrupts it, at
    no cost while rendering and with nothing left running afterwards. Elsewhere (another thread, a timer already
    in use, Windows) a trace function on the template's own compiled code checks the clock at each of its lines.
    No thread is started either way, so a template that never ends stops burning a CPU when its error is reported.
    """
    if _timer_free():
        def expire(signum: int, frame: FrameType | None) -> None:
            raise _RenderTimeout

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        return
    deadline = time.monotonic() + seconds

    def on_line(frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise _RenderTimeout
        return on_line

    def on_call(frame: FrameType, event: str, arg: Any) -> Any:
        return on_line if frame.f_code.co_filename == _TEMPLATE_FILE else None

    previous_trace = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(previous_trace)


def render_chat(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The tokenizer's chat template applied to `messages`, as text, within RENDER_LIMIT_S. A fault of the template
    itself (it does not parse, breaks the sandbox's rules, fails, or does not finish) is a ModelError naming the
    template; a refusal of these messages (its raise_exception, an undefined field) is the jinja2 TemplateError,
    for the caller to name the row or the messages."""
    template = template_of(tokenizer)
    try:
        with _time_limit(RENDER_LIMIT_S):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except _RenderTimeout:
        raise ModelError(f"{template} did not finish rendering one conversation within {RENDER_LIMIT_S:g} s (a loop "
                         "that does not end?); fix or replace the template") from None
    except TemplateSyntaxError as err:
        raise ModelError(f"{template} does not parse: {_words(err)} (line {err.lineno}); fix tokenizer_config.json / "
                         "chat_template.jinja") from None
    except SecurityError as err:
        raise ModelError(f"{template} tries what jinja2's sandbox forbids ({_words(err)}); infopo renders chat "
                         "templates only in the sandbox") from None
    except RecursionError:
        raise ModelError(f"{template} calls itself without end") from None
    except (TypeError, ValueError, ArithmeticError, LookupError, AttributeError) as err:  # raised by its own code
        raise ModelError(f"{template} fails: {_words(err)}") from None


def place_of(pair: PreferencePair) -> str:
    """Where the pair was read from, for an error message."""
    return pair.where or "a preference pair"


def _response_text(response: Text) -> str:
    if isinstance(response, str):
        return response
    text = _plain(response, False).removeprefix("\n\nAssistant: ")
    return " " + text if text else ""  # an empty reply is EOS alone


def truncate(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int,
             max_prompt_length: int, label: bool | None = None) -> TokenizedPair:
    """Keep the end of the prompt (the question) and the start of each response; `label` is kept as it is."""
    if len(prompt) + max(len(chosen), len(rejected)) <= max_length:
        return TokenizedPair(prompt, chosen, rejected, label=label)
    if len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:]
    room = max_length - len(prompt)
    return TokenizedPair(prompt, chosen[:room], rejected[:room], truncated=True, label=label)


def auto_max_length(lengths: Sequence[int], keep: float = 0.99) -> int:
    """The shortest max_length that keeps `keep` of the pairs (prompt + longer response) whole."""
    ordered = sorted(lengths)
    return ordered[max(0, math.ceil(keep * len(ordered)) - 1)]
