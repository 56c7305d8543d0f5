"""`featx predict --tta N`: the scores of an image averaged over the image itself and N seeded
augmented views of it, made as fine-tuning makes them; `--tta 0` is plain prediction."""

from __future__ import annotations

import csv
import io
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from clfdata import colour_folder
from conftest import assert_one_sentence_error, invoke_featx, run_featx

import featx
from featx.backbones.registry import get_backbone
from featx.backbones.tap import LayerTap
from featx.classify.prediction import collect_images, tta_inputs
from featx.data.augment_config import AugmentConfig
from featx.data.folders import load_image
from featx.data.preprocessing import Preprocessing
from featx.errors import UsageError
from featx.models.file import FeatxModel, load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tta") / "colours"
    return colour_folder(root, {"train": 6, "test": 3}, seed=11)


@pytest.fixture(scope="module")
def store(data) -> Path:
    path = data.parent / "store.h5"
    featx.extract(
        data, "resnet18", ["layer4"], store=path, weights="none", image_size=56, pool="avg",
        workers=0, quiet=True,
    )  # fmt: skip
    return path


def _fit(store: Path, clf: str, **params) -> FeatxModel:
    path = store.with_name(f"{clf}.joblib")
    featx.fit(store, "layer4@avg", clf, model=path, params=params or None)
    return load_model(path)


@pytest.fixture(scope="module")
def logreg(store) -> FeatxModel:
    """Strongly regularised, so its probabilities are far from 0 and 1 and a view changes them
    visibly."""
    return _fit(store, "logreg", C=0.001)


def _csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


@pytest.mark.slow
def test_tta_zero_is_plain_prediction_which_matches_evaluate(logreg, store, data):
    plain = featx.predict(logreg, [data / "test"])
    zero = featx.predict(logreg, [data / "test"], tta=0)
    assert zero.paths == plain.paths and zero.predicted == plain.predicted
    assert np.array_equal(zero.scores, plain.scores)

    evaluation = featx.evaluate(logreg, store, "test")
    where = {Path(p).relative_to(data).as_posix(): i for i, p in enumerate(zero.paths)}
    assert sorted(where) == sorted(evaluation.paths)
    for row, path in enumerate(evaluation.paths):
        i = where[path]
        assert zero.predicted[i] == logreg.class_names[evaluation.y_pred[row]]
        np.testing.assert_allclose(
            zero.scores[i][logreg.pipeline.classes_], evaluation.proba[row], atol=1e-6
        )


@pytest.mark.slow
def test_tta_changes_scores_keeps_probabilities_and_is_reproducible(logreg, data):
    plain = featx.predict(logreg, [data / "test"])
    tta = featx.predict(logreg, [data / "test"], tta=2)
    assert tta.paths == plain.paths and tta.probabilities
    assert tta.scores.shape == plain.scores.shape == (9, 3)
    assert np.abs(tta.scores - plain.scores).max() > 1e-3  # the views changed something
    np.testing.assert_allclose(tta.scores.sum(axis=1), 1, rtol=1e-6)
    names = tta.class_names
    assert tta.predicted == [names[i] for i in tta.scores.argmax(axis=1)]

    again = featx.predict(logreg, [data / "test"], tta=2)
    assert again.paths == tta.paths and again.predicted == tta.predicted
    assert np.array_equal(again.scores, tta.scores)
    assert not np.array_equal(featx.predict(logreg, [data / "test"], tta=1).scores, tta.scores)


