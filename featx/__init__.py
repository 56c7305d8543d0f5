"""featx: extract frozen-backbone features once into HDF5 stores, then train classifiers and
fine-tune on small image datasets."""

__version__ = "0.1.0"

from featx.backbones import available_backbones, get_backbone  # noqa: E402
from featx.extract import extract  # noqa: E402
from featx.store import FeatureStore  # noqa: E402

__all__ = ["FeatureStore", "__version__", "available_backbones", "extract", "get_backbone"]
