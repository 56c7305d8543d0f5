"""featx predict on raw image files gives what featx evaluate gives on their store rows."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from clfdata import colour_folder

import featx
from featx.classify.prediction import collect_images
from featx.errors import UsageError
from featx.models.file import FeatxModel, load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict") / "colours"
    return colour_folder(root, {"train": 8, "validation": 4, "test": 5}, seed=4)


def _store(data: Path, dtype: str) -> Path:
    store = data.parent / f"{dtype}.h5"
    featx.extract(
        data, "resnet18", ["layer3", "layer4"], store=store, weights="none", image_size=64,
        dtype=dtype, workers=0, quiet=True,
    )  # fmt: skip
    return store


@pytest.fixture(scope="module")
def store32(data):
    return _store(data, "float32")


@pytest.fixture(scope="module")
def store16(data):
    return _store(data, "float16")


def _fit(store, clf="logreg", layer="layer4", **kwargs) -> FeatxModel:
    path = store.with_name(f"{store.stem}-{clf}-{layer}.joblib")
    featx.fit(store, layer, clf, model=path, **kwargs)
    return load_model(path)


@pytest.fixture(scope="module")
def logreg(store32) -> FeatxModel:
    """The default classifier on layer4 of the float32 store, fitted once for the tests that
    only predict with it."""
    return _fit(store32)


def _by_relative_path(predictions, root):
    return {Path(p).relative_to(root).as_posix(): i for i, p in enumerate(predictions.paths)}


def _compare(model, store, data, split="test", atol=1e-6):
    evaluation = featx.evaluate(model, store, split)
    predictions = featx.predict(model, [data / split])
    where = _by_relative_path(predictions, data)
    assert len(where) == len(evaluation.paths)
    names = model.class_names
    for row, path in enumerate(evaluation.paths):
        i = where[path]
        assert predictions.predicted[i] == names[evaluation.y_pred[row]], path
        if evaluation.proba is not None:
            np.testing.assert_allclose(
                predictions.scores[i][model.pipeline.classes_], evaluation.proba[row], atol=atol
            )
    return evaluation, predictions


@pytest.mark.slow
def test_predict_gives_the_classes_evaluate_gives(logreg, store32, data):
    model = logreg
    evaluation, predictions = _compare(model, store32, data)
    assert evaluation.metrics["accuracy"] >= 0.8
    assert predictions.probabilities and not predictions.skipped
    np.testing.assert_allclose(predictions.scores.sum(axis=1), 1, rtol=1e-6)


@pytest.mark.slow
def test_predict_matches_a_float16_store_and_pooled_spatial_layer(store16, data):
    """Features are cast through the stored dtype, and --pool is part of the pipeline."""
    model = _fit(store16, "mlp", layer="layer3", pool="max", params={"epochs": 15})
    assert model.layer["dtype"] == "float16"
    _compare(model, store16, data, split="validation")


def test_predict_with_scores_when_the_classifier_has_no_probabilities(store32, data, tmp_path):
    model = _fit(store32, "ridge")
    _, predictions = _compare(model, store32, data)
    assert not predictions.probabilities
    header = predictions.to_csv(top_k=2).splitlines()[0]
    assert header == "path,predicted,top1,top1_score,top2,top2_score"


def test_csv_lists_top_k_classes_best_first(logreg, store32, data, tmp_path):
    model = logreg
    out = tmp_path / "p.csv"
    predictions = featx.predict(model, [data / "test" / "red", data / "test" / "blue"], out=out)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 10 == len(predictions.paths)
    assert list(rows[0]) == [
        "path", "predicted", "top1", "top1_probability", "top2", "top2_probability",
        "top3", "top3_probability",
    ]  # fmt: skip
    for row in rows:
        probabilities = [float(row[f"top{i}_probability"]) for i in (1, 2, 3)]
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) == pytest.approx(1, abs=1e-5)
        assert row["predicted"] == row["top1"]
        assert {row["top1"], row["top2"], row["top3"]} == {"blue", "green", "red"}
    wide = featx.predict(model, [data / "test" / "red"]).to_csv(top_k=10)
    assert wide.splitlines()[0].endswith("top3,top3_probability")  # at most every class


@pytest.mark.slow
def test_bad_images_are_reported_and_skipped(logreg, store32, data, tmp_path):
    model = logreg
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = sorted((data / "test" / "green").iterdir())[:2]
    for path in good:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image")
    truncated = good[0].read_bytes()
    (folder / "truncated.jpg").write_bytes(truncated[: len(truncated) // 3])
    (folder / "notes.txt").write_text("ignored: not an image extension")
    predictions = featx.predict(model, [folder, tmp_path / "missing.jpg"])
    assert sorted(predictions.paths) == sorted(str(folder / p.name) for p in good)
    reasons = dict(predictions.skipped)
    assert reasons[str(folder / "empty.png")] == "empty file"
    assert reasons[str(folder / "text.jpg")] == "not an image"
    assert "truncated" in reasons[str(folder / "truncated.jpg")]
    assert reasons[str(tmp_path / "missing.jpg")] == "no such file or directory"
    assert len(reasons) == 4

    cli = subprocess.run(
        [sys.executable, "-m", "featx.cli", "predict", "--model", model.path, folder,
         "--top-k", "1", "--quiet"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert cli.returncode == 3, cli.stderr
    rows = list(csv.DictReader(io.StringIO(cli.stdout)))
    assert [r["predicted"] for r in rows] == ["green", "green"]
    assert "3 file(s) could not be read and were skipped" in cli.stderr
    assert "empty.png: empty file" in cli.stderr and "Traceback" not in cli.stderr


@pytest.mark.slow
def test_cli_predict_writes_the_csv(logreg, store32, data, tmp_path):
    model = logreg
    out = tmp_path / "predictions.csv"
    cli = subprocess.run(
        [sys.executable, "-m", "featx.cli", "predict", "--model", model.path, data / "test",
         "--out", out, "--quiet"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert len(list(csv.DictReader(out.open()))) == 15
    assert "15 predictions written to" in cli.stderr


def test_predict_chooses_the_batch_as_extraction_does(logreg, store32, data, capsys):
    model = logreg
    featx.predict(model, [data / "test"], tta=1, device="cpu", quiet=False)
    # resnet18 at 64 px: 16 views a pass, i.e. 8 images and their 8 augmented views
    assert "Batch size 8 (on the CPU, for " in capsys.readouterr().err
    featx.predict(model, [data / "test"], batch_size=3, device="cpu", quiet=False)
    assert "Batch size" not in capsys.readouterr().err


def test_predict_refuses_weights_that_changed(logreg, store32, data):
    model = logreg
    changed = FeatxModel(model.pipeline, {**model.provenance, "weights_sha256": "f" * 64})
    with pytest.raises(UsageError, match="now hash to"):
        featx.predict(changed, [data / "test"])


def test_predict_usage_errors(logreg, store32, data, tmp_path):
    model = logreg
    with pytest.raises(UsageError, match="no image files found"):
        featx.predict(model, [tmp_path])
    with pytest.raises(UsageError, match="--top-k must be at least 1"):
        featx.predict(model, [data / "test"], top_k=0)


def test_collect_images_walks_folders_in_order(data, tmp_path):
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "a.jpg").write_bytes(b"")
    files, skipped = collect_images([data / "test", tmp_path])
    assert len(files) == 15 and not skipped
    assert files == sorted(files)
