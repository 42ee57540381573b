"""Errors a user can fix. Each renders as one line; the CLI prints it without a traceback.

Exit codes: 2 for anything the user's input, files or settings caused (every class here but ExportCheckFailed);
1 is left for infopo's own bugs: an unexpected exception, or an export whose check against llama.cpp failed.
"""

from __future__ import annotations


def first_line(err: BaseException, empty: str = "no reason given") -> str:
    """The first line of a library's message, for a one-line error (never the exception's class name)."""
    text = str(err).strip()
    return text.splitlines()[0].strip() if text else empty


class InfopoError(Exception):
    """Base class: `str(err)` is a single line that says what is wrong and, where possible, the fix."""

    exit_code = 2


class ConfigError(InfopoError):
    """A bad flag, preset or combination of settings."""

    exit_code = 2


class DataError(InfopoError):
    """A bad row in a preference file: names the place (`FILE:LINE` or `FILE:row N`) and the field."""

    exit_code = 2

    def __init__(self, where: str, field: str | None, problem: str) -> None:
        self.where, self.field, self.problem = where, field, problem
        super().__init__(f"{where}: field '{field}': {problem}" if field else f"{where}: {problem}")


class ModelError(InfopoError):
    """The model cannot be found, loaded or converted."""


class OutputError(InfopoError):
    """The output location is unusable (exists already, not writable, ...)."""

    exit_code = 2


class ExportError(InfopoError):
    """An export that cannot be written (an architecture, tokenizer or type the format does not take)."""


class ExportCheckFailed(ExportError):
    """The written export's answers differ from the merged model's: infopo's fault or llama.cpp's, not the user's."""

    exit_code = 1


class CheckpointError(InfopoError):
    """A checkpoint that cannot be read, or does not fit the run resuming from it."""

    exit_code = 2
