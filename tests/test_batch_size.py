"""The batch size featx chooses when none is given: on the CPU, the largest power of two from 4
to 16 whose activations fit a budget; it is said, recorded on every layer, and shown by `featx
info`, whatever a store holds there. A given batch size is used as it is."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from featx import extract
from featx.backbones import get_backbone
from featx.backbones.layers import (
    CPU_BATCH_BYTES,
    MAX_CPU_BATCH,
    MIN_CPU_BATCH,
    cpu_batch_size,
    trace_layers,
    traced_activation_bytes,
)
from featx.store import FeatureStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_cpu_batch_is_the_largest_power_of_two_that_fits_the_budget():
    previous = MAX_CPU_BATCH
    for per_image in (1, 2**20, 11 * 2**20, 25 * 2**20, 40 * 2**20, 100 * 2**20, 2**40):
        batch = cpu_batch_size(per_image)
        assert batch & (batch - 1) == 0 and MIN_CPU_BATCH <= batch <= MAX_CPU_BATCH
        assert batch == MIN_CPU_BATCH or batch * per_image <= CPU_BATCH_BYTES
        assert batch == MAX_CPU_BATCH or 2 * batch * per_image > CPU_BATCH_BYTES
        assert batch <= previous
        previous = batch
    assert cpu_batch_size(1) == 16 and cpu_batch_size(2**40) == 4  # OpenVINO halves below 4


@pytest.mark.parametrize(("size", "batch"), [(150, 16), (224, 8), (448, 4)])
def test_vgg16_gets_fewer_images_a_batch_as_its_inputs_grow(size, batch):
    vgg = get_backbone("vgg16")
    traced = trace_layers(vgg, vgg.skeleton("none"), size)
    per_image = traced_activation_bytes(traced, size)
    # block1's two 64-channel float32 maps live together
    assert per_image == pytest.approx(2 * 64 * size * size * 4, rel=0.05)
    assert cpu_batch_size(per_image) == batch


def test_the_chosen_batch_is_said_recorded_and_shown(small_photos, tmp_path, capsys):
    size = 96
    store = tmp_path / "chosen.h5"
    extract(
        small_photos, "resnet18", ["layer2"], store=store, weights="none", image_size=size,
        pool="avg", workers=0, device="cpu",
    )  # fmt: skip
    expected = 16  # resnet18 to layer2 at 96 px: about 1.3 MB of activations an image
    said = capsys.readouterr().err
    assert f"Batch size {expected} (on the CPU, for " in said
    with h5py.File(store) as f:
        assert f["features"]["layer2@avg"].attrs["batch_size"] == expected
    with FeatureStore(store) as opened:
        assert f"batch {expected}" in opened.summary()
        assert opened.meta["history"][-1]["batch_size"] == expected

    given = tmp_path / "given.h5"
    extract(
        small_photos, "resnet18", ["layer2"], store=given, weights="none", image_size=size,
        pool="avg", workers=0, device="cpu", batch_size=3,
    )  # fmt: skip
    assert "Batch size" not in capsys.readouterr().err
    with h5py.File(given) as f:
        assert f["features"]["layer2@avg"].attrs["batch_size"] == 3


@pytest.mark.parametrize("odd", ["many", np.array([16, 32]), -1])
def test_info_shows_a_batch_size_it_did_not_write_without_failing(
    small_photos, tmp_path, odd, capsys
):
    store = tmp_path / "odd.h5"
    extract(
        small_photos, "resnet18", ["layer1"], store=store, weights="none", image_size=32,
        pool="avg", workers=0, device="cpu", quiet=True,
    )  # fmt: skip
    with h5py.File(store, "r+") as f:  # a store edited by hand, or sent by someone
        f["features"]["layer1@avg"].attrs["batch_size"] = odd
    with FeatureStore(store) as opened:
        assert f"batch {odd}" in opened.summary()
