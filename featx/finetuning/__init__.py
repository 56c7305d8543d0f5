"""Fine-tuning: the network (base cut at a layer + head), the training session, the
learning-rate finder and the export to a model file."""

from featx._lazy import lazy_exports

_EXPORTS = {
    "finetune": "run",
    "FinetuneConfig": "config",
    "FinetuneResult": "config",
    "find_lr": "lr_find",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
