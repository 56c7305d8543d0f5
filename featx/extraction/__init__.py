"""Extraction: one resumable, chunked, locked pass of a backbone over a dataset."""

from featx._lazy import lazy_exports

_EXPORTS = {
    "extract": "run",
    "ExtractResult": "run",
    "ExtractSettings": "settings",
    "PredictSettings": "settings",
    "default_store_path": "naming",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
