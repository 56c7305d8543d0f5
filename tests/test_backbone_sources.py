"""Adding backbones: a new source is one builder registered with `register_backbone`, and a
new torchvision model one `builtin(...)` line; `featx.extract` then runs either on real
image files."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import rows_as_images
from torch import nn

import featx
from featx.backbones import registry
from featx.backbones.registry import RANDOM_INIT_SEED, Backbone, Weights, register_backbone
from featx.backbones.tap import LayerTap
from featx.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from featx.errors import WeightsUnavailable
from featx.store import FeatureStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def registry_restored(monkeypatch):
    """What a test registers is gone after it: the registry's table is restored."""
    monkeypatch.setattr(registry, "_BUILDERS", dict(registry._BUILDERS))


def run_extract(data: Path, backbone: str, layers: list[str], store: Path, **options):
    options = {"workers": 0, "batch_size": 4, "device": "cpu", "engine": "eager", **options}
    return featx.extract(data, backbone, layers, store=store, weights="none", quiet=True, **options)


def reference(model: nn.Module, modules: list[str], data: Path, paths, prep) -> dict:
    batch = torch.stack([prep(image) for image in rows_as_images(data, paths)])
    with torch.inference_mode():
        return {k: v.numpy() for k, v in LayerTap(model.eval(), modules)(batch).items()}


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * scale)


def seeded_init(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)  # what weights="none" builds
        return build()


class TinyNet(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)).mean(dim=(2, 3)))


TINY_PREP = Preprocessing(40, 32, IMAGENET_MEAN, IMAGENET_STD)


def test_a_new_source_is_one_registered_builder(registry_restored, small_photos, tmp_path):
    def no_file() -> Path:
        raise WeightsUnavailable("tiny networks have no pretrained weights.")

    @register_backbone("tiny:")
    def tiny(architecture: str) -> Backbone:
        build = functools.partial(TinyNet, int(architecture.removeprefix("net")))
        default = Weights("tiny:untrained", TINY_PREP, build, no_file)
        return Backbone(
            architecture, "tiny", architecture, build, lambda name: default, default,
            aliases={"block1": "stem"},
        )  # fmt: skip

    result = run_extract(small_photos, "tiny:net8", ["block1", "body"], tmp_path / "t.h5")
    with FeatureStore(result.store) as store:
        block1, body, paths = store.read("block1"), store.read("body"), list(store.paths())
        assert store.layer("block1").attrs["module"] == "stem"
        assert store.meta["backbone"] == "tiny:net8"
        assert store.meta["weights"] == f"none (random init, seed {RANDOM_INIT_SEED})"
    assert block1.shape == (10, 8, 32, 32) and body.shape == (10, 16, 16, 16)

    model = seeded_init(functools.partial(TinyNet, 8))
    ref = reference(model, ["stem", "body"], small_photos, paths, TINY_PREP)
    assert_close(block1, ref["stem"])
    assert_close(body, ref["body"])
    assert "tiny" in registry.available_sources()


@pytest.mark.slow
def test_a_new_torchvision_model_is_one_line(registry_restored, small_photos, tmp_path):
    from featx.backbones.sources.torchvision import builtin

    builtin("regnet_x_400mf", "RegNet_X_400MF_Weights.IMAGENET1K_V2", 232, 224)

    assert "regnet_x_400mf" in featx.available_backbones()
    record = featx.get_backbone("regnet_x_400mf")
    enum = torchvision.models.RegNet_X_400MF_Weights.IMAGENET1K_V2
    assert record.weights_identity() == "torchvision:RegNet_X_400MF_Weights.IMAGENET1K_V2"
    assert record.default_preprocessing() == record.named_weights("default").preprocessing
    assert record.default_preprocessing().crop == enum.transforms().crop_size[0]

    layers = ["trunk_output.block1", "trunk_output.block2"]
    result = run_extract(small_photos, "regnet_x_400mf", layers, tmp_path / "r.h5", image_size=64)
    with FeatureStore(result.store) as store:
        features, paths = {k: store.read(k) for k in layers}, list(store.paths())
    model = seeded_init(torchvision.models.regnet_x_400mf)
    prep = record.default_preprocessing().with_image_size(64)
    ref = reference(model, layers, small_photos, paths, prep)
    for layer in layers:
        assert_close(features[layer], ref[layer])
