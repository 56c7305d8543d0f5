"""The engine registry: every engine that can run a layer tap is one `EngineEntry` (its name,
builder, cache probe, availability probe and help), registered with `register_engine`.

`build_engine` builds the requested engine for a tap; an engine that cannot take the model
here falls back to eager and says why in `Engine.fallback_reason`, except for int8, which has
no eager fallback (eager would silently compute other features than the int8 a store records).
`EngineChoice` lists what `--engine` accepts: `auto` and every registered engine.

This module imports neither torch nor an engine's libraries: builders import them when called.
"""

from __future__ import annotations

import enum
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from featx.errors import UsageError
from featx.runtime import INFERENCE_PRECISIONS, PRECISIONS, check_precision

if TYPE_CHECKING:
    import torch
    from torch import nn

    from featx.inference.engine import Calibration, Engine

__all__ = [
    "ENGINES",
    "EngineChoice",
    "EngineEntry",
    "build_engine",
    "engine_help",
    "is_cached",
    "register_engine",
]

# builder(tap, device, precision, example, key, calibration, **options) -> Engine; `example`
# is one full batch, `key` names the cached conversion (None: no cache), `calibration` int8's
# images; `options` are engine-specific settings a builder may ignore.
Builder = Callable[..., "Engine"]


@dataclass(frozen=True)
class EngineEntry:
    """One engine: how to build it and what `auto` and `--help` need to know about it."""

    name: str
    build: Builder
    help: str
    is_cached: Callable[[str], bool] = lambda key: False  # its conversion for `key` is on disk
    available: Callable[[], bool] = lambda: True  # its libraries are installed
    precisions: tuple[str, ...] = PRECISIONS  # what it computes in (int8 has no fallback)
    devices: tuple[str, ...] = ("cpu", "cuda", "mps")  # where `auto` may measure it
    # seconds its set-up is guessed to take before it was ever measured on this machine
    # (`featx.inference.auto.setup_expected`): how long a run must be for `auto` to try it
    setup_guess: float = 5.0


ENGINES: dict[str, EngineEntry] = {}


class EngineChoice(enum.StrEnum):
    """What `--engine` accepts: auto, then every registered engine."""

    auto = "auto"


def _add_choice(name: str) -> None:
    """Make `name` a member of EngineChoice (an engine registered after import)."""
    if name in EngineChoice.__members__:
        return
    member = str.__new__(EngineChoice, name)
    member._name_ = member._value_ = name
    EngineChoice._member_map_[name] = member
    EngineChoice._value2member_map_[name] = member
    EngineChoice._member_names_.append(name)


def register_engine(
    name: str,
    *,
    help: str,
    is_cached: Callable[[str], bool] | None = None,
    available: Callable[[], bool] | None = None,
    precisions: tuple[str, ...] = PRECISIONS,
    devices: tuple[str, ...] = ("cpu", "cuda", "mps"),
    setup_guess: float = 5.0,
) -> Callable[[Builder], Builder]:
    """Decorator: register `builder` as the engine `name` (see `Builder` for its call; the
    rest are `EngineEntry`'s fields)."""

    def register(builder: Builder) -> Builder:
        if name == "auto":
            raise ValueError("auto is not an engine name: it chooses among the engines")
        ENGINES[name] = EngineEntry(
            name,
            builder,
            help,
            is_cached or (lambda key: False),
            available or (lambda: True),
            tuple(precisions),
            tuple(devices),
            setup_guess,
        )
        _add_choice(name)
        return builder

    return register


def engine_help() -> str:
    """`--engine`'s help: auto, then each engine's own line."""
    lines = ["What runs the network: auto (the fastest measured on this machine, set-up counted)"]
    lines += [f"{entry.name} ({entry.help})" for entry in ENGINES.values()]
    return ", ".join(lines) + "."


def is_cached(engine: str, key: str) -> bool:
    """Whether `engine`'s conversion for `key` is already on disk."""
    entry = ENGINES.get(engine)
    return entry is not None and entry.is_cached(key)


def _installed(module: str) -> Callable[[], bool]:
    return lambda: importlib.util.find_spec(module) is not None


