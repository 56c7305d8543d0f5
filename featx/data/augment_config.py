"""The augmentation settings (`AugmentConfig`): ranges of the random transforms, read from a
settings file or the command line. Torch-free, so the command line can declare its flags from
the fields without importing torch."""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from featx.errors import UsageError
from featx.settings import AUGMENTATION, option, option_spec

__all__ = ["AugmentConfig", "FILL_MODES"]

Fill = Literal["nearest", "constant", "reflect"]
FILL_MODES = typing.get_args(Fill)


def _range(default: float, help: str, highest: float, *, below: bool = False) -> Any:
    """A range-valued field: a number from 0 to `highest` (just under it with `below`)."""
    return option(default, help, panel=AUGMENTATION, minimum=0, maximum=highest, below=below)


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random transforms; defaults follow the classic Keras ImageDataGenerator recipe.

    - rotation: angle in degrees, uniform in [-rotation, rotation]; positive is counter-clockwise.
    - shift: translation as a fraction of width (x) and height (y), each uniform in [-shift, shift].
    - shear: horizontal shear factor k uniform in [-shear, shear] (x' = x + k*y), i.e. a shear
      angle of atan(k); 0.2 is about 11 degrees.
    - zoom: scale s uniform in [1 - zoom, 1 + zoom], same on both axes; s > 1 zooms in (objects
      grow by s, their area by s**2), s < 1 zooms out. (Keras uses the inverse convention.)
    - hflip, vflip: mirror left-right / top-bottom with probability 1/2.
    - crop: cut a random fraction in [0, crop] off each side, then resize back to the input size.
    - downsample: shrink by a random factor in [1, 1 + downsample], then resize back up.
    - brightness: multiply each channel by its own factor in [1 - brightness, 1 + brightness].
    - contrast: scale the distance to the mean grey level by a factor in [1 - contrast,
      1 + contrast].
    - noise: standard deviation of additive Gaussian noise, on the [0, 1] intensity scale.
    - fill: how geometric transforms fill pixels from outside the image: "nearest" (repeat the
      edge), "constant" (fill_value, 0-255, on every channel) or "reflect" (mirror at the edge).

    Each field is one command-line flag (`featx.settings.option`: help, range).
    """

    rotation: float = _range(40.0, "Rotation range in degrees, uniform in [-R, R].", 180.0)
    shift: float = _range(0.2, "Shift range, as fractions of width and height.", 1.0)
    shear: float = _range(0.2, "Shear factor range (0.2: about 11 degrees).", 1.0)
    zoom: float = _range(0.2, "Zoom range: scale uniform in [1-Z, 1+Z].", 1.0, below=True)
    hflip: bool = option(True, "Mirror left-right half of the time.", panel=AUGMENTATION)
    vflip: bool = option(False, "Mirror top-bottom half of the time.", panel=AUGMENTATION)
    crop: float = _range(
        0.0, "Cut a random fraction up to C off each side, then resize back.", 0.5, below=True
    )
    contrast: float = _range(0.0, "Contrast factor range [1-C, 1+C].", 1.0)
    brightness: float = _range(0.0, "Per-channel brightness factor range [1-B, 1+B].", 1.0)
    noise: float = _range(0.0, "Gaussian noise std on the 0-1 intensity scale.", 1.0)
    downsample: float = _range(0.0, "Shrink by a random factor in [1, 1+D], then resize back.", 7.0)
    fill: Fill = option("nearest", "Fill for uncovered pixels.", panel=AUGMENTATION)
    fill_value: int = option(
        0, "Grey level 0-255 for --fill constant.", panel=AUGMENTATION, minimum=0, maximum=255
    )

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            spec = option_spec(field)
            if field.type != "float":
                continue
            value = getattr(self, field.name)
            high = spec.maximum
            if not (
                _is_number(value) and 0 <= value and (value < high if spec.below else value <= high)
            ):
                upper = f"just below {high:g}" if spec.below else f"{high:g}"
                unit = " degrees" if field.name == "rotation" else ""
                raise UsageError(
                    f"Augmentation {field.name} must be a number from 0 to {upper}{unit}, "
                    f"got {value!r}."
                )
            object.__setattr__(self, field.name, float(value))
        for name in ("hflip", "vflip"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(
                    f"Augmentation {name} must be true or false, got {getattr(self, name)!r}."
                )
        if self.fill not in FILL_MODES:
            raise UsageError(
                f"Augmentation fill must be one of {', '.join(FILL_MODES)}, got {self.fill!r}."
            )
        if not (
            isinstance(self.fill_value, int)
            and not isinstance(self.fill_value, bool)
            and 0 <= self.fill_value <= 255
        ):
            raise UsageError(
                f"Augmentation fill_value must be a whole number from 0 to 255, "
                f"got {self.fill_value!r}."
            )

    @classmethod
    def none(cls) -> AugmentConfig:
        """The identity config: every transform off, images come back unchanged."""
        return cls(rotation=0.0, shift=0.0, shear=0.0, zoom=0.0, hflip=False)

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain JSON/TOML-compatible values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AugmentConfig:
        """Build a config from a mapping; missing fields keep their defaults."""
        valid = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(map(str, set(data) - set(valid)))
        if unknown:
            raise UsageError(
                f"Unknown augmentation setting(s) {', '.join(unknown)}; "
                f"valid keys are {', '.join(valid)}."
            )
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> AugmentConfig:
        """Read a config from a .toml, .json, .yaml or .yml file of top-level keys."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".toml", ".json", ".yaml", ".yml"):
            raise UsageError(
                f"Augmentation config {path} must be a .toml, .json, .yaml or .yml file."
            )
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"Cannot read augmentation config {path}: {exc.strerror}.") from exc
        try:
            data = _parse(text, suffix)
        except UsageError:
            raise
        except Exception as exc:  # each parser raises its own error type
            raise UsageError(f"Augmentation config {path} is not valid: {exc}") from exc
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise UsageError(f"Augmentation config {path} must hold a table of settings.")
        return cls.from_dict(data)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse(text: str, suffix: str) -> Any:
    if suffix == ".json":
        return json.loads(text)
    if suffix == ".toml":
        try:
            import tomllib
        except ImportError as exc:
            raise UsageError("Reading TOML needs Python 3.11 or newer; use JSON.") from exc
        return tomllib.loads(text)
    try:
        import yaml
    except ImportError as exc:
        raise UsageError("Reading YAML needs pyyaml installed; use TOML or JSON.") from exc
    return yaml.safe_load(text)
