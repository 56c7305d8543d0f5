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
) -> Path:
    """Write `out/base.safetensors` (the whole backbone with the fine-tuned weights, loadable
    as `--weights FILE`) and `out/model.featx`, a featx model file whose pipeline takes the
    feature layer's rows (as `featx extract --weights out/base.safetensors` stores them) and
    whose classifier is the fine-tuned head."""
    from safetensors.torch import save
    from sklearn.pipeline import Pipeline

    from featx.backbones.layers import pooled_shape
    from featx.backbones.registry import state_dict_sha256
    from featx.classify.pipeline import LayerFeatures
    from featx.models.file import FeatxModel, feature_identity, layer_record, model_provenance
    from featx.models.heads import TorchHead
    from featx.runtime import atomic_write, library_versions, now
    from featx.store.feature_store import layer_key

    config, net, record = session.config, session.net, session.record
    weights_path = out / "base.safetensors"
    with net.whole_backbone() as backbone:
        state, seen = {}, set()
        for k, v in backbone.state_dict().items():
            v = v.detach().cpu().contiguous()
            state[k] = v.clone() if v.data_ptr() in seen else v  # safetensors refuses sharing
            seen.add(v.data_ptr())
        atomic_write(weights_path, save(state))
        sha256 = state_dict_sha256(backbone)  # what Backbone.load(weights_path) will compute
    weights_spec = str(weights_path.resolve())

    info = session.layer_info
    row_shape = list(pooled_shape(info.shape, net.pool))
    classes = list(range(len(session.class_names)))
    pipeline = Pipeline(
        [
            ("features", LayerFeatures("none").fit(np.zeros((1, *row_shape), np.float32))),
            ("clf", TorchHead.from_head(net.head, classes)),
        ]
    )
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
    provenance = model_provenance(
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
    return FeatxModel(pipeline, provenance).save(out / "model.featx")
