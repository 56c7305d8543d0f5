"""Model files: a zip of JSON, skops and safetensors whose loading runs no code.

Round trips for every classifier and a fine-tuned head, and crafted files (a pickle that would
create a file, untrusted types, damaged archives, a zip bomb) through the command line: exit 2,
one sentence, no code run, good files beside them unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from pathlib import Path

import joblib
import numpy as np
import pytest
import skops.io
import torch
from conftest import assert_one_sentence_error, invoke_featx, make_folder, run_featx
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

import featx
from featx.classify.pipeline import LayerFeatures
from featx.classify.registry import CLASSIFIERS
from featx.errors import UsageError
from featx.models.file import FeatxModel, load_model
from featx.models.heads import TorchHead, load_fitted_head, make_head
from featx.models.trusted import trusted_types
from featx.store.feature_store import FeatureStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KEY = "layer2@avg"
MEMBERS = {"provenance.json", "pipeline.skops", "heads.json", "heads.safetensors"}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A dataset, its store, and a good logreg model file."""
    root = tmp_path_factory.mktemp("models")
    data = root / "pets"
    make_folder(data, {"cat": 4, "dog": 4}, split="train")
    make_folder(data, {"cat": 2, "dog": 2}, split="validation", start=20)
    make_folder(data, {"cat": 2, "dog": 2}, split="test", start=30)
    store = featx.extract(
        data, "resnet18", ["layer2"], store=root / "pets.h5", weights="none", image_size=32,
        pool="avg", workers=0, quiet=True,
    ).store  # fmt: skip
    good = root / "good.featx"
    featx.fit(store, KEY, "logreg", model=good)
    return {"root": root, "data": data, "store": store, "good": good}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rows(store: Path) -> np.ndarray:
    with FeatureStore(store) as opened:
        return opened.read(KEY)


@pytest.fixture
def audited_loads(monkeypatch) -> list:
    """Record the `trusted` list every skops load is given."""
    given = []
    real = skops.io.loads

    def loads(data, trusted=None):
        given.append(list(trusted or []))
        return real(data, trusted=trusted)

    monkeypatch.setattr(skops.io, "loads", loads)
    return given


def _no_pickle(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a model file was unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)


# ---- round trips -------------------------------------------------------------------------
@pytest.mark.parametrize("clf", sorted(CLASSIFIERS))
@pytest.mark.slow
def test_every_classifier_survives_save_and_load(world, clf, tmp_path, audited_loads, monkeypatch):
    params = {"epochs": 5} if clf == "mlp" else None
    path = tmp_path / f"{clf}.featx"
    sweep = featx.fit(world["store"], KEY, clf, params=params, model=path)
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
    assert names <= MEMBERS and {"provenance.json", "pipeline.skops"} <= names
    assert ("heads.safetensors" in names) == (clf == "mlp")

    _no_pickle(monkeypatch)
    loaded = load_model(path)
    assert audited_loads and set(audited_loads[-1]) <= trusted_types()
    X = _rows(world["store"])
    for got, wanted in zip(loaded.scores(X), sweep.best.model.scores(X), strict=True):
        np.testing.assert_array_equal(got, wanted)
    assert loaded.provenance == json.loads(json.dumps(sweep.best.model.provenance))


def test_a_fine_tuned_head_survives_save_and_load(world, tmp_path, audited_loads, monkeypatch):
    good = load_model(world["good"])
    width = good.layer["row_shape"][0]
    torch.manual_seed(0)
    head = make_head(width, [16], 0.5, 1)
    pipeline = Pipeline(
        [
            ("features", LayerFeatures("none").fit(np.zeros((1, width), np.float32))),
            ("clf", TorchHead.from_head(head, [0, 1])),
        ]
    )
    model = FeatxModel(pipeline, {**good.provenance, "classifier": "finetune"})
    path = model.save(tmp_path / "model.featx")

    _no_pickle(monkeypatch)
    loaded = load_model(path)
    assert audited_loads and set(audited_loads[-1]) <= trusted_types()
    X = _rows(world["store"])
    for got, wanted in zip(loaded.scores(X), model.scores(X), strict=True):
        np.testing.assert_array_equal(got, wanted)
    fitted = load_fitted_head(path)  # `featx finetune --head` reads it the same way
    for name, tensor in head.state_dict().items():
        torch.testing.assert_close(fitted.head.state_dict()[name], tensor)


