"""Checks of a loaded pipeline's arrays before anything runs on them.

skops rebuilds only the types featx builds, but some of them index memory with the numbers
stored in the file and no bounds checks: a decision tree's child and feature indices, a knn
search tree's index and node ranges, libsvm's support-vector counts, a weighted Minkowski
metric's length. A crafted file could make such an index point anywhere (a crash, or memory
read out as a prediction) or make a tree walk loop. `check_pipeline` checks every such object
against its own shapes, and the estimator around it against its inputs, and raises a
one-sentence `UsageError` for the first one that does not hold.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from featx.errors import UsageError

__all__ = ["check_pipeline"]

_TREE_LEAF = -1
_MAX_LEVELS = 48  # a knn search tree of 2**48 nodes is far beyond any file featx writes


class _Broken(Exception):
    """What is wrong with one object; `check_pipeline` turns it into a UsageError."""


def _require(condition: Any, what: str) -> None:
    if not bool(condition):
        raise _Broken(what)


def _array(value: Any, what: str, ndim: int, kind: str = "iuf") -> np.ndarray:
    _require(isinstance(value, np.ndarray), f"{what} is not an array")
    _require(value.ndim == ndim and value.dtype.kind in kind, f"{what} has the wrong shape")
    return value


def _count(value: Any, what: str, low: int = 0) -> int:
    _require(isinstance(value, int | np.integer) and not isinstance(value, bool), f"{what}")
    _require(int(value) >= low, what)
    return int(value)


def _check_tree(tree: Any, n_features: int | None = None) -> None:
    """A fitted `sklearn.tree._tree.Tree`: every internal node's children lie after it and
    inside the node array (so a walk ends and stays in memory), its feature inside the
    input, and leaves have no children."""
    # node_count sizes the views of the node and value arrays: it must not exceed what
    # was allocated before those views are made
    _require(tree.node_count == tree.capacity, "its node count differs from its node array")
    _require(tree.node_count >= 1, "it has no nodes")
    _require(tree.n_outputs == 1, "it has several outputs")
    if n_features is not None:
        _require(tree.n_features == n_features, "its input width differs from the estimator's")
    n = tree.node_count
    left = np.asarray(tree.children_left)
    right = np.asarray(tree.children_right)
    feature = np.asarray(tree.feature)
    index = np.arange(n)
    leaf = left == _TREE_LEAF
    _require(np.array_equal(leaf, right == _TREE_LEAF), "a node has only one child")
    inner = ~leaf
    for child in (left[inner], right[inner]):
        _require(
            np.all(child > index[inner]) and np.all(child < n), "a child index is out of range"
        )
    _require(
        np.all(feature[inner] >= 0) and np.all(feature[inner] < tree.n_features),
        "a feature index is out of range",
    )
    _require(np.asarray(tree.value).shape == (n, 1, tree.max_n_classes), "its values are misshapen")


def _check_decision_tree(est: Any) -> None:
    n_features = _count(getattr(est, "n_features_in_", None), "n_features_in_ is wrong", 1)
    _check_tree(est.tree_, n_features)
    classes = np.asarray(est.classes_)
    _require(classes.ndim == 1 and len(classes) == int(est.n_classes_), "its classes disagree")
    _require(est.tree_.max_n_classes == len(classes), "its tree's classes differ from its own")


def _check_metric(metric: Any, n_features: int) -> None:
    """A distance metric's weights (weighted Minkowski) cover exactly the input's width."""
    p, weights, _ = metric.__getstate__()
    name = type(metric).__name__
    _require(np.isfinite(p) or name.startswith("Chebyshev"), "its metric has a non-finite p")
    if name.startswith("Minkowski"):
        _require(p >= 1, "its Minkowski metric has p below 1")
        weights = np.asarray(weights)
        _require(weights.size in (0, n_features), "its metric weights differ from the input width")


def _check_search_tree(tree: Any) -> None:
    """A knn KDTree or BallTree: the index is a permutation of the rows, every node's range
    lies inside it, an inner node's children exist, and the node count fits the levels."""
    data, idx, nodes, bounds, leaf_size, levels, n_nodes, *_, metric, weights = tree.__getstate__()
    data = _array(data, "its data", 2, "f")
    n_rows, width = data.shape
    _require(n_rows >= 1 and width >= 1, "its data is empty")
    _array(idx, "its index", 1, "i")
    _require(len(idx) == n_rows, "its index has the wrong length")
    _require(np.array_equal(np.sort(idx), np.arange(n_rows)), "its index is not a permutation")
    _count(leaf_size, "its leaf size is wrong", 1)
    levels = _count(levels, "its level count is wrong", 1)
    _require(levels <= _MAX_LEVELS and n_nodes == 2**levels - 1, "its node count is wrong")
    _require(isinstance(nodes, np.ndarray) and nodes.shape == (n_nodes,), "its nodes are misshapen")
    start, end, is_leaf = (
        nodes[name].astype(np.int64) for name in ("idx_start", "idx_end", "is_leaf")
    )
    _require(
        np.all(start >= 0) & np.all(start <= end) & np.all(end <= n_rows),
        "a node range is out of range",
    )
    _require(np.all(np.isin(is_leaf, (0, 1))), "a node's leaf flag is not 0 or 1")
    inner = np.flatnonzero(is_leaf == 0)
    _require(np.all(2 * inner + 2 < n_nodes), "an inner node's children are missing")
    rows = 2 if type(tree).__name__.startswith("KDTree") else 1
    _require(np.shape(bounds) == (rows, n_nodes, width), "its node bounds are misshapen")
    if weights is not None:
        _require(np.shape(weights) == (n_rows,), "its sample weights have the wrong length")
    _check_metric(metric, width)


