"""Stores that featx did not write as they are: copies of a real store edited with h5py, each
opened by `featx info`, `featx fit` and `featx extract`. Every command answers with exit 2 and
one sentence naming the problem, and leaves the file as it was."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import assert_one_sentence_error, invoke_featx, make_folder, run_featx

from featx.errors import UsageError
from featx.store.feature_store import FeatureStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KEY = "layer2@avg"


def _extract_args(data: Path) -> list[object]:
    return [
        "extract", data, "--backbone", "resnet18", "--weights", "none", "--image-size", "32",
        "--layer", "layer2", "--pool", "avg", "--workers", "0", "--device", "cpu", "--quiet",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, store) made by the command line, in this process."""
    root = tmp_path_factory.mktemp("validation")
    data = root / "pets"
    make_folder(data, {"cat": 3, "dog": 3}, split="train")
    make_folder(data, {"cat": 2, "dog": 2}, split="validation", start=20)
    store = root / "good.h5"
    result = invoke_featx(*_extract_args(data), "--store", store)
    assert result.returncode == 0, result.stderr
    return data, store


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _replace(f: h5py.File, name: str, data: np.ndarray, **kwargs) -> None:
    del f[name]
    f.create_dataset(name, data=data, **kwargs)


def _shorter(name: str) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        values = f[name][()]
        _replace(f, name, values[:-1], dtype=f[name].dtype)

    return edit


def _set_feature(value: float) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        f[f"features/{KEY}"][3, 5] = value

    return edit


def _meta(change: Callable[[dict], object]) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        meta = json.loads(f.attrs["meta"])
        f.attrs["meta"] = json.dumps(change(meta))

    return edit


def _group_for_features(f: h5py.File) -> None:
    del f[f"features/{KEY}"]
    f.create_group(f"features/{KEY}")


def _int_features(f: h5py.File) -> None:
    n = len(f["rows/path"])
    _replace(f, f"features/{KEY}", np.arange(n, dtype=np.int64))


def _fewer_feature_rows(f: h5py.File) -> None:
    _replace(f, f"features/{KEY}", f[f"features/{KEY}"][:-2])


def _label_out_of_range(f: h5py.File) -> None:
    f["rows/label"][2] = 7


def _unknown_split(f: h5py.File) -> None:
    splits = f["rows/split"].asstr()[()].astype(object)
    splits[0] = "holdout"
    _replace(f, "rows/split", splits, dtype=h5py.string_dtype())


def _without_dataset_fingerprint(meta: dict) -> dict:
    del meta["dataset"]["fingerprint"]
    return meta


def _without_backbone(meta: dict) -> dict:
    del meta["backbone"]
    return meta


def _preprocessing_without_mean(meta: dict) -> dict:
    del meta["preprocessing"]["mean"]
    return meta


