"""featx: extract frozen-backbone features once into HDF5 stores, then train classifiers and
fine-tune on small image datasets.

The public names load their modules on first use, so `import featx` (and `featx --help`) does
not import torch.
"""

from featx._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "FeatureStore": "store.feature_store",
    "merge": "store.merge",
    "available_backbones": "backbones.registry",
    "get_backbone": "backbones.registry",
    "extract": "extraction.run",
    "ExtractResult": "extraction.run",
    "fit": "classify.fit",
    "Sweep": "classify.fit",
    "evaluate": "classify.evaluate",
    "Evaluation": "classify.evaluate",
    "predict": "classify.predict",
    "Predictions": "classify.predict",
    "load_model": "models.file",
    "FeatxModel": "models.file",
    "MLPClassifier": "classify.mlp",
    "finetune": "finetuning.run",
    "FinetuneConfig": "finetuning.config",
    "FinetuneResult": "finetuning.config",
    "AugmentConfig": "data.augment",
}
__all__ = ["__version__", *_EXPORTS]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
