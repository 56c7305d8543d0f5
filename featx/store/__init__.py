"""The HDF5 feature store: its format, `FeatureStore`, bounded row reading, merging shards."""

from featx._lazy import lazy_exports

_EXPORTS = {
    "FeatureStore": "feature_store",
    "LayerRows": "rows",
    "ConcatRows": "rows",
    "open_rows": "rows",
    "merge": "merging",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
