"""The classifiers `featx fit` knows, their hyper-parameters, and the pipeline around them.

A pipeline takes the rows of one store layer exactly as stored (vectors, or spatial maps of
shape C x H x W) and runs: `features` (pool or flatten to a float32 matrix), optionally
`scale` (StandardScaler), `pca` (PCA, or IncrementalPCA when streamed) and `l2` (Normalizer),
then `clf`. Because the first step consumes stored rows, a fitted pipeline applies unchanged
to a store, or to the same layer's output computed on new images.

Hyper-parameters are given as text, `[CLF.]NAME=VALUE[,VALUE...]`: several values make a grid.
"""

from __future__ import annotations

import ast
import difflib
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.decomposition import PCA, IncrementalPCA
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression, RidgeClassifier, SGDClassifier
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import SVC, LinearSVC

from featx.backbones.layers import POOLS
from featx.errors import UsageError


# ---- the registry ------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassifierSpec:
    """One classifier name: what it is and how to make it with featx's defaults."""

    name: str
    summary: str
    make: Callable[[int, int], BaseEstimator]  # (seed, n_jobs) -> unfitted estimator
    streams: bool = False  # can train out-of-core with partial_fit

    def estimator(self, seed: int = 0, n_jobs: int = 1) -> BaseEstimator:
        return self.make(seed, n_jobs)


def _mlp(seed: int, n_jobs: int) -> BaseEstimator:
    from featx.classify.mlp import MLPClassifier

    return MLPClassifier(random_state=seed)


# Defaults are chosen for standardised CNN features: thousands of dimensions, few samples.
CLASSIFIERS: dict[str, ClassifierSpec] = {
    spec.name: spec
    for spec in (
        ClassifierSpec(
            "logreg",
            "multinomial logistic regression (L2, lbfgs)",
            lambda seed, n_jobs: LogisticRegression(C=1.0, max_iter=1000, random_state=seed),
        ),
        ClassifierSpec(
            "linearsvm",
            "linear SVM, one-vs-rest (no probabilities)",
            lambda seed, n_jobs: LinearSVC(C=1.0, dual="auto", max_iter=5000, random_state=seed),
        ),
        ClassifierSpec(
            "svm",
            "RBF-kernel SVM (no probabilities)",
            lambda seed, n_jobs: SVC(C=1.0, kernel="rbf", gamma="scale", random_state=seed),
        ),
        ClassifierSpec(
            "knn",
            "k nearest neighbours (k=5)",
            lambda seed, n_jobs: KNeighborsClassifier(n_neighbors=5, n_jobs=n_jobs),
        ),
        ClassifierSpec(
            "rf",
            "random forest (300 trees)",
            lambda seed, n_jobs: RandomForestClassifier(
                n_estimators=300, random_state=seed, n_jobs=n_jobs
            ),
        ),
        ClassifierSpec(
            "ridge",
            "ridge classifier (no probabilities)",
            lambda seed, n_jobs: RidgeClassifier(alpha=1.0),
        ),
        ClassifierSpec(
            "sgd",
            "logistic regression by SGD; trains out-of-core",
            lambda seed, n_jobs: SGDClassifier(
                loss="log_loss", alpha=1e-4, random_state=seed, n_jobs=n_jobs
            ),
            streams=True,
        ),
        ClassifierSpec(
            "mlp",
            "torch MLP head, Dense(256)-Dropout(0.5); trains out-of-core",
            _mlp,
            streams=True,
        ),
    )
}


