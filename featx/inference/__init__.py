"""Inference: images decoded into batches, a tapped network and the engine that runs it,
shared by extraction, prediction, evaluation on images and fine-tuning's data."""

from featx._lazy import lazy_exports

_EXPORTS = {
    "Engine": "engine",
    "Calibration": "engine",
    "cache_key": "engine",
    "CALIBRATION_IMAGES": "engine",
    "CONVERSIONS": "engine",
    "INT8_COSINE": "engine",
    "ENGINES": "engines",
    "EngineChoice": "engines",
    "EngineEntry": "engines",
    "register_engine": "engines",
    "build_engine": "engines",
    "is_cached": "engines",
    "resolve_engine": "auto",
    "AutoEngine": "race",
    "cpu_class": "machine",
    "cpu_features": "machine",
    "cpu_description": "machine",
    "Images": "images",
    "collate": "images",
    "open_images": "images",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