def test_a_head_spec_larger_than_its_tensors_is_refused(world, tmp_path):
    good = load_model(world["good"])
    width = good.layer["row_shape"][0]
    pipeline = Pipeline(
        [
            ("features", LayerFeatures("none").fit(np.zeros((1, width), np.float32))),
            ("clf", TorchHead.from_head(make_head(width, [8], 0.5, 1), [0, 1])),
        ]
    )
    path = FeatxModel(pipeline, good.provenance).save(tmp_path / "head.featx")
    members = _members(path)
    specs = json.loads(members["heads.json"])
    specs["head0"]["hidden_sizes"] = [1 << 30]  # would allocate terabytes
    crafted = _zip(
        tmp_path / "crafted.featx", {**members, "heads.json": json.dumps(specs).encode()}
    )
    message = assert_one_sentence_error(invoke_featx("info", crafted))
    assert "head head0 does not match its stored tensors" in message


def test_a_legacy_pickle_loads_only_when_trusted(world, tmp_path):
    good = load_model(world["good"])
    legacy = tmp_path / "old.joblib"
    joblib.dump(
        {
            "format": "featx-model",
            "format_version": 1,
            "pipeline": good.pipeline,
            "provenance": good.provenance,
        },
        legacy,
    )
    args = ["evaluate", "--model", legacy, "--store", world["store"]]
    message = assert_one_sentence_error(invoke_featx(*args))
    assert "pass --trust-pickle if you trust its source, or refit" in message
    trusted = invoke_featx(*args, "--trust-pickle")
    assert trusted.returncode == 0, trusted.stderr
    converted = load_model(legacy, trust_pickle=True).save(tmp_path / "new.featx")
    X = _rows(world["store"])
    np.testing.assert_array_equal(load_model(converted).scores(X)[1], good.scores(X)[1])


