"""featx: extract frozen-backbone features once into HDF5 stores, then train classifiers and
fine-tune on small image datasets."""

__version__ = "0.1.0"

from featx.backbones import available_backbones, get_backbone  # noqa: E402
from featx.evaluation import evaluate  # noqa: E402
from featx.extract import extract  # noqa: E402
from featx.model import load_model  # noqa: E402
from featx.prediction import predict  # noqa: E402
from featx.store import FeatureStore  # noqa: E402
from featx.training import fit  # noqa: E402

__all__ = [
    "FeatureStore",
    "__version__",
    "available_backbones",
    "evaluate",
    "extract",
    "fit",
    "get_backbone",
    "load_model",
    "predict",
]
