"""Tests for featx.classify.mlp: real (small) fits, no mocks."""

from __future__ import annotations

import joblib
import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.datasets import load_digits, make_classification
from sklearn.model_selection import GridSearchCV, cross_val_score, train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks
from torch import nn

from featx.classify.mlp import MLPClassifier
from featx.models.heads import head_from_spec as build_head

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    X = StandardScaler().fit_transform(X).astype(np.float32)
    return train_test_split(X, y, test_size=0.25, stratify=y, random_state=0)


@pytest.fixture(scope="module")
def noisy():
    """A binary problem where validation loss stops improving after a few epochs."""
    return make_classification(
        n_samples=300, n_features=20, n_informative=3, flip_y=0.3, random_state=0
    )


def _weights(clf: MLPClassifier) -> list[np.ndarray]:
    return [t.numpy().copy() for t in clf.module_.state_dict().values()]


@parametrize_with_checks(
    [
        MLPClassifier(epochs=10),
        MLPClassifier(epochs=10, early_stopping=False, optimizer="adam", hidden_sizes=(32, 16)),
    ]
)
@pytest.mark.slow
def test_sklearn_compatible(estimator, check):
    check(estimator)


@pytest.mark.slow
def test_learns_digits(digits):
    X_train, X_test, y_train, y_test = digits
    clf = MLPClassifier(epochs=30).fit(X_train, y_train)
    assert clf.score(X_test, y_test) > 0.9
    proba = clf.predict_proba(X_test)
    assert proba.shape == (len(X_test), 10)
    assert_allclose(proba.sum(axis=1), 1.0)
    assert_array_equal(clf.classes_[proba.argmax(axis=1)], clf.predict(X_test))
    assert clf.n_features_in_ == 64
    assert len(clf.loss_curve_) == len(clf.validation_loss_curve_) == clf.n_iter_


def test_reproducible_and_leaves_global_rng_alone(digits):
    X_train, X_test, y_train, _ = digits
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    a = MLPClassifier(epochs=3, random_state=1).fit(X_train, y_train)
    b = MLPClassifier(epochs=3, random_state=1).fit(X_train, y_train)
    c = MLPClassifier(epochs=3, random_state=2).fit(X_train, y_train)
    assert torch.equal(torch_state, torch.get_rng_state())
    assert_array_equal(numpy_state[1], np.random.get_state()[1])
    assert_array_equal(a.predict_proba(X_test), b.predict_proba(X_test))
    assert_array_equal(a.predict(X_test), b.predict(X_test))
    assert not np.array_equal(_weights(a)[0], _weights(c)[0])


def test_early_stopping_restores_best_epoch(noisy):
    X, y = noisy
    params = {"learning_rate": 1e-2, "patience": 3}
    clf = MLPClassifier(epochs=100, **params).fit(X, y)
    assert clf.n_iter_ < 100
    assert clf.n_iter_ == clf.best_epoch_ + 3
    assert clf.best_epoch_ == np.argmin(clf.validation_loss_curve_) + 1
    # The same run cut at the best epoch ends with the weights that were kept.
    cut = MLPClassifier(epochs=clf.best_epoch_, **params).fit(X, y)
    assert cut.n_iter_ == cut.best_epoch_ == clf.best_epoch_
    for kept, expected in zip(_weights(clf), _weights(cut), strict=True):
        assert_array_equal(kept, expected)


def test_without_early_stopping_runs_all_epochs(noisy):
    X, y = noisy
    clf = MLPClassifier(epochs=4, early_stopping=False).fit(X, y)
    assert clf.n_iter_ == clf.best_epoch_ == len(clf.loss_curve_) == 4
    assert clf.validation_loss_curve_ == []


def test_tiny_class_falls_back_to_random_split(noisy):
    X, y = noisy
    y = y.copy()
    y[0] = 2  # a class of one sample cannot be stratified
    clf = MLPClassifier(epochs=2).fit(X, y)
    assert_array_equal(clf.classes_, [0, 1, 2])
    assert clf.predict_proba(X).shape == (len(X), 3)


def test_pipeline_grid_search_and_cross_validation():
    X, y = make_classification(n_samples=240, n_features=10, n_informative=5, random_state=0)
    pipe = make_pipeline(StandardScaler(), MLPClassifier(epochs=15))
    assert cross_val_score(pipe, X, y, cv=3).mean() > 0.75
    grid = GridSearchCV(
        pipe, {"mlpclassifier__hidden_sizes": [(8,), (32,)], "mlpclassifier__dropout": [0.0]}, cv=3
    )
    grid.fit(X, y)
    assert grid.best_params_["mlpclassifier__hidden_sizes"] in [(8,), (32,)]
    assert grid.score(X, y) > 0.75


