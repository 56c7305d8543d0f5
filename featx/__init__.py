"""featx: extract frozen-backbone features once into HDF5 stores, then train classifiers and
fine-tune on small image datasets.

The public names load their modules on first use, so `import featx` (and `featx --help`) does
not import torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "FeatureStore": "featx.store",
    "available_backbones": "featx.backbones",
    "get_backbone": "featx.backbones",
    "extract": "featx.extraction",
    "fit": "featx.training",
    "evaluate": "featx.evaluation",
    "predict": "featx.prediction",
    "load_model": "featx.model",
    "finetune": "featx.finetune",
    "FinetuneConfig": "featx.finetune",
    "MLPClassifier": "featx.mlp",
    "AugmentConfig": "featx.augment",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'featx' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
