"""Stores that point outside themselves, and outputs that must not destroy or leak.

A store file may make HDF5 read other files: external storage, virtual datasets, external
links. Each hostile store here is a copy of a real store edited with h5py so that it points at
a "secret": a FIFO, which blocks whoever opens it, so a command that finishes never opened it.
`featx info` and `featx fit` refuse each store in one sentence (exit 2). The one exception,
a virtual store written by `featx merge --virtual`, is read only while its shards are what the
merge recorded. A case that could block on the FIFO, die by a signal or needs a signal of its
own runs in a process of its own; the others run the command line in this process."""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import (
    FEATX,
    assert_one_sentence_error,
    file_digest,
    invoke_featx,
    make_folder,
    run_featx,
)

from featx import FeatureStore, extract, merge
from featx.errors import UsageError
from featx.store.feature_store import add_layer, write_store

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
    result = invoke_featx("info", merged)
    assert result.returncode == 0 and "virtual" in result.stdout, result.stderr


def test_a_virtual_merge_refuses_a_missing_shard(built, tmp_path):
    merged, shards = _merged_virtual(built, tmp_path)
    shards[1].unlink()
    result = invoke_featx("info", merged)
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
    result = invoke_featx("info", merged)
    message = assert_one_sentence_error(result)
    assert f"shard {shards[0]} changed after `featx merge --virtual`" in message


def test_a_shard_that_is_itself_virtual_is_refused(built, tmp_path, secret):
    merged, shards = _merged_virtual(built, tmp_path)
    with h5py.File(shards[1], "r+") as f:
        _virtual(secret)(f)
    result = run_featx("info", merged, cwd=tmp_path, timeout=TIMEOUT)
    message = assert_one_sentence_error(result)
    assert str(shards[1]) in message and "virtual dataset" in message


# ---- outputs that must not destroy -------------------------------------------------------
PREPROCESSING = {"resize": 8, "crop": 8, "mean": [0.5] * 3, "std": [0.5] * 3}


def synthetic_shards(folder: Path, count: int, rows: int, row_shape=(64,)) -> list[Path]:
    """`count` valid shard stores of `rows` rows each, with random float32 features."""
    rng = np.random.default_rng(0)
    total = count * rows
    files = {
        "path": np.array([f"c/{i:07d}.jpg" for i in range(total)], dtype=object),
        "label": np.zeros(total, np.int32),
        "split": np.array(["unsplit"] * total, dtype=object),
        "size": np.ones(total, np.int64),
        "mtime_ns": np.zeros(total, np.int64),
    }
    paths = []
    for i in range(count):
        lo, hi = i * rows, (i + 1) * rows
        meta = {
            "backbone": "synthetic", "weights": "none", "weights_sha256": "0" * 64,
            "preprocessing": PREPROCESSING, "augment": None,
            "dataset": {"root": "/data", "fingerprint": "f", "n_files": total},
            "shard": {"index": i, "count": count, "first_row": lo, "n_rows": rows,
                      "n_rows_total": total},
            "history": [],
        }  # fmt: skip
        columns = {k: files[k][lo:hi] for k in ("path", "label", "split")}
        columns |= {"source": np.arange(lo, hi), "view": np.zeros(rows, np.int32)}
        path = folder / f"s.shard-{i}of{count}.h5"
        with write_store(path, meta, ["c"], files, columns, []) as out:
            block = rng.standard_normal((rows, *row_shape), dtype=np.float32)
            add_layer(out, "f", rows, row_shape, "float32", "none", {}, iter([block]))
        paths.append(path)
    return paths


def test_merge_replaces_only_a_merge_of_the_same_shards(built, tmp_path):
    shards = [Path(shutil.copy(s, tmp_path / s.name)) for s in built["shards"]]
    out = tmp_path / "out.h5"
    shutil.copy(built["store"], out)  # an unrelated store
    before = file_digest(out)
    result = invoke_featx("merge", out, *shards)
    message = assert_one_sentence_error(result)
    assert f"{out} already exists and is not a merge of these shards" in message
    assert file_digest(out) == before
    merge(out, shards, overwrite=True)
    merge(out, shards)  # the same merge again
    assert invoke_featx("merge", out, *shards).returncode == 0
    with pytest.raises(UsageError, match="not a merge of these shards"):
        merge(out, [*shards[:1], Path(shutil.copy(shards[1], tmp_path / "other-1of2.h5"))])


@pytest.mark.parametrize("value", [{}, "x", {"index": 0, "count": "2"}])
def test_merge_refuses_shard_metadata_that_featx_does_not_write(built, tmp_path, value):
    shards = [Path(shutil.copy(s, tmp_path / s.name)) for s in built["shards"]]
    with h5py.File(shards[1], "r+") as f:
        meta = json.loads(f.attrs["meta"])
        meta["shard"] = value
        f.attrs["meta"] = json.dumps(meta)
    with pytest.raises(UsageError, match="shard metadata that is not the record"):
        merge(tmp_path / "out.h5", shards)


def test_merge_outputs_that_cannot_be_written(built, tmp_path):
    shards = built["shards"]
    (tmp_path / "folder.h5").mkdir()
    (tmp_path / "afile").write_text("x")
    for out, words in (
        (tmp_path / "folder.h5", "is a folder"),
        (tmp_path / "afile" / "out.h5", "is a file, not a folder"),
    ):
        result = invoke_featx("merge", out, *shards)
        assert words in assert_one_sentence_error(result)
    assert (tmp_path / "afile").read_text() == "x"


