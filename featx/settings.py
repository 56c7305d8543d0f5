"""Typed settings: each option of a command declared once, as a dataclass field.

A settings class is a dataclass whose fields are made with `option(...)`: the default, the help
text, the range and the help panel of one value. The command line derives its options from the
fields (`featx.cli`), the library functions take the settings object, and `check_settings`
validates every value once, wherever the object came from::

    @dataclass(frozen=True)
    class PredictSettings:
        top_k: int = option(3, "Best classes listed per image.", minimum=1, maximum=1000)
        engine: Engine = option(Engine.auto, "What runs the network.", common=True)

Choices are a `str` Enum subclass or a `typing.Literal`; the command line lists and completes
them. This module imports neither torch nor typer.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import types
import typing
from collections.abc import Callable
from typing import Any

from featx.errors import UsageError, check_range

__all__ = [
    "AUGMENTATION",
    "DATA",
    "Device",
    "INT64_MAX",
    "NETWORK",
    "OUTPUT",
    "SCALE_OUT",
    "TRAINING",
    "batch_size_option",
    "device_option",
    "seed_option",
    "trust_pickle_option",
    "workers_option",
    "OptionSpec",
    "check_settings",
    "choices_of",
    "flag_of",
    "machine_workers",
    "option",
    "option_spec",
    "resolved_maximum",
]

INT64_MAX = 2**63 - 1
"""The implicit upper bound of every whole-number option: numpy and torch overflow above it."""

_KEY = "featx.option"

# The help panels, in the order `--help` lists them (after the common options).
DATA = "Data"
NETWORK = "Network"
TRAINING = "Training"
AUGMENTATION = "Augmentation"
OUTPUT = "Output"
SCALE_OUT = "Scaling out"


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """What `option` records on a field, besides its default."""

    help: str
    flag: str | None = None
    panel: str = "Options"
    minimum: float | None = None
    maximum: float | Callable[[], float] | None = None
    above: bool = False
    below: bool = False
    common: bool = False
    metavar: str | None = None
    default_text: str | None = None


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    panel: str = "Options",
    minimum: float | None = None,
    maximum: float | Callable[[], float] | None = None,
    above: bool = False,
    below: bool = False,
    common: bool = False,
    metavar: str | None = None,
    default_text: str | None = None,
) -> Any:
    """A dataclass field for one option.

    `flag` is the option's name on the command line without dashes (default: the field name
    with `-` for `_`); `minimum`/`maximum` bound a number (or each number of a list), strictly
    with `above`/`below`; `maximum` may be a zero-argument callable giving a bound derived from
    the machine (see `machine_workers`). `common=True` options are listed first in `--help`,
    the others in their `panel`. `default_text` is what `--help` shows as the default when the
    default is None and means something (e.g. "half the cores, at most 4").
    """
    spec = OptionSpec(
        help=help,
        flag=flag.lstrip("-") if flag else None,
        panel=panel,
        minimum=minimum,
        maximum=maximum,
        above=above,
        below=below,
        common=common,
        metavar=metavar,
        default_text=default_text,
    )
    metadata = {_KEY: spec}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def option_spec(field: dataclasses.Field) -> OptionSpec | None:
    """The OptionSpec of a field made with `option`, else None."""
    return field.metadata.get(_KEY)


def flag_of(field: dataclasses.Field) -> str:
    """The option's name on the command line, without dashes (`batch-size`)."""
    spec = option_spec(field)
    if spec is not None and spec.flag:
        return spec.flag
    return field.name.replace("_", "-")


def resolved_maximum(spec: OptionSpec) -> float | None:
    """The upper bound, calling it when it derives from the machine."""
    return spec.maximum() if callable(spec.maximum) else spec.maximum


def machine_workers() -> int:
    """The most worker processes featx starts: four per CPU core this process may use."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return 4 * max(cores, 1)


class Device(str, enum.Enum):
    """Where the network runs."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


# ---- options that several commands share: each declared here once ---------------------------
def device_option() -> Any:
    return option(
        Device.auto, "Where the network runs (auto: a GPU if there is one).", panel=NETWORK
    )


