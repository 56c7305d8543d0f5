"""The HDF5 feature store: its format, `FeatureStore`, and bounded row reading."""

from featx._lazy import lazy_exports

_EXPORTS = {
    "FeatureStore": "feature_store",
    "LayerRows": "rows",
    "ConcatRows": "rows",
    "open_rows": "rows",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
