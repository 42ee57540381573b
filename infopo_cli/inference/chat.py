"""`infopo chat`: a multi-turn session on stdin, replies streamed as they come.

Each line is a user turn; the model sees the whole conversation so far. `/reset` forgets it, `/exit` (or the
end of input) ends the session; a line starting `//` is sent with one slash less (`//exit` asks about /exit). Ctrl-C during a reply ends that reply (what was shown stays in the history);
Ctrl-C while waiting for a line ends the session. Nothing here knows which model answers: `reply` is any
function from messages to text pieces (transformers or llama.cpp).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from infopo_cli.inference.generation import ContextFull, Messages, as_messages

EXIT = ("/exit", "/quit")
RESET = "/reset"
HELP = "/reset clears the conversation, /exit (or Ctrl-D) ends it, //text sends /text; Ctrl-C stops a reply"
NOT_UTF8 = "(that line is not valid UTF-8; skipped)"


def _is_utf8(text: str) -> bool:
    """False for text holding bytes that were not UTF-8 (Python's surrogateescape gives them as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class ChatSession:
    """The turns of one `infopo chat` session and its system message."""

    system: str | None = None
    history: Messages = field(default_factory=list)  # user and assistant turns, in order

    def messages(self, user: str) -> Messages:
        """What the model reads for the next reply: the system message, every earlier turn, then `user`."""
        return as_messages([*self.history, {"role": "user", "content": user}], self.system)

    def add(self, user: str, reply: str) -> None:
        """Record one exchange: the user's turn and the model's reply."""
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]

    def reset(self) -> None:
        """Forget every turn (the system message stays)."""
        self.history.clear()


def run_chat(session: ChatSession, reply: Callable[[Messages], Iterable[str]], read_line: Callable[[], str | None],
             write: Callable[[str], None], note: Callable[[str], None]) -> int:
    """Answer lines from `read_line` (None at the end of input) until /exit; returns the number of replies. A line
    that is not UTF-8 is skipped with a note."""
    replies = 0
    while True:
        try:
            line = read_line()
        except KeyboardInterrupt:  # at the prompt, not in a reply: the user wants out
            note("")
            return replies
        except UnicodeDecodeError:  # a reader that decodes strictly (input() on a terminal)
            note(NOT_UTF8)
            continue
        if line is None:
            return replies
        if not _is_utf8(line):  # a tokenizer would refuse it and end the session
            note(NOT_UTF8)
            continue
        user = line.strip()
        if not user:
            continue
        if user in EXIT:
            return replies
        if user == RESET:
            session.reset()
            note("(conversation cleared)")
            continue
        if re.fullmatch(r"/[A-Za-z]+", user):  # a mistyped command, not a message for the model
            note(f"(unknown command {user}: {HELP})")
            continue
        if user.startswith("//"):  # a message that starts with a slash, not a command
            user = user[1:]
        pieces: list[str] = []
        stream = iter(reply(session.messages(user)))
        try:
            for piece in stream:
                write(piece)
                pieces.append(piece)
        except ContextFull as full:  # the conversation outgrew the model: say so, forget this turn, go on
            note(f"(not answered, and not kept: {full}; /reset starts a new conversation)")
            continue
        except KeyboardInterrupt:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
            write("\n")
            note("(reply stopped)")
        else:
            write("\n")
        session.add(user, "".join(pieces))
        replies += 1