# ---- the built-in engines --------------------------------------------------------------------
@register_engine("eager", help="PyTorch as it is", setup_guess=0.0)
def _eager(tap, device, precision, example, key=None, calibration=None, **options):
    from featx.inference.torch_engines import eager_engine

    return eager_engine(tap, device, precision)


@register_engine(
    "compile",
    help="torch.compile",
    # inductor's own cache did not shorten a second compile in a fresh process: not counted
    available=_installed("torch._inductor"),
    devices=("cpu", "cuda"),
    setup_guess=30.0,
)
def _compile(tap, device, precision, example, key=None, calibration=None, **options):
    from featx.inference.torch_engines import compile_engine

    return compile_engine(tap, device, precision, example, options.get("compile_mode", "default"))


def _openvino_cached(key: str) -> bool:
    from featx.inference.openvino_engine import is_converted

    return is_converted(key)


@register_engine(
    "openvino",
    help="OpenVINO on the CPU",
    is_cached=_openvino_cached,
    available=_installed("openvino"),
    precisions=INFERENCE_PRECISIONS,
    devices=("cpu",),
    setup_guess=3.0,
)
def _openvino(tap, device, precision, example, key=None, calibration=None, **options):
    from featx.inference.openvino_engine import openvino_engine

    if device.type != "cpu":
        raise ValueError(f"the openvino engine runs on the CPU, not {device.type}")
    hint, streams = options.get("ov_hint", "THROUGHPUT"), options.get("ov_streams")
    threads = options.get("ov_threads")
    return openvino_engine(tap, precision, example, key, hint, streams, calibration, threads)


# ---- building ---------------------------------------------------------------------------------
def build_engine(
    tap: nn.Module,
    engine: str,
    device: torch.device,
    precision: str,
    example: torch.Tensor,
    key: str | None = None,
    *,
    calibration: Calibration | None = None,
    **options: Any,
) -> Engine:
    """The requested engine for `tap`, or eager with `fallback_reason` set when that engine
    cannot take this model here. `example` is one full batch (its size fixes compile's batch);
    `key` (see `cache_key`) names the cached conversion, None disables the cache. `options` go
    to the engine's builder (compile_mode; ov_hint, ov_streams, ov_threads).

    int8 needs an engine that computes it and `calibration` (unless `key`'s int8 model is
    cached); it never falls back: a failure is a UsageError that says why."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}")
    check_precision(device, precision, engine)
    entry = ENGINES[engine]
    if precision == "int8":
        return _int8_engine(entry, tap, device, example, key, calibration, options)
    if engine == "eager":
        return entry.build(tap, device, precision, example, key, **options)
    try:
        return entry.build(tap, device, precision, example, key, **options)
    except Exception as error:  # ImportError, conversion or compilation errors
        from featx.inference.engine import one_line

        fallback = ENGINES["eager"].build(tap, device, precision, example, key)
        why = (
            f"{error.name or engine} is not installed"
            if isinstance(error, ImportError)
            else one_line(error)
        )
        fallback.fallback_reason = f"{engine} unavailable ({why})"
        return fallback


def _int8_engine(entry: EngineEntry, tap, device, example, key, calibration, options) -> Engine:
    from featx.inference.engine import one_line

    if "int8" not in entry.precisions:
        raise UsageError(f"--precision int8 does not run on the {entry.name} engine.")
    if calibration is None and not entry.is_cached(key or ""):
        raise UsageError(
            "the int8 model of these layers is not in this machine's engine cache and there are "
            "no calibration images here; run featx extract --precision int8 on this machine "
            "first (it calibrates on the dataset)."
        )
    try:
        return entry.build(tap, device, "int8", example, key, calibration, **options)
    except ImportError as error:
        raise UsageError(
            f"--precision int8 needs {error.name or 'openvino'} (OpenVINO and NNCF); "
            'pip install "featx[int8]".'
        ) from None
    except Exception as error:  # conversion or quantization errors
        raise UsageError(
            f"the {entry.name} engine could not quantize this model to int8 ({one_line(error)})."
        ) from None