# ---- crafted files -----------------------------------------------------------------------
class _CreatesFile:
    """Unpickling this creates the file `path`."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _provenance(good: Path, change) -> dict[str, bytes]:
    members = _members(good)
    provenance = json.loads(members["provenance.json"])
    change(provenance)
    return {**members, "provenance.json": json.dumps(provenance).encode()}


def _untrusted(good: Path, path: Path, pwned: Path) -> Path:
    evil = Pipeline([("f", FunctionTransformer(os.system, kw_args={"command": f"touch {pwned}"}))])
    return _zip(path, {**_members(good), "pipeline.skops": skops.io.dumps(evil)})


def _not_a_pipeline(good: Path, path: Path, pwned: Path) -> Path:
    scaler = StandardScaler().fit(np.zeros((2, 3)))
    return _zip(path, {**_members(good), "pipeline.skops": skops.io.dumps(scaler)})


def _pickle(good: Path, path: Path, pwned: Path) -> Path:
    payload = {"format": "featx-model", "format_version": 1, "pipeline": _CreatesFile(pwned)}
    path.write_bytes(pickle.dumps(payload))
    return path


def _no_provenance(good: Path, path: Path, pwned: Path) -> Path:
    members = _members(good)
    del members["provenance.json"]
    return _zip(path, members)


def _no_layer(good: Path, path: Path, pwned: Path) -> Path:
    return _zip(path, _provenance(good, lambda p: p.pop("layer")))


def _no_backbone(good: Path, path: Path, pwned: Path) -> Path:
    return _zip(path, _provenance(good, lambda p: p.pop("backbone")))


def _newer(good: Path, path: Path, pwned: Path) -> Path:
    return _zip(path, _provenance(good, lambda p: p.update(format_version=99)))


def _truncated(good: Path, path: Path, pwned: Path) -> Path:
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _random_bytes(good: Path, path: Path, pwned: Path) -> Path:
    path.write_bytes(b"\0" + np.random.default_rng(0).bytes(4095))
    return path


def _zip_bomb(good: Path, path: Path, pwned: Path) -> Path:
    return _zip(path, {**_members(good), "provenance.json": bytes(100 << 20)})


# name -> (maker, what `evaluate`, `predict` and `finetune --head` say, what `info` says)
HOSTILE = {
    "a pickle that creates a file": (
        _pickle,
        "pickle-based model file from an older featx; loading it can run code: pass "
        "--trust-pickle if you trust its source, or refit",
        "pickle-based model file from an older featx",
    ),
    "an untrusted type in the pipeline": (
        _untrusted,
        "types that featx does not build and will not load: ",
        "FunctionTransformer",
    ),
    "a skops file that is not a Pipeline": (_not_a_pipeline, "not a Pipeline", None),
    "a zip without provenance.json": (_no_provenance, "the zip has no provenance.json", None),
    "provenance without layer": (_no_layer, "lacks provenance field layer", None),
    "provenance without backbone": (_no_backbone, "lacks provenance field backbone", None),
    "format_version 99": (_newer, "written by a newer featx (model format 99)", None),
    "a truncated zip": (_truncated, "damaged or truncated zip file", None),
    "random bytes": (
        _random_bytes,
        "is not a featx model file",
        "is neither a featx store nor a featx model file",
    ),
    "a zip bomb": (_zip_bomb, "provenance.json that unpacks to 104.9 MB", None),
}


@pytest.mark.parametrize("case", list(HOSTILE))
@pytest.mark.slow
def test_a_crafted_model_file_is_refused_without_running_code(world, case, tmp_path):
    maker, expected, expected_info = HOSTILE[case]
    pwned = tmp_path / "pwned"
    hostile = maker(world["good"], tmp_path / "hostile.featx", pwned)
    hashes = {p: _sha256(p) for p in (hostile, world["good"], world["store"])}
    run = tmp_path / "run"
    commands = {
        "info": ["info", hostile],
        "evaluate": ["evaluate", "--model", hostile, "--store", world["store"]],
        "predict": ["predict", "--model", hostile, world["data"], "--device", "cpu"],
        "finetune": [
            "finetune", world["data"], "--backbone", "resnet18", "--weights", "none",
            "--image-size", "32", "--head", hostile, "--out", run, "--device", "cpu",
            "--workers", "0", "--quiet",
        ],
    }  # fmt: skip
    for command, args in commands.items():
        message = assert_one_sentence_error(invoke_featx(*args))
        wanted = expected_info if command == "info" and expected_info else expected
        assert wanted in message, (command, message)
        assert not pwned.exists(), command
    assert not run.exists()
    assert {p: _sha256(p) for p in hashes} == hashes


def test_untrusted_types_are_listed(world, tmp_path):
    hostile = _untrusted(world["good"], tmp_path / "hostile.featx", tmp_path / "pwned")
    with pytest.raises(UsageError) as error:
        load_model(hostile)
    message = str(error.value)
    assert "sklearn.preprocessing._function_transformer.FunctionTransformer" in message
    assert "system" in message and not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_a_fresh_interpreter_never_unpickles(world, tmp_path):
    pwned = tmp_path / "pwned"
    hostile = _pickle(world["good"], tmp_path / "old.joblib", pwned)
    for args in (["info", hostile], ["predict", "--model", hostile, world["data"]]):
        assert_one_sentence_error(run_featx(*args, cwd=tmp_path))
        assert not pwned.exists()


def test_a_trusted_legacy_pickle_still_needs_its_provenance(world, tmp_path):
    good = load_model(world["good"])
    provenance = {k: v for k, v in good.provenance.items() if k != "layer"}
    legacy = tmp_path / "old.joblib"
    joblib.dump(
        {"format": "featx-model", "format_version": 1, "pipeline": good.pipeline,
         "provenance": provenance},
        legacy,
    )  # fmt: skip
    message = assert_one_sentence_error(
        invoke_featx("predict", "--model", legacy, world["data"], "--trust-pickle")
    )
    assert message.endswith(f"model file {legacy} lacks provenance field layer.")
