"""Manifests (CSV, TSV, Parquet) list the same dataset as the equivalent image folder, give the
same store, keep their extra columns as per-row metadata, and are refused in one sentence when
malformed."""

from __future__ import annotations

import csv
import os

import h5py
import numpy as np
import pytest
from conftest import assert_one_sentence_error, invoke_featx, make_folder, run_featx

from featx import FeatureStore, extract
from featx.data import open_dataset, scan_image_folder
from featx.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = {"backbone": "resnet18", "weights": "none", "image_size": 32}
FAST = {"workers": 0, "batch_size": 4, "device": "cpu", "quiet": True}


@pytest.fixture
def split_folder(tmp_path):
    root = tmp_path / "data"
    make_folder(root, {"cat": 3, "dog": 2}, split="train")
    make_folder(root, {"cat": 1, "dog": 2}, split="val", start=20)
    make_folder(root, {"cat": 1, "dog": 1}, split="test", start=40)
    return root


def write_manifest(path, folder, extra=True, absolute=False, delimiter=","):
    """The manifest equivalent to `folder` (rows shuffled), with two extra columns."""
    rows = list(folder.files)[::-1]
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh, delimiter=delimiter)
        out.writerow(["label", "path", "split", *(["weight", "source"] if extra else [])])
        for i, f in enumerate(rows):
            where = str(folder.root / f.path) if absolute else f.path
            split = {"validation": "val"}.get(f.split, f.split)
            out.writerow(
                [folder.class_names[f.label], where, split, *([i * 0.5, f"cam{i % 2}"] * extra)]
            )
    return path


def test_folder_and_manifest_list_the_same_dataset(split_folder):
    folder = scan_image_folder(split_folder)
    for absolute in (False, True):
        manifest = write_manifest(split_folder / "m.csv", folder, absolute=absolute)
        listed = open_dataset(manifest)
        assert listed.files == folder.files
        assert listed.class_names == folder.class_names
        assert listed.fingerprint != folder.fingerprint  # a manifest is identified by its bytes
        assert set(listed.meta) == {"weight", "source"}
        assert isinstance(listed.meta["weight"][0], float)


def test_folder_and_manifest_give_the_same_store(split_folder, tmp_path):
    folder = scan_image_folder(split_folder)
    manifest = write_manifest(split_folder / "labels.tsv", folder, absolute=True, delimiter="\t")
    a = extract(split_folder, layers=["layer3"], store=tmp_path / "a.h5", **TINY, **FAST)
    b = extract(manifest, layers=["layer3"], store=tmp_path / "b.h5", **TINY, **FAST)
    with FeatureStore(a.store) as sa, FeatureStore(b.store) as sb:
        np.testing.assert_array_equal(sa.read("layer3"), sb.read("layer3"))
        assert sa.class_names == sb.class_names
        for column in ("paths", "labels", "sources", "views", "split_of_rows"):
            np.testing.assert_array_equal(getattr(sa, column)(), getattr(sb, column)())
        assert sa.meta["dataset"]["fingerprint"] == scan_image_folder(split_folder).fingerprint
        assert sb.meta["dataset"]["fingerprint"] == open_dataset(manifest).fingerprint
        assert sb.row_meta_columns == ["source", "weight"]
        by_path = dict(zip(sb.paths(), sb.row_meta("source"), strict=True))
        assert set(by_path.values()) == {"cam0", "cam1"}
        assert sb.row_meta("weight", split="test").dtype == np.float64
    with h5py.File(b.store, "r") as raw:  # plain h5py reads it
        assert raw["rows/meta/source"].asstr()[()].shape == (len(folder.files),)


@pytest.mark.slow
def test_parquet_manifest_and_missing_file_is_skipped(split_folder, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = scan_image_folder(split_folder)
    paths = [f.path for f in folder.files] + ["train/cat/gone.jpg"]
    labels = [folder.class_names[f.label] for f in folder.files] + ["cat"]
    splits = [f.split for f in folder.files] + ["train"]
    table = pa.table(
        {"path": paths, "label": labels, "split": splits, "id": list(range(len(paths)))}
    )
    pq.write_table(table, split_folder / "m.parquet")
    result = run_featx(
        "extract", split_folder / "m.parquet", "--backbone", "resnet18", "--weights", "none",
        "--image-size", 32, "--layer", "avgpool", "--workers", 0, "--quiet",
        "--store", tmp_path / "p.h5", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert "gone.jpg: missing file" in result.stderr
    with FeatureStore(tmp_path / "p.h5") as store:
        assert store.n_rows == len(folder.files)
        assert store.row_meta("id").dtype == np.int64


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "lists no images"),
        ("path,label\n", "lists no images"),
        ("path,split\na.jpg,train\n", "no label column"),
        ("path,label,split\na.jpg,cat,holdout\n", "unknown split"),
        ("path,label\na.jpg,cat\na.jpg,dog\n", "twice"),
        ("path,label\na.jpg,cat,extra\n", "fields"),
        ("path,label\na.jpg,\n", "empty label"),
    ],
)
def test_malformed_manifest_is_one_sentence(tmp_path, text, words):
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    result = invoke_featx(
        "extract", manifest, "--backbone", "resnet18", "--weights", "none", "--layer", "avgpool",
        "--store", tmp_path / "s.h5",
    )  # fmt: skip
    assert words in assert_one_sentence_error(result)
    assert not (tmp_path / "s.h5").exists()


