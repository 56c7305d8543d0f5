"""featx fit and evaluate on stores that `featx extract` wrote from real image folders."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import sklearn
from clfdata import (
    FASHION_MNIST,
    colour_folder,
    digits_folder,
    fashion_mnist_folder,
    synthetic_store,
)
from typer.testing import CliRunner

import featx
from featx.classify.selection import select_rows
from featx.cli import app
from featx.errors import UsageError
from featx.models.file import load_model
from featx.runtime import parse_size
from featx.store.feature_store import FeatureStore

CLASSES = ["blue", "green", "red"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _extract(root, store, **kwargs):
    options = dict(weights="none", image_size=64, workers=0, quiet=True)
    featx.extract(root, "resnet18", ["layer3", "layer4"], store=store, **(options | kwargs))
    return store


@pytest.fixture(scope="module")
def split_data(tmp_path_factory):
    """DATA/{train,validation,test}/CLASS with 10, 5 and 5 images per class."""
    root = tmp_path_factory.mktemp("split") / "colours"
    return colour_folder(root, {"train": 10, "validation": 5, "test": 5}, seed=1)


@pytest.fixture(scope="module")
def split_store(split_data):
    return _extract(split_data, split_data.parent / "split.h5")


@pytest.fixture(scope="module")
def aug_store(tmp_path_factory):
    """A dataset without split folders, 10 images per class, each with 2 augmented views."""
    root = colour_folder(tmp_path_factory.mktemp("aug") / "colours", 10, seed=2)
    return _extract(root, root.parent / "aug.h5", augment=2)


@pytest.fixture(scope="module")
def model_path(split_store, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "logreg.joblib"
    featx.fit(split_store, "layer4", "logreg", model=path)
    return path


# ---- sweeps -------------------------------------------------------------------------------
@pytest.mark.slow
def test_sweep_runs_every_layer_and_classifier_and_ranks_them(aug_store):
    sweep = featx.fit(aug_store, ["layer3", "layer4"], ["logreg", "ridge", "knn"])
    pairs = {(r.layer, r.classifier) for r in sweep.results}
    assert pairs == set(itertools.product(["layer3", "layer4"], ["logreg", "ridge", "knn"]))
    scores = [r.score for r in sweep.results]
    assert scores == sorted(scores, reverse=True)
    assert [r.rank for r in sweep.results] == list(range(1, 7))
    assert sweep.best.score >= 0.9  # colour classes are easy, even for random-weight features
    table = sweep.leaderboard().splitlines()
    assert "accuracy*" in table[1]
    assert len(table) == 3 + 6
    with FeatureStore(aug_store) as store:
        n_validation = len(select_rows(store).validation)
    for r in sweep.results:
        assert r.metrics["validation"]["n_samples"] == n_validation
    ridge = next(r for r in sweep.results if r.classifier == "ridge")
    assert ridge.metrics["validation"]["log_loss"] is None  # no probabilities
    logreg = next(r for r in sweep.results if r.classifier == "logreg")
    assert logreg.metrics["validation"]["log_loss"] >= 0


@pytest.mark.slow
def test_all_classifiers_fit(split_store):
    names = ["logreg", "linearsvm", "svm", "knn", "rf", "ridge", "sgd", "mlp"]
    sweep = featx.fit(split_store, "layer4", names, params=["rf.n_estimators=20"])
    assert sorted(r.classifier for r in sweep.results) == sorted(names)
    assert all(r.score > 1 / 3 for r in sweep.results)  # better than chance
    rf = next(r for r in sweep.results if r.classifier == "rf")
    assert rf.model.pipeline[-1].n_estimators == 20


def test_grid_is_searched_on_the_validation_split(split_store):
    sweep = featx.fit(
        split_store, "layer4", ["logreg", "svm"], params=["C=0.0001,1", "svm.gamma=scale"]
    )
    for r in sweep.results:
        assert [s["params"]["C"] for s in r.search] == [0.0001, 1]
        best = max(r.search, key=lambda s: s["score"])
        assert r.params["C"] == best["params"]["C"]
        assert r.score == pytest.approx(best["score"])  # refit on train = the searched fit
        assert r.model.pipeline[-1].C == r.params["C"]
    svm = next(r for r in sweep.results if r.classifier == "svm")
    assert svm.params["gamma"] == "scale"


def test_store_splits_are_used_and_test_is_left_alone(split_store):
    with FeatureStore(split_store) as store:
        selection = select_rows(store)
        split = store.split_of_rows()
        np.testing.assert_array_equal(selection.train, np.flatnonzero(split == "train"))
        np.testing.assert_array_equal(selection.validation, np.flatnonzero(split == "validation"))
    sweep = featx.fit(split_store, "layer4", "logreg")
    assert sweep.best.model.provenance["n_train"] == 30
    assert sweep.best.metrics["validation"]["n_samples"] == 15
    assert "test" not in sweep.best.metrics


def test_holdout_is_stratified_grouped_by_source_and_scores_original_views(aug_store):
    with FeatureStore(aug_store) as store:
        sources, views, labels = store.sources(), store.views(), store.labels()
        selection = select_rows(store, val_fraction=0.3, seed=1)
        again = select_rows(store, val_fraction=0.3, seed=1)
        other = select_rows(store, val_fraction=0.3, seed=2)
    assert (views > 0).any()
    train, held = selection.train, selection.validation
    assert not set(sources[train]) & set(sources[held])
    assert (views[held] == 0).all()
    assert (views[train] > 0).any()  # augmented views of training images are trained on
    assert set(labels[held]) == {0, 1, 2}
    assert set(sources[train]) | set(sources[held]) == set(sources)
    np.testing.assert_array_equal(selection.validation, again.validation)
    assert not np.array_equal(selection.validation, other.validation)


def test_grouped_cv_never_splits_a_source(aug_store):
    with FeatureStore(aug_store) as store:
        sources, views = store.sources(), store.views()
        selection = select_rows(store, cv=3, seed=0)
    rows = selection.train
    tested = []
    for train, test in selection.folds:
        assert not set(sources[rows[train]]) & set(sources[rows[test]])
        assert (views[rows[test]] == 0).all()
        tested.extend(rows[test])
    assert sorted(tested) == sorted(np.flatnonzero(views == 0))  # each original scored once

    sweep = featx.fit(aug_store, "layer4", "logreg", params={"C": [0.01, 1.0]}, cv=3)
    cv = sweep.best.metrics["cv"]
    assert cv["folds"] == 3 and len(cv["accuracy"]["folds"]) == 3
    assert sweep.best.score == pytest.approx(cv["accuracy"]["mean"])
    assert len(sweep.best.search) == 2
    assert "± " in sweep.leaderboard()


def test_pipeline_steps_pool_pca_and_l2(split_store):
    sweep = featx.fit(split_store, "layer3", "logreg", pool="avg", pca=8, l2=True)
    pipeline = sweep.best.model.pipeline
    assert [name for name, _ in pipeline.steps] == ["features", "scale", "pca", "l2", "clf"]
    assert pipeline["features"].n_features_out_ == 256  # layer3 maps: 256 x 4 x 4
    assert pipeline["pca"].n_components_ == 8
    with FeatureStore(split_store) as store:
        X = store.read("layer3", "test")
    norms = np.linalg.norm(pipeline[:-1].transform(X), axis=1)
    np.testing.assert_allclose(norms, 1, rtol=1e-5)
    assert (
        sweep.best.model.provenance["pipeline"]
        == "avg-pool -> standardise -> PCA(8) -> L2-normalise"
    )


# ---- model file ---------------------------------------------------------------------------
def test_model_file_holds_pipeline_and_provenance(split_store, tmp_path):
    path, report = tmp_path / "m.joblib", tmp_path / "fit.json"
    sweep = featx.fit(
        split_store, ["layer3", "layer4"], ["logreg", "mlp"], model=path, report=report
    )
    model = load_model(path)
    p = model.provenance
    with FeatureStore(split_store) as store:
        meta = store.meta
        assert p["backbone"] == "resnet18"
        assert p["weights"] == meta["weights"] and p["weights_spec"] == "none"
        assert p["weights_sha256"] == meta["weights_sha256"]
        assert p["preprocessing"] == meta["preprocessing"]
        assert p["store"]["dataset_fingerprint"] == meta["dataset"]["fingerprint"]
        assert p["store"]["path"] == str(split_store.resolve())
        assert p["class_names"] == CLASSES == store.class_names
        assert p["layer"]["key"] == sweep.best.layer
        assert p["layer"]["module"] == sweep.best.layer and p["layer"]["pool"] == "none"
        assert p["versions"]["scikit-learn"] == sklearn.__version__
        assert p["versions"]["featx"] == featx.__version__
        assert p["classifier"] == sweep.best.classifier
        assert p["metrics"]["validation"]["accuracy"] == sweep.best.score
        X = store.read(sweep.best.layer, "test")
    np.testing.assert_array_equal(
        model.pipeline.predict_proba(X), sweep.best.model.pipeline.predict_proba(X)
    )
    data = json.loads(report.read_text())
    assert len(data["results"]) == 4 and data["results"][0]["rank"] == 1
    assert set(data["results"][0]["metrics"]["validation"]) >= {
        "accuracy", "balanced_accuracy", "macro_f1", "log_loss", "per_class", "confusion_matrix"
    }  # fmt: skip
    png = tmp_path / "fit-confusion.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = model.summary()
    assert "resnet18" in text and sweep.best.layer in text and "blue, green, red" in text


def test_mlp_model_survives_a_model_file_round_trip(split_store, tmp_path):
    sweep = featx.fit(
        split_store, "layer4", "mlp", params={"epochs": 20}, model=tmp_path / "m.featx"
    )
    model = load_model(tmp_path / "m.featx")
    with FeatureStore(split_store) as store:
        X = store.read("layer4", "test")
    np.testing.assert_array_equal(
        model.pipeline.predict_proba(X), sweep.best.model.pipeline.predict_proba(X)
    )


def test_load_model_refuses_other_files(split_store, tmp_path):
    with pytest.raises(UsageError, match="not a featx model file"):
        load_model(split_store)
    import joblib

    joblib.dump({"something": 1}, tmp_path / "other.joblib")
    with pytest.raises(UsageError, match="pickle-based model file from an older featx"):
        load_model(tmp_path / "other.joblib")
    with pytest.raises(UsageError, match="not a featx model file"):
        load_model(tmp_path / "other.joblib", trust_pickle=True)


# ---- evaluate -----------------------------------------------------------------------------
def test_evaluate_scores_the_test_split(model_path, split_store, tmp_path):
    result = featx.evaluate(model_path, split_store, "test", report=tmp_path / "ev.json")
    m = result.metrics
    assert m["n_samples"] == 15
    assert m["accuracy"] >= 0.8
    assert np.sum(m["confusion_matrix"]) == 15
    assert [row["support"] for row in m["per_class"].values()] == [5, 5, 5]
    with FeatureStore(split_store) as store:
        assert list(result.paths) == list(store.paths("test"))
    data = json.loads((tmp_path / "ev.json").read_text())
    assert data["split"] == "test" and data["metrics"]["accuracy"] == m["accuracy"]
    assert (tmp_path / "ev-confusion.png").exists()
    assert "accuracy" in result.table()


def test_evaluate_accepts_another_store_with_the_same_features(model_path, tmp_path):
    """A new image folder extracted the same way is a valid evaluation store."""
    root = colour_folder(tmp_path / "more", {"test": 4}, seed=9)
    store = _extract(root, tmp_path / "more.h5")
    assert featx.evaluate(model_path, store, "test").metrics["accuracy"] >= 0.75
    # only some of the classes: labels are matched to the model's classes by name
    root = colour_folder(tmp_path / "two", {"test": 4}, seed=9, classes=["red", "blue"])
    result = featx.evaluate(model_path, _extract(root, tmp_path / "two.h5"), "test")
    assert sorted(set(result.y_true)) == [CLASSES.index("blue"), CLASSES.index("red")]
    assert result.metrics["per_class"]["green"]["support"] == 0
    assert result.metrics["accuracy"] >= 0.75


def test_evaluate_refuses_a_store_with_other_features(model_path, tmp_path):
    # a store of one test image per class: the refusals depend on the features, not the rows
    data = colour_folder(tmp_path / "few", {"test": 1}, seed=5)
    other_size = _extract(data, tmp_path / "s48.h5", image_size=48)
    with pytest.raises(UsageError, match="the preprocessing is 'resize to 64x64.*48x48"):
        featx.evaluate(model_path, other_size, "test")
    other_backbone = tmp_path / "mobilenet.h5"
    featx.extract(
        data, "mobilenet_v3_small", ["features.12"], store=other_backbone,
        weights="none", image_size=64, workers=0, quiet=True,
    )  # fmt: skip
    with pytest.raises(UsageError) as error:
        featx.evaluate(model_path, other_backbone, "test")
    message = str(error.value)
    assert "backbone is resnet18 in the model, mobilenet_v3_small in the store" in message
    assert "has no layer layer4" in message and message.endswith(".")


# ---- out-of-core --------------------------------------------------------------------------
@pytest.mark.slow
def test_streamed_fit_on_a_small_store(split_store):
    sweep = featx.fit(
        split_store, "layer4", ["sgd", "mlp"], stream=True, chunk_mb=8 * 2048 * 4 / 1e6, seed=3
    )
    for r in sweep.results:
        assert r.streamed and r.epochs
        assert r.score >= 0.8
        assert r.model.provenance["streamed"] is True
        assert type(r.model.pipeline["scale"]).__name__ == "StandardScaler"


def test_streamed_pca_uses_incremental_pca(split_store):
    sweep = featx.fit(split_store, "layer4", "sgd", stream=True, pca=4, chunk_mb=8 * 2048 * 4 / 1e6)
    assert type(sweep.best.model.pipeline["pca"]).__name__ == "IncrementalPCA"
    assert sweep.best.model.pipeline["pca"].n_components_ == 4


def test_memory_budget_decides_streaming(split_store):
    sweep = featx.fit(split_store, "layer3", "sgd", memory_budget=1000)
    assert sweep.best.streamed
    sweep = featx.fit(split_store, "layer3", "sgd")
    assert not sweep.best.streamed
    with pytest.raises(UsageError, match="more than the memory budget.*not svm"):
        featx.fit(split_store, "layer3", ["sgd", "svm"], memory_budget=1000)
    with pytest.raises(UsageError, match="cannot cross-validate"):
        featx.fit(split_store, "layer3", "sgd", stream=True, cv=3)


def test_parse_size():
    assert parse_size("500MB") == 500_000_000
    assert parse_size("2GiB") == 2 << 30
    assert parse_size("1.5 GB") == 1_500_000_000
    assert parse_size("123") == 123
    with pytest.raises(UsageError):
        parse_size("lots")


# ---- errors -------------------------------------------------------------------------------
def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_sentence(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("featx: ") and lines[0].endswith("."), lines
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.slow
def test_usage_errors_are_one_sentence(split_store, aug_store, model_path, tmp_path):
    fit = ["fit", "--store", split_store]
    vectors = synthetic_store(tmp_path / "vectors.h5", 40, 8)
    cases = [
        ([*fit, "--layer", "layer9"], "has no layer 'layer9'; it has: layer3, layer4"),
        ([*fit, "--layer", "layer4", "--clf", "xgboost"], "unknown classifier 'xgboost'"),
        ([*fit, "--layer", "layer4", "--clf", "logreg", "--param", "gamma=1"],
         "logreg has no parameter 'gamma'"),
        ([*fit, "--layer", "layer4", "--clf", "svm", "--param", "svm.C=-1"],
         "The 'C' parameter of SVC must be"),
        ([*fit, "--layer", "layer4", "--clf", "logreg", "--param", "C"], "is not of the form"),
        ([*fit, "--layer", "layer4", "--clf", "logreg", "--param", "svm.C=1"],
         "svm, which is not among the chosen classifiers"),
        ([*fit, "--layer", "layer4", "--clf", "mlp", "--param", "dropout=2"], "dropout"),
        (["fit", "--store", vectors, "--layer", "feat", "--pool", "avg"],
         "--pool avg needs a spatial map, but layer feat has rows of shape 8"),
        ([*fit, "--layer", "layer4", "--pca", "1000"], "--pca 1000 is more than"),
        ([*fit, "--layer", "layer4", "--clf", "rf", "--stream"], "only sgd and mlp"),
        ([*fit, "--layer", "layer4", "--cv", "1"], "--cv must be at least 2"),
        (["fit", "--store", aug_store, "--layer", "layer4", "--val-fraction", "1.5"],
         "--val-fraction must be between 0 and 1"),
        (["fit", "--store", tmp_path / "missing.h5", "--layer", "x"], "does not exist"),
        (["evaluate", "--model", model_path, "--store", aug_store],
         "has no 'test' rows; it has: unsplit"),
        (["evaluate", "--model", tmp_path / "nope.joblib", "--store", aug_store],
         "model file"),
        (["info", tmp_path / "nope.joblib"], "does not exist"),
    ]  # fmt: skip
    for args, expected in cases:
        message = _one_sentence(_cli(*args))
        assert expected in message, (args, message)


def test_single_class_and_unlabelled_stores_are_refused(tmp_path):
    root = colour_folder(tmp_path / "one", 4, classes=["red"])
    store = _extract(root, tmp_path / "one.h5")
    message = _one_sentence(_cli("fit", "--store", store, "--layer", "layer4"))
    assert "has a single class (red)" in message
    unlabelled = synthetic_store(tmp_path / "unlabelled.h5", 40, 8, class_names=[], labels_value=-1)
    message = _one_sentence(_cli("fit", "--store", unlabelled, "--layer", "feat"))
    assert "has no classes (/classes is empty)" in message


def test_a_store_without_training_rows_is_refused(tmp_path):
    root = colour_folder(tmp_path / "testonly", {"test": 3}, classes=["red", "blue"])
    store = _extract(root, tmp_path / "testonly.h5")
    message = _one_sentence(_cli("fit", "--store", store, "--layer", "layer4"))
    assert "has no training rows (its splits: test)" in message


@pytest.mark.slow
def test_cli_fit_evaluate_and_info(split_store, tmp_path):
    """The real `featx` entry point in a fresh interpreter: exit codes and files."""
    model, report = tmp_path / "cli.joblib", tmp_path / "cli.json"
    featx_cli = [sys.executable, "-m", "featx.cli"]
    fit = subprocess.run(
        [*featx_cli, "fit", "--store", split_store, "--layer", "layer3", "--layer", "layer4",
         "--clf", "logreg", "--clf", "ridge", "--param", "C=0.1,1", "--model", model,
         "--report", report, "--quiet"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr
    assert fit.stdout.startswith("sorted by accuracy on the validation rows")
    assert fit.stdout.count("logreg") >= 2 and "confusion matrix" in fit.stdout
    assert model.exists() and report.exists()
    evaluate = subprocess.run(
        [*featx_cli, "evaluate", "--model", model, "--store", split_store, "--split", "test"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert evaluate.returncode == 0, evaluate.stderr
    assert "test split of" in evaluate.stdout and "macro F1" in evaluate.stdout
    info = subprocess.run([*featx_cli, "info", model], capture_output=True, text=True, timeout=300)
    assert info.returncode == 0, info.stderr
    assert "classifier  logreg" in info.stdout or "classifier  ridge" in info.stdout
    assert "weights     none (random init" in info.stdout
    store_info = _cli("info", split_store)
    assert store_info.exit_code == 0 and "layers (2):" in store_info.stdout
    wrong = subprocess.run(
        [*featx_cli, "fit", "--store", split_store, "--layer", "nope"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert wrong.returncode == 2 and wrong.stderr.strip().splitlines() == [
        f"featx: store {split_store} has no layer 'nope'; it has: layer3, layer4."
    ]


# ---- real data ----------------------------------------------------------------------------
@pytest.mark.slow
def test_pretrained_features_beat_chance_and_random_weights(tmp_path):
    """A real dataset, 10 classes, 30 training and 15 validation images per class, read at 80
    pixels: logistic regression on EfficientNet-Lite0's ImageNet features is far above chance
    and clearly above the same network with random weights. Fashion-MNIST when installed
    (measured 0.81 against 0.60), else scikit-learn's digits, where random convolutional
    features are already good (measured 0.88 against 0.81)."""
    splits = {"train": 30, "validation": 15}
    if (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        root, margin = fashion_mnist_folder(tmp_path / "fashion", splits), 0.12
    else:
        root, margin = digits_folder(tmp_path / "digits", splits), 0.03
    layers = ["blocks.5", "forward_features"]
    scores = {}
    for weights in ("default", "none"):
        store = tmp_path / f"{weights}.h5"
        featx.extract(
            root, "efficientnet_lite0", layers, store=store, weights=weights, image_size=80,
            pool="avg", workers=0, quiet=True,
        )  # fmt: skip
        sweep = featx.fit(store, ["blocks.5@avg", "forward_features@avg"], "logreg")
        scores[weights] = {r.layer: r.score for r in sweep.results}
    pretrained, random = max(scores["default"].values()), max(scores["none"].values())
    assert pretrained >= 0.7, scores  # chance is 0.10
    assert pretrained >= random + margin, scores


# ---- adding a classifier ------------------------------------------------------------------
@pytest.fixture
def nearest_centroid():
    """A classifier added the one way there is: one registry record."""
    from featx.classify.registry import CLASSIFIERS, ClassifierSpec, register_classifier

    spec = register_classifier(
        ClassifierSpec("centroid", "nearest class mean", "sklearn.neighbors:NearestCentroid")
    )
    yield spec
    del CLASSIFIERS[spec.name]


def test_a_registered_classifier_fits_saves_loads_and_is_listed(nearest_centroid, tmp_path):
    from featx.classify.registry import classifier_help, classifier_table

    store = synthetic_store(tmp_path / "s.h5", 120, 8, 3, n_informative=8, separation=3.0)
    model = tmp_path / "centroid.featx"
    sweep = featx.fit(store, "feat", ["logreg", "centroid"], model=model, log=False)
    assert {r.classifier for r in sweep.results} == {"logreg", "centroid"}
    assert "centroid" in classifier_help() and "centroid" in classifier_table()
    centroid = next(r for r in sweep.results if r.classifier == "centroid")
    centroid.model.save(model)
    loaded = load_model(model)
    with FeatureStore(store) as opened:
        rows = opened.read("feat")
    np.testing.assert_array_equal(
        loaded.pipeline.predict(rows), centroid.model.pipeline.predict(rows)
    )
    assert loaded.provenance["classifier"] == "centroid"


def test_classifier_parameters_are_bounded(split_store):
    for param, clf in (
        ("hidden_sizes=(100000000000,)", "mlp"),
        ("max_depth=1e20", "rf"),
        ("max_depth=100000000000000000000", "rf"),
        ("C=nan", "logreg"),
    ):
        with pytest.raises(UsageError, match=f"bad parameter for {clf}") as caught:
            featx.fit(split_store, "layer4", clf, params=[param], log=False)
        assert "\n" not in str(caught.value)
