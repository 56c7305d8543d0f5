"""Backbones whose layers are not channels-first maps (ViT tokens, fixed input sizes), and
cross-validation with a class smaller than the number of folds."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_one_sentence_error, invoke_featx, make_folder

import featx
from featx.backbones.registry import get_backbone
from featx.errors import UsageError
from featx.finetuning.network import build_network

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VIT = "timm:vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts") / "data"
    make_folder(root, {"a": 4, "b": 4, "c": 1}, size=(40, 30))
    return root


@pytest.mark.slow
def test_pooling_tokens_is_refused_and_tokens_are_stored_unpooled(photos, tmp_path):
    store = tmp_path / "vit.h5"
    args = ("extract", photos, "--backbone", VIT, "--weights", "none", "--layer",
            "forward_features", "--workers", "0", "--quiet", "--store", store)  # fmt: skip
    message = assert_one_sentence_error(invoke_featx(*args, "--pool", "avg"))
    assert "token sequence of shape 197x192" in message and "--pool none" in message
    assert not store.exists()
    assert invoke_featx(*args).returncode == 0
    with featx.FeatureStore(store) as s:
        assert s.layers == ["forward_features"]
        assert s.layer("forward_features").shape == (197, 192)


def test_a_fixed_input_size_model_at_another_size_is_one_sentence(photos, tmp_path):
    result = invoke_featx(
        "extract", photos, "--backbone", VIT, "--weights", "none", "--image-size", "32",
        "--layer", "forward_features", "--workers", "0", "--store", tmp_path / "v.h5",
    )  # fmt: skip
    assert "cannot run on 32x32 inputs" in assert_one_sentence_error(result)


def test_a_vit_fine_tuning_network_builds_its_groups():
    backbone = get_backbone(VIT)
    model = backbone.load("none").model
    with pytest.raises(UsageError, match="token sequence"):
        build_network(backbone, model, 224, 3)
    net, _ = build_network(backbone, model, 224, 3, pool="none")  # the token map flattened
    net.set_trainable(0)  # the root owns pos_embed and cls_token without running as a module
    assert any(p.requires_grad for p in net.head.parameters())


def test_cv_with_a_class_smaller_than_the_folds_scores_log_loss(photos, tmp_path):
    store = featx.extract(
        photos, "resnet18", ["avgpool"], weights="none", image_size=48, workers=0, quiet=True,
        store=tmp_path / "s.h5",
    ).store  # fmt: skip
    sweep = featx.fit(store, ["avgpool"], ["logreg"], cv=2)
    log_loss = sweep.best.metrics["cv"]["log_loss"]["mean"]  # a fold lacks class c
    assert log_loss is not None and np.isfinite(log_loss)


def test_partial_results_of_other_settings_are_discarded_with_a_message(photos, tmp_path):
    store = tmp_path / "s.h5"
    partial = tmp_path / "s.h5.partial"
    partial.mkdir()
    (partial / "run.json").write_text('{"pool": "max"}')  # an interrupted run of another kind
    (partial / "chunk-000000.npz").write_bytes(b"not from this run")
    result = invoke_featx(
        "extract", photos, "--backbone", "resnet18", "--weights", "none", "--image-size", "48",
        "--layer", "avgpool", "--workers", "0", "--store", store,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"Discarding {partial}" in result.stderr
    assert not partial.exists()
    with featx.FeatureStore(store) as s:
        assert s.n_rows == 9