@pytest.mark.slow
def test_tta_scores_are_the_mean_over_the_image_and_its_seeded_views(logreg, data):
    """Recompute by hand: the plain input plus `tta_inputs(..., 2, key=crc32(file name))` with the
    default augmentation (the store was not augmented), through the unfolded backbone, cast to
    the stored dtype, scored by the pipeline, averaged."""
    files, _ = collect_images([data / "test"])
    predictions = featx.predict(logreg, [data / "test"], tta=2)
    assert predictions.paths == [str(f) for f in files]
    assert logreg.provenance["store"]["augment"] is None and not logreg.provenance.get("augment")

    p, layer = logreg.provenance, logreg.layer
    model = get_backbone(p["backbone"]).load(p["weights_spec"]).model
    tap = LayerTap(model, [layer["module"]], pool=layer["pool"])
    preprocessing = Preprocessing.from_dict(p["preprocessing"])

    def averaged(image, key: int) -> np.ndarray:
        views = torch.cat(
            [
                preprocessing(image)[None],
                tta_inputs(image, preprocessing, AugmentConfig(), 2, key=key),
            ]
        )
        assert views.shape == (3, 3, 56, 56)
        assert not torch.equal(views[1], views[2]) and not torch.equal(views[0], views[1])
        with torch.inference_mode():
            features = tap(views)[layer["module"]].numpy().astype(layer["dtype"])
        _, scores = logreg.scores(features)
        return scores.mean(axis=0)

    for index, path in enumerate(files):
        image = load_image(path)
        key = zlib.crc32(path.name.encode())
        expected = averaged(image, key=key)
        np.testing.assert_allclose(predictions.scores[index], expected, atol=1e-5)
        assert predictions.predicted[index] == logreg.class_names[int(expected.argmax())]
        # the tolerance tells views apart: those of another key are much farther off
        assert np.abs(averaged(image, key=key + 1) - predictions.scores[index]).max() > 1e-4


def test_tta_views_of_an_image_do_not_depend_on_the_other_files(logreg, data):
    files, _ = collect_images([data / "test"])
    together = featx.predict(logreg, [data / "test"], tta=2)
    alone = featx.predict(logreg, [files[-1]], tta=2)
    # batches of other sizes may round differently; other views would differ by far more
    np.testing.assert_allclose(alone.scores[0], together.scores[-1], rtol=1e-6, atol=1e-7)


def test_tta_with_decision_scores_predicts_their_argmax(store, data):
    ridge = _fit(store, "ridge")
    tta = featx.predict(ridge, [data / "test"], tta=2)
    assert not tta.probabilities
    assert tta.predicted == [tta.class_names[i] for i in tta.scores.argmax(axis=1)]
    assert np.abs(tta.scores - featx.predict(ridge, [data / "test"]).scores).max() > 1e-4


def test_negative_tta_is_refused(logreg, data):
    with pytest.raises(UsageError, match="--tta must be at least 0, not -1"):
        featx.predict(logreg, [data / "test"], tta=-1)
    result = invoke_featx("predict", "--model", logreg.path, data / "test", "--tta", "-1")
    message = assert_one_sentence_error(result)
    assert message == "featx: --tta must be at least 0, not -1."
    assert result.stdout == ""


@pytest.mark.slow
def test_cli_tta_end_to_end(logreg, data, tmp_path):
    api = featx.predict(logreg, [data / "test"], tta=2)
    out = tmp_path / "tta.csv"
    cli = run_featx(
        "predict", "--model", logreg.path, data / "test", "--tta", "2", "--top-k", "3",
        "--workers", "0", "--quiet", "--out", out, cwd=tmp_path,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert "9 predictions written to" in cli.stderr
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == api.paths
    assert [r["predicted"] for r in rows] == api.predicted
    for row, scores in zip(rows, api.scores, strict=True):
        for k in (1, 2, 3):
            column = api.class_names.index(row[f"top{k}"])
            assert float(row[f"top{k}_probability"]) == pytest.approx(scores[column], abs=1e-6)

    plain = invoke_featx("predict", "--model", logreg.path, data / "test", "--quiet")
    assert plain.returncode == 0, plain.stderr
    plain_rows = _csv(plain.stdout)
    assert [r["path"] for r in plain_rows] == api.paths
    assert [r["top1_probability"] for r in plain_rows] != [r["top1_probability"] for r in rows]

    help_text = invoke_featx("predict", "--help").stdout
    assert "--tta" in help_text
