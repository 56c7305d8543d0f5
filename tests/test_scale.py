"""Shards at scale: Slurm arrays with steps and lists, planning that reads and stats only a
shard's own slice, shard stores that hold only their own files, and `featx export`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_sentence_error, make_folder, run_featx

from featx import FeatureStore, merge

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = ("--backbone", "resnet18", "--weights", "none", "--image-size", "32")
PLACE = "from featx.extraction.shard import parse_shard; print(*parse_shard('slurm'))"


def slurm_env(task: int, ids: list[int], step: int | None) -> dict[str, str]:
    """The array variables Slurm gives task `task` of an array of task ids `ids`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        SLURM_ARRAY_TASK_ID=str(task),
        SLURM_ARRAY_TASK_COUNT=str(len(ids)),
        SLURM_ARRAY_TASK_MIN=str(min(ids)),
        SLURM_ARRAY_TASK_MAX=str(max(ids)),
    )
    if step is not None:
        env["SLURM_ARRAY_TASK_STEP"] = str(step)
    return env


def place(task: int, ids: list[int], step: int | None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PLACE], env=slurm_env(task, ids, step), capture_output=True,
        text=True,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("ids", "step"),
    [
        ([0, 2, 4, 6], 2),  # --array=0-6:2
        ([1, 4, 7], 3),  # --array=1,4,7 (or 1-7:3)
        ([3, 4, 5, 6, 7], 1),  # --array=3-7
        ([1, 4, 7], None),  # a Slurm that does not set the step: evenly spaced ids
        ([5], 1),  # --array=5
    ],
)
def test_each_task_of_a_slurm_array_computes_its_own_shard(ids, step):
    if step is None:
        ids = list(range(len(ids)))  # without the step, only consecutive ids can be placed
    shards = []
    for task in ids:
        result = place(task, ids, step)
        assert result.returncode == 0, result.stderr
        shards.append(tuple(map(int, result.stdout.split())))
    assert shards == [(i, len(ids)) for i in range(len(ids))]


