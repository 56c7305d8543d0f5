"""Backbones: the registry (constructor, weights, preprocessing, layer names) and the
layer taps every stage runs."""

from featx._lazy import lazy_exports

_EXPORTS = {
    "Backbone": "registry",
    "LoadedBackbone": "registry",
    "available_backbones": "registry",
    "get_backbone": "registry",
    "LayerInfo": "layers",
    "layer_table": "layers",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
