"""A command's settings options, built from TrainConfig's fields (config.py says each one's flag, help and panel once).

`@settings_options(names)` gives a typer command one option per setting named, none of them with a default: a
flag not given is left out of the `settings` dict the command receives, so it never overrides the preset.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from infopo_cli.config import cli_option, expand_home, flag
from infopo_cli.errors import ConfigError

# settings that are free text for a tokenizer (paths, names and ids may be any bytes the system allows)
TEXT_SETTINGS = ("system_prompt",)


def check_text(option: str, value: str | None) -> None:
    """A text option must be UTF-8: Python passes the bytes of one that is not as lone surrogates (surrogateescape),
    which a tokenizer refuses only once the model has loaded, with a TypeError."""
    try:
        (value or "").encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{option} is not valid UTF-8") from None


def _refuse_blank(param: typer.CallbackParam, value: Any, allow_empty: bool) -> Any:
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(item, str) and not item.strip() and not (allow_empty and item == ""):
            name = param.opts[0] if param.param_type_name == "option" else (param.metavar or str(param.name)).upper().rstrip(".")
            instead = "" if param.required else f", or omit {name} for its default"
            raise ConfigError(f"{name} {item!r} names no file or folder: give a path{instead}")
    return expand_home(value)


def named_path(param: typer.CallbackParam, value: Any) -> Any:
    """Callback of a path option or argument: '' is an error, not its default (`train --eval-data ''` means no held-out
    data, so an empty `--out` or run folder elsewhere must not quietly mean the default one); a leading `~` is expanded."""
    return _refuse_blank(param, value, allow_empty=False)


def default_or_path(param: typer.CallbackParam, value: Any) -> Any:
    """Callback of an option whose value may be left out (`export --gguf`: then the default path, so '' is that
    default too); a blank one (' ') is still an error, not a file named ' '."""
    return _refuse_blank(param, value, allow_empty=True)


def given(params: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """The settings among `params` that were given: a flag left out is None, or an empty tuple for a repeatable one
    parsed by click directly; one value of a repeatable flag is a string, several a list."""
    out = {}
    for name in names:
        value = params.get(name)
        if value is None or value == ():
            continue
        if isinstance(value, (list, tuple)):
            value = value[0] if len(value) == 1 else list(value)
        out[name] = value
    return out


def _parameter(name: str, changes: Mapping[str, Any]) -> inspect.Parameter:
    option = cli_option(name, **changes)
    # escaped: a help text is plain text (`pip install 'infopo[unsloth]'` must not lose its [unsloth] as markup)
    info = typer.Option(*option.decls, help=escape(option.help), rich_help_panel=option.panel, metavar=option.metavar,
                        show_default=False)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[option.type], info])


def settings_options(names: Iterable[str], changes: Mapping[str, Mapping[str, Any]] | None = None) -> Callable:
    """Decorate a command `def cmd(own options..., settings: dict)`: typer sees its own options, then one per setting
    in `names` (`changes[name]`: this command's own help, panel, type or metavar for it), and the command gets the
    settings given as `settings`. Own options with a help panel come after the settings' (--resume, --dry-run)."""
    names = tuple(names)
    changes = changes or {}

    def decorate(command: Callable) -> Callable:
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
               for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "settings"]
        paneled = [p for p in own if _panel(p)]
        parameters = [p for p in own if not _panel(p)] + [_parameter(n, changes.get(n, {})) for n in names] + paneled

        @functools.wraps(command)
        def wrapper(**params: Any) -> Any:
            settings = given(params, names)
            for name in TEXT_SETTINGS:
                if isinstance(settings.get(name), str):
                    check_text(flag(name), settings[name])
            return command(**{k: v for k, v in params.items() if k not in names}, settings=settings)

        wrapper.__signature__ = inspect.Signature(parameters)  # what typer reads instead of **params
        return wrapper

    return decorate


def _panel(parameter: inspect.Parameter) -> str | None:
    metadata = getattr(parameter.annotation, "__metadata__", ())
    return next((getattr(m, "rich_help_panel", None) for m in metadata if isinstance(m, typer.models.ParameterInfo)), None)
