"""The backbone registry and layer taps: Keras layer names, one forward pass that stops after
the deepest requested layer, `featx layers`, and loading weights (files, prefixes, safetensors,
and the offline errors when pretrained weights are not cached)."""

from __future__ import annotations

from collections import Counter

import pytest
import timm
import torch
import torchvision
from conftest import assert_one_sentence_error, invoke_featx, run_featx, seeded
from torch import nn

from featx.backbones.layers import trace_layers
from featx.backbones.registry import available_backbones, get_backbone
from featx.backbones.tap import LayerTap
from featx.backbones.weights import state_dict_sha256
from featx.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KERAS_VGG16 = [
    *(f"block1_conv{i}" for i in (1, 2)), "block1_pool",
    *(f"block2_conv{i}" for i in (1, 2)), "block2_pool",
    *(f"block3_conv{i}" for i in (1, 2, 3)), "block3_pool",
    *(f"block4_conv{i}" for i in (1, 2, 3)), "block4_pool",
    *(f"block5_conv{i}" for i in (1, 2, 3)), "block5_pool",
]  # fmt: skip
# Keras VGG16 output shapes at 224 x 224 (channels first)
KERAS_VGG16_SHAPES = {
    "block1_conv2": (64, 224, 224),
    "block1_pool": (64, 112, 112),
    "block2_pool": (128, 56, 56),
    "block3_conv3": (256, 56, 56),
    "block3_pool": (256, 28, 28),
    "block4_pool": (512, 14, 14),
    "block5_conv3": (512, 14, 14),
    "block5_pool": (512, 7, 7),
}


# ---- layer names --------------------------------------------------------------------------
@pytest.mark.slow
def test_vgg16_keras_layer_names():
    vgg16 = get_backbone("vgg16")
    assert list(vgg16.aliases) == KERAS_VGG16
    assert vgg16.module_path("block4_pool") == "features.23"
    assert vgg16.module_path("block5_pool") == "features.30"
    assert vgg16.layer_name("features.23") == "block4_pool"
    assert vgg16.module_path("features.23") == "features.23"  # module paths pass through

    model = torchvision.models.vgg16()
    modules = dict(model.named_modules())
    for name, path in vgg16.aliases.items():
        module = modules[path]
        if name.endswith("pool"):
            assert isinstance(module, nn.MaxPool2d), name
        else:  # Keras convs include their activation: the ReLU right after the Conv2d
            index = int(path.split(".")[1])
            assert isinstance(module, nn.ReLU), name
            assert isinstance(model.features[index - 1], nn.Conv2d), name

    infos = {i.name: i for i in trace_layers(vgg16, model, 224)}
    for name, shape in KERAS_VGG16_SHAPES.items():
        assert infos[name].shape == shape, name


@pytest.mark.slow
def test_vgg19_keras_layer_names():
    vgg19 = get_backbone("vgg19")
    assert vgg19.module_path("block5_pool") == "features.36"
    assert vgg19.module_path("block3_conv4") == "features.17"
    assert len(vgg19.aliases) == 16 + 5
    model = torchvision.models.vgg19()
    modules = dict(model.named_modules())
    assert all(
        isinstance(modules[p], nn.MaxPool2d) for a, p in vgg19.aliases.items() if "pool" in a
    )


@pytest.mark.slow
def test_featx_layers_vgg16_lists_keras_names_shapes_and_sizes(tmp_path):
    result = invoke_featx("layers", "vgg16")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.strip()}
    for name in KERAS_VGG16:
        assert name in lines, name
    row = lines["block1_pool"]
    assert row[1] == "features.4" and row[2] == "64x112x112"
    assert row[3:5] == ["3.2", "MB"]  # 64 * 112 * 112 * 4 bytes, float32
    assert lines["block4_pool"][2] == "512x14x14"


