"""Classifiers on the cache: the registry, the MLP estimator, fit (sweeps, CV, streaming),
evaluate and predict."""

from featx._lazy import lazy_exports

_EXPORTS = {
    "fit": "fit",
    "FitSettings": "fit_settings",
    "Sweep": "sweep",
    "FitResult": "sweep",
    "Selection": "selection",
    "select_rows": "selection",
    "evaluate": "evaluate",
    "Evaluation": "evaluate",
    "predict": "predict",
    "Predictions": "predict",
    "MLPClassifier": "mlp",
    "classifier_table": "registry",
    "LayerFeatures": "pipeline",
    "ConcatLayers": "pipeline",
    "evaluate_images": "evaluate",
    "features_for_images": "predict",
    "probe": "probe",
    "ProbeSettings": "probe_settings",
    "ProbeResult": "probe_result",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
