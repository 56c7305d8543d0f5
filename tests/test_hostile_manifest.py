"""Hostile manifests: cells and headers that used to fail only when the store was written, or
gave a wrong dataset without a word. Each is refused in one sentence before any image is read
(no store, no partial folder), or read as the text it is."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import assert_one_sentence_error, invoke_featx, make_folder

from featx.data import open_dataset

TINY = ("--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--workers", "0")


@pytest.fixture
def data(tmp_path) -> Path:
    root = tmp_path / "data"
    make_folder(root, {"cat": 2, "dog": 2}, size=(40, 30))
    return root


def _rows(data: Path) -> list[str]:
    return sorted(p.relative_to(data).as_posix() for p in data.rglob("*.jpg"))


def _write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode())
    return path


# name: (manifest text given the image paths, words of the refusal)
REFUSED = {
    "nul-in-path": (lambda r: f"path,label\n{r[0]}\0x,cat\n{r[2]},dog\n", "NUL byte"),
    "nul-in-label": (lambda r: f"path,label\n{r[0]},ca\0t\n{r[2]},dog\n", "control characters"),
    "column-dot": (lambda r: f"path,label,.\n{r[0]},cat,1\n{r[2]},dog,2\n", "column named '.'"),
    "column-slash": (lambda r: f"path,label,a/b\n{r[0]},cat,1\n{r[2]},dog,2\n", "'a/b'"),
    "nameless-column-with-values": (
        lambda r: f"path,label,\n{r[0]},cat,7\n{r[2]},dog,\n",
        "values in column 3, which has no name",
    ),
    "newline-in-path": (
        lambda r: f'path,label,split\n"we\nird.jpg",cat,holdout\n{r[2]},dog,train\n',
        "we\\x0aird.jpg the unknown split",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_bad_manifest_is_refused_before_any_work(data, tmp_path, case):
    text, words = REFUSED[case]
    manifest = _write(data / "m.csv", text(_rows(data)))
    store = tmp_path / "s.h5"
    done = invoke_featx("extract", manifest, *TINY, "--layer", "avgpool", "--store", store)
    assert words in assert_one_sentence_error(done, 2)
    assert not store.exists() and not list(tmp_path.glob("*.partial"))


def test_a_null_label_is_refused_not_a_class_named_none(data, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = _rows(data)
    pq.write_table(
        pa.table({"path": rows, "label": ["cat", None, "dog", "dog"]}), data / "m.parquet"
    )
    done = invoke_featx("extract", data / "m.parquet", *TINY, "--layer", "avgpool",
                        "--store", tmp_path / "s.h5")  # fmt: skip
    message = assert_one_sentence_error(done, 2)
    assert "no label" in message and "labelled rows only" in message


def test_the_same_image_under_two_spellings_is_listed_once(data, tmp_path):
    """Through a linked folder, an absolute path and a relative one name the same file."""
    link = tmp_path / "link"
    link.symlink_to(data)
    rows = _rows(data)
    text = (
        f"path,label,split\n{rows[0]},cat,train\n{link / rows[0]},cat,test\n{rows[2]},dog,train\n"
    )
    manifest = _write(data / "m.csv", text)
    done = invoke_featx("extract", link / "m.csv", *TINY, "--layer", "avgpool",
                        "--store", tmp_path / "s.h5")  # fmt: skip
    assert "twice" in assert_one_sentence_error(done, 2)
    assert manifest.exists()


def test_spreadsheet_columns_and_numbers_stay_what_they_are(data):
    """A trailing comma's empty columns are dropped; `1_000` and integers past int64 stay
    text; ordinary numbers are numbers."""
    rows = _rows(data)
    lines = ["path,label,split,id,big,n,,"]
    for i, row in enumerate(rows):
        lines.append(f"{row},{row.split('/')[0]},train,1_00{i},{10**20 + i},{i},,")
    listed = open_dataset(_write(data / "m.csv", "\n".join(lines) + "\n"))
    assert set(listed.meta) == {"id", "big", "n"}
    assert sorted(listed.meta["id"]) == [f"1_00{i}" for i in range(4)]
    assert sorted(listed.meta["big"]) == [str(10**20 + i) for i in range(4)]
    assert sorted(listed.meta["n"]) == [0, 1, 2, 3]