def test_joblib_round_trip(tmp_path, digits):
    X_train, X_test, y_train, _ = digits
    clf = Pipeline([("mlp", MLPClassifier(epochs=3))]).fit(X_train, y_train)
    joblib.dump(clf, tmp_path / "clf.joblib")
    loaded = joblib.load(tmp_path / "clf.joblib")
    assert_array_equal(loaded.predict_proba(X_test), clf.predict_proba(X_test))


def test_string_labels_and_binary_sigmoid_output():
    X, y = make_classification(n_samples=200, n_features=8, random_state=0)
    labels = np.array(["dog", "cat"])[y]
    clf = MLPClassifier(epochs=20).fit(X, labels)
    assert_array_equal(clf.classes_, ["cat", "dog"])
    assert clf.module_[-1].out_features == 1
    assert clf.decision_function(X).shape == (200,)
    proba = clf.predict_proba(X)
    assert proba.shape == (200, 2)
    assert_allclose(proba.sum(axis=1), 1.0)
    assert clf.score(X, labels) > 0.85
    assert set(clf.predict(X)) <= {"cat", "dog"}

    multi = np.array(["a", "b", "c"])[np.arange(200) % 3]
    clf = MLPClassifier(epochs=2).fit(X, multi)
    assert clf.module_[-1].out_features == 3
    assert clf.decision_function(X).shape == (200, 3)


def test_float16_input_trains_like_float32(digits):
    X_train, X_test, y_train, _ = digits
    half = X_train.astype(np.float16)
    a = MLPClassifier(epochs=2).fit(half, y_train)
    b = MLPClassifier(epochs=2).fit(half.astype(np.float32), y_train)
    assert_array_equal(
        a.predict_proba(X_test.astype(np.float16)),
        b.predict_proba(X_test.astype(np.float16).astype(np.float32)),
    )


def test_partial_fit_over_chunks(digits):
    X_train, X_test, y_train, y_test = digits
    clf = MLPClassifier()
    with pytest.raises(ValueError, match="classes must be passed"):
        clf.partial_fit(X_train[:10], y_train[:10])
    for _ in range(5):
        for start in range(0, len(X_train), 200):
            chunk = slice(start, start + 200)
            clf.partial_fit(X_train[chunk], y_train[chunk], classes=np.arange(10))
    assert clf.n_iter_ == len(clf.loss_curve_) == 5 * 7
    assert clf.score(X_test, y_test) > 0.9
    with pytest.raises(ValueError, match="not in classes"):
        clf.partial_fit(X_train[:5], np.full(5, 11))
    with pytest.raises(ValueError, match="differs"):
        clf.partial_fit(X_train[:5], y_train[:5], classes=np.arange(11))


@pytest.mark.parametrize("n_classes", [2, 4])
def test_head_export_reproduces_logits(tmp_path, n_classes):
    X, y = make_classification(
        n_samples=120, n_features=12, n_informative=6, n_classes=n_classes, random_state=0
    )
    clf = MLPClassifier(hidden_sizes=(16, 8), epochs=3).fit(X, y)
    spec = clf.head_spec()
    assert spec["in_features"] == 12
    assert spec["hidden_sizes"] == [16, 8]
    assert spec["dropout"] == 0.5
    assert spec["binary"] == (n_classes == 2)
    assert spec["n_outputs"] == (1 if n_classes == 2 else n_classes)
    assert spec["classes"] == list(range(n_classes))

    head = build_head(spec)
    kinds = [type(layer) for layer in head]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout] * 2 + [nn.Linear]
    expected = clf.decision_function(X).reshape(len(X), -1)
    x = torch.from_numpy(X.astype(np.float32))
    with torch.no_grad():
        assert_allclose(head(x).numpy(), expected, rtol=1e-6)

    clf.save_head(tmp_path / "head.pt")
    loaded = torch.load(tmp_path / "head.pt", weights_only=True)
    with torch.no_grad():
        assert_allclose(build_head(loaded)(x).numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize(
    "params", [{"optimizer": "lbfgs"}, {"dropout": 1.0}, {"hidden_sizes": (0,)}, {"epochs": 0}]
)
def test_invalid_parameters_raise(params, noisy):
    X, y = noisy
    with pytest.raises(ValueError):
        MLPClassifier(**params).fit(X, y)
