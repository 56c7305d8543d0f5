"""The augmentation options, as one group: each command gets their values as one argument."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featx.cli.declare import option_group, plain_option, regular_file, settings_parameters
from featx.data.augment_config import AugmentConfig
from featx.finetuning.config import FINETUNE_AUGMENT
from featx.settings import AUGMENTATION

__all__ = [
    "AugmentFlags",
    "augmentation_options",
    "with_augmentation",
    "with_finetune_augmentation",
]


def augmentation_options(base: AugmentConfig) -> list[inspect.Parameter]:
    """--augment-config FILE and a flag for each AugmentConfig field, each showing `base`'s
    value as its default; a flag not given keeps the settings file's (or `base`'s) value."""
    shown = dataclasses.asdict(base)
    config_file = plain_option(
        "augment_config",
        Path | None,
        None,
        "TOML, JSON or YAML file of augmentation settings (keys as the flags below; "
        "flags override it).",
        panel=AUGMENTATION,
        callback=regular_file,
        metavar="FILE",
    )
    flags = settings_parameters(AugmentConfig, defaults=dict.fromkeys(shown), shown=shown)
    return [config_file, *flags]


@dataclass(frozen=True)
class AugmentFlags:
    """The augmentation options as given: a settings file and the flags that were set."""

    file: Path | None
    overrides: dict[str, Any]

    @property
    def given(self) -> bool:
        return self.file is not None or any(v is not None for v in self.overrides.values())

    def config(
        self, default: bool = False, base: AugmentConfig | None = None
    ) -> AugmentConfig | None:
        """The AugmentConfig of the file (or `base`, or the defaults) with the flags applied;
        None when nothing was given, unless `default`. Raises UsageError for bad settings."""
        if not self.given and not default:
            return None
        if self.file is not None:
            base = AugmentConfig.from_file(self.file)
        elif base is None:
            base = AugmentConfig()
        given = {k: v for k, v in self.overrides.items() if v is not None}
        return AugmentConfig.from_dict({**base.to_dict(), **given})


def _augment_flags(values: dict[str, Any]) -> AugmentFlags:
    return AugmentFlags(values.pop("augment_config"), values)


with_augmentation = option_group(
    "augmentation", augmentation_options(AugmentConfig()), _augment_flags
)
"""Adds --augment-config FILE, --rotation ... --fill-value; the command gets `augmentation:
AugmentFlags`."""

with_finetune_augmentation = option_group(
    "augmentation", augmentation_options(FINETUNE_AUGMENT), _augment_flags
)
"""The same flags, showing fine-tuning's defaults."""