def classifier_spec(name: str) -> ClassifierSpec:
    """The registry entry for `name`; UsageError naming the known classifiers otherwise."""
    if name in CLASSIFIERS:
        return CLASSIFIERS[name]
    close = difflib.get_close_matches(name, list(CLASSIFIERS), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise UsageError(f"unknown classifier {name!r}; {hint}choose from: {', '.join(CLASSIFIERS)}.")


def classifier_table() -> str:
    """Name, streaming support and summary of every classifier, one per line."""
    return "\n".join(
        f"{s.name:<10} {'stream' if s.streams else '':<7} {s.summary}" for s in CLASSIFIERS.values()
    )


# ---- hyper-parameters --------------------------------------------------------------------
@dataclass(frozen=True)
class ParamSpec:
    """One `--param`: a classifier (None: every classifier that has it), a name, its values."""

    classifier: str | None
    name: str
    values: tuple[Any, ...]

    @property
    def text(self) -> str:
        prefix = f"{self.classifier}." if self.classifier else ""
        return f"{prefix}{self.name}={','.join(map(repr, self.values))}"


_PARAM = re.compile(r"^(?:(?P<clf>[A-Za-z_]\w*)\.)?(?P<name>[A-Za-z_]\w*)=(?P<values>.*)$", re.S)
_WORDS = {"true": True, "false": False, "none": None}


def parse_value(text: str) -> Any:
    """`0.1` -> 0.1, `5` -> 5, `true` -> True, `none` -> None, `(256,128)` -> (256, 128);
    anything else stays a string."""
    text = text.strip()
    if text.lower() in _WORDS:
        return _WORDS[text.lower()]
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text
    return value if isinstance(value, int | float | tuple | list) else text


def _split_values(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, current = [], 0, []
    for char in text:
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def parse_param(text: str) -> ParamSpec:
    """Parse `[CLF.]NAME=V1[,V2...]`; UsageError if it is not of that form."""
    match = _PARAM.match(text.strip())
    if not match or not match["values"].strip():
        raise UsageError(
            f"--param {text!r} is not of the form NAME=VALUE[,VALUE...] or CLF.NAME=VALUE, "
            "e.g. C=0.01,0.1,1 or svm.gamma=scale."
        )
    values = tuple(parse_value(v) for v in _split_values(match["values"]))
    if any(isinstance(v, str) and not v for v in values):
        raise UsageError(f"--param {text!r} has an empty value.")
    return ParamSpec(match["clf"], match["name"], values)


def as_param_specs(params: Mapping[str, Any] | Iterable[str] | None) -> list[ParamSpec]:
    """ParamSpecs from `--param` texts, or from a mapping {"[clf.]name": value or [grid]}."""
    if params is None:
        return []
    if isinstance(params, Mapping):
        specs = []
        for key, value in params.items():
            clf, _, name = key.rpartition(".")
            values = tuple(value) if isinstance(value, list) else (value,)
            specs.append(ParamSpec(clf or None, name, values))
        return specs
    return [parse_param(text) for text in params]


def param_grids(
    classifiers: Sequence[str], specs: Sequence[ParamSpec]
) -> dict[str, dict[str, list[Any]]]:
    """{classifier: {param: [values]}} for each classifier; UsageError for a `--param` that no
    chosen classifier takes, or that names a classifier that was not chosen."""
    grids: dict[str, dict[str, list[Any]]] = {name: {} for name in classifiers}
    valid = {name: _param_names(name) for name in classifiers}
    for spec in specs:
        if spec.classifier is None:
            targets = [name for name in classifiers if spec.name in valid[name]]
            if not targets:
                _unknown_param(spec.name, " or ".join(classifiers), set().union(*valid.values()))
        else:
            classifier_spec(spec.classifier)
            if spec.classifier not in grids:
                raise UsageError(
                    f"--param {spec.text} is for {spec.classifier}, which is not among the "
                    f"chosen classifiers ({', '.join(classifiers)})."
                )
            if spec.name not in valid[spec.classifier]:
                _unknown_param(spec.name, spec.classifier, valid[spec.classifier])
            targets = [spec.classifier]
        for name in targets:
            grids[name][spec.name] = list(spec.values)
    return grids


def _unknown_param(name: str, where: str, names: Iterable[str]) -> None:
    names = sorted(names)
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise UsageError(f"{where} has no parameter {name!r}; {hint}parameters: {', '.join(names)}.")


def _param_names(classifier: str) -> list[str]:
    return sorted(classifier_spec(classifier).estimator().get_params(deep=False))


def check_params(estimator: BaseEstimator, params: Mapping[str, Any], classifier: str) -> None:
    """Set `params` on a copy of `estimator` and validate them without fitting; UsageError with
    scikit-learn's sentence when a value is out of range or of the wrong type."""
    est = clone(estimator).set_params(**params)
    # A fit on a few random rows runs the estimator's own parameter validation (public API).
    rows = np.random.RandomState(0).rand(8, 3)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est.fit(rows, np.arange(8) % 2)
    except (ValueError, TypeError) as error:
        text = str(error).strip().splitlines()[0].rstrip(".")
        raise UsageError(f"bad parameter for {classifier}: {text}.") from None


# ---- the pipeline ------------------------------------------------------------------------
class LayerFeatures(TransformerMixin, BaseEstimator):
    """Stored layer rows -> a float32 matrix of shape (n_samples, n_features).

    Rows of shape (C, H, W) are averaged (`pool="avg"`), maxed (`"max"`) or both concatenated
    (`"avgmax"`) over H and W; with `pool="none"` every row is flattened. Float16 rows are
    computed on in float32.

    Parameters
    ----------
    pool : {"none", "avg", "max", "avgmax"}, default="none"
        How spatial maps become vectors.

    Attributes
    ----------
    row_shape_ : tuple of int
        Shape of one input row seen in `fit`.
    n_features_out_ : int
        Width of the output matrix.
    """

    def __init__(self, pool: str = "none"):
        self.pool = pool

    def fit(self, X, y=None) -> LayerFeatures:
        """Record the row shape of `X`."""
        X = self._check(X)
        self.row_shape_ = tuple(X.shape[1:])
        self.n_features_out_ = self._out(X[:1]).shape[1]
        return self

    def transform(self, X) -> np.ndarray:
        """Pool or flatten `X`, which must have the row shape seen in `fit`."""
        X = self._check(X)
        if tuple(X.shape[1:]) != self.row_shape_:
            raise ValueError(
                f"rows of shape {tuple(X.shape[1:])} given, {self.row_shape_} expected."
            )
        return self._out(X)

    def _check(self, X) -> np.ndarray:
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}.")
        X = np.asarray(X)
        if X.ndim < 2:
            raise ValueError(f"expected rows of features, got an array of shape {X.shape}.")
        if self.pool != "none" and X.ndim != 4:
            raise ValueError(f"pool={self.pool!r} needs C x H x W rows, got {X.shape[1:]}.")
        return X

    def _out(self, X: np.ndarray) -> np.ndarray:
        if self.pool == "none":
            return X.reshape(len(X), -1).astype(np.float32, copy=False)
        parts = []
        if self.pool in ("avg", "avgmax"):
            parts.append(X.mean(axis=(2, 3), dtype=np.float32))
        if self.pool in ("max", "avgmax"):
            parts.append(X.max(axis=(2, 3)).astype(np.float32))
        return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]


