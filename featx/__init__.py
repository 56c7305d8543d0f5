"""featx: extract frozen-backbone features once into HDF5 stores, then train classifiers and
fine-tune on small image datasets.

The public names load their modules on first use, so `import featx` (and `featx --help`) does
not import torch.
"""

import importlib
import os
from typing import Any

from featx._lazy import lazy_exports

# The classifiers register the types their model files hold (`featx.models.trusted`), so that
# a model file loads in any process that imported featx, whichever stage it started from.
from featx.classify import registry as _classifiers  # noqa: F401

__version__ = "0.1.0"

_EXPORTS = {
    "FeatureStore": "store.feature_store",
    "merge": "store.merging",
    "available_backbones": "backbones.registry",
    "get_backbone": "backbones.registry",
    "extract": "extraction.run",
    "ExtractResult": "extraction.run",
    "fit": "classify.fitting",
    "FitSettings": "classify.fit_settings",
    "Sweep": "classify.sweep",
    "evaluate": "classify.evaluation",
    "Evaluation": "classify.evaluation",
    "predict": "classify.prediction",
    "Predictions": "classify.prediction",
    "probe": "classify.probing",
    "ProbeSettings": "classify.probe_settings",
    "ProbeResult": "classify.probe_result",
    "load_model": "models.file",
    "FeatxModel": "models.file",
    "MLPClassifier": "classify.mlp",
    "finetune": "finetuning.run",
    "FinetuneConfig": "finetuning.config",
    "FinetuneResult": "finetuning.config",
    "AugmentConfig": "data.augment_config",
}
__all__ = ["__version__", *_EXPORTS]
_exported, _dir = lazy_exports(__name__, _EXPORTS)
# The subpackages and modules (featx.classify, featx.runlog ...) are attributes too, each
# imported on first use.
_SUBMODULES = frozenset(
    entry.name.removesuffix(".py")
    for entry in os.scandir(os.path.dirname(__file__))
    if not entry.name.startswith("_")
    and (entry.name.endswith(".py") or os.path.isfile(os.path.join(entry.path, "__init__.py")))
)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    return _exported(name)


def __dir__() -> list[str]:
    return sorted({*_dir(), *_SUBMODULES, "__version__"})