def test_an_uneven_slurm_list_is_refused_in_one_sentence(tmp_path):
    make_folder(tmp_path / "data", {"cat": 2, "dog": 2})
    env = slurm_env(2, [1, 2, 7], 1)  # --array=1,2,7: no task can know its place
    result = subprocess.run(
        [sys.executable, "-m", "featx.cli", "extract", str(tmp_path / "data"), *TINY,
         "--layer", "avgpool", "--shard", "slurm"],
        env=env, cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert "evenly spaced" in assert_one_sentence_error(result)


@pytest.mark.slow
def test_a_stepped_slurm_array_merges_into_the_one_process_store(tmp_path):
    data = tmp_path / "data"
    make_folder(data, {"cat": 4, "dog": 3})
    common = (*TINY, "--layer", "avgpool", "--workers", "0", "--quiet")
    whole = run_featx("extract", data, *common, "--store", tmp_path / "w.h5", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    ids = [0, 2, 4]  # --array=0-4:2
    for task in ids:
        env = slurm_env(task, ids, 2)
        result = subprocess.run(
            [sys.executable, "-m", "featx.cli", "extract", str(data), *common, "--store",
             str(tmp_path / "s.h5"), "--shard", "slurm"],
            env=env, cwd=tmp_path, capture_output=True, text=True,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    shards = sorted(tmp_path.glob("s.shard-*of3.h5"))
    assert len(shards) == 3
    merged = merge(tmp_path / "m.h5", shards)
    with FeatureStore(tmp_path / "w.h5") as a, FeatureStore(merged) as b:
        np.testing.assert_array_equal(a.paths(), b.paths())
        np.testing.assert_allclose(b.read("avgpool"), a.read("avgpool"), rtol=1e-5, atol=1e-6)


def write_manifest(data, folder, path):
    with open(path, "w") as fh:
        fh.write("path,label,split\n")
        for f in folder.files:
            fh.write(f"{data / f.path},{folder.class_names[f.label]},{f.split}\n")
    return path


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    from featx.data.folders import scan_image_folder

    root = tmp_path_factory.mktemp("manifest")
    make_folder(root / "data", {"cat": 5, "dog": 4}, split="train")
    make_folder(root / "data", {"cat": 2, "dog": 2}, split="test", start=20)
    return write_manifest(root / "data", scan_image_folder(root / "data"), root / "m.csv")


def test_a_shard_plans_and_stats_only_its_own_files(manifest):
    from featx.data.manifest import read_manifest
    from featx.extraction.plan import Work

    listed = read_manifest(manifest)
    work = Work.plan(listed, 1, (1, 3))
    assert listed.fingerprint and listed.files.stated() == 0
    assert work.shard == {"index": 1, "count": 3, "first_row": 8, "n_rows": 8,
                          "n_rows_total": 22, "first_file": 4, "n_files": 4}  # fmt: skip
    assert work.items[:3] == [(4, 0), (4, 1), (5, 0)]
    mine = listed.files[4:8]
    assert listed.files.stated() == 4 and all(f.size > 0 for f in mine)


@pytest.mark.slow
def test_manifest_shards_hold_their_own_files_and_merge_to_the_whole(manifest, tmp_path):
    from featx import extract

    options = {"layers": ["avgpool"], "augment": 1, "backbone": "resnet18", "weights": "none",
               "image_size": 32, "workers": 0, "batch_size": 4, "device": "cpu",
               "quiet": True}  # fmt: skip
    whole = extract(manifest, store=tmp_path / "w.h5", **options).store
    shards = [extract(manifest, store=tmp_path / "s.h5", shard=(i, 3), **options).store
              for i in range(3)]  # fmt: skip
    with FeatureStore(shards[1]) as one:
        assert sorted(one.files()) == sorted(set(one.paths()))  # its own files only
        assert len(one.files()) == 4 and one.meta["dataset"]["n_files"] == 13
    merged = merge(tmp_path / "m.h5", shards)
    with FeatureStore(whole) as a, FeatureStore(merged) as b:
        assert a.files() == b.files()
        assert a.meta["dataset"] == b.meta["dataset"]
        for column in ("paths", "labels", "sources", "views", "split_of_rows"):
            np.testing.assert_array_equal(getattr(a, column)(), getattr(b, column)())
        np.testing.assert_allclose(b.read("avgpool"), a.read("avgpool"), rtol=1e-5, atol=1e-6)


def test_mount_points_are_matched_by_path_components():
    from featx.extraction.distributed import mount_type

    mounts = ("/dev/vda / ext4 rw 0 0\nserver:/x /data nfs4 rw 0 0\n"
              "/dev/vdb /data2 ext4 rw 0 0\n/dev/vdc /mnt/my\\040disk xfs rw 0 0\n")  # fmt: skip
    assert mount_type(Path("/data2/stores"), mounts) == "ext4"  # not inside /data
    assert mount_type(Path("/data/stores"), mounts) == "nfs4"
    assert mount_type(Path("/data"), mounts) == "nfs4"
    assert mount_type(Path("/mnt/my disk/s"), mounts) == "xfs"
    assert mount_type(Path("/srv"), mounts) == "ext4"


@pytest.fixture(scope="module")
def feature_store(tmp_path_factory):
    from clfdata import synthetic_store

    return synthetic_store(tmp_path_factory.mktemp("export") / "s.h5", 700, 24, block_rows=128)


def test_export_npy_parts_hold_the_rows_and_their_metadata(feature_store, tmp_path):
    import pyarrow.parquet as pq

    from featx.store.export import export

    result = export(feature_store, tmp_path / "out", "feat", "npy", rows_per_file=300)
    assert [f.name for f in result.files] == [f"img_emb_000{i}.npy" for i in range(3)]
    emb = np.concatenate([np.load(f) for f in result.files])
    metas = sorted((tmp_path / "out" / "metadata").glob("metadata_*.parquet"))
    assert [m.name for m in metas] == [f"metadata_000{i}.parquet" for i in range(3)]
    assert [pq.read_metadata(m).num_rows for m in metas] == [300, 300, 100]
    meta = {k: sum((pq.read_table(m).column(k).to_pylist() for m in metas), []) for k in
            ("path", "label", "split")}  # fmt: skip
    with FeatureStore(feature_store) as store:
        np.testing.assert_array_equal(emb, store.read("feat"))
        assert meta["path"] == store.paths().tolist()
        assert meta["label"] == [store.class_names[i] for i in store.labels()]
        assert meta["split"] == store.split_of_rows().tolist()
    assert result.n_rows == 700 and result.dim == 24


def test_export_parquet_has_an_embedding_column_and_takes_one_split(feature_store, tmp_path):
    import pyarrow.parquet as pq

    from featx.store.export import export

    result = export(feature_store, tmp_path / "out", "feat", "parquet", split="validation")
    table = pq.read_table(result.files[0])
    with FeatureStore(feature_store) as store:
        wanted = store.read("feat", split="validation")
        assert table.column("path").to_pylist() == store.paths("validation").tolist()
    np.testing.assert_array_equal(np.array(table.column("embedding").to_pylist()), wanted)
    assert set(table.column("split").to_pylist()) == {"validation"}


def test_export_refuses_a_folder_that_holds_files(feature_store, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ("export", feature_store, out, "--layer", "feat")
    refused = run_featx(*args, cwd=tmp_path)
    assert "--overwrite" in assert_one_sentence_error(refused)
    assert (out / "keep.txt").read_text() == "mine"
    done = run_featx(*args, "--overwrite", "--format", "parquet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["emb", "featx_export.json"]
    assert not list(tmp_path.glob(".out.*"))


def test_embedding_reader_reads_the_export(feature_store, tmp_path):
    reader = pytest.importorskip("embedding_reader")
    from featx.store.export import export

    export(feature_store, tmp_path / "npy", "feat", "npy", rows_per_file=300)
    export(feature_store, tmp_path / "pq", "feat", "parquet", rows_per_file=300)
    with FeatureStore(feature_store) as store:
        features, paths = store.read("feat"), store.paths().tolist()
    metadata = tmp_path / "npy" / "metadata"
    for folder, options in (
        ("npy", {"file_format": "parquet_npy", "metadata_folder": str(metadata),
                 "meta_columns": ["path"]}),
        ("pq", {"file_format": "parquet", "embedding_column": "embedding",
                "meta_columns": ["path"]}),
    ):  # fmt: skip
        read = reader.EmbeddingReader(str(tmp_path / folder / "emb"), **options)
        got, got_paths = [], []
        for emb, meta in read(batch_size=256, start=0, end=read.count, show_progress=False):
            got.append(emb)
            got_paths.extend(meta["path"].tolist())
        np.testing.assert_allclose(np.concatenate(got), features, rtol=1e-6)
        assert got_paths == paths


@pytest.fixture
def small_disk(mount):
    """A 2 MB tmpfs (skipped where mounting is not permitted)."""
    return mount("size=2m")


@pytest.mark.slow
def test_a_disk_filling_up_mid_merge_is_one_sentence_and_keeps_the_old_store(tmp_path, small_disk):
    """The shards' rows carry 2.4 MB of text metadata and their features a few KB: the
    free-space check passes on a 2 MB disk, and the disk fills while the rows are written.
    The merge, copied or virtual, ends in one line with the exit code of a full disk (2), the
    old OUT as it was and no temporary file."""
    data = tmp_path / "data"
    make_folder(data, {"cat": 3, "dog": 3})
    manifest = tmp_path / "m.csv"
    lines = [f"{p.relative_to(tmp_path)},{p.parent.name},{'x' * 400_000}"
             for p in sorted(data.rglob("*.jpg"))]  # fmt: skip
    manifest.write_text("path,label,note\n" + "\n".join(lines) + "\n")
    for i in range(2):
        done = run_featx("extract", manifest, *TINY, "--layer", "avgpool", "--workers", 0,
                         "--quiet", "--shard", f"{i}/2", "--store", tmp_path / "s.h5",
                         cwd=tmp_path)  # fmt: skip
        assert done.returncode == 0, done.stderr
    out = small_disk / "merged.h5"
    out.write_bytes(b"the previous store")
    shards = [tmp_path / f"s.shard-{i}of2.h5" for i in range(2)]
    for virtual in ([], ["--virtual"]):
        result = run_featx("merge", out, *shards, "--overwrite", *virtual, cwd=tmp_path)
        message = assert_one_sentence_error(result, code=2)
        assert "disk full while writing" in message  # mid-write, not the space check's
        assert result.stderr.strip() == message, result.stderr  # no HDF5 diagnostics
        assert out.read_bytes() == b"the previous store"
        assert [p.name for p in small_disk.iterdir()] == ["merged.h5"]
