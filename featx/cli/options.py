"""Option groups shared by several `featx` commands: augmentation settings, and the network
and data options of `finetune` and `lr-find`.

`option_group` adds a list of typer options to a command and hands the command their values as
one argument, so each group is declared once. Importing this module does not import torch, so
`featx --help` stays fast.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from featx.errors import FeatxError, check_range

__all__ = ["AugmentFlags", "in_range", "option_group"]


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
        except FeatxError as error:
            typer.echo(f"featx: {error}", err=True)
            raise typer.Exit(error.exit_code) from None
        return value

    return check


AT_LEAST_ONE = in_range(1)
NOT_NEGATIVE = in_range(0)
POSITIVE = in_range(0, above=True)
FRACTION = in_range(0, 1, above=True, below=True)  # strictly between 0 and 1
IMAGE_SIZE = in_range(16)


def check_n_jobs(value: int) -> int:
    """--n-jobs: a positive count or -1 (all cores), as scikit-learn reads it."""
    if value == 0 or value < -1:
        typer.echo(
            f"featx: --n-jobs must be at least 1, or -1 for all cores, not {value}.", err=True
        )
        raise typer.Exit(2)
    return value


def _option(
    name: str,
    kind: Any,
    default: Any,
    help: str,
    *decls: str,
    panel: str | None = None,
    callback: Callable | None = None,
) -> inspect.Parameter:
    """A keyword-only typer option."""
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=default,
        annotation=Annotated[
            kind, typer.Option(*decls, help=help, rich_help_panel=panel, callback=callback)
        ],
    )


def option_group(target: str, options: list[inspect.Parameter], collect: Callable[[dict], Any]):
    """Decorator: give a command the CLI `options`, and pass `collect(their values)` to it as
    the argument `target` (which the command declares, and typer never sees)."""
    names = [p.name for p in options]

    def decorate(func):
        signature = inspect.signature(func, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != target]

        @functools.wraps(func)
        def command(**kwargs):
            values = {name: kwargs.pop(name) for name in names}
            kwargs[target] = collect(values)
            return func(**kwargs)

        params = own + options
        command.__signature__ = signature.replace(parameters=params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__
        return command

    return decorate


# AugmentConfig's defaults, for the help text (featx.data.augment imports torch; --help should not).
AUGMENT_DEFAULTS = {
    "rotation": 40.0,
    "shift": 0.2,
    "shear": 0.2,
    "zoom": 0.2,
    "hflip": True,
    "vflip": False,
    "crop": 0.0,
    "contrast": 0.0,
    "brightness": 0.0,
    "noise": 0.0,
    "downsample": 0.0,
    "fill": "nearest",
    "fill_value": 0,
}
_AUG = "Augmentation (a file and/or flags; flags override the file)"
_D = AUGMENT_DEFAULTS
AUGMENT_OPTIONS = [
    _option(
        "augment_config",
        Path | None,
        None,
        "TOML, JSON or YAML file of augmentation settings (keys as the flags below).",
        panel=_AUG,
    ),
    _option(
        "rotation",
        float | None,
        None,
        f"Rotation range in degrees, uniform in [-R, R] (default {_D['rotation']:g}).",
        panel=_AUG,
    ),
    _option(
        "shift",
        float | None,
        None,
        "Horizontal and vertical shift range, as fractions of width and height "
        f"(default {_D['shift']:g}).",
        panel=_AUG,
    ),
    _option(
        "shear",
        float | None,
        None,
        f"Shear factor range (default {_D['shear']:g}, about 11 degrees).",
        panel=_AUG,
    ),
    _option(
        "zoom",
        float | None,
        None,
        f"Zoom range: scale uniform in [1-Z, 1+Z] (default {_D['zoom']:g}).",
        panel=_AUG,
    ),
    _option(
        "hflip",
        bool | None,
        None,
        "Mirror left-right half of the time (default on).",
        "--hflip/--no-hflip",
        panel=_AUG,
    ),
    _option(
        "vflip",
        bool | None,
        None,
        "Mirror top-bottom half of the time (default off).",
        "--vflip/--no-vflip",
        panel=_AUG,
    ),
    _option(
        "crop",
        float | None,
        None,
        f"Cut a random fraction up to C off each side, then resize back (default {_D['crop']:g}).",
        panel=_AUG,
    ),
    _option(
        "contrast",
        float | None,
        None,
        f"Contrast factor range [1-C, 1+C] (default {_D['contrast']:g}).",
        panel=_AUG,
    ),
    _option(
        "brightness",
        float | None,
        None,
        f"Per-channel brightness factor range [1-B, 1+B] (default {_D['brightness']:g}).",
        panel=_AUG,
    ),
    _option(
        "noise",
        float | None,
        None,
        f"Gaussian noise std on the 0-1 intensity scale (default {_D['noise']:g}).",
        panel=_AUG,
    ),
    _option(
        "downsample",
        float | None,
        None,
        f"Shrink by a random factor in [1, 1+D], then resize back (default {_D['downsample']:g}).",
        panel=_AUG,
    ),
    _option(
        "fill",
        str | None,
        None,
        f"Fill for uncovered pixels: nearest, constant or reflect (default {_D['fill']}).",
        panel=_AUG,
    ),
    _option(
        "fill_value",
        int | None,
        None,
        f"Grey level 0-255 for --fill constant (default {_D['fill_value']}).",
        panel=_AUG,
    ),
]


@dataclass(frozen=True)
class AugmentFlags:
    """The augmentation options as given: a settings file and the flags that were set."""

    file: Path | None
    overrides: dict[str, Any]

    @property
    def given(self) -> bool:
        return self.file is not None or any(v is not None for v in self.overrides.values())

    def config(self, default: bool = False, base=None):
        """The AugmentConfig of the file (or `base`, or the defaults) with the flags applied;
        None when nothing was given, unless `default`. Raises UsageError for bad settings."""
        if not self.given and not default:
            return None
        from featx.data.augment import AugmentConfig

        if self.file is not None:
            base = AugmentConfig.from_file(self.file)
        elif base is None:
            base = AugmentConfig()
        given = {k: v for k, v in self.overrides.items() if v is not None}
        return AugmentConfig.from_dict({**base.to_dict(), **given})


def _augment_flags(values: dict[str, Any]) -> AugmentFlags:
    return AugmentFlags(values.pop("augment_config"), values)


with_augmentation = option_group("augmentation", AUGMENT_OPTIONS, _augment_flags)
"""Adds --augment-config FILE, --rotation ... --fill-value; the command gets `augmentation:
AugmentFlags`."""


_NET = "Network and data"
NETWORK_OPTIONS = [
    _option(
        "backbone",
        str,
        inspect.Parameter.empty,
        "Backbone name (see `featx backbones`), or timm:NAME.",
        panel=_NET,
    ),
    _option(
        "weights",
        str,
        "default",
        "default, a named weights set, none (seeded random), or a .pth/.safetensors file.",
        panel=_NET,
    ),
    _option(
        "image_size",
        int | None,
        None,
        "Resize straight to N x N (Keras target_size) instead of the weights' resize and crop.",
        panel=_NET,
        callback=IMAGE_SIZE,
    ),
    _option(
        "decode",
        str | None,
        None,
        "reduced: decode large JPEGs at a reduced size (still 2x the resize or more), or full. "
        "Default: the --head model's or --store's decoding, else reduced.",
        panel=_NET,
    ),
    _option(
        "layer",
        str | None,
        None,
        "Feature layer the head sits on (default: the final feature map).",
        panel=_NET,
    ),
    _option(
        "pool",
        str | None,
        None,
        "avg, max, avgmax, or none (flatten): how the layer's map becomes a vector (default avg).",
        panel=_NET,
    ),
    _option(
        "head",
        str,
        "mlp",
        "mlp, linear, or a model file to start from: the best model of a `featx fit` sweep "
        "(`--model best.featx`; a logreg or mlp on one layer of this backbone's features) or a "
        "fine-tuned model.",
        panel=_NET,
    ),
    _option(
        "hidden",
        int,
        256,
        "Hidden units of the mlp head (0: none).",
        panel=_NET,
        callback=NOT_NEGATIVE,
    ),
    _option(
        "dropout",
        float,
        0.5,
        "Dropout before the head's last layer(s).",
        panel=_NET,
        callback=in_range(0, 1, below=True),
    ),
    _option(
        "unfreeze_from",
        str | None,
        None,
        "First layer that trains in the full stage (as `featx layers` names it); default: "
        "the whole base, each earlier block at --lr-mult times the next one's rate.",
        panel=_NET,
    ),
    _option(
        "lr_mult",
        float,
        0.7,
        "Each earlier block's learning rate is this times the next later one's.",
        panel=_NET,
        callback=POSITIVE,
    ),
    _option("optimizer", str, "adam", "adam, adamw, sgd or rmsprop.", panel=_NET),
    _option("weight_decay", float, 0.0, "Weight decay.", panel=_NET, callback=NOT_NEGATIVE),
    _option(
        "momentum",
        float,
        0.9,
        "Momentum (sgd; the peak of one-cycle's momentum cycle).",
        panel=_NET,
        callback=in_range(0, 1),
    ),
    _option(
        "bn",
        str,
        "frozen",
        "frozen: BatchNorm keeps its statistics (eval mode); train: it updates them.",
        panel=_NET,
    ),
    _option(
        "class_weights", str, "none", "none, or balanced (inverse class frequency).", panel=_NET
    ),
    _option("batch_size", int, 32, "Images per step.", panel=_NET, callback=AT_LEAST_ONE),
    _option(
        "val_fraction",
        float,
        0.2,
        "Share of training images held out (seeded, stratified) when there is no "
        "validation folder.",
        panel=_NET,
        callback=FRACTION,
    ),
    _option(
        "seed", int, 0, "Seed of everything random: split, order, augmentation, head.", panel=_NET
    ),
    _option(
        "precision", str, "fp32", "fp32, bf16 (autocast, CPU or GPU) or fp16 (GPU).", panel=_NET
    ),
    _option(
        "augment",
        bool,
        True,
        "Augment training images (settings below).",
        "--augment/--no-augment",
        panel=_NET,
    ),
    _option(
        "workers",
        int | None,
        None,
        "Decoding processes (default: half the cores, at most 4; 0: in-process).",
        panel=_NET,
        callback=NOT_NEGATIVE,
    ),
    _option("device", str, "auto", "auto, cpu, cuda or mps.", panel=_NET),
]

with_network = option_group("network", NETWORK_OPTIONS, dict)
"""Adds the network and data options of finetune and lr-find; the command gets `network: dict`
(FinetuneConfig fields plus augment, workers and device)."""