def workers_option(default: int | None = None) -> Any:
    """--workers; None means featx's choice (`featx.runtime.default_workers`)."""
    return option(
        default,
        "Decoding processes (0: decode in this process).",
        panel=DATA,
        minimum=0,
        maximum=machine_workers,
        default_text="half the cores, at most 4" if default is None else None,
    )


def batch_size_option(help: str = "Images per forward pass.", default: int | None = None) -> Any:
    """--batch-size; None means featx's choice from the memory the activations need."""
    return option(
        default,
        help,
        panel=NETWORK,
        minimum=1,
        maximum=65536,
        default_text="chosen by memory (4-16 on the CPU, 32 on a GPU)" if default is None else None,
    )


def trust_pickle_option() -> Any:
    return option(
        False,
        "Also load a pickle-based model file from an older featx; unpickling runs code stored "
        "in the file: only for files you trust.",
        panel=DATA,
    )


def seed_option(help: str = "Seed of everything random.") -> Any:
    return option(0, help, minimum=0, maximum=2**32 - 1)


def check_settings(settings: Any) -> None:
    """Validate every `option` field of a settings dataclass: choices (Enum or Literal), whole
    numbers where the type says int, finite numbers, and ranges. Raises UsageError naming the
    flag (`--batch-size must be at least 1, not 0.`)."""
    if not dataclasses.is_dataclass(settings) or isinstance(settings, type):
        raise TypeError(f"check_settings needs a settings dataclass, not {settings!r}")
    hints = typing.get_type_hints(type(settings))
    for field in dataclasses.fields(settings):
        spec = option_spec(field)
        if spec is None:
            continue
        _check_value(flag_of(field), getattr(settings, field.name), hints[field.name], spec)


def _split_optional(kind: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    origin = typing.get_origin(kind)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        optional = len(args) < len(typing.get_args(kind))
        return (args[0] if len(args) == 1 else kind), optional
    return kind, kind is type(None) or kind is Any


def choices_of(kind: Any) -> list[Any] | None:
    """The allowed values of an Enum or Literal type, else None."""
    kind, _ = _split_optional(kind)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return [member.value for member in kind]
    if typing.get_origin(kind) is typing.Literal:
        return list(typing.get_args(kind))
    return None


def _check_value(flag: str, value: Any, kind: Any, spec: OptionSpec) -> None:
    kind, optional = _split_optional(kind)
    if value is None:
        if optional:
            return
        raise UsageError(f"--{flag} needs a value.")
    origin = typing.get_origin(kind)
    if origin in (list, tuple, set, frozenset):
        args = [a for a in typing.get_args(kind) if a is not Ellipsis] or [Any]
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, set, frozenset)):
            raise UsageError(f"--{flag} must be a list, not {value!r}.")
        for item in value:
            _check_value(flag, item, args[0], spec)
        return
    choices = choices_of(kind)
    if choices is not None:
        given = value.value if isinstance(value, enum.Enum) else value
        if given not in choices:
            listed = ", ".join(str(c) for c in choices)
            raise UsageError(f"--{flag} must be one of {listed}, not {given!r}.")
        return
    if kind is bool:
        if not isinstance(value, bool):
            raise UsageError(f"--{flag} must be true or false, not {value!r}.")
        return
    if kind is int or kind is float:
        _check_number(flag, value, kind, spec)
    elif spec.minimum is not None or spec.maximum is not None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            _check_number(flag, value, float, spec)


def _check_number(flag: str, value: Any, kind: type, spec: OptionSpec) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"--{flag} must be a number, not {value!r}.")
    if kind is int and not isinstance(value, int):
        raise UsageError(f"--{flag} must be a whole number, not {value!r}.")
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"--{flag} must be a finite number, not {value}.")
    maximum = resolved_maximum(spec)
    if isinstance(value, int) and abs(value) > INT64_MAX:
        # past what numpy and torch hold, and too long for check_range's number format
        if value > 0:
            bound = INT64_MAX if maximum is None else maximum
            raise UsageError(f"--{flag} must be at most {_number(bound)}, not {value}.")
        bound = -INT64_MAX if spec.minimum is None else spec.minimum
        raise UsageError(f"--{flag} must be at least {_number(bound)}, not {value}.")
    check_range(flag, value, spec.minimum, maximum, above=spec.above, below=spec.below)


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"
