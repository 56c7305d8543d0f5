"""The feature store: its documented HDF5 layout read with plain h5py, provenance, the
FeatureStore reader, `featx info`, and compression round trips."""

from __future__ import annotations

import importlib.metadata
import json
import re
from datetime import datetime

import h5py
import numpy as np
import pytest
import timm
import torch
import torchvision
from conftest import assert_one_sentence_error, invoke_featx, make_folder

import featx
from featx import FeatureStore, extract
from featx.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = ("bird", "cat", "dog")
SPLITS = {"train": (4, 3, 3), "val": (2, 1, 1), "test": (1, 1, 2)}  # val/ is read as validation
ARGS = (
    "--backbone", "resnet18", "--weights", "none", "--image-size", "40", "--layer", "layer2",
    "--layer", "avgpool", "--batch-size", "4", "--workers", "0", "--device", "cpu",
)  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A split dataset with one unreadable file, extracted by the CLI in this process;
    (dir, data, result)."""
    tmp = tmp_path_factory.mktemp("store")
    data, start = tmp / "birds", 0
    for split, counts in SPLITS.items():
        make_folder(data, dict(zip(CLASSES, counts, strict=True)), split=split, start=start)
        start += sum(counts)
    (data / "test" / "cat" / "broken.jpg").write_text("not a jpeg")
    result = invoke_featx("extract", data, *ARGS, "--store", tmp / "birds.h5", argv=True)
    assert result.returncode == 3, result.stderr
    return tmp, data, result


@pytest.mark.slow
def test_layout_readable_with_plain_h5py(built):
    tmp, data, _ = built
    with h5py.File(tmp / "birds.h5", "r") as f:
        assert f.attrs["featx_format"] == "featx-store" and f.attrs["format_version"] == 1
        meta = json.loads(f.attrs["meta"])
        classes = [c.decode() for c in f["classes"][()]]
        paths = [p.decode() for p in f["rows/path"][()]]
        splits = [s.decode() for s in f["rows/split"][()]]
        labels = f["rows/label"][()]
        sources, views = f["rows/source"][()], f["rows/view"][()]
        layer2, avgpool = f["features/layer2"], f["features/avgpool"]
        assert layer2.shape == (18, 128, 5, 5) and layer2.dtype == np.float32
        assert avgpool.shape == (18, 512, 1, 1)
        assert dict(layer2.attrs) == {
            "layer": "layer2", "module": "layer2", "pool": "none", "precision": "fp32",
            "engine": "eager", "batch_size": 4, "engine_rows": '[["eager", 0, 18]]',
        }  # fmt: skip
        train = np.array(splits) == "train"
        x_train = layer2[np.flatnonzero(train)]
        file_paths = [p.decode() for p in f["files/path"][()]]
        file_sizes = f["files/size"][()]
        assert set(f["files"]) == {"path", "label", "split", "size", "mtime_ns"}
        skipped = dict(
            zip(f["skipped/path"].asstr()[()], f["skipped/reason"].asstr()[()], strict=True)
        )

    assert classes == list(CLASSES)
    assert labels.dtype == np.int32 and len(paths) == len(labels) == 18
    for path, split, label in zip(paths, splits, labels, strict=True):
        folder, class_name = path.split("/")[:2]
        assert {"train": "train", "val": "validation", "test": "test"}[folder] == split
        assert classes[label] == class_name
    assert splits == sorted(splits, key=["train", "validation", "test"].index)
    assert x_train.shape[0] == 10 and np.isfinite(x_train).all() and x_train.std() > 0
    assert list(views) == [0] * 18
    assert [file_paths[s] for s in sources] == paths
    assert len(file_paths) == 19 and "test/cat/broken.jpg" in file_paths
    assert file_sizes[file_paths.index("test/cat/broken.jpg")] == len("not a jpeg")
    assert skipped == {"test/cat/broken.jpg": "not an image"}
    assert meta["dataset"]["root"] == str(data.resolve())


def test_provenance(built):
    tmp, data, _ = built
    with FeatureStore(tmp / "birds.h5") as store:
        meta = store.meta
    assert meta["backbone"] == "resnet18"
    assert meta["weights"] == "none (random init, seed 0)" and meta["weights_spec"] == "none"
    assert re.fullmatch(r"[0-9a-f]{64}", meta["weights_sha256"])
    assert meta["preprocessing"] == {
        "resize": 40, "crop": 0, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "interpolation": "bilinear", "square": True, "decode": "reduced",
    }  # fmt: skip
    assert "resize to 40x40" in meta["preprocessing_text"]
    versions = meta["versions"]
    assert versions["featx"] == featx.__version__
    for name, module in (("torch", torch), ("torchvision", torchvision), ("timm", timm)):
        assert versions[name] == module.__version__  # with the build tag, e.g. 2.15.0+cu132
        assert versions[name].startswith(importlib.metadata.version(name))
    assert {"h5py", "numpy", "python"} <= set(versions)
    created = datetime.strptime(meta["created"], "%Y-%m-%dT%H:%M:%S%z")
    assert abs((datetime.now(created.tzinfo) - created).total_seconds()) < 24 * 3600
    (event,) = meta["history"]
    assert event["command"].startswith("featx extract ")
    assert (
        f"{data} --backbone resnet18" in event["command"] and "--layer avgpool" in event["command"]
    )
    assert event["layers"] == ["layer2", "avgpool"]
    assert re.fullmatch(r"[0-9a-f]{64}", meta["dataset"]["fingerprint"])
    assert meta["dataset"]["n_files"] == 19


def test_reader(built):
    tmp, _, _ = built
    with FeatureStore(tmp / "birds.h5") as store, h5py.File(tmp / "birds.h5", "r") as f:
        everything = f["features/layer2"][()]
        splits = f["rows/split"].asstr()[()]
        labels = f["rows/label"][()]
        assert store.n_rows == 18 and store.layers == ["avgpool", "layer2"]
        assert store.splits == ["train", "validation", "test"]
        assert store.class_names == list(CLASSES)
        assert np.array_equal(store.read("layer2"), everything)
        assert np.array_equal(store.labels(), labels)
        for split in store.splits:
            mask = splits == split
            assert np.array_equal(store.read("layer2", split=split), everything[mask])
            assert np.array_equal(store.labels(split=split), labels[mask])
            assert list(store.paths(split=split)) == list(f["rows/path"].asstr()[()][mask])
        assert store.layer("avgpool").shape == (512, 1, 1)
        assert store.skipped == [("test/cat/broken.jpg", "not an image")]
        with pytest.raises(UsageError, match="has no layer 'layer3'; it has: avgpool, layer2"):
            store.read("layer3")
        with pytest.raises(UsageError, match="no 'unsplit' rows"):
            store.read("layer2", split="unsplit")
        assert "rows=18" in repr(store)


@pytest.mark.parametrize("split", [None, "train", "validation", "test"])
@pytest.mark.parametrize("chunk_rows", [None, 1, 3, 7, 100])
def test_iter_chunks_covers_every_row_once(built, split, chunk_rows):
    tmp, _, _ = built
    with FeatureStore(tmp / "birds.h5") as store:
        want_x, want_y = store.read("layer2", split=split), store.labels(split=split)
        chunks = list(store.iter_chunks("layer2", split=split, chunk_rows=chunk_rows))
    assert all(len(x) == len(y) for x, y in chunks)
    if chunk_rows:
        assert all(len(x) <= chunk_rows for x, _ in chunks)
        assert len(chunks) == -(-len(want_y) // chunk_rows)
    assert np.array_equal(np.concatenate([x for x, _ in chunks]), want_x)
    assert np.array_equal(np.concatenate([y for _, y in chunks]), want_y)


def test_featx_info(built):
    tmp, data, _ = built
    result = invoke_featx("info", tmp / "birds.h5")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "backbone    resnet18" in out
    assert "weights     none (random init, seed 0)" in out
    assert "resize to 40x40" in out
    assert f"{data.resolve()}  (19 files" in out
    assert re.search(r"layer2\s+128x5x5\s+float32", out)
    assert re.search(r"avgpool\s+512x1x1\s+float32", out)
    assert "rows: 18" in out
    assert re.search(r"class\s+train\s+validation\s+test", out)
    assert re.search(r"bird\s+4\s+2\s+1\n", out)
    assert re.search(r"cat\s+3\s+1\s+1\n", out)  # the broken test/cat file is not a row
    assert re.search(r"dog\s+3\s+1\s+2\n", out)
    assert "skipped files: 1\n  test/cat/broken.jpg: not an image" in out
    assert re.search(r"history:\n  \S+  featx extract ", out)
    assert f"featx {featx.__version__}, torch {importlib.metadata.version('torch')}" in out


def test_files_that_are_not_stores(tmp_path):
    (tmp_path / "x.h5").write_text("hello")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    for name, words in (("x.h5", "not a readable HDF5"), ("other.h5", "not a featx feature store"),
                        ("missing.h5", "does not exist")):  # fmt: skip
        with pytest.raises(UsageError, match=words):
            FeatureStore(tmp_path / name)
    result = invoke_featx("info", tmp_path / "missing.h5")
    assert "does not exist" in assert_one_sentence_error(result)


@pytest.mark.slow
def test_compression_round_trips_identical_values(small_photos, tmp_path):
    arrays = {}
    for compression in ("none", "gzip", "lzf"):
        result = extract(
            small_photos, "mobilenet_v3_small", ["features.3"],
            store=tmp_path / f"{compression}.h5", weights="none", image_size=64,
            compression=compression, workers=0, device="cpu", quiet=True,
        )  # fmt: skip
        with h5py.File(result.store, "r") as f:
            ds = f["features/features.3"]
            assert ds.compression == (None if compression == "none" else compression)
            assert ds.chunks is not None and ds.chunks[1:] == ds.shape[1:]
            arrays[compression] = ds[()]
    assert np.array_equal(arrays["none"], arrays["gzip"])
    assert np.array_equal(arrays["none"], arrays["lzf"])
    sizes = {c: (tmp_path / f"{c}.h5").stat().st_size for c in arrays}
    assert sizes["gzip"] < sizes["none"]  # compression actually happened
