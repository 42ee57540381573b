"""Preference row formats, detected from the data and normalised into one `PreferencePair`.

- explicit:       prompt, chosen, rejected are strings.
- conversational: chosen/rejected are lists of {role, content} messages (UltraFeedback-binarized);
                  prompt is a string, a message list, or absent (then the turns shared by chosen and
                  rejected are the prompt). Prompt turns repeated at the start of chosen/rejected are cut.
- implicit:       only chosen/rejected full transcripts (Anthropic HH): the prompt is their shared prefix
                  cut at the last turn boundary; where they differ before the last assistant turn, each
                  response holds every turn after that boundary.
- unpaired:       one completion and a label (thumbs up/down feedback, as KTO reads it): prompt and completion are
                  strings or message lists, the label true/false, 1/0/-1, good/bad, ... (`parse_label`). It becomes
                  a PreferencePair with `label` set, the completion as `chosen` and an empty `rejected`.

A row's `system` column (Intel/orca_dpo_pairs; renamed by --system-field) is its system message: the first message of
its prompt, unless the prompt holds one of its own.

An empty reply is an answer (an assistant that prefers saying nothing): it is kept and trained as the
end-of-turn token alone. Both replies empty, or identical, is an error: the pair prefers nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from infopo_cli.errors import ConfigError, DataError

FORMATS = ("auto", "explicit", "conversational", "implicit", "unpaired")
ROLES = ("system", "user", "assistant", "tool")
Message = tuple[str, str]          # (role, content): hashable, so duplicate pairs can be counted
Text = str | tuple[Message, ...]   # a plain string, or messages

HH_TURN = re.compile(r"\n\nHuman:|\n\nAssistant:")
HH_ASSISTANT = "\n\nAssistant:"


@dataclass(frozen=True)
class Fields:
    """The field names of the prompt, chosen and rejected texts in a row, of an unpaired row's completion and
    label, and of a row's system message (--prompt-field etc.; an empty system field reads no system column)."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    completion: str = "completion"
    label: str = "label"
    system: str = "system"

    def __post_init__(self) -> None:
        # a pair's three columns must differ; an unpaired row's completion and label, and the system column, only
        # where the user named them (paired data never reads them, so a prompt column called "label" is no clash)
        named = [("prompt", self.prompt), ("chosen", self.chosen), ("rejected", self.rejected)]
        named += [(role, getattr(self, role)) for role in ("completion", "label", "system")
                  if getattr(self, role) not in (role, "")]
        for i, (role, name) in enumerate(named):
            for other, same in named[i + 1:]:
                if name == same:
                    raise ConfigError(f"--{role}-field and --{other}-field both name the column '{name}': each role "
                                      "needs its own")

    def flag(self, name: str) -> str:
        """The option that names field `name`: 'chosen' -> '--chosen-field'."""
        return "--" + next(flag for flag in ("prompt", "chosen", "rejected", "completion", "label", "system")
                           if getattr(self, flag) == name) + "-field"


@dataclass(frozen=True)
class PreferencePair:
    """One normalised preference pair: a prompt and two answers, each a string or a list of chat messages.

    With `label` set it is one unpaired feedback row instead: `chosen` holds its completion, `label` says whether
    it is desirable, and `rejected` is empty ("" or ()).
    """

    prompt: Text
    chosen: Text
    rejected: Text
    where: str = field(default="", compare=False)  # FILE:LINE, for errors; not part of the pair's identity
    label: bool | None = None                       # None: a pair; True/False: an unpaired row (desirable or not)

    @property
    def unpaired(self) -> bool:
        """Whether this is one unpaired feedback row (a completion and a label), not a pair."""
        return self.label is not None


def unpaired_row(prompt: Text, completion: Text, label: bool, where: str = "") -> PreferencePair:
    """One unpaired feedback row: `rejected` is empty, of the completion's kind (a string or messages)."""
    return PreferencePair(prompt, completion, "" if isinstance(completion, str) else (), where, label)


