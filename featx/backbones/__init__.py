"""Backbones: the registry (constructor, weights, preprocessing, layer names), its sources
(`featx/backbones/sources/`, one module each) and the layer taps every stage runs."""

from featx._lazy import lazy_exports
from featx.backbones import sources  # noqa: F401  (registers every source's backbones)

_EXPORTS = {
    "Backbone": "registry",
    "LoadedBackbone": "registry",
    "Weights": "registry",
    "available_backbones": "registry",
    "get_backbone": "registry",
    "register_backbone": "registry",
    "LayerInfo": "layers",
    "layer_table": "layers",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
