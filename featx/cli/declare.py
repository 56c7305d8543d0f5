"""Options declared once: typer options derived from settings dataclasses (`from_settings`),
range checks, and the options several commands share (`Shared`).

`option_group` adds a list of typer options to a command and hands the command their values as
one argument, so each group is declared once. Importing this module does not import torch, so
`featx --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import math
import stat
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from featx.cli.app import fail
from featx.errors import FeatxError, UsageError, check_range
from featx.settings import (
    OUTPUT,
    Device,
    check_settings,
    device_option,
    flag_of,
    option,
    option_spec,
    resolved_maximum,
    trust_pickle_option,
    workers_option,
)

__all__ = [
    "DATA_HELP",
    "from_settings",
    "in_range",
    "option_group",
    "partial_settings",
    "plain_option",
    "regular_file",
    "Shared",
    "settings_parameters",
]

DATA_HELP = (
    "Image folder (DATA/CLASS/*.jpg or DATA/{train,validation,test}/CLASS/*.jpg) or a "
    "manifest (.csv, .tsv, .parquet with columns path, label[, split])."
)
"""The help of a DATA argument: what every image-taking command accepts."""


def in_range(
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    above: bool = False,
    below: bool = False,
) -> Callable:
    """A typer callback that stops the command, before any work, with one sentence
    (`featx: --flag must be at least N, not V.`, exit 2) when the value is out of range; the
    same rule (`featx.errors.check_range`) as the library's own checks."""

    def check(ctx: typer.Context, param: typer.CallbackParam, value: Any) -> Any:
        if ctx.resilient_parsing:
            return value
        flag = max(param.opts, key=len).lstrip("-")
        try:
            check_range(flag, value, minimum, maximum, above=above, below=below)
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"--{flag} must be a finite number, not {value}.")
        except FeatxError as error:
            raise fail(str(error), error.exit_code) from None
        return value

    return check


AT_LEAST_ONE = in_range(1)
NOT_NEGATIVE = in_range(0)
POSITIVE = in_range(0, above=True)
FRACTION = in_range(0, 1, above=True, below=True)  # strictly between 0 and 1
IMAGE_SIZE = in_range(16, 8192)
SEED = in_range(0, 2**32 - 1)


def check_n_jobs(value: int) -> int:
    """--n-jobs: a positive count or -1 (all cores), as scikit-learn reads it."""
    if value == 0 or value < -1 or value > 4096:
        raise fail(f"--n-jobs must be from 1 to 4096, or -1 for all cores, not {value}.")
    return value


def plain_option(
    name: str,
    kind: Any,
    default: Any,
    help: str,
    *decls: str,
    panel: str | None = None,
    callback: Callable | None = None,
    **shown: Any,
) -> inspect.Parameter:
    """A keyword-only typer option (`shown`: show_default, metavar)."""
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=default,
        annotation=Annotated[
            kind,
            typer.Option(*decls, help=help, rich_help_panel=panel, callback=callback, **shown),
        ],
    )


def option_group(
    target: str | None, options: list[inspect.Parameter], collect: Callable[[dict], Any]
):
    """Decorator: give a command the CLI `options`, and pass `collect(their values)` to it as
    the argument `target` (which the command declares, and typer never sees); with `target`
    None, `collect` returns a dict of keyword arguments the command declares. A FeatxError
    from `collect` stops the command before any work, in one line."""
    names = [p.name for p in options]

    def decorate(func):
        signature = inspect.signature(func, eval_str=True)
        taken = set(names) if target is None else {target}
        own = [p for p in signature.parameters.values() if p.name not in taken]

        @functools.wraps(func)
        def command(**kwargs):
            values = {name: kwargs.pop(name) for name in names}
            try:
                collected = collect(values)
            except FeatxError as error:
                raise fail(str(error), error.exit_code) from None
            if target is None:
                kwargs.update(collected)
            else:
                kwargs[target] = collected
            return func(**kwargs)

        params = own + options
        command.__signature__ = signature.replace(parameters=params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__
        return command

    return decorate


@dataclass(frozen=True)
class Shared:
    """Options several commands share, each declared once (commands take some of them with
    `from_settings(Shared, None, only=...)`)."""

    device: Device = device_option()
    workers: int | None = workers_option()
    trust_pickle: bool = trust_pickle_option()
    quiet: bool = option(False, "No progress bars or messages.", panel=OUTPUT)


# ---- options derived from a settings dataclass ---------------------------------------------
def _typer_option(
    field: dataclasses.Field,
    kind: Any,
    default: Any,
    parse: Callable[[str], Any] | None = None,
    shown: Any = None,
) -> Any:
    """Annotated[kind, typer.Option(...)] for one `featx.settings.option` field; with `parse`,
    the option reads text and `parse` turns it into the field's value; `shown` is the default
    --help names for an option whose own default is None (not given)."""
    spec = option_spec(field)
    flag = flag_of(field)
    base, optional = _without_none(kind)
    if typing.get_origin(base) in (typing.Union, types.UnionType):
        base = typing.get_args(base)[0]  # e.g. list[str] | dict: the command line gives a list
        kind = base | None if optional else base
    negatable = base is bool and default is not False
    decls = [f"--{flag}/--no-{flag}" if negatable else f"--{flag}"]
    extra: dict[str, Any] = {}
    low, high = spec.minimum, resolved_maximum(spec)
    if parse is not None:
        kind, extra["callback"] = str | None, _parsed(parse)
    elif base in (int, float) and (low is not None or high is not None):
        extra["callback"] = in_range(low, high, above=spec.above, below=spec.below)
    help = spec.help
    if spec.default_text is not None and default is None:
        help = f"{help} Default: {spec.default_text}."
    elif shown is not None and default is None:
        help = f"{help} Default: {_shown(shown)}."
    if isinstance(default, list) and default and "Default:" not in help:
        help = f"{help} Default: {', '.join(map(str, default))}."
    if (base is bool and not negatable) or default is None or isinstance(default, list):
        extra["show_default"] = False
    panel = None if spec.common else spec.panel
    option = typer.Option(*decls, help=help, rich_help_panel=panel, metavar=spec.metavar,
                          **extra)  # fmt: skip
    return Annotated[kind, option]


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, enum.Enum):
        return str(value.value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _parsed(parse: Callable[[str], Any]) -> Callable:
    """A typer callback giving `parse(text)`, or one `featx: --flag: ...` line."""

    def convert(ctx: typer.Context, param: typer.CallbackParam, value: str | None) -> Any:
        if value is None or ctx.resilient_parsing:
            return value
        flag = max(param.opts, key=len)
        try:
            return parse(value)
        except FeatxError as error:
            raise fail(f"{flag}: {error}", error.exit_code) from None
        except (OverflowError, ValueError):
            raise fail(f"{flag} cannot read {value!r}.") from None

    return convert


def _without_none(kind: Any) -> tuple[Any, bool]:
    args = typing.get_args(kind)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else kind), True
    return kind, False