# name -> (edit, what the message says, whether opening alone finds it)
CASES: dict[str, tuple[Callable[[h5py.File], None], str, bool]] = {
    "meta {}": (_meta(lambda m: {}), "lacks meta field backbone", True),
    "meta a JSON list": (_meta(lambda m: [1, 2]), "meta attribute that is not a JSON object", True),
    "meta not JSON": (
        lambda f: f.attrs.__setitem__("meta", "{not json"),
        "meta attribute that is not JSON",
        True,
    ),
    "meta without backbone": (_meta(_without_backbone), "lacks meta field backbone", True),
    "meta without dataset.fingerprint": (
        _meta(_without_dataset_fingerprint),
        "lacks meta field dataset.fingerprint",
        True,
    ),
    "meta preprocessing without mean": (
        _meta(_preprocessing_without_mean),
        "meta field preprocessing of store",  # ... is not one featx writes (no field 'mean')
        True,
    ),
    "a group where a layer should be": (
        _group_for_features,
        f"group where the dataset /features/{KEY} should be",
        True,
    ),
    "/skipped deleted": (lambda f: f.__delitem__("skipped"), "has no /skipped group", True),
    "rows/label too short": (_shorter("rows/label"), "entries in /rows/label", True),
    "rows/split too short": (_shorter("rows/split"), "entries in /rows/split", True),
    "features cut to fewer rows": (_fewer_feature_rows, f"rows in layer {KEY}", True),
    "1-D integer features": (_int_features, "not rows of float16 or float32", True),
    "labels out of range": (_label_out_of_range, "label 7 at row 2, outside the 2 classes", True),
    "an unknown split": (_unknown_split, "unknown split 'holdout'", True),
    "format_version 99": (
        lambda f: f.attrs.__setitem__("format_version", 99),
        "written by a newer featx (store format 99)",
        True,
    ),
    "classes missing": (lambda f: f.__delitem__("classes"), "has no /classes dataset", True),
    "featx_format missing": (
        lambda f: f.attrs.__delitem__("featx_format"),
        "is not a featx feature store",
        True,
    ),
    # Non-finite values are only found by a scan: fit and evaluate make it, opening does not.
    "NaN values": (_set_feature(np.nan), f"layer {KEY} of store", False),
    "infinite values": (_set_feature(np.inf), f"layer {KEY} of store", False),
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def corrupted(request, built, tmp_path) -> tuple[Path, str, bool]:
    _, store = built
    edit, expected, at_open = CASES[request.param]
    copy = tmp_path / "edited.h5"
    shutil.copyfile(store, copy)
    with h5py.File(copy, "r+") as f:
        edit(f)
    return copy, expected, at_open


@pytest.mark.slow
def test_every_command_names_the_problem_and_changes_nothing(built, corrupted):
    data, good = built
    store, expected, at_open = corrupted
    before, good_before = _sha256(store), _sha256(good)

    fit = invoke_featx("fit", "--store", store, "--layer", KEY, "--clf", "logreg")
    message = assert_one_sentence_error(fit)
    assert expected in message, message

    info = invoke_featx("info", store)
    extract = invoke_featx(*_extract_args(data), "--store", store)
    if at_open:
        for result in (info, extract):
            assert expected in assert_one_sentence_error(result)
    else:
        assert info.returncode == 0, info.stderr
        assert extract.returncode == 0, extract.stderr  # the layer is there: nothing to compute
    assert _sha256(store) == before
    assert _sha256(good) == good_before


@pytest.mark.slow
def test_the_cli_in_a_fresh_interpreter_refuses_a_broken_store(built, tmp_path):
    data, store = built
    copy = tmp_path / "short.h5"
    shutil.copyfile(store, copy)
    with h5py.File(copy, "r+") as f:
        _fewer_feature_rows(f)
    before = _sha256(copy)
    for args in (["info", copy], [*_extract_args(data), "--store", copy]):
        message = assert_one_sentence_error(run_featx(*args, cwd=tmp_path))
        assert f"rows in layer {KEY}" in message
    assert _sha256(copy) == before


def test_check_finite_names_the_first_bad_row_and_its_image(built, tmp_path):
    _, store = built
    copy = tmp_path / "nan.h5"
    shutil.copyfile(store, copy)
    with h5py.File(copy, "r+") as f:
        f[f"features/{KEY}"][4, 0] = np.nan
        f[f"features/{KEY}"][7, 1] = -np.inf
        path = f["rows/path"].asstr()[4]
        split = f["rows/split"].asstr()[4]
    with FeatureStore(copy) as opened:
        with pytest.raises(UsageError, match=rf"first at row 4, image {path}\)\.$"):
            opened.check_finite(KEY)
        other = "validation" if split == "train" else "train"
        with pytest.raises(UsageError, match="first at row 7"):
            opened.check_finite(KEY, other)
    with FeatureStore(store) as opened:
        opened.check_finite(KEY)  # a good store passes


def test_a_good_store_opens(built):
    _, store = built
    with FeatureStore(store) as opened:
        assert opened.n_rows == 10 and opened.layers == [KEY]
        assert set(opened.meta["dataset"]) >= {"root", "fingerprint", "n_files"}