class ConcatLayers(TransformerMixin, BaseEstimator):
    """Rows of several stored layers, flattened and concatenated (`featx.store.ConcatRows`)
    -> each layer pooled like `LayerFeatures` (spatial maps by `pool`, "avg" when it is
    "none"; vectors as they are), standardised on its own, then concatenated.

    Parameters
    ----------
    row_shapes : tuple of tuple of int
        The stored row shape of each layer, in the order of the columns.
    pool : {"none", "avg", "max", "avgmax"}, default="avg"
        How the spatial maps among the layers become vectors.

    Attributes
    ----------
    layers_ : list of (LayerFeatures, StandardScaler)
        The fitted steps of each layer.
    n_features_out_ : int
        Width of the output matrix.
    """

    def __init__(self, row_shapes: tuple[tuple[int, ...], ...] = (), pool: str = "avg"):
        self.row_shapes = row_shapes
        self.pool = pool

    def _parts(self, X) -> list[np.ndarray]:
        X = np.asarray(X)
        sizes = [int(np.prod(shape)) for shape in self.row_shapes]
        if X.ndim != 2 or X.shape[1] != sum(sizes):
            raise ValueError(
                f"expected rows of {sum(sizes)} concatenated values, got shape {X.shape}."
            )
        bounds = np.cumsum([0, *sizes])
        return [
            X[:, lo:hi].reshape(len(X), *shape)
            for lo, hi, shape in zip(bounds[:-1], bounds[1:], self.row_shapes, strict=True)
        ]

    def fit(self, X, y=None) -> ConcatLayers:
        """Fit each layer's pooling and scaler."""
        spatial_pool = "avg" if self.pool == "none" else self.pool
        self.layers_ = []
        for part, shape in zip(self._parts(X), self.row_shapes, strict=True):
            features = LayerFeatures(spatial_pool if len(shape) == 3 else "none").fit(part)
            scaler = StandardScaler().fit(features.transform(part))
            self.layers_.append((features, scaler))
        self.n_features_out_ = sum(f.n_features_out_ for f, _ in self.layers_)
        return self

    def transform(self, X) -> np.ndarray:
        """Pool, standardise and concatenate each layer's part of `X`."""
        return np.concatenate(
            [
                scaler.transform(features.transform(part)).astype(np.float32)
                for part, (features, scaler) in zip(self._parts(X), self.layers_, strict=True)
            ],
            axis=1,
        )


@dataclass(frozen=True)
class PipelineConfig:
    """The steps around the classifier."""

    pool: str = "none"  # applied to stored spatial maps at fit time
    scale: bool = True
    pca: int | None = None
    l2: bool = False

    def describe(self, n_layers: int = 1) -> str:
        if n_layers > 1:
            pool = "avg" if self.pool == "none" else self.pool
            steps = [f"{n_layers} layers: {pool}-pool maps, standardise each layer, concatenate"]
        else:
            steps = ["flatten" if self.pool == "none" else f"{self.pool}-pool"]
        if self.scale:
            steps.append("standardise")
        if self.pca:
            steps.append(f"PCA({self.pca})")
        if self.l2:
            steps.append("L2-normalise")
        return " -> ".join(steps)


def build_pipeline(
    classifier: BaseEstimator,
    config: PipelineConfig,
    seed: int = 0,
    streamed: bool = False,
    row_shapes: Sequence[tuple[int, ...]] | None = None,
) -> Pipeline:
    """features -> [scale] -> [pca] -> [l2] -> clf. `streamed` uses IncrementalPCA, whose
    partial_fit learns from chunks (StandardScaler and Normalizer need no other variant).
    `row_shapes` of several layers makes the features step `ConcatLayers`."""
    features = (
        ConcatLayers(tuple(map(tuple, row_shapes)), config.pool)
        if row_shapes is not None and len(row_shapes) > 1
        else LayerFeatures(config.pool)
    )
    steps: list[tuple[str, Any]] = [("features", features)]
    if config.scale:
        steps.append(("scale", StandardScaler()))
    if config.pca:
        steps.append(
            ("pca", IncrementalPCA(config.pca) if streamed else PCA(config.pca, random_state=seed))
        )
    if config.l2:
        steps.append(("l2", Normalizer()))
    steps.append(("clf", classifier))
    return Pipeline(steps)
