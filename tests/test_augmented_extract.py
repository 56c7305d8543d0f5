"""`featx extract --augment K`: K seeded augmented views of every training image, none of
validation or test images, resumable like plain extraction."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_folder
from typer.testing import CliRunner

from featx.backbones.registry import get_backbone
from featx.backbones.tap import LayerTap
from featx.cli import app
from featx.data.augment import AugmentConfig, Augmenter, view_seed
from featx.data.folders import load_image
from featx.extraction.run import extract
from featx.store.feature_store import FeatureStore

SETTINGS = AugmentConfig(rotation=25, shift=0.1, zoom=0.15, brightness=0.2)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYER = dict(backbone="resnet18", layers=["layer3"], weights="none", image_size=48, pool="avg")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """train: 2 classes x 3, validation: 2 x 2, test: 2 x 1 photos."""
    root = tmp_path_factory.mktemp("aug") / "pets"
    make_folder(root, {"cat": 3, "dog": 3}, split="train")
    make_folder(root, {"cat": 2, "dog": 2}, split="validation", start=20)
    make_folder(root, {"cat": 1, "dog": 1}, split="test", start=40)
    return root


def run(data: Path, store: Path, views: int = 3, seed: int = 7, **options):
    kwargs = {**LAYER, **options}
    backbone, layers = kwargs.pop("backbone"), kwargs.pop("layers")
    return extract(
        data, backbone, layers, store=store, augment=views, augment_config=SETTINGS, seed=seed,
        workers=0, quiet=True, **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def augmented(photos, tmp_path_factory) -> Path:
    return run(photos, tmp_path_factory.mktemp("stores") / "aug.h5").store


def test_k_views_of_each_training_image_and_none_of_the_others(augmented):
    with FeatureStore(augmented) as store:
        files = store._file["files"]
        file_split = files["split"].asstr()[()]
        file_path = files["path"].asstr()[()]
        sources, views = store.sources(), store.views()
        splits, paths, labels = store.split_of_rows(), store.paths(), store.labels()
        meta = store.meta["augment"]
        features = store.read("layer3@avg")

    assert meta == {"views": 3, "seed": 7, "config": SETTINGS.to_dict()}
    for index, split in enumerate(file_split):
        rows = np.flatnonzero(sources == index)
        expected = [0, 1, 2, 3] if split == "train" else [0]
        assert views[rows].tolist() == expected, file_path[index]
        assert set(paths[rows]) == {file_path[index]} and set(splits[rows]) == {split}
        assert len(set(labels[rows])) == 1
        if split == "train":  # every view is a different picture
            assert len({features[r].tobytes() for r in rows}) == 4
    assert len(sources) == 6 * 4 + 4 + 2


def test_an_augmented_row_is_the_backbone_on_its_seeded_view(augmented, photos):
    record = get_backbone("resnet18")
    loaded = record.load("none")
    preprocessing = loaded.preprocessing.with_image_size(48)
    tap = LayerTap(loaded.model, ["layer3"], pool="avg")
    with FeatureStore(augmented) as store:
        sources, views = store.sources(), store.views()
        features, paths = store.read("layer3@avg"), store.paths()
    for row in (1, 6):  # view 1 of the first image, view 2 of the second
        image = load_image(photos / paths[row])
        seed = view_seed(7, int(sources[row]), int(views[row]))
        view = preprocessing(image, lambda im, seed=seed: Augmenter(SETTINGS)(im, seed))
        with torch.inference_mode():
            expected = tap(view[None])["layer3"][0].numpy()
        assert views[row] > 0
        np.testing.assert_allclose(features[row], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_views_reproduce_for_a_seed_and_change_with_it(augmented, photos, tmp_path):
    again = run(photos, tmp_path / "again.h5").store
    other = run(photos, tmp_path / "other.h5", seed=8).store
    with FeatureStore(augmented) as a, FeatureStore(again) as b, FeatureStore(other) as c:
        first, second, third = (s.read("layer3@avg") for s in (a, b, c))
        original = a.views() == 0
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first[original], third[original])
    assert not np.isclose(first[~original], third[~original]).all(axis=1).any()


def test_augmentation_flags_and_file_are_recorded_in_the_store(photos, tmp_path):
    settings = tmp_path / "augment.toml"
    settings.write_text("zoom = 0.3\nrotation = 5\n")
    store = tmp_path / "flags.h5"
    result = CliRunner().invoke(
        app,
        ["extract", str(photos), "--backbone", "resnet18", "--weights", "none",
         "--layer", "layer3", "--pool", "avg", "--image-size", "32", "--workers", "0",
         "--augment", "1", "--seed", "3", "--augment-config", str(settings),
         "--rotation", "15", "--no-hflip", "--store", str(store), "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    with FeatureStore(store) as opened:
        recorded = opened.meta["augment"]
        assert "augment     1 views per training image, seed 3" in opened.summary()
    wanted = AugmentConfig(rotation=15, zoom=0.3, hflip=False)
    assert recorded == {"views": 1, "seed": 3, "config": wanted.to_dict()}


def test_augmentation_flags_without_views_are_refused(photos, tmp_path):
    result = CliRunner().invoke(
        app,
        ["extract", str(photos), "--backbone", "resnet18", "--layer", "layer3",
         "--rotation", "15", "--store", str(tmp_path / "x.h5")],
    )  # fmt: skip
    assert result.exit_code == 2
    assert result.stderr == (
        "featx: augmentation settings apply to augmented views; add --augment K.\n"
    )


# Extraction in a fresh interpreter with chunks of one batch, so that a kill lands mid-run.
SMALL_CHUNKS = (
    "import sys, featx.extraction.run as e; e.CHUNK_BYTES = int(sys.argv.pop(1)); "
    "from featx.cli import app; app()"
)


@pytest.mark.slow
def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    data = tmp_path / "pets"
    make_folder(data, {"cat": 4, "dog": 4}, split="train", size=(320, 240))
    make_folder(data, {"cat": 2, "dog": 2}, split="validation", size=(320, 240), start=20)

    def command(store: Path) -> list[str]:
        return [
            sys.executable, "-c", SMALL_CHUNKS, "2048", "extract", str(data),
            "--backbone", "resnet18", "--weights", "none", "--layer", "layer3", "--pool", "avg",
            "--image-size", "48", "--batch-size", "2", "--workers", "0", "--augment", "3",
            "--rotation", "30", "--seed", "5", "--store", str(store),
        ]  # fmt: skip

    store = tmp_path / "killed.h5"
    partial = tmp_path / "killed.h5.partial"
    process = subprocess.Popen(command(store), cwd=tmp_path, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (partial / "chunk-000000.npz").exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = len(list(partial.glob("chunk-*.npz")))
    assert not store.exists() and 1 <= done < 20  # 8 x 4 + 4 items in chunks of 2

    resumed = subprocess.run(command(store), cwd=tmp_path, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming" in resumed.stderr and not partial.exists()
    whole = tmp_path / "whole.h5"
    assert subprocess.run(command(whole), cwd=tmp_path, capture_output=True).returncode == 0
    with FeatureStore(store) as a, FeatureStore(whole) as b:
        np.testing.assert_array_equal(a.read("layer3@avg"), b.read("layer3@avg"))
        np.testing.assert_array_equal(a.views(), b.views())
        np.testing.assert_array_equal(a.sources(), b.sources())
        assert a.meta["augment"] == b.meta["augment"]
