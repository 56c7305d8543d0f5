"""A fine-tuned network as an ordinary featx model file: the backbone with the fine-tuned
weights as a safetensors file, and a pipeline whose classifier is the trained head."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["export_model"]


def export_model(
    session: Any,
    out: Path,
    metrics: dict[str, Any],
    history: list[dict[str, Any]],
    best: dict[str, Any],
    command: str,
    refit: dict[str, Any] | None = None,
) -> Path:
    """Write `out/base.safetensors` (the whole backbone with the fine-tuned weights, loadable
    as `--weights FILE`) and `out/model.featx`, a featx model file whose pipeline takes the
    feature layer's rows (as `featx extract --weights out/base.safetensors` stores them) and
    whose classifier is the fine-tuned head. `refit`: what `--refit all` retrained (the
    session then trains on train + validation)."""
    from sklearn.pipeline import Pipeline

    from featx.backbones.layers import pooled_shape
    from featx.classify.pipeline import LayerFeatures
    from featx.models.file import FeatxModel
    from featx.models.heads import TorchHead

    net = session.net
    weights_spec, sha256 = _save_base(net, out / "base.safetensors")
    info = session.layer_info
    row_shape = list(pooled_shape(info.shape, net.pool))
    classes = list(range(len(session.class_names)))
    pipeline = Pipeline(
        [
            ("features", LayerFeatures("none").fit(np.zeros((1, *row_shape), np.float32))),
            ("clf", TorchHead.from_head(net.head, classes)),
        ]
    )
    provenance = _provenance(
        session, out, weights_spec, sha256, row_shape, pipeline, metrics, history, best, command
    )
    provenance["trained_on"] = _trained_on(session)
    if refit:
        provenance["selection"] += (
            f", then trained again on train + validation for {refit['epochs']['head']} + "
            f"{refit['epochs']['full']} epochs (--refit all; the test metrics are this network's)"
        )
    return FeatxModel(pipeline, provenance).save(out / "model.featx")


def _trained_on(session: Any) -> dict[str, Any]:
    """Which images the network trained on, as `featx fit` records its rows."""
    files = session.folder.files
    return {
        "n_rows": len(session.split.train),
        "splits": sorted({files[i].split for i in session.split.train}),
        "refit": session.config.refit,
    }


def _save_base(net: Any, path: Path) -> tuple[str, str]:
    """The whole backbone with the fine-tuned weights as safetensors at `path`: (its path,
    the sha256 that `Backbone.load(path)` will compute)."""
    from safetensors.torch import save

    from featx.backbones.weights import state_dict_sha256
    from featx.runtime import atomic_write

    with net.whole_backbone() as backbone:
        state, seen = {}, set()
        for k, v in backbone.state_dict().items():
            v = v.detach().cpu().contiguous()
            state[k] = v.clone() if v.data_ptr() in seen else v  # safetensors refuses sharing
            seen.add(v.data_ptr())
        atomic_write(path, save(state))
        sha256 = state_dict_sha256(backbone)
    return str(path.resolve()), sha256


def _provenance(
    session, out, weights_spec, sha256, row_shape, pipeline, metrics, history, best, command
) -> dict[str, Any]:
    """The model file's provenance: the fine-tuned features, the head and the run."""
    from featx.models.file import feature_identity, layer_record, model_provenance
    from featx.runtime import library_versions, now
    from featx.store.feature_store import layer_key

    config, net, record, info = session.config, session.net, session.record, session.layer_info
    augment = config.augment.to_dict() if config.augment is not None else None
    epochs = config.stage_epochs
    features = feature_identity(
        backbone=record.name,
        weights=record.weights_identity(weights_spec),
        weights_spec=weights_spec,
        weights_sha256=sha256,
        preprocessing=session.preprocessing,
    )
    features["store"] = {
        "path": f"(none: fine-tuned on images, run {out})",
        "dataset_root": str(session.folder.root.resolve()),
        "dataset_fingerprint": session.folder.fingerprint,
        "n_rows": len(session.split.train),
        "augment": augment,
        "created": now(),
        "versions": library_versions(),
    }
    layer = layer_record(
        key=layer_key(info.name, net.pool),
        name=info.name,
        module=info.module,
        pool=net.pool,
        precision=config.precision,
        dtype="float32",
        row_shape=row_shape,
    )
    return model_provenance(
        features,
        layer,
        session.class_names,
        classifier="finetune",
        params={
            "head": config.head,
            "unfreeze_from": session.unfreeze_from,
            "epochs_head": epochs["head"],
            "epochs": epochs["full"],
            "lr": config.lr,
            "lr_mult": config.lr_mult,
            "optimizer": config.optimizer,
            "schedule": config.schedule,
        },
        estimator=f"TorchHead({len(pipeline[-1].spec['hidden_sizes'])} hidden layer(s))",
        pipeline=f"{'flatten' if net.pool == 'none' else net.pool + '-pool'} -> fine-tuned head",
        selection=f"best of {len(history)} epochs by validation loss (epoch {best['epoch']})",
        n_train=len(session.split.train),
        metrics=metrics,
        augment=augment,
        finetune={
            "run": str(out.resolve()),
            "seed": config.seed,
            "original_weights": session.loaded.weights,
            "validation": session.split.how,
        },
        command=command,
    )
