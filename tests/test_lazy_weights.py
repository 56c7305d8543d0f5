"""Loading only the weights the requested layers use: the same features and weights_sha256 as
a full load, nothing above the deepest layer materialised, and stores made before still match."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from featx.backbones import weights as weights_io
from featx.backbones.registry import get_backbone
from featx.backbones.tap import LayerTap
from featx.backbones.weights import state_dict_sha256
from featx.errors import UsageError
from featx.runtime import cache_root
from tests.conftest import assert_one_sentence_error, invoke_featx, seeded

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 48
BATCH = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """resnet18 with seeded random weights (BatchNorms not the identity), saved as a .pth."""
    model = seeded(torchvision.models.resnet18)
    path = tmp_path_factory.mktemp("weights") / "r18.pth"
    torch.save(model.state_dict(), path)
    return model, path


def _features(model: torch.nn.Module, layer: str) -> torch.Tensor:
    with torch.inference_mode():
        return LayerTap(model, [layer])(BATCH)[layer]


def _forget_hashes() -> None:
    shutil.rmtree(cache_root() / "weights-sha256", ignore_errors=True)


@pytest.mark.slow
def test_early_layer_load_matches_the_full_load(resnet18_file, tmp_path):
    model, path = resnet18_file
    safetensors = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(safetensors))
    record = get_backbone("resnet18")
    for weights in (path, safetensors):
        _forget_hashes()
        full = record.load(str(weights))
        part = record.load(str(weights), ["layer2"], SIZE)
        assert part.weights_sha256 == full.weights_sha256 == state_dict_sha256(model)
        assert torch.equal(_features(part.model, "layer2"), _features(model, "layer2"))
        assert torch.equal(_features(full.model, "layer2"), _features(model, "layer2"))


def test_modules_above_the_deepest_layer_hold_nothing(resnet18_file):
    _, path = resnet18_file
    for weights in (str(path), "none"):
        model = get_backbone("resnet18").load(weights, ["layer1"], SIZE).model
        for above in ("layer2", "layer3", "layer4", "fc"):
            module = model.get_submodule(above)
            assert sum(p.numel() for p in module.parameters()) == 0, (weights, above)
        kept = list(model.layer1.parameters()) + list(model.conv1.parameters())
        assert kept and not any(t.is_meta for t in model.state_dict().values())


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/maps")
def test_the_weights_file_is_unmapped_after_loading(resnet18_file):
    _, path = resnet18_file
    _forget_hashes()
    loaded = get_backbone("resnet18").load(str(path), ["layer1"], SIZE)
    assert str(path.resolve()) not in Path("/proc/self/maps").read_text()
    assert loaded.weights_sha256 == state_dict_sha256(resnet18_file[0])


@pytest.mark.slow
def test_reading_in_small_windows_hashes_and_loads_the_same(resnet18_file, monkeypatch):
    model, path = resnet18_file
    monkeypatch.setattr(weights_io, "READ_WINDOW", 1 << 20)  # 45 remaps, large tensors in rows
    _forget_hashes()
    loaded = get_backbone("resnet18").load(str(path))
    assert loaded.weights_sha256 == state_dict_sha256(model)
    assert torch.equal(_features(loaded.model, "layer4"), _features(model, "layer4"))


@pytest.mark.slow
def test_a_rewritten_file_is_hashed_again(tmp_path):
    path = tmp_path / "r18.pth"
    record = get_backbone("resnet18")
    hashes = []
    for seed in (1, 2):  # same size, new bytes and mtime
        model = seeded(torchvision.models.resnet18, seed=seed)
        torch.save(model.state_dict(), path)
        hashes.append(record.load(str(path), ["layer1"], SIZE).weights_sha256)
        assert hashes[-1] == state_dict_sha256(model)
    assert hashes[0] != hashes[1]


def test_half_precision_file_hashes_as_the_float_model(resnet18_file, tmp_path):
    model, _ = resnet18_file
    path = tmp_path / "r18-half.pth"
    half = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(half, path)
    reference = torchvision.models.resnet18().eval()
    reference.load_state_dict(torch.load(path, weights_only=True))  # what featx did before
    loaded = get_backbone("resnet18").load(str(path), ["layer2"], SIZE)
    assert loaded.weights_sha256 == state_dict_sha256(reference)
    assert torch.equal(_features(loaded.model, "layer2"), _features(reference, "layer2"))


def test_file_missing_a_needed_tensor_is_one_sentence(resnet18_file, small_photos, tmp_path):
    model, _ = resnet18_file
    state = model.state_dict()
    del state["layer1.0.conv1.weight"]
    path = tmp_path / "holed.pth"
    torch.save(state, path)
    result = invoke_featx(
        "extract", small_photos, "--backbone", "resnet18", "--weights", path,
        "--layer", "layer1", "--image-size", "32", "--workers", "0",
        "--store", tmp_path / "s.h5",
    )  # fmt: skip
    message = assert_one_sentence_error(result)
    assert "does not fit resnet18: 1 missing keys such as 'layer1.0.conv1.weight'" in message
    assert not (tmp_path / "s.h5").exists()
    with pytest.raises(UsageError, match="does not fit"):
        get_backbone("resnet18").load(str(path), ["layer1"], 32)


@pytest.mark.slow
def test_a_store_made_before_is_still_reused(resnet18_file, small_photos, tmp_path):
    from featx import FeatureStore, extract

    model, path = resnet18_file
    store = tmp_path / "s.h5"
    common = dict(weights=str(path), image_size=32, workers=0, device="cpu", quiet=True)
    extract(small_photos, "resnet18", ["layer1"], store=store, **common)
    with FeatureStore(store) as s:
        # the value featx wrote before it loaded lazily: the hash of the whole loaded model
        assert s.meta["weights_sha256"] == state_dict_sha256(model)
        before = s.read("layer1")
    _forget_hashes()  # hashed from the file again, not read from the cache
    result = extract(small_photos, "resnet18", ["layer1", "layer3"], store=store, **common)
    assert result.reused == ["layer1"]
    with FeatureStore(store) as s:
        assert (s.read("layer1") == before).all()
        assert "layer3" in s.layers


@pytest.mark.slow
def test_torchvision_cached_checkpoints_load_as_torchvision_does(tmp_path, monkeypatch):
    """A checkpoint in torch's cache (random weights under the real file names, saved as
    before torch 0.4.1 without BatchNorm counts; densenet's in the old key names torchvision
    renames) gives what torchvision's own loading gives."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    for name, layer in (("resnet18", "layer2"), ("densenet121", "features.denseblock1")):
        enum = torchvision.models.get_model_weights(name).DEFAULT
        state = seeded(getattr(torchvision.models, name)).state_dict()
        state = {
            _legacy_densenet_name(k) if name.startswith("densenet") else k: v
            for k, v in state.items()
            if not k.endswith("num_batches_tracked")
        }
        torch.save(state, cache / Path(enum.url).name)
        reference = torchvision.models.get_model(name, weights=enum).eval()
        loaded = get_backbone(name).load("default", [layer], SIZE)
        assert loaded.weights_sha256 == state_dict_sha256(reference), name
        assert torch.equal(_features(loaded.model, layer), _features(reference, layer)), name