def test_unreadable_and_absent_manifest(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\na.jpg,cat\n")
    os.chmod(manifest, 0)
    for path in (manifest, tmp_path / "absent.csv"):
        result = invoke_featx(
            "extract", path, "--backbone", "resnet18", "--layer", "avgpool",
            "--store", tmp_path / "s.h5",
        )  # fmt: skip
        if path == manifest and os.access(manifest, os.R_OK):  # running as root
            continue
        assert_one_sentence_error(result)


MANIFEST_CASES = {
    "plain": "path,label,split,w,src\na/x.jpg,cat,train,1,cam0\nb/y.jpg, dog ,val,2.5,cam1\n"
    "./c/z.jpg,cat,test,3,cam_2\n",
    "unicode": "path,label,split\nz.jpg,b,train\né.jpg,b,Train \n"
    "Z.jpg,a,test\n"
    "b/ä.jpg,\u3000a,val\n",
    "spacing": "path,label,n,m\n\x1ca.jpg\x1c,cat, 5 ,1e3\nb/../c.jpg,dog,007,.5\n",
    "quoted": 'path,label\n"a,1.jpg","ca""t"\n"b\nc.jpg",dog\n',
    "blank rows": "path,label,\na.jpg,cat,\n,,\n\nb.jpg,dog,\n",
    "text numbers": "path,label,big,under,hex\na.jpg,cat,99999999999999999999,1_000,0x10\n",
    "nul": "path,label\na\x00b.jpg,cat\n",
    "control label": "path,label\na.jpg,c\x01t\n",
    "unknown split": "path,label,split\na.jpg,cat,train\nb.jpg,cat,bogus\n",
    "twice": "path,label\na.jpg,cat\n./a.jpg,dog\n",
    "twice spelled": "path,label\nd//b.jpg,cat\nd/b.jpg,dog\n",
    "empty path": "path,label\n ,cat\n",
}


def _listing(folder):
    if isinstance(folder, str):
        return folder
    meta = {k: [str(v) for v in values] for k, values in folder.meta.items()}
    return (
        folder.class_names,
        list(folder.files.column("path")),
        folder.files.column("label").tolist(),
        list(folder.files.column("split")),
        meta,
        folder.notes,
    )


@pytest.mark.parametrize("name", sorted(MANIFEST_CASES))
def test_the_columnar_reader_reads_as_python_csv_does(tmp_path, monkeypatch, name):
    """pyarrow's reader (with its vectorised checks) and the row-by-row reader give the same
    dataset, or refuse in the same sentence."""
    pytest.importorskip("pyarrow")
    from featx.data import manifest

    path = tmp_path / "m.csv"
    path.write_text(MANIFEST_CASES[name])

    def read():
        try:
            return _listing(manifest.read_manifest(path))
        except UsageError as error:
            return str(error)

    columnar = read()
    monkeypatch.setattr(manifest, "parse_arrow", lambda *args: None)
    assert read() == columnar


def test_a_large_manifest_is_read_once_then_from_the_cache(tmp_path):
    """A manifest of CACHE_ROWS rows or more is kept in featx's cache: the next reading of
    the same bytes maps it, gives the same dataset, and a damaged entry is read again."""
    pytest.importorskip("pyarrow")
    from featx.data.manifest_cache import CACHE_ROWS
    from featx.runtime import cache_root

    n = CACHE_ROWS + 10
    lines = [f"d{i % 7}/img{i:06d}.jpg,c{i % 13},{('train', 'val')[i % 2]},{i}" for i in range(n)]
    path = tmp_path / "big.csv"
    path.write_text("path,label,split,id\n" + "\n".join(lines) + "\n")
    entries = cache_root() / "manifests"
    before = set(entries.glob("*.arrow")) if entries.exists() else set()
    first = open_dataset(path)
    made = set(entries.glob("*.arrow")) - before
    assert len(made) == 1
    second = open_dataset(path)
    assert _listing(second) == _listing(first)
    assert second.fingerprint == first.fingerprint
    assert second.files.stated() == 0  # no file stat()ed to list or identify it
    made.pop().write_bytes(b"not arrow")
    assert _listing(open_dataset(path)) == _listing(first)
