"""BatchNorm folding (`featx.backbones.layers.fold_batchnorm`, run by every extraction and
prediction):
timm's BatchNormAct2d after Conv2d / Conv2dSame is folded, the tapped outputs do not change,
and a conv whose own output is wanted is left alone."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from conftest import photo, seeded
from timm.layers import BatchNormAct2d, Conv2dSame
from torch import nn

from featx.backbones.layers import fold_batchnorm, prepare_tap
from featx.backbones.tap import FORWARD_FEATURES, LayerTap
from featx.data.preprocessing import Preprocessing

SIZE = 64
LITE0_LAYERS = ["blocks.4", FORWARD_FEATURES]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """Four real photos, preprocessed as `--image-size 64` does."""
    preprocessing = Preprocessing(SIZE, 0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                                  square=True)  # fmt: skip
    return torch.stack([preprocessing(photo(i)) for i in range(4)])


def tapped(model: nn.Module, layers: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        return LayerTap(model, layers)(x)


def assert_outputs_close(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4, msg=name)


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    return seeded(lambda: timm.create_model("tf_efficientnet_lite0"))


def test_timm_batchnormact_is_folded_and_outputs_are_unchanged(lite0, photos):
    model = copy.deepcopy(lite0)
    before = dict(lite0.named_modules())
    bn_act = [name for name, m in before.items() if isinstance(m, BatchNormAct2d)]
    assert bn_act and any(isinstance(m, Conv2dSame) for m in before.values())

    folded = fold_batchnorm(model)
    assert folded and sorted(folded) == sorted(bn_act)  # every BN here follows its own conv
    after = dict(model.named_modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in after.values())
    for name in folded:
        assert not isinstance(after[name], nn.BatchNorm2d), name
    # the BNs' affine maps went into the convs, Conv2dSame (TF "same" padding) included
    convs = {n: m for n, m in after.items() if isinstance(m, nn.Conv2d)}
    assert all(m.bias is not None for m in convs.values())
    assert any(type(m) is Conv2dSame for m in convs.values())

    assert_outputs_close(tapped(model, LITE0_LAYERS, photos), tapped(lite0, LITE0_LAYERS, photos))


def test_prepare_tap_on_timm_gives_the_unfolded_outputs(lite0, photos):
    """The set-up extraction and predict run: folding, channels_last, unreached weights freed."""
    tap = prepare_tap(copy.deepcopy(lite0), LITE0_LAYERS, "none", torch.device("cpu"), SIZE)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in tap.modules())
    with torch.inference_mode():
        got = tap(photos.contiguous(memory_format=torch.channels_last))
    assert_outputs_close(got, tapped(lite0, LITE0_LAYERS, photos))


@pytest.mark.parametrize("part", ["act", "drop"])
def test_a_batchnormact_submodule_stays_tappable(lite0, photos, part):
    """`featx layers --all` lists `blocks.4.0.bn1.act` (it runs once per forward pass), so
    extraction must still find it after folding."""
    layer = f"blocks.4.0.bn1.{part}"
    want = tapped(lite0, [layer], photos)
    tap = prepare_tap(copy.deepcopy(lite0), [layer], "none", torch.device("cpu"), SIZE)
    with torch.inference_mode():
        got = tap(photos)
    assert_outputs_close(got, want)


@pytest.mark.slow
def test_a_kept_conv_is_not_folded_and_gives_the_same_output(photos):
    reference = seeded(torchvision.models.resnet18)
    model = copy.deepcopy(reference)
    folded = fold_batchnorm(model, keep=["conv1"])

    assert "bn1" not in folded and "layer1.0.bn1" in folded and "layer4.1.bn2" in folded
    assert type(model.bn1) is nn.BatchNorm2d
    torch.testing.assert_close(model.bn1.running_var, reference.bn1.running_var, rtol=0, atol=0)
    assert model.conv1.bias is None
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert isinstance(model.layer1[0].bn1, nn.Identity)

    got = tapped(model, ["conv1", "layer4"], photos)
    want = tapped(reference, ["conv1", "layer4"], photos)
    assert torch.equal(got["conv1"], want["conv1"])
    torch.testing.assert_close(got["layer4"], want["layer4"], rtol=1e-4, atol=1e-4)

    everything = fold_batchnorm(copy.deepcopy(reference))
    assert "bn1" in everything and set(folded) == set(everything) - {"bn1"}
