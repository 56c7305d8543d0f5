"""Data in: image folders, manifests and packed datasets, decoding and preprocessing, seeded
augmentation and its preview."""

from featx._lazy import lazy_exports

_EXPORTS = {
    "ImageFile": "folders",
    "ImageFolder": "folders",
    "BadImage": "folders",
    "scan_image_folder": "folders",
    "load_image": "folders",
    "list_images": "folders",
    "printable": "folders",
    "open_dataset": "manifest",
    "read_manifest": "manifest",
    "Preprocessing": "preprocessing",
    "AugmentConfig": "augment_config",
    "Augmenter": "augment",
    "augment_preview": "preview",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
