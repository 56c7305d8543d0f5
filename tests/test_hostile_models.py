"""Crafted model files, as an attacker would write them: real featx models whose arrays,
archive sizes or provenance were rewritten inside the file. Every one is refused in one
`featx:` sentence with exit 2, by `info`, `evaluate` and `predict` run as real processes:
no traceback, no death by a signal, no memory blown up by a lying archive."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_sentence_error, invoke_featx, make_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ("--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--workers", "0")
FIT = ("--layer", "avgpool", "--cv", "2", "--quiet")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A dataset, its store, and real model files of rf and of knn on each search structure."""
    root = tmp_path_factory.mktemp("crafted")
    data = root / "data"
    make_folder(data, {"cat": 4, "dog": 4}, size=(40, 30))
    store = root / "s.h5"
    done = invoke_featx("extract", data, *TINY, "--layer", "avgpool", "--store", store, "--quiet")
    assert done.returncode == 0, done.stderr
    models = {"data": data, "store": store, "root": root}
    knn = ("--clf", "knn", "--param", "n_neighbors=1", "--param")
    for name, extra in {
        "rf": ("--clf", "rf", "--param", "n_estimators=5"),  # the checks hold for each tree
        "logreg": ("--clf", "logreg"),
        "svm": ("--clf", "svm"),
        "kd_tree": (*knn, "algorithm=kd_tree"),
        "ball_tree": (*knn, "algorithm=ball_tree"),
        "brute": (*knn, "algorithm=brute"),
    }.items():
        model = root / f"{name}.featx"
        done = invoke_featx("fit", "--store", store, *FIT, *extra, "--model", model)
        assert done.returncode == 0, done.stderr
        models[name] = model
    return models


# Crafted arrays used to kill featx by a signal, so each case runs in a process of its own:
# forked from one interpreter that imported featx's libraries once (a fresh interpreter per
# case spends seconds importing them).
FORKS = r"""
import json, os, sys, tempfile, time
import h5py, skops.io, sklearn.ensemble, sklearn.neighbors, sklearn.svm, torch
from featx.cli import app

cases, timeout = json.loads(sys.stdin.read())
results = {}
for name, args in cases.items():
    err = tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:
        os.dup2(err.fileno(), 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        sys.argv = ["featx", *args]
        try:
            app()
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    deadline = time.monotonic() + timeout
    while not (ended := os.wait4(pid, os.WNOHANG))[0]:
        if time.monotonic() > deadline:
            os.kill(pid, 9)
        time.sleep(0.01)
    err.seek(0)
    results[name] = {"returncode": os.waitstatus_to_exitcode(ended[1]),
                     "stderr": err.read().decode(errors="replace"),
                     "maxrss": ended[2].ru_maxrss * 1024}
print(json.dumps(results))
"""