def _legacy_densenet_name(key: str) -> str:
    """torchvision's old DenseNet names: `denselayer1.norm1.weight` -> `...norm.1.weight`."""
    import re

    return re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", key)


@pytest.mark.slow
def test_timm_weights_file_loads_only_the_needed_tensors(tmp_path):
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = timm.create_model("resnet18").eval()
    path = tmp_path / "timm-r18.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = get_backbone("timm:resnet18").load(str(path), ["layer1"], SIZE)
    assert loaded.weights_sha256 == state_dict_sha256(model)
    assert sum(p.numel() for p in loaded.model.layer4.parameters()) == 0
    assert torch.equal(_features(loaded.model, "layer1"), _features(model, "layer1"))


def test_a_weights_file_is_hashed_once_until_it_changes(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"a" * 1000)
    assert weights_io.file_sha256(path) == hashlib.sha256(b"a" * 1000).hexdigest()
    # The cached digest stands in for the file until its size or mtime changes.
    entries = {p: p.read_text() for p in (cache_root() / "weights-sha256").iterdir()}
    mine = [p for p, v in entries.items() if v == hashlib.sha256(b"a" * 1000).hexdigest()]
    assert mine
    mine[0].write_text("0" * 64)
    assert weights_io.file_sha256(path) == "0" * 64
    path.write_bytes(b"b" * 1000)
    os.utime(path, ns=(1, 10**18))
    assert weights_io.file_sha256(path) == hashlib.sha256(b"b" * 1000).hexdigest()


@pytest.mark.skipif(sys.platform != "linux", reason="the XDG cache folder is Linux's")
def test_weights_hashes_go_to_the_platform_cache_folder_unless_featx_cache_is_set(tmp_path):
    import subprocess

    path = tmp_path / "w.pth"
    path.write_bytes(b"c" * 1000)
    code = "from pathlib import Path; from featx.backbones.weights import file_sha256\n"
    code += f"print(file_sha256(Path({str(path)!r})))"
    env = {k: v for k, v in os.environ.items() if k != "FEATX_CACHE"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    for extra, where in (
        ({}, tmp_path / "xdg" / "featx"),
        ({"FEATX_CACHE": str(tmp_path / "own")}, tmp_path / "own"),
    ):
        done = subprocess.run(
            [sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True
        )
        assert done.stdout.strip() == hashlib.sha256(b"c" * 1000).hexdigest(), done.stderr
        assert len(list((where / "weights-sha256").iterdir())) == 1, where


def test_a_blocked_hash_cache_only_costs_hashing_again(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "w.pth"
    path.write_bytes(b"d" * 1000)
    digest = hashlib.sha256(b"d" * 1000).hexdigest()
    assert weights_io.file_sha256(path) == digest
    (entry,) = (tmp_path / "cache" / "weights-sha256").iterdir()
    entry.unlink()
    entry.mkdir()  # the entry's place is taken: it can be neither read nor written
    assert weights_io.file_sha256(path) == digest
    assert get_backbone("resnet18").weights_identity(str(path)).endswith(digest[:16])
    assert entry.is_dir()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anyway")
def test_a_read_only_hash_cache_only_costs_hashing_again(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "weights-sha256").mkdir(parents=True)
    (tmp_path / "cache" / "weights-sha256").chmod(0o500)
    path = tmp_path / "w.pth"
    path.write_bytes(b"e" * 1000)
    try:
        assert weights_io.file_sha256(path) == hashlib.sha256(b"e" * 1000).hexdigest()
    finally:
        (tmp_path / "cache" / "weights-sha256").chmod(0o700)
