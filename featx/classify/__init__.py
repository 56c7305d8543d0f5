"""Classifiers on the cache: the registry, the MLP estimator, fit (sweeps, CV, streaming),
evaluate and predict."""

from featx._lazy import lazy_exports

_EXPORTS = {
    "fit": "fitting",
    "FitSettings": "fit_settings",
    "Sweep": "sweep",
    "FitResult": "sweep",
    "Selection": "selection",
    "select_rows": "selection",
    "evaluate": "evaluation",
    "Evaluation": "evaluation",
    "predict": "prediction",
    "Predictions": "prediction",
    "MLPClassifier": "mlp",
    "classifier_table": "registry",
    "LayerFeatures": "pipeline",
    "ConcatLayers": "pipeline",
    "evaluate_images": "evaluation",
    "features_for_images": "prediction",
    "probe": "probing",
    "ProbeSettings": "probe_settings",
    "ProbeResult": "probe_result",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