def run_forked(cases: dict[str, tuple], cwd: Path, timeout: float = 300) -> dict[str, dict]:
    """{case: {returncode (minus the signal when killed by one), stderr, maxrss (peak bytes
    resident)}} of `featx ARGS` for each case's ARGS, each in a forked process."""
    plain = {name: [str(a) for a in args] for name, args in cases.items()}
    done = subprocess.run([sys.executable, "-c", FORKS], input=json.dumps([plain, timeout]),
                          cwd=cwd, capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(done.stdout.splitlines()[-1])


def as_done(result: dict) -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess([], result["returncode"], "", result["stderr"])


# ---- rewriting a model file ---------------------------------------------------------------
def members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def write_zip(path, content: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in content.items():
            zf.writestr(name, data)
    return path


def _find(node, cls: str):
    """The first schema node of class `cls` (depth first)."""
    if isinstance(node, dict):
        if node.get("__class__") == cls:
            return node
        children = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return None
    for child in children:
        found = _find(child, cls)
        if found is not None:
            return found
    return None


def _field(owner: dict, name: str | int) -> dict:
    """The schema node of attribute `name` (or tuple item `name`) of an object node."""
    return owner["content"]["content"][name]


def edit_pipeline(
    model: Path, out: Path, cls: str, name: str | int, change: Callable, *, reduce_arg=False
) -> Path:
    """`model` with one value of the first `cls` object in its pipeline rewritten:
    `change(old) -> new` on an array (an .npy member) or a JSON value; `reduce_arg` picks the
    constructor arguments of a reduced object (sklearn's Tree) instead of its state."""
    outer = members(model)
    with zipfile.ZipFile(io.BytesIO(outer["pipeline.skops"])) as zf:
        inner = {n: zf.read(n) for n in zf.namelist()}
    schema = json.loads(inner["schema.json"])
    owner = _find(schema, cls)
    assert owner is not None, cls
    node = owner["__reduce__"]["args"]["content"][name] if reduce_arg else _field(owner, name)
    if node.get("__loader__") == "NdArrayNode":
        array = np.load(io.BytesIO(inner[node["file"]]), allow_pickle=False)
        buffer = io.BytesIO()
        np.save(buffer, change(array), allow_pickle=False)
        inner[node["file"]] = buffer.getvalue()
    else:
        node["content"] = json.dumps(change(json.loads(node["content"])))
        node["__id__"] = 1  # skops shares a value among nodes of one id: give it its own
        inner["schema.json"] = json.dumps(schema).encode()
    buffer = io.BytesIO()
    write_zip(buffer, inner, zipfile.ZIP_STORED)  # as skops writes it
    return write_zip(out, {**outer, "pipeline.skops": buffer.getvalue()})


def _set(field: str, value) -> Callable:
    """A change that sets one field of a structured array (or a plain array) everywhere."""

    def change(array: np.ndarray) -> np.ndarray:
        array = array.copy()
        if field:
            array[field] = value
        else:
            array[...] = value
        return array

    return change


def _first(field: str, value) -> Callable:
    """A change of one field of the first record of a structured array (a tree's root)."""

    def change(array: np.ndarray) -> np.ndarray:
        array = array.copy()
        array[field][0] = value
        return array

    return change


# ---- arrays that index memory -------------------------------------------------------------
# name: (model, class in the pipeline, attribute or state item, change, words of the refusal)
ARRAY_CASES = {
    "tree-child-far": ("rf", "Tree", "nodes", _first("left_child", 10**9), "child index"),
    "tree-child-loop": ("rf", "Tree", "nodes", _first("right_child", 0), "child index"),
    "tree-feature-far": ("rf", "Tree", "nodes", _first("feature", 10**9), "feature index"),
    "kd-index-far": ("kd_tree", "KDTree", 1, lambda a: a + 10**9, "not a permutation"),
    "kd-node-range": ("kd_tree", "KDTree", 2, _first("idx_end", 10**9), "node range"),
    "ball-index-far": ("ball_tree", "BallTree", 1, lambda a: a + 10**9, "not a permutation"),
    "knn-label-far": ("brute", "KNeighborsClassifier", "_y", lambda a: a + 10**9, "label index"),
    "svc-support-long": (
        "svm", "SVC", "support_", lambda a: np.arange(10**5, dtype=a.dtype), "support indices"
    ),
    "svc-coef-short": ("svm", "SVC", "_dual_coef_", lambda a: a[:, :1].copy(), "coefficients"),
    "svc-counts": ("svm", "SVC", "_n_support", lambda a: a * 1000, "support counts"),
    "classes-beyond-names": (
        "logreg", "LogisticRegression", "classes_", lambda a: a + 5, "indices of its 2 class"
    ),
}  # fmt: skip


def _assert_refused(done: subprocess.CompletedProcess, words: str) -> None:
    assert done.returncode >= 0, f"killed by signal {-done.returncode}"
    assert words in assert_one_sentence_error(done, 2)


BY_INFO_AND_PREDICT = ["tree-child-far", "kd-index-far"]


@pytest.fixture(scope="module")
def crafted_runs(world) -> dict[str, dict]:
    """Every crafted-array case run by `evaluate` (and two by `info` and `predict`), each in a
    process of its own."""
    folder = world["root"] / "arrays"
    folder.mkdir()
    runs = {}
    for case, (model, cls, name, change, _) in ARRAY_CASES.items():
        crafted = edit_pipeline(world[model], folder / f"{case}.featx", cls, name, change)
        runs[f"evaluate {case}"] = ("evaluate", "--model", crafted, "--store", world["store"],
                                    "--split", "unsplit")  # fmt: skip
        if case in BY_INFO_AND_PREDICT:
            runs[f"info {case}"] = ("info", crafted)
            runs[f"predict {case}"] = ("predict", "--model", crafted, world["data"], "--quiet",
                                       "--workers", "0")  # fmt: skip
    return run_forked(runs, folder)


@pytest.mark.parametrize("case", list(ARRAY_CASES))
def test_crafted_arrays_are_refused(crafted_runs, case):
    _assert_refused(as_done(crafted_runs[f"evaluate {case}"]), ARRAY_CASES[case][-1])


@pytest.mark.parametrize("case", BY_INFO_AND_PREDICT)
@pytest.mark.parametrize("command", ["info", "predict"])
def test_crafted_arrays_are_refused_by_info_and_predict(crafted_runs, case, command):
    _assert_refused(as_done(crafted_runs[f"{command} {case}"]), ARRAY_CASES[case][-1])


def test_the_real_models_pass_the_checks(world):
    from featx.models.file import load_model

    for name in ("rf", "logreg", "svm", "kd_tree", "ball_tree", "brute"):
        assert load_model(world[name]).class_names == ["cat", "dog"]


# ---- an archive that lies about its sizes -------------------------------------------------
def lying_bomb(good: Path, out: Path, inflated: int) -> Path:
    """A model file of about `inflated` / 1000 bytes whose pipeline.skops inflates to
    `inflated` bytes, while its central directory claims a packed size only ten times
    smaller (so the stated ratio looks like an ordinary one)."""
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("provenance.json", members(good)["provenance.json"])
        with zf.open("pipeline.skops", "w") as fh:
            zero = bytes(1 << 20)
            for _ in range(inflated >> 20):
                fh.write(zero)
    data = bytearray(out.read_bytes())
    at = data.rindex(b"PK\x01\x02")  # the directory entry of pipeline.skops, the last member
    struct.pack_into("<I", data, at + 20, inflated // 10)  # its packed size
    out.write_bytes(bytes(data))
    return out


@pytest.mark.slow
def test_a_lying_zip_bomb_is_refused_with_bounded_memory(world, tmp_path):
    inflated = 1 << 30
    bomb = lying_bomb(world["rf"], tmp_path / "bomb.featx", inflated)
    assert bomb.stat().st_size < 2 << 20
    runs = run_forked({"good": ("info", world["rf"]), "bomb": ("info", bomb)}, tmp_path)
    baseline, peak = runs["good"]["maxrss"], runs["bomb"]["maxrss"]
    assert "pipeline.skops that unpacks to" in assert_one_sentence_error(as_done(runs["bomb"]))
    assert peak < baseline + inflated // 8, (peak >> 20, baseline >> 20)


# ---- provenance of the wrong type or value ------------------------------------------------
def _provenance(model: Path, out: Path, field: str, value) -> Path:
    """`model` with provenance field `field` (dotted for a nested one) set to `value`."""
    content = members(model)
    provenance = json.loads(content["provenance.json"])
    *parents, last = field.split(".")
    target = provenance
    for name in parents:
        target = target[name]
    target[last] = value
    return write_zip(out, {**content, "provenance.json": json.dumps(provenance).encode()})


# name: (field, value, command, words of the refusal)
PROVENANCE_CASES = {
    "params-text": ("params", "fast", "info", "field params that is not a JSON object"),
    "versions-list": ("versions", [1, 2], "info", "field versions"),
    "metrics-number": ("metrics", {"test": 5}, "info", "field metrics.test"),
    "metrics-text": ("metrics", {"test": {"accuracy": "high"}}, "info", "metrics.test.accuracy"),
    "store-text": ("store", "here", "info", "field store that is not a JSON object"),
    "trained-on-text": ("trained_on", {"n_rows": "all"}, "info", "field trained_on.n_rows"),
    "layers-object": ("layers", {"a": 1}, "info", "field layers that is not a list"),
    "one-class": ("class_names", ["cat"], "predict", "two or more names"),
    "escape-in-class": ("class_names", ["\x1b[2J\x1b[31mcat", "dog"], "info", "control char"),
    "pool-median": ("layer.pool", "median", "predict", "field layer.pool"),
    "std-zero": ("preprocessing.std", [0, 0, 0], "predict", "field preprocessing.std"),
    "resize-negative": ("preprocessing.resize", -32, "predict", "field preprocessing.resize"),
    "resize-huge": ("preprocessing.resize", 100000, "predict", "field preprocessing.resize"),
}


@pytest.mark.parametrize("case", list(PROVENANCE_CASES))
def test_provenance_of_the_wrong_kind_is_refused(world, case, tmp_path):
    field, value, command, words = PROVENANCE_CASES[case]
    crafted = _provenance(world["logreg"], tmp_path / "crafted.featx", field, value)
    args = ("info", crafted) if command == "info" else ("predict", "--model", crafted)
    if command == "predict":
        args += (world["data"], "--quiet", "--workers", "0")
    done = invoke_featx(*args)
    assert "\x1b" not in done.stdout + done.stderr
    assert words in assert_one_sentence_error(done, 2)


def test_a_nan_dropout_in_a_head_is_refused(world, tmp_path):
    from sklearn.pipeline import Pipeline

    from featx.classify.pipeline import LayerFeatures
    from featx.models.file import FeatxModel, load_model
    from featx.models.heads import TorchHead, make_head

    good = load_model(world["logreg"])
    width = good.layer["row_shape"][0]
    pipeline = Pipeline(
        [
            ("features", LayerFeatures("none").fit(np.zeros((1, width), np.float32))),
            ("clf", TorchHead.from_head(make_head(width, [4], 0.5, 1), [0, 1])),
        ]
    )
    path = FeatxModel(pipeline, good.provenance).save(tmp_path / "head.featx")
    content = members(path)
    specs = json.loads(content["heads.json"])
    specs["head0"]["dropout"] = float("nan")
    crafted = write_zip(
        tmp_path / "nan.featx", {**content, "heads.json": json.dumps(specs).encode()}
    )
    done = invoke_featx("predict", "--model", crafted, world["data"], "--quiet", "--workers", "0")
    assert "dropout outside [0, 1)" in assert_one_sentence_error(done, 2)


def test_a_compressed_member_inside_the_pipeline_is_refused(world, tmp_path):
    """skops stores its members uncompressed; a deflated one could inflate past any bound
    while skops reads it, so featx refuses it before skops opens the pipeline."""
    outer = members(world["logreg"])
    with zipfile.ZipFile(io.BytesIO(outer["pipeline.skops"])) as zf:
        inner = {n: zf.read(n) for n in zf.namelist()}
    buffer = io.BytesIO()
    write_zip(buffer, inner, zipfile.ZIP_DEFLATED)
    crafted = write_zip(tmp_path / "c.featx", {**outer, "pipeline.skops": buffer.getvalue()})
    message = assert_one_sentence_error(invoke_featx("info", crafted), 2)
    assert "compressed member pipeline.skops/" in message


def test_an_honest_member_past_what_featx_writes_is_refused_before_inflating(world, tmp_path):
    """No lie in the directory, and an ordinary-looking ratio (about 150): a member of about
    100 MB in a file of about 700 kB is far past what featx writes in a file that small, and
    is refused from its stated size."""
    rng = np.random.default_rng(0)
    bomb = tmp_path / "honest.featx"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("provenance.json", members(world["rf"])["provenance.json"])
        with zf.open("pipeline.skops", "w") as fh:
            for _ in range(96):
                fh.write(rng.bytes(6 << 10) + bytes((1 << 20) - (6 << 10)))
    with zipfile.ZipFile(bomb) as zf:
        info = zf.getinfo("pipeline.skops")
        assert 100 < info.file_size / info.compress_size < 200
    message = assert_one_sentence_error(invoke_featx("info", bomb), 2)
    assert "pipeline.skops that unpacks to 100.7 MB" in message


def test_predictions_never_start_a_csv_cell_with_a_formula(world, tmp_path):
    """Class names and file names a spreadsheet would run (OWASP's CSV injection) are written
    with a leading apostrophe."""
    names = ['=HYPERLINK("http://example.com")', "@SUM(1)"]
    crafted = _provenance(world["logreg"], tmp_path / "crafted.featx", "class_names", names)
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("+cmd.jpg", "-x.jpg", "plain.jpg"):
        (photos / name).write_bytes((world["data"] / "cat" / "img-000.jpg").read_bytes())
    out = tmp_path / "p.csv"
    done = invoke_featx("predict", "--model", crafted, photos, "--out", out, "--quiet",
                        "--workers", "0")  # fmt: skip
    assert done.returncode == 0, done.stderr
    import csv

    rows = list(csv.reader(out.read_text().splitlines()))[1:]
    cells = [cell for row in rows for cell in row if cell and not cell[0].isdigit()]
    assert len(rows) == 3 and cells
    assert all(cell[0] not in "=+-@" for cell in cells), cells
    assert {f"'{n}" for n in names} <= set(cells)
