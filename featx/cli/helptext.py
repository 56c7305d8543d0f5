"""What `--help` shows: text taken literally (no markup swallowed), placeholders that name the
value rather than a Python type, panels in a fixed order, one-line command summaries."""

from __future__ import annotations

import inspect
import re
import typing
from pathlib import Path
from typing import Any

from rich.markup import escape as _rich_escape
from typer.core import TyperArgument, TyperOption

from featx.settings import AUGMENTATION, DATA, NETWORK, OUTPUT, SCALE_OUT, TRAINING

__all__ = ["PANELS", "escape", "polish", "summary"]

COMMON = "Options"
PANELS = [COMMON, DATA, NETWORK, TRAINING, AUGMENTATION, OUTPUT, SCALE_OUT]
"""Help panels in their order: the common options first."""


def escape(text: str | None) -> str | None:
    """Text that the rich help renderer shows as written: `featx[ray]` stays `featx[ray]`."""
    return None if text is None else _rich_escape(text)


def summary(doc: str) -> str:
    """The first sentence of a docstring, on one line (the top-level command list)."""
    paragraph = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
    sentence = re.split(r"(?<=[.:])\s", paragraph, maxsplit=1)[0]
    return sentence.rstrip(".:,") + "."


def _placeholder(param: Any) -> str:
    """NAME, N, X, PATH, or the choices when they are few."""
    kind = param.type_descriptor
    if kind.is_choice:
        listed = "|".join(str(getattr(c, "value", c)) for c in kind.choices)
        return listed if len(listed) <= 14 else "NAME"
    base = typing.get_args(kind.annotation)[0] if kind.is_list else kind.annotation
    if base is int:
        return "N"
    if base is float:
        return "X"
    if kind.is_path or kind.is_file or base is Path:
        return "PATH"
    return (param.name or "value").upper() if isinstance(param, TyperArgument) else "TEXT"


def _list_choices(param: Any) -> None:
    """Say the choices in the help when the placeholder does not show them."""
    kind = param.type_descriptor
    help = getattr(param, "help", None) or ""
    if not kind.is_choice or "|" in (param.metavar or ""):
        return
    choices = [str(getattr(c, "value", c)) for c in kind.choices]
    if not all(c in help for c in choices):
        param.help = f"{help} One of: {', '.join(choices)}.".strip()


def _argument_usage(param: TyperArgument) -> str:
    name = param.metavar or (param.name or "").upper()
    name = name if param.required else f"[{name}]"
    return name + ("..." if param.nargs != 1 else "")


def _plain_help_option(command: Any) -> None:
    """--help is a flag: no placeholder."""
    original = command.get_help_option

    def get_help_option(ctx: Any) -> Any:
        option = original(ctx)
        if option is not None:
            option.metavar = ""
        return option

    command.get_help_option = get_help_option


def polish(command: Any) -> Any:
    """Set every parameter's placeholder, list choices, and sort the options by panel; done
    once per command object."""
    if getattr(command, "_featx_polished", False):
        return command
    _plain_help_option(command)
    if command.help:
        command.short_help = command.short_help or summary(command.help)
        command.help = escape(command.help)
    for param in command.params:
        if isinstance(param, TyperOption) and (param.is_flag or param.count):
            param.metavar = ""
        elif param.metavar is None:
            param.metavar = _placeholder(param)
        if isinstance(param, TyperArgument):
            param._usage_display_name = lambda param=param: _argument_usage(param)
            param.display_type_rich = lambda ctx: None  # the name says it
        _list_choices(param)
        if getattr(param, "help", None):
            param.help = escape(param.help)

    def rank(param: Any) -> int:
        if isinstance(param, TyperArgument):
            return -1
        panel = getattr(param, "rich_help_panel", None) or COMMON
        return PANELS.index(panel) if panel in PANELS else len(PANELS)

    command.params.sort(key=rank)
    command._featx_polished = True
    return command
