"""The model file: one writer, one reader, one provenance builder; and the one torch head."""

from featx._lazy import lazy_exports

_EXPORTS = {"FeatxModel": "file", "load_model": "file", "TorchHead": "heads"}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