@pytest.fixture
def small_disk(mount):
    return mount("size=512k")


def test_merge_onto_a_full_disk_is_one_sentence_and_leaves_nothing(tmp_path, small_disk):
    shards = synthetic_shards(tmp_path, 4, 500)  # 512 kB of features
    out = small_disk / "out.h5"
    result = run_featx("merge", out, *shards, cwd=tmp_path)
    assert "disk full" in assert_one_sentence_error(result)
    assert os.listdir(small_disk) == []


def test_merge_over_a_file_size_limit_is_one_sentence_and_leaves_nothing(tmp_path):
    shards = synthetic_shards(tmp_path, 4, 500)
    out = tmp_path / "out" / "merged.h5"
    limit = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000)); "
        "from featx.cli import app; sys.argv[0] = 'featx'; app()"
    )
    result = subprocess.run(
        [sys.executable, "-c", limit, "merge", str(out), *map(str, shards)],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert "disk full while writing" in assert_one_sentence_error(result)
    assert os.listdir(out.parent) == []


def test_an_immutable_store_at_the_final_rename_is_one_sentence(built, tmp_path):
    out = tmp_path / "out.h5"
    shutil.copy(built["store"], out)
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode:
        pytest.skip("chattr +i needs root and a file system that keeps the flag")
    try:
        result = invoke_featx("merge", "--overwrite", out, *built["shards"])
        assert "cannot write" in assert_one_sentence_error(result)
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=True)
    assert not list(tmp_path.glob(".out.h5.*"))


def test_a_read_only_folder_is_one_sentence(built, mount):
    folder = mount("ro,size=64k")
    result = invoke_featx("merge", folder / "out.h5", *built["shards"])
    assert "cannot write" in assert_one_sentence_error(result)


def test_a_killed_writer_s_temporary_file_is_removed_by_the_next_write(built, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    out = tmp_path / "out.h5"
    stale = [tmp_path / f".out.h5.{platform.node()}.{dead}.tmp", tmp_path / f".out.h5.{dead}.tmp"]
    alive = tmp_path / f".out.h5.{platform.node()}.1.tmp"  # init's pid: alive
    for path in (*stale, alive):
        path.write_bytes(b"x" * 1000)
    merge(out, built["shards"])
    assert not any(p.exists() for p in stale) and alive.exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_merge_and_keeps_the_old_output(tmp_path, signum):
    shards = synthetic_shards(tmp_path, 20, 200, row_shape=(16, 16, 16))  # 65 MB
    out = merge(tmp_path / "out.h5", shards[:1] + shards[1:])
    before = file_digest(out)
    proc = subprocess.Popen([*FEATX, "merge", str(out), *map(str, shards)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        while not list(tmp_path.glob(".out.h5.*.tmp")):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGSTOP)  # the merge is writing: hold it there
        os.kill(proc.pid, signum)
        os.kill(proc.pid, signal.SIGCONT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)
    assert f"{out} was left as it was" in assert_one_sentence_error(result, code=130)
    assert file_digest(out) == before and not list(tmp_path.glob(".out.h5.*"))


def _extract_cli(built: dict[str, Path], store: Path) -> subprocess.CompletedProcess:
    return invoke_featx("extract", built["data"], "--backbone", "resnet18", "--weights", "none",
                        "--image-size", 32, "--layer", KEY, "--workers", 0, "--device", "cpu",
                        "--quiet", "--store", store)  # fmt: skip


def test_extract_keeps_a_user_s_file_in_the_partial_folder(built, tmp_path):
    store = tmp_path / "x.h5"
    partial = tmp_path / "x.h5.partial"
    partial.mkdir()
    (partial / "run.json").write_text("{}")  # another run's description...
    (partial / "notes.txt").write_text("mine")  # ...and a file featx did not write
    message = assert_one_sentence_error(_extract_cli(built, store))
    assert "'notes.txt', which featx did not write" in message
    assert (partial / "notes.txt").read_text() == "mine" and not store.exists()


def test_extract_refuses_a_symlinked_partial_folder(built, tmp_path):
    store = tmp_path / "x.h5"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep.txt").write_text("mine")
    (tmp_path / "x.h5.partial").symlink_to(tmp_path / "elsewhere")
    message = assert_one_sentence_error(_extract_cli(built, store))
    assert "is a symbolic link" in message
    assert (tmp_path / "elsewhere" / "keep.txt").read_text() == "mine"


MERGE_UNDER_A_LIMIT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
from featx import merge
merge(sys.argv[1], sys.argv[2:], virtual=False)
"""


@pytest.mark.slow
def test_merge_holds_few_files_open_whatever_the_number_of_shards(tmp_path):
    shards = synthetic_shards(tmp_path, 80, 3)  # more shards than files may be open at once
    out = tmp_path / "merged.h5"
    command = [sys.executable, "-c", MERGE_UNDER_A_LIMIT, str(out), *map(str, shards)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with FeatureStore(out) as store:
        assert store.n_rows == 240 and store.meta["history"][-1]["shards"][79] == str(shards[79])
        for i in (0, 79):
            with FeatureStore(shards[i]) as shard:
                np.testing.assert_array_equal(store.read("f")[3 * i : 3 * i + 3], shard.read("f"))