def _check_knn(est: Any) -> None:
    fit_x = _array(est._fit_X, "its training rows", 2, "f")
    n_rows = len(fit_x)
    _require(fit_x.shape[1] == est.n_features_in_, "its training rows have the wrong width")
    _require(int(est.n_samples_fit_) == n_rows, "its row count disagrees with its rows")
    classes = np.asarray(est.classes_)
    y = _array(est._y, "its labels", 1, "iu")
    _require(len(y) == n_rows, "its labels and rows differ in number")
    _require(np.all(y >= 0) & np.all(y < len(classes)), "a label index is out of range")
    _require(1 <= int(est.n_neighbors) <= n_rows, "n_neighbors exceeds its rows")
    method = est._fit_method
    _require(method in ("brute", "kd_tree", "ball_tree"), "its search method is unknown")
    if method != "brute":
        from sklearn.neighbors import BallTree, KDTree

        kind = KDTree if method == "kd_tree" else BallTree
        _require(type(est._tree) is kind, "its search tree is not the kind it names")
        _require(
            np.asarray(est._tree.data).shape == fit_x.shape, "its search tree holds other rows"
        )


def _check_svc(est: Any) -> None:
    """libsvm reads `support_` rows of the support vectors, `_n_support` per class, one
    coefficient row per class but one and one intercept per pair of classes."""
    _require(est.kernel in ("linear", "poly", "rbf", "sigmoid"), "its kernel is not one featx fits")
    _require(not est._sparse, "it is sparse")
    vectors = _array(est.support_vectors_, "its support vectors", 2, "f")
    n_sv = len(vectors)
    _require(vectors.shape[1] == est.n_features_in_, "its support vectors have the wrong width")
    _require(np.shape(est.support_) == (n_sv,), "its support indices have the wrong length")
    counts = _array(est._n_support, "its support counts", 1, "i")
    n_class = len(counts)
    _require(n_class == len(est.classes_) and n_class >= 2, "its class count disagrees")
    _require(np.all(counts >= 0) and int(counts.sum()) == n_sv, "its support counts disagree")
    _require(np.shape(est._dual_coef_) == (n_class - 1, n_sv), "its coefficients are misshapen")
    pairs = n_class * (n_class - 1) // 2
    _require(np.shape(est._intercept_) == (pairs,), "its intercepts are misshapen")
    for name in ("_probA", "_probB"):
        _require(np.size(getattr(est, name)) in (0, pairs), f"its {name} is misshapen")
    _require(np.isfinite(est._gamma) and float(est.coef0) == float(est.coef0), "its gamma is wrong")
    _count(est.degree, "its degree is wrong")


def _checker(obj: Any):
    """The check for one object of the pipeline, by type; None for plain numpy estimators."""
    from sklearn.metrics import DistanceMetric
    from sklearn.neighbors import BallTree, KDTree, KNeighborsClassifier
    from sklearn.svm import SVC
    from sklearn.tree import DecisionTreeClassifier
    from sklearn.tree._tree import Tree

    for kind, check in (
        (Tree, _check_tree),
        (DecisionTreeClassifier, _check_decision_tree),
        (KDTree, _check_search_tree),
        (BallTree, _check_search_tree),
        (KNeighborsClassifier, _check_knn),
        (SVC, _check_svc),
    ):
        if isinstance(obj, kind):
            return check if _fitted(obj) else None
    if isinstance(obj, DistanceMetric):  # outside a search tree: as wide as it claims
        return lambda metric: _check_metric(metric, max(1, np.size(metric.__getstate__()[1])))
    return None


def _fitted(obj: Any) -> bool:
    """Whether `obj` holds fitted state (a forest also keeps an unfitted template tree)."""
    return not hasattr(obj, "get_params") or any(
        name.endswith("_") and not name.startswith("__") for name in vars(obj)
    )


def _children(obj: Any) -> list[Any]:
    if isinstance(obj, dict):
        return list(obj.values())
    if isinstance(obj, list | tuple):
        return list(obj)
    state = getattr(obj, "__dict__", None)
    return list(state.values()) if isinstance(state, dict) else []


def check_pipeline(pipeline: Any, path: Any, n_classes: int) -> None:
    """UsageError naming the first object of `pipeline` (anywhere in it) whose arrays would
    index memory outside themselves or make a walk loop, or if the labels the pipeline
    predicts are not indices of the `n_classes` class names."""
    try:
        labels = np.asarray(pipeline.classes_)
        valid = labels.ndim == 1 and labels.dtype.kind in "iu" and len(labels) >= 1
        valid = valid and len(set(labels.tolist())) == len(labels)
        valid = valid and bool(np.all((labels >= 0) & (labels < n_classes)))
    except (AttributeError, TypeError, ValueError):
        valid = False
    if not valid:
        raise UsageError(
            f"model file {path} has a classifier whose classes are not the indices of its "
            f"{n_classes} class names; featx refuses it."
        )
    seen: set[int] = set()
    pending = [pipeline]
    while pending:
        obj = pending.pop()
        if id(obj) in seen or isinstance(obj, str | bytes | int | float | np.ndarray | type(None)):
            continue
        seen.add(id(obj))
        check = _checker(obj)
        if check is not None:
            try:
                check(obj)
            except _Broken as error:
                raise UsageError(
                    f"model file {path} has a damaged {type(obj).__name__} ({error}); "
                    "featx refuses it."
                ) from None
            except (AttributeError, TypeError, ValueError, KeyError, IndexError) as error:
                raise UsageError(
                    f"model file {path} has a damaged {type(obj).__name__} (incomplete: "
                    f"{type(error).__name__}); featx refuses it."
                ) from None
        pending.extend(_children(obj))