def test_featx_layers_timm_model_offers_forward_features(tmp_path):
    result = invoke_featx("layers", "efficientnet_lite0", "--image-size", "96")
    assert result.returncode == 0, result.stderr
    names = [line.split()[0] for line in result.stdout.splitlines()[2:]]
    assert "forward_features" in names and "blocks.4" in names
    assert names.index("blocks.4") < names.index("forward_features")
    ff = next(line for line in result.stdout.splitlines() if line.startswith("forward_features"))
    assert "1280x3x3" in ff


@pytest.mark.slow
def test_unknown_layer_names_close_matches(small_photos, tmp_path):
    result = invoke_featx(
        "extract", small_photos, "--backbone", "vgg16", "--weights", "none",
        "--layer", "block4_pol", "--image-size", "32", "--workers", "0",
        "--store", tmp_path / "s.h5",
    )  # fmt: skip
    message = assert_one_sentence_error(result)
    assert "block4_pol" in message and "block4_pool" in message
    assert "featx layers vgg16" in message
    assert not (tmp_path / "s.h5").exists()


def test_unknown_backbone_names_close_matches():
    result = invoke_featx("layers", "resnet19")
    message = assert_one_sentence_error(result)
    assert "resnet18" in message
    result = invoke_featx("layers", "timm:resnet_18")
    assert "Close matches" in assert_one_sentence_error(result)


# ---- one pass, stopping after the deepest requested layer ---------------------------------
def started_modules(model: nn.Module) -> tuple[Counter, list]:
    """Count how often each module starts its forward (pre-hooks fire even if it never ends)."""
    calls: Counter = Counter()
    handles = [
        module.register_forward_pre_hook(lambda _m, _i, name=name: calls.update([name]))
        for name, module in model.named_modules()
        if name
    ]
    return calls, handles


def modules_after(model: nn.Module, deepest: str, x: torch.Tensor) -> list[str]:
    """Module paths that start after `deepest` ends in a plain forward pass (excluding its
    children and the containers that hold it)."""
    order, ended = [], []

    def pre(name):
        if ended and not name.startswith(deepest + ".") and not deepest.startswith(name + "."):
            order.append(name)

    handles = [m.register_forward_pre_hook(lambda _m, _i, n=n: pre(n)) for n, m in
               model.named_modules() if n]  # fmt: skip
    handles.append(
        dict(model.named_modules())[deepest].register_forward_hook(lambda *_: ended.append(True))
    )
    with torch.inference_mode():
        model(x)
    for h in handles:
        h.remove()
    return order


@pytest.mark.parametrize(
    "builder, requested, deepest",
    [
        (torchvision.models.vgg16, ["features.23", "features.9"], "features.23"),
        (torchvision.models.resnet18, ["layer2", "layer1", "conv1"], "layer2"),
        (lambda: timm.create_model("tf_efficientnet_lite0"), ["blocks.1", "blocks.4"], "blocks.4"),
    ],
    ids=["vgg16", "resnet18", "efficientnet_lite0"],
)
@pytest.mark.slow
def test_tap_stops_after_the_deepest_requested_layer(builder, requested, deepest):
    model = seeded(builder)
    x = torch.randn(2, 3, 64, 64)
    later = modules_after(model, deepest, x)
    assert later  # the model does have modules after the deepest layer
    calls, handles = started_modules(model)
    tap = LayerTap(model, requested)
    with torch.inference_mode():
        out = tap(x)
    for h in handles:
        h.remove()
    assert list(out) == requested
    assert all(calls[name] == 1 for name in requested)
    assert [name for name in later if calls[name]] == []

    plain = {}
    hooks = [
        dict(model.named_modules())[n].register_forward_hook(
            lambda _m, _i, o, n=n: plain.setdefault(n, o)
        )
        for n in requested
    ]
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    for name in requested:
        torch.testing.assert_close(out[name], plain[name])


def test_tap_forward_features_skips_the_head():
    model = seeded(timm.create_model, model_name="tf_efficientnet_lite0")
    x = torch.randn(2, 3, 64, 64)
    calls, handles = started_modules(model)
    with torch.inference_mode():
        out = LayerTap(model, ["blocks.2", "forward_features"], pool="avg")(x)
        want = model.forward_features(x)
    for h in handles:
        h.remove()
    assert calls["conv_head"] == 2 and calls["bn2"] == 2  # tap + reference forward_features
    assert calls["global_pool"] == 0 and calls["classifier"] == 0
    torch.testing.assert_close(out["forward_features"], want.mean(dim=(2, 3)))
    assert out["blocks.2"].shape == (2, 40)


