"""Classifier results: `fit --refit`, `+`-joined layers, evaluate on an image folder,
fit and evaluate appended to the run log, `featx runs` / `featx report`, `featx --version`."""

from __future__ import annotations

import numpy as np
import pytest
from clfdata import colour_folder
from conftest import assert_one_sentence_error, invoke_featx, run_featx

import featx
from featx.classify.evaluation import evaluate, evaluate_images
from featx.classify.fitting import fit
from featx.classify.prediction import predict
from featx.errors import UsageError
from featx.models.file import load_model
from featx.runlog import read_runs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """DATA/{train,test}/CLASS with 10 and 5 images per class (fit holds out 20%)."""
    return colour_folder(tmp_path_factory.mktemp("results") / "colours", {"train": 10, "test": 5})


@pytest.fixture(scope="module")
def store(data):
    path = data.parent / "colours.h5"
    featx.extract(
        data, "resnet18", ["layer3", "layer4"], store=path, weights="none", image_size=32,
        workers=0, quiet=True,
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def joined(store, tmp_path_factory):
    """A sweep over layer3 and layer3+layer4, the best `+` model saved."""
    model = tmp_path_factory.mktemp("joined") / "joined.joblib"
    sweep = fit(store, ["layer3+layer4"], "logreg", pool="avg", model=model)
    return sweep, model


def test_joined_layers_model_records_every_layer(joined):
    sweep, path = joined
    model = load_model(path)
    assert [layer["key"] for layer in model.layers] == ["layer3", "layer4"]
    assert model.layer["key"] == "layer3+layer4"
    assert sweep.best.layer == "layer3+layer4"
    # 256 + 512 channels, each avg-pooled and standardised on its own
    features = model.pipeline.named_steps["features"]
    assert features.n_features_out_ == 256 + 512
    assert "layer       layer4" in model.summary()


def test_joined_model_predicts_images_as_evaluate_scores_the_store(joined, store, data):
    _, path = joined
    on_store = evaluate(path, store, "test", log=False)
    on_images = evaluate_images(path, data, "test")
    assert list(on_images.paths) == list(on_store.paths)
    assert np.array_equal(on_images.y_pred, on_store.y_pred)
    np.testing.assert_allclose(on_images.proba, on_store.proba, rtol=1e-4, atol=1e-5)
    predicted = predict(path, [data / "test"])
    assert predicted.predicted == on_images.predicted_names


def test_refit_all_is_the_default_for_a_hold_out_and_sees_its_rows(store):
    default = fit(store, "layer4", "logreg", pool="avg", log=False).best
    train = fit(store, "layer4", "logreg", pool="avg", refit="train", log=False).best
    seen, kept = default.model.provenance["trained_on"], train.model.provenance["trained_on"]
    assert seen["refit"] == "all" and seen["n_rows"] == 30  # 3 classes x 10 images
    assert kept["refit"] == "train" and kept["n_rows"] == 24  # 20% held out
    assert default.metrics == train.metrics  # scores come from before the refit
    assert not np.array_equal(default.model.pipeline[-1].coef_, train.model.pipeline[-1].coef_)
    assert "--refit all" in default.model.summary()


def test_refit_train_is_the_default_with_a_validation_split(tmp_path):
    root = colour_folder(tmp_path / "split", {"train": 6, "validation": 3}, seed=3)
    path = tmp_path / "split.h5"
    featx.extract(
        root, "resnet18", ["layer4"], store=path, weights="none", image_size=32, pool="avg",
        workers=0, quiet=True,
    )  # fmt: skip
    best = fit(path, "layer4", "logreg", log=False).best
    assert best.model.provenance["trained_on"] == {
        "refit": "train", "splits": ["train"], "n_rows": 18,
    }  # fmt: skip
    best = fit(path, "layer4", "logreg", refit="all", log=False).best
    assert best.model.provenance["trained_on"]["splits"] == ["train", "validation"]
    assert best.model.provenance["trained_on"]["n_rows"] == 27


def test_fit_and_evaluate_are_logged_and_reported(store, tmp_path):
    before = len(read_runs([store]))
    sweep = fit(store, ["layer4", "layer3+layer4"], ["logreg", "ridge"], pool="avg")
    runs = read_runs([store])[before:]
    assert [(r.kind, r.layer, r.classifier) for r in runs] == [
        ("fit", r.layer, r.classifier) for r in sweep.results
    ]
    best = next(r for r in runs if r.settings["rank"] == 1)
    assert best.metric("validation", "accuracy") == sweep.best.score
    assert best.settings["trained_on"]["refit"] == "all"
    assert len(best.details["validation"]["confusion_matrix"]) == 3
    assert set(best.details["validation"]["per_class"]) == {"blue", "green", "red"}

    model = tmp_path / "m.joblib"
    sweep.best.model.save(model)
    evaluate(model, store, "test")
    logged = read_runs([store])[-1]
    assert logged.kind == "evaluate" and logged.metric("test", "accuracy") is not None

    shown = invoke_featx("runs", "--store", store)
    assert shown.returncode == 0, shown.stderr
    assert logged.key in shown.stdout and "layer3+layer4" in shown.stdout
    page = tmp_path / "report.html"
    written = invoke_featx("report", page, "--store", store)
    assert written.returncode == 0, written.stderr
    html = page.read_text()
    assert f'data-run="{logged.key}"' in html and "Store colours.h5" in html


def test_evaluate_needs_a_store_or_a_folder(joined, store, data):
    _, model = joined
    for args in ([], ["--store", store, data]):
        result = invoke_featx("evaluate", "--model", model, *args)
        assert "store" in assert_one_sentence_error(result)


def test_joined_layers_refuse_streaming(store):
    with pytest.raises(UsageError, match="in memory only"):
        fit(store, "layer3+layer4", "sgd", pool="avg", stream=True, log=False)


def test_version_and_layer_modules(tmp_path):
    result = invoke_featx("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"featx {featx.__version__}"
    from featx.backbones.layers import layer_table

    rows = layer_table("efficientnet_lite0", 64, 1000, False).splitlines()[2:]
    modules = [row[23:43].strip() for row in rows]  # the module column
    assert rows and all(modules)
    assert "blocks.6" in modules


@pytest.mark.slow
def test_fit_keeps_its_model_when_the_run_log_is_a_folder(store, tmp_path):
    """A log problem never costs the fit: one warning line, exit 0, the model written."""
    import shutil

    from featx.runlog import log_path

    copy = tmp_path / store.name
    shutil.copy(store, copy)
    log_path(copy).mkdir()
    model = tmp_path / "m.featx"
    done = run_featx("fit", "--store", copy, "--layer", "layer4", "--clf", "logreg",
                     "--model", model, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    warnings = [line for line in done.stderr.splitlines() if "run was not recorded" in line]
    assert warnings == [
        f"warning: the fit run was not recorded: {log_path(copy)} is a folder, not a featx run log."
    ]
    assert load_model(model).layer["key"] == "layer4"