LABELS = {**dict.fromkeys(("true", "yes", "1", "good", "up", "thumbs_up", "thumbsup", "thumbs up", "positive",
                           "desirable", "accept", "accepted", "like", "\N{THUMBS UP SIGN}"), True),
          **dict.fromkeys(("false", "no", "0", "-1", "bad", "down", "thumbs_down", "thumbsdown", "thumbs down",
                           "negative", "undesirable", "reject", "rejected", "dislike", "\N{THUMBS DOWN SIGN}"), False)}


def parse_label(value: Any, where: str, name: str) -> bool:
    """An unpaired row's label as a bool (True: desirable). Only the spellings thumbs datasets use are read (1/-1
    among them); anything else is a DataError, never a guess."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (1, 0, -1):
        return value == 1
    # the emoji variation selector is dropped: 👍️ is 👍
    key = value.strip().lower().replace("\N{VARIATION SELECTOR-16}", "") if isinstance(value, str) else None
    if key in LABELS:
        return LABELS[key]
    if key in ("1.0", "0.0", "-1.0"):  # a CSV column pandas wrote as floats (it does once the column has a gap)
        return key == "1.0"
    if isinstance(value, str):
        got = repr(value[:40] + "..." * (len(value) > 40))  # repr escapes newlines: the message stays one line
    else:
        got = str(value) if isinstance(value, (int, float)) else _kind(value)
    raise DataError(where, name, f"expected a label: true/false, 1/0/-1, good/bad, up/down (got {got})")


def detect(row: Any, fields: Fields) -> str:
    """The format of a row, from its shape."""
    if not isinstance(row, dict):
        return "explicit"
    # a row with a completion or a label and no chosen/rejected is unpaired feedback (one missing names itself then)
    if (fields.completion in row or fields.label in row) and fields.chosen not in row and fields.rejected not in row:
        return "unpaired"
    chosen = row.get(fields.chosen)
    if isinstance(chosen, list) or isinstance(row.get(fields.prompt), list):  # messages with string replies too
        return "conversational"
    if fields.prompt in row or fields.prompt != Fields.prompt or _other_text(row, fields):
        return "explicit"  # a prompt (a null one is an error), or one named or held elsewhere: missing, said so
    return "implicit"


def _other_text(row: dict, fields: Fields) -> bool:
    """Whether a row without a prompt has text besides its replies (Intel/orca_dpo_pairs' `question`), which reading
    the prompt off the replies' shared start would drop. HH transcripts hold their prompt: theirs is not looked at."""
    chosen = row.get(fields.chosen)
    if isinstance(chosen, str) and HH_TURN.search(chosen):
        return False
    return any(_is_text(value) for name, value in row.items()
               if name not in (fields.chosen, fields.rejected, fields.system) and not METADATA.fullmatch(str(name)))


# columns that describe a row rather than hold its text: an id, a CSV's index column, where it came from, the model
# that wrote a reply, scores
METADATA = re.compile(r"(?i)(unnamed: ?\d+|index|idx|id|.*_id|source|dataset|split|category|lang(uage)?|models?|"
                      r".*_model|.*score.*|.*rating.*)")
# a value that names rather than says: "alpaca_1042", "gpt-4", "en" (ASCII: a prompt in Chinese has no spaces either)
TOKEN = re.compile(r"[A-Za-z0-9_.:/\-]{1,64}")


def _is_text(value: Any) -> bool:
    """A string that says something: not blank, not one token that names a thing."""
    return isinstance(value, str) and bool(value.strip()) and not TOKEN.fullmatch(value.strip())


def row_system(row: dict, fields: Fields) -> str | None:
    """The row's system message from its system column (Intel/orca_dpo_pairs' `system`); "" where the column holds
    none (empty, null, not text, or one token: some sets name a model or an MT system there); None where the row has
    no such column, or another role reads it (--prompt-field system)."""
    name = fields.system
    if not name or name not in row or name in (fields.prompt, fields.chosen, fields.rejected, fields.completion,
                                               fields.label):
        return None
    value = row[name]
    return value if _is_text(value) else ""


def normalise(row: Any, where: str, fmt: str, fields: Fields, system: str | None = None) -> PreferencePair:
    """One row in the given format -> PreferencePair, or a DataError naming the field."""
    names = (fields.prompt, fields.completion, fields.label) if fmt == "unpaired" else \
        (fields.prompt, fields.chosen, fields.rejected)
    if not isinstance(row, dict):
        raise DataError(where, None, f"expected an object with fields {', '.join(map(repr, names))}, got {_kind(row)}")
    # the prompt is needed where the format has no other place for it, or where --prompt-field named it
    needs_prompt = fmt in ("explicit", "unpaired") or fields.prompt != Fields.prompt
    for name in names[1:] + ((fields.prompt,) if needs_prompt else ()):
        if name in row and row[name] is None and name != fields.label:  # a null label is a bad label
            raise DataError(where, name, "null")
        if name not in row:
            others = [k for k in row if k not in names]
            columns = ", ".join(repr(str(k))[1:-1] for k in list(row)[:12])  # escaped: the message stays one line
            implicit = ", or read it off the start chosen and rejected share with --format implicit" \
                if name == fields.prompt and fmt == "explicit" and fields.prompt == Fields.prompt else ""
            hint = f" (columns: {columns}; map yours with {fields.flag(name)}{implicit})" if others else ""
            raise DataError(where, name, "missing" + hint)
    own_system = row_system(row, fields)
    if fmt == "unpaired":
        pair = _unpaired(row, where, fields)
        pair = with_own_system(pair, own_system)
        return replace(with_system(pair, system) if system else pair, where=where)
    if fmt == "conversational":
        pair = _conversational(row, where, fields)
    elif fmt == "implicit":
        if row.get(fields.prompt) is not None:  # --format implicit given for rows that have their prompt apart
            raise DataError(where, fields.prompt, "present, but --format implicit reads the prompt off the start that "
                            "chosen and rejected share; use --format explicit (or auto)")
        pair = _implicit(row, where, fields)
    else:
        pair = PreferencePair(_string(row, fields.prompt, where), _string(row, fields.chosen, where, reply=True),
                              _string(row, fields.rejected, where, reply=True))
        if (transcript := _hh_prompt(pair.prompt)) is not None:  # Dahoas/full-hh-rlhf: the turns so far, then replies
            pair = PreferencePair(_hh_messages(transcript, where, fields.prompt), _hh_reply(pair.chosen),
                                  _hh_reply(pair.rejected))
    if is_empty(pair.chosen) and is_empty(pair.rejected):
        raise DataError(where, fields.chosen, "both replies are empty (the pair expresses no preference)")
    if pair.chosen == pair.rejected:
        raise DataError(where, fields.rejected, "identical to 'chosen' (the pair expresses no preference)")
    if not (fmt == "implicit" and isinstance(pair.prompt, str)):  # a continuation of shared text is no chat turn
        pair = with_own_system(pair, own_system)  # the row's own first: --system adds one only to rows without
    if system:
        pair = with_system(pair, system)
    return replace(pair, where=where)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null", str: "a string"}.get(type(value), type(value).__name__)


def is_empty(text: Text) -> bool:
    """A reply with no content (whitespace only, or messages that all are)."""
    return not text.strip() if isinstance(text, str) else all(not content.strip() for _, content in text)


def is_multi_turn(text: Text) -> bool:
    """Whether `text` is a conversation of more than one message."""
    return not isinstance(text, str) and len(text) > 1


def _string(row: dict, name: str, where: str, reply: bool = False) -> str:
    """A string field; a reply may be empty (an answer of its own), a prompt may not."""
    value = row[name]
    if not isinstance(value, str):
        raise DataError(where, name, f"expected a string, got {_kind(value)}")
    if not reply and not value.strip():
        raise DataError(where, name, "empty")
    return value


def _messages(value: Any, where: str, name: str) -> tuple[Message, ...]:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(where, name, "empty")
        return (("user", value),)
    if not isinstance(value, list):
        raise DataError(where, name, f"expected a list of messages or a string, got {_kind(value)}")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(where, name, f"message {i + 1}: expected an object with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(where, name, f"message {i + 1}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise DataError(where, name, f"message {i + 1}: content must be a string, got {_kind(content)}")
        out.append((role, content))
    return tuple(out)


def _after_prompt(prompt: tuple[Message, ...], response: tuple[Message, ...]) -> tuple[Message, ...]:
    """The response without the prompt's turns, where it repeats them at its start."""
    return response[len(prompt):] if response[:len(prompt)] == prompt else response


def _check_turns(prompt: tuple[Message, ...], replies: dict[str, tuple[Message, ...]], where: str,
                 fields: Fields, given: bool = False) -> None:
    """Each reply starts with the assistant's turn; the prompt ends with someone else's. `given`: the prompt is the
    row's own (a reply that repeats it exactly has had it cut)."""
    for name, response in replies.items():
        if not response:
            raise DataError(where, name, "has no reply after the prompt")
        if response[0][0] != "assistant":
            why = (f" ({name} starts with other turns than the {fields.prompt} field's, so they were not cut from it: "
                   "a system message, a space or a turn of difference?)") if given and len(response) > 1 else ""
            raise DataError(where, name, f"the reply after the prompt must be an assistant message, got role "
                                         f"{response[0][0]!r}{why}")
    if not prompt:
        raise DataError(where, fields.prompt, "empty")
    if prompt[-1][0] == "assistant":
        raise DataError(where, fields.prompt, "the prompt must end with a user (or tool) turn, not the assistant's")


def _unpaired(row: dict, where: str, fields: Fields) -> PreferencePair:
    """An unpaired row: explicit when prompt and completion are strings, else conversational (a string completion is
    one assistant message, a string prompt one user message). An empty completion is an answer, as for pairs."""
    label = parse_label(row[fields.label], where, fields.label)
    if isinstance(row[fields.prompt], str) and isinstance(row[fields.completion], str):
        return unpaired_row(_string(row, fields.prompt, where), row[fields.completion], label)
    prompt = _messages(row[fields.prompt], where, fields.prompt)
    value = row[fields.completion]
    completion = (("assistant", value),) if isinstance(value, str) else _messages(value, where, fields.completion)
    completion = _after_prompt(prompt, completion)
    _check_turns(prompt, {fields.completion: completion}, where, fields)
    return unpaired_row(prompt, completion, label)


def _conversational(row: dict, where: str, fields: Fields) -> PreferencePair:
    chosen = _messages(row[fields.chosen], where, fields.chosen)
    rejected = _messages(row[fields.rejected], where, fields.rejected)
    if isinstance(row[fields.chosen], str):
        chosen = (("assistant", row[fields.chosen]),)
    if isinstance(row[fields.rejected], str):
        rejected = (("assistant", row[fields.rejected]),)
    if row.get(fields.prompt) is not None:
        prompt = _messages(row[fields.prompt], where, fields.prompt)
        chosen, rejected = _after_prompt(prompt, chosen), _after_prompt(prompt, rejected)  # prompt repeated inside
    else:
        shared = 0  # the turns both share, up to (not including) each one's final reply
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not prompt:
            raise DataError(where, fields.prompt, "missing, and chosen/rejected share no prompt turns")
    _check_turns(prompt, {fields.chosen: chosen, fields.rejected: rejected}, where, fields,
                 given=row.get(fields.prompt) is not None)
    return PreferencePair(prompt, chosen, rejected)


def _implicit(row: dict, where: str, fields: Fields) -> PreferencePair:
    chosen, rejected = _string(row, fields.chosen, where), _string(row, fields.rejected, where)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    prefix = chosen[:shared]
    cut = prefix.rfind(HH_ASSISTANT)
    if cut >= 0:  # Anthropic HH: turns marked "\n\nHuman:" / "\n\nAssistant:"
        cut += len(HH_ASSISTANT)
        prompt = _hh_messages(chosen[:cut], where, fields.chosen)
        return PreferencePair(prompt, _hh_reply(chosen[cut:]), _hh_reply(rejected[cut:]))
    if HH_TURN.search(chosen) and HH_TURN.search(rejected):  # a word boundary inside a turn is no prompt
        raise DataError(where, f"{fields.chosen}/{fields.rejected}", "the transcripts differ before their first "
                        "'\\n\\nAssistant:' turn (in the human's turn): they share no prompt to prefer a reply to")
    cut = max(prefix.rfind("\n"), prefix.rfind(" "))  # no turn markers: the last line or word boundary
    if cut <= 0:
        raise DataError(where, fields.prompt, "missing, and chosen/rejected share no prompt prefix")
    return PreferencePair(chosen[:cut + 1], chosen[cut + 1:], rejected[cut + 1:])


def _hh_prompt(text: str) -> str | None:
    """A prompt that is an HH transcript up to the assistant's turn ('\\n\\nHuman: hi\\n\\nAssistant:'), with the blank
    line before its first marker; None for any other prompt (one that only mentions a turn stays text)."""
    body = text.strip()
    if not body.startswith("Human:") or not body.endswith("Assistant:"):
        return None
    return "\n\n" + body


def _hh_messages(text: str, where: str, name: str) -> tuple[Message, ...]:
    """'\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:' -> user a, assistant b, user c. Text before
    the first turn ("You are a helpful assistant.\\n\\nHuman: ...") is a system message, not dropped."""
    marks = list(HH_TURN.finditer(text))
    preamble = text[:marks[0].start()].strip() if marks else ""
    turns = [("system", preamble)] if preamble else []
    for mark, following in zip(marks, marks[1:] + [None]):
        content = text[mark.end():following.start() if following else len(text)].strip()
        role = "user" if "Human" in mark.group() else "assistant"
        if following is not None or content:
            turns.append((role, content))
    if len(turns) <= bool(preamble) or turns[bool(preamble)][0] != "user":
        raise DataError(where, name, "transcript does not start with a '\\n\\nHuman:' turn")
    return tuple(turns)


def _hh_reply(text: str) -> tuple[Message, ...]:
    """What follows the prompt's last '\n\nAssistant:': the reply (perhaps empty), then any later turns when the
    transcripts differ before their last assistant turn."""
    marks = list(HH_TURN.finditer(text))
    turns = [("assistant", text[:marks[0].start() if marks else len(text)].strip())]
    for mark, following in zip(marks, marks[1:] + [None]):
        content = text[mark.end():following.start() if following else len(text)].strip()
        turns.append(("user" if "Human" in mark.group() else "assistant", content))
    return tuple(turns)


def with_system(pair: PreferencePair, system: str) -> PreferencePair:
    """The pair with `system` as its first message, unless it has a system message of its own."""
    pair = as_turns(pair)
    return pair if pair.prompt[0][0] == "system" else replace(pair, prompt=(("system", system),) + pair.prompt)


def with_own_system(pair: PreferencePair, own: str | None) -> PreferencePair:
    """The pair with its row's system message (`row_system`). A row of a set with a system column is written as
    messages even where that row's is empty, so that a model without a chat template reads every row of the set in
    one form."""
    return pair if own is None else with_system(pair, own) if own else as_turns(pair)


def as_turns(pair: PreferencePair) -> PreferencePair:
    """A pair of strings as messages: the prompt a user turn, the replies assistant turns (an unpaired row's
    rejected stays empty: no reply, not an empty one)."""
    if not isinstance(pair.prompt, str):
        return pair
    return replace(pair, prompt=(("user", pair.prompt),), chosen=(("assistant", pair.chosen),),
                   rejected=() if pair.unpaired else (("assistant", pair.rejected),))
