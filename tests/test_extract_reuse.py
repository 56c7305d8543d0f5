"""Reusing a store: an identical command computes nothing (and never loads the network), a new
layer is added next to bit-identical old ones, and a store made from other data, weights or
preprocessing is refused with a message naming the difference, unless --overwrite."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
import torchvision
from conftest import (
    assert_one_sentence_error,
    file_digest,
    invoke_featx,
    make_folder,
    photo,
    run_featx,
)

from featx import FeatureStore, extract
from featx.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def quick(data, store, layers=("layer1",), **options):
    options = {
        "weights": "none", "image_size": 32, "workers": 0, "device": "cpu", "batch_size": 4,
        **options,
    }  # fmt: skip
    return extract(data, "resnet18", list(layers), store=store, **options)


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "pets"
    make_folder(root, {"cat": 3, "dog": 3})
    return root


@pytest.mark.slow
def test_identical_command_does_not_load_the_network(data, tmp_path):
    """The store is made with `--weights default` from a torch cache holding a (seeded)
    resnet18 checkpoint; the cache is then emptied. Loading the network would now fail
    (offline), so the identical command succeeding proves it was not loaded."""
    cache = tmp_path / "torch-home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        torch.save(torchvision.models.resnet18().state_dict(), cache / "resnet18-f37072fd.pth")
    env = {"TORCH_HOME": str(tmp_path / "torch-home")}
    args = ["extract", data, "--backbone", "resnet18", "--layer", "layer2", "--workers", "0",
            "--device", "cpu", "--batch-size", "4"]  # fmt: skip
    first = run_featx(*args, cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    store = tmp_path / "stores" / "pets-resnet18-default-std.h5"
    assert first.stdout.strip() == "stores/pets-resnet18-default-std.h5"
    before = file_digest(store)
    (cache / "resnet18-f37072fd.pth").unlink()

    again = run_featx(*args, cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr
    assert "nothing to compute" in again.stderr
    assert again.stdout.strip() == "stores/pets-resnet18-default-std.h5"
    assert file_digest(store) == before
    assert sorted(os.listdir(store.parent)) == [store.name]  # no lock, partial or temp left

    # whereas anything that needs the network now fails, as the proof above assumes
    more = run_featx(*args, "--layer", "layer3", cwd=tmp_path, env=env)
    assert "cannot be downloaded" in assert_one_sentence_error(more)
    assert file_digest(store) == before


def test_identical_call_reuses_every_layer(data, tmp_path):
    store = tmp_path / "s.h5"
    quick(data, store, layers=["layer1", "layer2"], quiet=True)
    before = file_digest(store)
    result = invoke_featx(
        "extract", data, "--backbone", "resnet18", "--weights", "none", "--image-size", "32",
        "--layer", "layer2", "--layer", "layer1", "--store", store,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"All requested layers are already in {store}; nothing to compute." in result.stderr
    assert file_digest(store) == before
    again = quick(data, store, layers=["layer1"], quiet=True)
    assert again.computed == [] and again.reused == ["layer1"] and again.n_rows == 6
    assert file_digest(store) == before


@pytest.mark.slow
def test_new_layer_is_added_and_old_values_stay_bit_identical(data, tmp_path, capsys):
    store = tmp_path / "s.h5"
    first = quick(data, store, layers=["layer1"], pool="avg")
    assert first.computed == ["layer1@avg"]
    with FeatureStore(store) as s:
        old = s.read("layer1@avg")
        old_bytes = s._file["features/layer1@avg"][()].tobytes()
        created = s.meta["created"]
    capsys.readouterr()

    second = quick(data, store, layers=["layer1", "layer3"], pool="avg")
    assert second.computed == ["layer3@avg"] and second.reused == ["layer1@avg"]
    assert "Wrote 1 layer(s) for 6 rows" in capsys.readouterr().err
    third = quick(data, store, layers=["layer1"])  # the same layer, not pooled: a new key
    assert third.computed == ["layer1"]
    with FeatureStore(store) as s:
        assert s.layers == ["layer1", "layer1@avg", "layer3@avg"]
        assert s.read("layer1@avg").tobytes() == old_bytes
        assert np.array_equal(s.read("layer1@avg"), old)
        assert s.read("layer3@avg").shape == (6, 256)
        np.testing.assert_allclose(s.read("layer1").mean(axis=(2, 3)), old, rtol=1e-5, atol=1e-6)
        assert s.meta["created"] == created
        assert [e["layers"] for e in s.meta["history"]] == [["layer1@avg"], ["layer3@avg"],
                                                            ["layer1"]]  # fmt: skip


@pytest.mark.parametrize("change", ["added", "modified", "removed"])
@pytest.mark.slow
def test_changed_dataset_is_refused(data, tmp_path, change):
    store = tmp_path / "s.h5"
    quick(data, store, quiet=True)
    before = file_digest(store)
    target = data / "dog" / "img-004.jpg"
    if change == "added":
        target = data / "dog" / "new.jpg"
        photo(40).save(target)
    elif change == "modified":
        photo(41).save(target)
        stat = target.stat()
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    else:
        target.unlink()
    with pytest.raises(UsageError) as error:
        quick(data, store, layers=["layer2"], quiet=True)
    message = str(error.value)
    assert f"1 {change} (e.g. dog/{target.name})" in message
    assert "--overwrite" in message
    assert file_digest(store) == before

    result = invoke_featx(
        "extract", data, "--backbone", "resnet18", "--weights", "none", "--image-size", "32",
        "--layer", "layer1", "--store", store,
    )  # fmt: skip
    assert f"1 {change}" in assert_one_sentence_error(result)
    assert file_digest(store) == before


@pytest.mark.slow
def test_other_weights_or_preprocessing_are_refused_then_overwritten(data, tmp_path):
    store = tmp_path / "s.h5"
    quick(data, store, quiet=True)
    before = file_digest(store)
    weights = tmp_path / "seeded.pth"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        torch.save(torchvision.models.resnet18().state_dict(), weights)

    cases = [
        (["--weights", weights, "--image-size", "32"], "weights is none (random init, seed 0) "
         "in the store, file:seeded.pth sha256:"),
        (["--weights", "none", "--image-size", "48"], "preprocessing is resize to 32x32"),
        (["--weights", "none"], "resize shorter side to 256 (bilinear), centre crop 224"),
        (["--weights", "none", "--image-size", "32", "--backbone", "resnet34"],
         "backbone is resnet18 in the store, resnet34 now"),
    ]  # fmt: skip
    for options, words in cases:
        backbone = [] if "--backbone" in options else ["--backbone", "resnet18"]
        result = invoke_featx(
            "extract", data, *backbone, *options, "--layer", "layer1", "--store", store
        )
        message = assert_one_sentence_error(result)
        assert words in message and "--overwrite" in message
        assert file_digest(store) == before

    result = invoke_featx(
        "extract", data, "--backbone", "resnet18", "--weights", "none", "--image-size", "48",
        "--layer", "layer2", "--store", store, "--overwrite", "--workers", "0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "--overwrite" in result.stderr
    with FeatureStore(store) as s:
        assert s.layers == ["layer2"]  # the old store is gone, not merged
        assert s.meta["preprocessing"]["resize"] == 48
        assert len(s.meta["history"]) == 1
        assert s.read("layer2").shape == (6, 128, 6, 6)


@pytest.mark.slow
def test_overwrite_of_a_matching_store_recomputes(data, tmp_path):
    store = tmp_path / "s.h5"
    quick(data, store, quiet=True)
    with FeatureStore(store) as s:
        old = s.read("layer1")
    result = quick(data, store, layers=["layer2"], overwrite=True, quiet=True)
    assert result.computed == ["layer2"] and result.reused == []
    with FeatureStore(store) as s:
        assert s.layers == ["layer2"]
    again = quick(data, store, quiet=True)
    with FeatureStore(store) as s:
        assert np.array_equal(s.read("layer1"), old)
    assert again.computed == ["layer1"]


def test_moved_dataset_with_the_same_files_is_reused(data, tmp_path):
    store = tmp_path / "s.h5"
    quick(data, store, quiet=True)
    moved = tmp_path / "elsewhere" / "pets"
    shutil.copytree(data, moved)  # copy2 keeps sizes and modification times
    result = quick(moved, store, quiet=True)
    assert result.computed == [] and result.reused == ["layer1"]
