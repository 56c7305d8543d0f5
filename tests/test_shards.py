"""Sharded extraction and merging: shards concatenated (copied or virtual) equal a one-process
store, the merged and virtual stores work with info/fit/evaluate/streamed fit, and mismatched
shards are refused in one sentence."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import assert_one_sentence_error, invoke_featx, make_folder, run_featx

from featx import FeatureStore, extract, merge
from featx.errors import UsageError
from featx.extraction.shard import parse_shard, shard_store_path

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = {"backbone": "resnet18", "weights": "none", "image_size": 32}
FAST = {"workers": 0, "batch_size": 3, "device": "cpu", "quiet": True}
COLUMNS = ("paths", "labels", "sources", "views", "split_of_rows")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards") / "data"
    make_folder(root, {"cat": 4, "dog": 3}, split="train")
    make_folder(root, {"cat": 2, "dog": 2}, split="validation", start=20)
    make_folder(root, {"cat": 2, "dog": 2}, split="test", start=40)
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    return root


def assert_same_store(a, b, keys):
    with FeatureStore(a) as sa, FeatureStore(b) as sb:
        assert sa.class_names == sb.class_names
        assert sa.files() == sb.files()
        assert sa.skipped == sb.skipped
        for column in COLUMNS:
            np.testing.assert_array_equal(getattr(sa, column)(), getattr(sb, column)())
        for key in keys:
            np.testing.assert_allclose(sb.read(key), sa.read(key), rtol=1e-5, atol=1e-6)
        for name in ("backbone", "weights_sha256", "preprocessing", "dataset", "augment"):
            assert sa.meta[name] == sb.meta[name]


@pytest.fixture(scope="module")
def sharded(dataset, tmp_path_factory):
    """A one-process store and its three shards, with one augmented view per training image."""
    out = tmp_path_factory.mktemp("stores")
    options = {"layers": ["layer3", "avgpool"], "augment": 1, **TINY, **FAST}
    whole = extract(dataset, store=out / "whole.h5", **options).store
    shards = [extract(dataset, store=out / "s.h5", shard=(i, 3), **options) for i in (2, 0, 1)]
    return whole, [r.store for r in shards], out


@pytest.mark.slow
def test_shards_cover_the_rows_with_views_together(sharded):
    whole, shards, out = sharded
    assert shards[1] == out / "s.shard-0of3.h5"
    total = 0
    for path in sorted(shards):
        with FeatureStore(path) as store:
            info = store.meta["shard"]
            assert info["first_row"] == total
            total += info["n_rows"]
            sources = store.sources()
            # each source image's original and augmented view sit in the same shard
            assert set(np.bincount(sources)[np.unique(sources)]) <= {1, 2}
    with FeatureStore(whole) as store:
        assert total == store.n_rows + 2 * len(store.skipped)  # a training image: two rows


@pytest.mark.parametrize("virtual", [False, True])
def test_merge_equals_one_process_store(sharded, virtual):
    whole, shards, out = sharded
    merged = merge(out / f"merged-{virtual}.h5", shards, virtual=virtual)
    assert_same_store(whole, merged, ["layer3", "avgpool"])
    with FeatureStore(merged) as store:
        assert "shard" not in store.meta
        assert store.meta["history"][-1]["shards"] == [str(p.resolve()) for p in sorted(shards)]
    with h5py.File(merged, "r") as raw:
        assert raw["features/layer3"].is_virtual == virtual


def test_a_shard_resumes_and_is_reused(dataset, sharded):
    _, shards, out = sharded
    again = extract(
        dataset, store=out / "s.h5", shard=(0, 3), layers=["avgpool"], augment=1, **TINY, **FAST
    )
    assert again.reused == ["avgpool"] and not again.computed
    with pytest.raises(UsageError, match="shard"):  # the same file can't be another slice
        shard_store_path(out / "s.h5", (0, 3)).rename(out / "s.shard-1of3.h5.bak")
        (out / "s.shard-1of3.h5.bak").rename(out / "s.shard-0of3.h5")
        extract(dataset, store=out / "s.h5", shard=(1, 3), layers=["avgpool"], **TINY, **FAST)


def test_merge_reads_shards_recorded_before_the_decode_field(sharded, tmp_path):
    """A shard whose preprocessing record predates `decode` (full decoding) merges with shards
    that say `decode: full`, and not with shards that decoded at reduced size."""
    _, shards, _ = sharded
    copies = [Path(shutil.copy(path, tmp_path / path.name)) for path in shards]

    def set_decode(path: Path, decode: str | None) -> None:
        with h5py.File(path, "r+") as raw:
            meta = json.loads(raw.attrs["meta"])
            meta["preprocessing"].pop("decode")
            if decode is not None:
                meta["preprocessing"]["decode"] = decode
            raw.attrs["meta"] = json.dumps(meta)

    set_decode(copies[0], None)
    for path in copies[1:]:
        set_decode(path, "full")
    merge(tmp_path / "m.h5", copies)
    set_decode(copies[1], "reduced")
    result = invoke_featx("merge", tmp_path / "m2.h5", *copies)
    assert "preprocessing" in assert_one_sentence_error(result)
    with h5py.File(copies[1], "r+") as raw:  # a record featx did not write: one sentence
        meta = json.loads(raw.attrs["meta"])
        meta["preprocessing"] = {"resize": 32}
        raw.attrs["meta"] = json.dumps(meta)
    result = invoke_featx("merge", tmp_path / "m3.h5", *copies)
    assert "is not one featx writes (it has no field 'mean')" in assert_one_sentence_error(result)
    assert not (tmp_path / "m3.h5").exists()


@pytest.mark.parametrize("virtual", [False, True])
def test_merged_layers_list_the_batch_sizes_and_engines_the_shards_ran(sharded, tmp_path, virtual):
    _, shards, _ = sharded
    copies = [Path(shutil.copy(path, tmp_path / path.name)) for path in shards]
    with h5py.File(copies[1], "r+") as raw:  # as if that shard ran on another kind of node
        raw["features"]["layer3"].attrs.update({"batch_size": 32, "engine": "openvino"})
    merge(tmp_path / "m.h5", copies, virtual=virtual)
    with h5py.File(tmp_path / "m.h5") as merged:
        assert merged["features"]["layer3"].attrs["batch_size"] == "3, 32"
        assert merged["features"]["layer3"].attrs["engine"] == "eager, openvino"
        assert merged["features"]["avgpool"].attrs["batch_size"] == 3


@pytest.mark.parametrize("virtual", [False, True])
def test_merged_engine_rows_say_which_engine_computed_which_merged_rows(sharded, tmp_path, virtual):
    """Each shard's engine ranges move to where its rows land in the merged store: a merge of
    shards that all ran eager records what the one-process store records, and a shard that
    ran openvino is named for its own rows only."""
    whole, shards, _ = sharded
    with FeatureStore(whole) as store:
        whole_ranges = json.loads(store.layer("layer3").attrs["engine_rows"])
    merge(tmp_path / "same.h5", shards, virtual=virtual)
    with FeatureStore(tmp_path / "same.h5") as store:
        assert json.loads(store.layer("layer3").attrs["engine_rows"]) == whole_ranges
        assert whole_ranges == [["eager", 0, store.n_rows]]
    copies, sizes = {}, {}
    for path in shards:
        with FeatureStore(path) as store:
            index = store.meta["shard"]["index"]
            copies[index], sizes[index] = (
                Path(shutil.copy(path, tmp_path / path.name)),
                store.n_rows,
            )
    sizes = [sizes[i] for i in range(3)]
    middle = sizes[1] // 2  # shard 1 ran openvino from its middle row on
    with h5py.File(copies[1], "r+") as raw:
        raw["features"]["layer3"].attrs["engine_rows"] = json.dumps(
            [["eager", 0, middle], ["openvino", middle, sizes[1]]]
        )
    merge(tmp_path / "m.h5", list(copies.values()), virtual=virtual)
    with FeatureStore(tmp_path / "m.h5") as store:
        ranges = json.loads(store.layer("layer3").attrs["engine_rows"])
        assert json.loads(store.layer("avgpool").attrs["engine_rows"]) == whole_ranges
    start = sizes[0] + middle
    end = sizes[0] + sizes[1]
    assert ranges == [["eager", 0, start], ["openvino", start, end], ["eager", end, sum(sizes)]]


@pytest.mark.slow
def test_merge_refuses_mismatched_shards(dataset, sharded, tmp_path):
    whole, shards, out = sharded
    refusals = [
        ([shards[0], shards[1]], "missing"),
        ([*shards, shards[0]], "overlap"),
        ([whole, *shards], "not a shard store"),
    ]
    other = extract(dataset, store=tmp_path / "o.h5", shard=(1, 3), layers=["avgpool"],
                    augment=1, **{**TINY, "image_size": 40}, **FAST).store  # fmt: skip
    refusals.append(([shards[1], shards[2], other], "preprocessing"))
    fewer = extract(dataset, store=tmp_path / "f.h5", shard=(1, 3), layers=["avgpool"],
                    augment=1, **TINY, **FAST).store  # fmt: skip
    refusals.append(([shards[0], shards[1], fewer], "layers"))  # shards 2, 0 and 1
    for paths, words in refusals:
        result = invoke_featx("merge", tmp_path / "m.h5", *paths)
        assert words in assert_one_sentence_error(result)
        assert not (tmp_path / "m.h5").exists()


def test_parse_shard(monkeypatch):
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "a/b", "-1/2", "1"):
        with pytest.raises(UsageError):
            parse_shard(bad)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert parse_shard("slurm") == (2, 4)


@pytest.mark.slow
def test_cli_shards_merge_virtual_then_info_fit_evaluate(dataset, tmp_path):
    common = ("--backbone", "resnet18", "--weights", "none", "--image-size", 32, "--layer",
              "avgpool", "--workers", 0, "--quiet", "--store", tmp_path / "c.h5")  # fmt: skip
    for i in range(2):
        result = run_featx("extract", dataset, *common, "--shard", f"{i}/2", cwd=tmp_path)
        assert result.returncode == (3 if i == 0 else 0), result.stderr  # broken: shard 0
    shards = [tmp_path / f"c.shard-{i}of2.h5" for i in range(2)]
    result = run_featx("merge", "--virtual", tmp_path / "v.h5", *shards, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    info = run_featx("info", tmp_path / "v.h5", cwd=tmp_path)
    assert info.returncode == 0 and "featx merge" in info.stdout, info.stderr
    assert "virtual" in info.stdout
    for stream in ("--no-stream", "--stream"):
        model = tmp_path / f"m{stream}.joblib"
        fit = run_featx("fit", "--store", tmp_path / "v.h5", "--layer", "avgpool", "--clf",
                        "sgd", stream, "--model", model, cwd=tmp_path)  # fmt: skip
        assert fit.returncode == 0, fit.stderr
        evaluation = run_featx("evaluate", "--model", model, "--store", tmp_path / "v.h5",
                               "--split", "test", cwd=tmp_path)  # fmt: skip
        assert evaluation.returncode == 0 and "accuracy" in evaluation.stdout, evaluation.stderr


def test_ray_not_installed_is_one_sentence(dataset, tmp_path):
    hide_ray = "import sys; sys.modules['ray'] = None; from featx.cli import app; app()"
    result = subprocess.run(
        [sys.executable, "-c", hide_ray, "extract", str(dataset), "--backbone", "resnet18",
         "--layer", "avgpool", "--ray", "local", "--store", str(tmp_path / "r.h5")],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert "pip install featx[ray]" in assert_one_sentence_error(result)


def test_shard_options_that_do_not_go_together(dataset, tmp_path):
    for options, words in (
        (("--ray", "local", "--shard", "0/2"), "not both"),
        (
            (
                "--shards",
                "2",
            ),
            "--shards goes with --ray",
        ),
        (
            (
                "--shard",
                "2/2",
            ),
            "does not exist",
        ),
    ):
        result = invoke_featx("extract", dataset, "--backbone", "resnet18", "--layer", "avgpool",
                              "--store", tmp_path / "x.h5", *options)  # fmt: skip
        assert words in assert_one_sentence_error(result)