# ---- weights ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet18_files(tmp_path_factory):
    """A seeded resnet18 state dict saved as plain .pth, with a `module.` prefix (DataParallel),
    wrapped in {"state_dict": ...}, and as .safetensors."""
    from safetensors.torch import save_file

    tmp = tmp_path_factory.mktemp("weights")
    model = seeded(torchvision.models.resnet18)
    state = model.state_dict()
    files = {
        "plain": tmp / "r18.pth",
        "module": tmp / "r18-dataparallel.pth",
        "wrapped": tmp / "r18-checkpoint.pt",
        "safetensors": tmp / "r18.safetensors",
    }
    torch.save(state, files["plain"])
    torch.save({f"module.{k}": v for k, v in state.items()}, files["module"])
    torch.save({"state_dict": state, "epoch": 3}, files["wrapped"])
    save_file({k: v.contiguous() for k, v in state.items()}, str(files["safetensors"]))
    return model, files


@pytest.mark.slow
def test_weights_files_in_every_form_load_the_same_tensors(resnet18_files):
    model, files = resnet18_files
    want = state_dict_sha256(model)
    record = get_backbone("resnet18")
    for kind, path in files.items():
        loaded = record.load(str(path))
        assert loaded.weights_sha256 == want, kind
        assert loaded.weights.startswith(f"file:{path.name} sha256:"), kind
        assert not loaded.model.training


@pytest.mark.slow
def test_safetensors_and_prefixed_files_extract_equal_features(
    small_photos, tmp_path, resnet18_files
):
    from featx import FeatureStore, extract

    _, files = resnet18_files
    arrays = []
    for kind in ("plain", "module", "safetensors"):
        result = extract(
            small_photos, "resnet18", ["layer2"], store=tmp_path / f"{kind}.h5",
            weights=str(files[kind]), image_size=48, workers=0, device="cpu", quiet=True,
        )  # fmt: skip
        with FeatureStore(result.store) as store:
            arrays.append(store.read("layer2"))
            assert store.meta["weights_spec"] == str(files[kind].resolve())
    assert all((a == arrays[0]).all() for a in arrays[1:])


def test_mismatched_weights_file_is_one_sentence(small_photos, tmp_path):
    other = tmp_path / "mobilenet.pth"
    torch.save(seeded(torchvision.models.mobilenet_v3_small).state_dict(), other)
    bad = tmp_path / "not-weights.pth"
    bad.write_bytes(b"this is not a torch file")
    for path, words in ((other, "does not fit resnet18"), (bad, "cannot read weights file")):
        result = invoke_featx(
            "extract", small_photos, "--backbone", "resnet18", "--weights", path,
            "--layer", "layer1", "--image-size", "32", "--workers", "0",
            "--store", tmp_path / "s.h5",
        )  # fmt: skip
        assert words in assert_one_sentence_error(result)
        assert not (tmp_path / "s.h5").exists()
    with pytest.raises(UsageError, match="does not exist"):
        get_backbone("resnet18").load(str(tmp_path / "missing.pth"))


@pytest.mark.slow
def test_resnet34_tensors_do_not_fit_resnet18(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(seeded(torchvision.models.resnet34).state_dict(), path)
    with pytest.raises(UsageError, match="unexpected keys"):
        get_backbone("resnet18").load(str(path))
    wide = seeded(torchvision.models.resnet18, num_classes=10).state_dict()
    torch.save(wide, path)
    with pytest.raises(UsageError, match=r"'fc.weight' has shape \(10, 512\)"):
        get_backbone("resnet18").load(str(path))


@pytest.mark.slow
def test_torchvision_weights_not_cached_offline(small_photos, tmp_path):
    cache = tmp_path / "torch-home"
    cache.mkdir()
    result = run_featx(
        "extract", small_photos, "--backbone", "resnet18", "--weights", "default",
        "--layer", "layer1", "--workers", "0", cwd=tmp_path,
        env={"TORCH_HOME": str(cache)},
    )  # fmt: skip
    message = assert_one_sentence_error(result)
    assert str(cache / "hub" / "checkpoints") in message
    assert "--weights FILE" in message and "resnet18-f37072fd.pth" in message
    assert not (tmp_path / "stores" / "pets-resnet18-default-std.h5").exists()
    checkpoints = cache / "hub" / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())  # no partial download