def settings_parameters(
    cls: type,
    *,
    only: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    defaults: dict[str, Any] | None = None,
    required: Iterable[str] = (),
    parse: dict[str, Callable[[str], Any]] | None = None,
    shown: dict[str, Any] | None = None,
) -> list[inspect.Parameter]:
    """The typer options of a settings dataclass's `option` fields (those named in `only`,
    less `exclude`); `defaults` replaces a field's default for one command, and a `required`
    field has none there; `parse` maps a field to the function reading its command-line text
    (e.g. a size such as 4GB); `shown` maps a field whose default here is None (a flag that
    may be left out) to the value --help names as its default."""
    hints = typing.get_type_hints(cls)
    chosen = None if only is None else list(only)
    fields = {f.name: f for f in dataclasses.fields(cls) if option_spec(f) is not None}
    names = [n for n in (chosen or fields) if n not in set(exclude)]
    params = []
    for name in names:
        field = fields[name]
        if defaults and name in defaults:
            default = defaults[name]
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = field.default
        if default is dataclasses.MISSING or name in required:
            default = inspect.Parameter.empty
        annotation = _typer_option(
            field, hints[name], default, (parse or {}).get(name), (shown or {}).get(name)
        )
        params.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
            )  # fmt: skip
        )
    return params


def from_settings(
    cls: type,
    target: str | None = "settings",
    *,
    only: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    defaults: dict[str, Any] | None = None,
    required: Iterable[str] = (),
    parse: dict[str, Callable[[str], Any]] | None = None,
):
    """Decorator: give a command the options of the settings dataclass `cls`; the command gets
    `target=cls(**values)`, validated by `featx.settings.check_settings` before any work (one
    `featx:` line and exit 2 when a value is wrong). With `target` None and `only`, the
    command gets each value as its own keyword argument instead. `only`, `exclude`,
    `defaults`, `required` and `parse` as in `settings_parameters`."""
    params = settings_parameters(
        cls, only=only, exclude=exclude, defaults=defaults, required=required, parse=parse
    )  # fmt: skip

    def collect(values: dict[str, Any]) -> Any:
        if target is None:
            check_settings(partial_settings(cls, values))
            return {k: v.value if isinstance(v, enum.Enum) else v for k, v in values.items()}
        settings = cls(**values)
        check_settings(settings)
        return settings

    return option_group(target, params, collect)


def partial_settings(cls: type, values: dict[str, Any]) -> Any:
    """A settings object holding some of the fields of `cls`, for check_settings."""
    fields = [f for f in dataclasses.fields(cls) if f.name in values]
    hints = typing.get_type_hints(cls)
    spec = [(f.name, hints[f.name], dataclasses.field(default=None, metadata=f.metadata))
            for f in fields]  # fmt: skip
    return dataclasses.make_dataclass(f"{cls.__name__}Part", spec)(**values)


def regular_file(ctx: typer.Context, param: typer.CallbackParam, value: Path | None):
    """A typer callback refusing, before any work, a path that is not a regular file (a FIFO
    or a device would block or never end)."""
    if value is None or ctx.resilient_parsing:
        return value
    flag = max(param.opts, key=len)
    try:
        mode = value.stat().st_mode
    except OSError as error:
        raise fail(f"{flag} {value}: {error.strerror or error}.") from None
    if not stat.S_ISREG(mode):
        raise fail(f"{flag} {value} is not a regular file.")
    return value
