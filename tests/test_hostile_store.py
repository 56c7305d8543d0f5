"""Stores that point outside themselves, and outputs that must not destroy or leak.

A store file may make HDF5 read other files: external storage, virtual datasets, external
links. Each hostile store here is a copy of a real store edited with h5py so that it points at
a "secret": a FIFO, which blocks whoever opens it, so a command that finishes never opened it.
`featx info` and `featx fit` refuse each store in one sentence (exit 2). The one exception,
a virtual store written by `featx merge --virtual`, is read only while its shards are what the
merge recorded."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import assert_one_sentence_error, make_folder, run_featx

from featx import FeatureStore, extract, merge
from featx.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = {"backbone": "resnet18", "weights": "none", "image_size": 32, "layers": ["avgpool"]}
FAST = {"workers": 0, "batch_size": 4, "device": "cpu", "quiet": True}
KEY = "avgpool"
TIMEOUT = 120  # a command that opened the FIFO would block until then


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """A data folder, a store, its two shards and their virtual merge."""
    root = tmp_path_factory.mktemp("hostile-store")
    data = root / "pets"
    make_folder(data, {"cat": 3, "dog": 3}, split="train")
    make_folder(data, {"cat": 2, "dog": 2}, split="test", start=20)
    store = extract(data, store=root / "good.h5", **TINY, **FAST).store
    shards = [
        extract(data, store=root / "s.h5", shard=(i, 2), **TINY, **FAST).store for i in (0, 1)
    ]
    return {"root": root, "data": data, "store": store, "shards": shards}


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "secret"
    os.mkfifo(path)
    return path


def _replace_layer(f: h5py.File, **kwargs) -> None:
    shape, dtype = f[f"features/{KEY}"].shape, f[f"features/{KEY}"].dtype
    del f[f"features/{KEY}"]
    f.create_dataset(f"features/{KEY}", shape=shape, dtype=dtype, **kwargs)


def _external_storage(secret: Path) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        ds = f[f"features/{KEY}"]
        _replace_layer(f, external=[(str(secret), 0, ds.size * ds.dtype.itemsize)])

    return edit


def _external_labels(secret: Path) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        n = len(f["rows/label"])
        del f["rows/label"]
        f.create_dataset("rows/label", shape=(n,), dtype="i4", external=[(str(secret), 0, 4 * n)])

    return edit


def _virtual(secret: Path, name: str = f"features/{KEY}", record: bool = False):
    def edit(f: h5py.File) -> None:
        ds = f[name]
        layout = h5py.VirtualLayout(shape=ds.shape, dtype=ds.dtype)
        layout[:] = h5py.VirtualSource(str(secret), name, shape=ds.shape)
        del f[name]
        f.create_virtual_dataset(name, layout, fillvalue=0)
        if record:  # a forged record of a merge onto the secret
            meta = json.loads(f.attrs["meta"])
            meta["virtual_sources"] = [
                {"path": str(secret), "n_rows": ds.shape[0], "identity": "0" * 64}
            ]
            f.attrs["meta"] = json.dumps(meta)

    return edit


def _external_link(secret: Path, name: str = f"features/{KEY}"):
    def edit(f: h5py.File) -> None:
        del f[name]
        f[name] = h5py.ExternalLink(str(secret), "/data")

    return edit


# name -> (edit on the secret, what the message says)
CASES = {
    "external storage of a layer": (_external_storage, "external storage"),
    "external storage of the labels": (_external_labels, "external storage"),
    "virtual layer onto an unnamed file": (_virtual, "virtual layers were not written"),
    "virtual layer with a forged merge record": (
        lambda s: _virtual(s, record=True),
        "cannot be used",
    ),
    "virtual labels": (lambda s: _virtual(s, "rows/label"), "/rows/label is a virtual dataset"),
    "external link as a layer": (_external_link, "link to another file"),
    "external link as the rows group": (lambda s: _external_link(s, "rows"), "link to another"),
}


def _hostile(built: dict[str, Path], folder: Path, edit: Callable[[h5py.File], None]) -> Path:
    path = folder / "hostile.h5"
    shutil.copy(built["store"], path)
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


@pytest.mark.parametrize("case", CASES)
def test_info_refuses_a_store_that_reads_other_files(built, tmp_path, secret, case):
    edit, words = CASES[case]
    store = _hostile(built, tmp_path, edit(secret))
    result = run_featx("info", store, cwd=tmp_path, timeout=TIMEOUT)
    message = assert_one_sentence_error(result)
    assert f"store {store}" in message and words in message
    with pytest.raises(UsageError, match="outside itself|cannot be used"):
        FeatureStore(store)


FIT_CASES = ["external storage of a layer", "virtual layer onto an unnamed file",
             "external link as a layer"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", FIT_CASES)
def test_fit_refuses_a_store_that_reads_other_files(built, tmp_path, secret, case):
    edit, words = CASES[case]
    store = _hostile(built, tmp_path, edit(secret))
    model = tmp_path / "m.featx"
    result = run_featx("fit", "--store", store, "--layer", KEY, "--clf", "knn", "--param",
                       "n_neighbors=1", "--model", model, cwd=tmp_path,
                       timeout=TIMEOUT)  # fmt: skip
    assert words in assert_one_sentence_error(result)
    assert not model.exists()


def _merged_virtual(built: dict[str, Path], folder: Path) -> tuple[Path, list[Path]]:
    """Copies of the two shards in `folder` and their virtual merge."""
    shards = [Path(shutil.copy(s, folder / s.name)) for s in built["shards"]]
    return merge(folder / "v.h5", shards, virtual=True), shards


def test_a_virtual_merge_reads_its_shards_while_they_are_unchanged(built, tmp_path):
    merged, shards = _merged_virtual(built, tmp_path)
    with FeatureStore(merged) as store, FeatureStore(built["store"]) as whole:
        np.testing.assert_allclose(store.read(KEY), whole.read(KEY), rtol=1e-4, atol=1e-5)
        assert [s["path"] for s in store.meta["virtual_sources"]] == [str(s) for s in shards]
    result = run_featx("info", merged, cwd=tmp_path)
    assert result.returncode == 0 and "virtual" in result.stdout, result.stderr


def test_a_virtual_merge_refuses_a_missing_shard(built, tmp_path):
    merged, shards = _merged_virtual(built, tmp_path)
    shards[1].unlink()
    result = run_featx("info", merged, cwd=tmp_path)
    message = assert_one_sentence_error(result)
    assert f"shard store {shards[1]} is missing" in message and "featx merge" in message


def test_a_virtual_merge_refuses_a_shard_extracted_again(built, tmp_path):
    merged, shards = _merged_virtual(built, tmp_path)
    with FeatureStore(merged) as store:
        before = store.read(KEY)
    options = {**TINY, "image_size": 40}
    again = extract(
        built["data"], store=tmp_path / "s.h5", shard=(0, 2), overwrite=True, **options, **FAST
    ).store
    assert again == shards[0]
    with FeatureStore(again) as shard:  # the shard's features did change
        assert not np.allclose(shard.read(KEY), before[: shard.n_rows])
    result = run_featx("info", merged, cwd=tmp_path)
    message = assert_one_sentence_error(result)
    assert f"shard {shards[0]} changed after `featx merge --virtual`" in message


def test_a_shard_that_is_itself_virtual_is_refused(built, tmp_path, secret):
    merged, shards = _merged_virtual(built, tmp_path)
    with h5py.File(shards[1], "r+") as f:
        _virtual(secret)(f)
    result = run_featx("info", merged, cwd=tmp_path, timeout=TIMEOUT)
    message = assert_one_sentence_error(result)
    assert str(shards[1]) in message and "virtual dataset" in message