@pytest.mark.slow
def test_timm_weights_not_cached_offline(small_photos, tmp_path):
    hf_home, torch_home = tmp_path / "hf-home", tmp_path / "torch-home"
    result = run_featx(
        "extract", small_photos, "--backbone", "timm:resnet18", "--layer", "layer1",
        "--workers", "0", cwd=tmp_path,
        # HF_HUB_OFFLINE skips huggingface_hub's retries (about 50 s without a network)
        env={"HF_HOME": str(hf_home), "TORCH_HOME": str(torch_home), "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    message = assert_one_sentence_error(result)
    assert str(hf_home / "hub") in message
    assert "--weights FILE" in message


def test_named_weights_that_do_not_exist():
    with pytest.raises(UsageError, match="IMAGENET1K_V1"):
        get_backbone("resnet18").weights_identity("IMAGENET1K_V9")


# Building the larger architectures (even on the meta device) costs up to a second each.
QUICK_TO_BUILD = {
    "efficientnet_b0", "efficientnet_lite0", "inception_v3", "mobilenet_v2",
    "mobilenet_v3_large", "mobilenet_v3_small", "resnet18", "resnet34", "resnet50",
    "vgg16", "vgg19",
}  # fmt: skip


def _builtin(name: str):
    return name if name in QUICK_TO_BUILD else pytest.param(name, marks=pytest.mark.slow)


@pytest.mark.parametrize("name", [_builtin(name) for name in available_backbones()])
def test_builtin_default_weights_and_preprocessing_match_the_libraries(name):
    """The registry knows each built-in's default weights and preprocessing without importing
    torch (fast start-up); they must be exactly what torchvision and timm say, and the
    architecture they fill the one the library builds for them."""
    import dataclasses

    from featx.backbones.sources.timm import PACKAGED_LITE0_DIST

    def shapes(build) -> dict[str, tuple[int, ...]]:
        with torch.device("meta"):
            return {k: tuple(v.shape) for k, v in build().state_dict().items()}

    record = get_backbone(name)
    computed = dataclasses.replace(record, default=None)
    assert record.default_preprocessing() == computed.default_preprocessing(), name
    assert record.default_preprocessing("none") == computed.default_preprocessing("none")
    known, library = record.weights(), computed.weights()
    assert shapes(known.architecture) == shapes(library.architecture), name
    if not known.identity.startswith(PACKAGED_LITE0_DIST):
        assert known.identity == library.identity, name
    else:
        tag = timm.models.get_pretrained_cfg(record.architecture).tag
        assert library.identity == f"timm:{record.architecture}.{tag}"


@pytest.mark.slow
def test_an_inductor_cache_path_that_is_a_file_is_one_sentence(small_photos, tmp_path):
    """torch creates TORCHINDUCTOR_CACHE_DIR when torchvision is imported; even the eager
    engine imports torchvision, so a file there is named, not blamed on the input size."""
    (tmp_path / "afile").write_text("not a folder")
    result = run_featx(
        "extract", small_photos, "--backbone", "resnet18", "--layer", "layer1",
        "--weights", "none", "--engine", "eager", "--workers", "0",
        "--store", tmp_path / "s.h5",
        cwd=tmp_path, env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "afile")},
    )  # fmt: skip
    message = assert_one_sentence_error(result)
    assert "TORCHINDUCTOR_CACHE_DIR" in message and "input" not in message
    assert not (tmp_path / "s.h5").exists()
