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
import importlib
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from featx.errors import UsageError, first_line
from featx.models.trusted import TypeSource, trust_types

if TYPE_CHECKING:  # scikit-learn loads when an estimator is made, not for `featx classifiers`
    from sklearn.base import BaseEstimator

__all__ = [
    "ClassifierSpec",
    "ParamSpec",
    "as_param_specs",
    "classifier_help",
    "register_classifier",
    "streaming_classifiers",
    "check_params",
    "classifier_spec",
    "classifier_table",
    "param_grids",
    "parse_param",
    "parse_value",
]


# ---- the registry ------------------------------------------------------------------------
SEED, N_JOBS = "seed", "n_jobs"  # default values replaced by fit's seed and parallel jobs


@dataclass(frozen=True)
class ClassifierSpec:
    """One classifier name: what it is, how to make it with featx's defaults, and what a
    model file holding a fitted one contains.

    `estimator` is the class as `"module:Class"`; `defaults` its parameters, where the values
    `SEED` and `N_JOBS` stand for fit's seed and parallel jobs. `holds` lists the further types
    a fitted estimator contains (trees, search structures), as `featx.models.trusted` takes
    them. `limits` bounds parameters whose size costs memory or time (each number of a tuple
    too)."""

    name: str
    summary: str
    estimator_path: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    streams: bool = False  # can train out-of-core with partial_fit
    holds: tuple[TypeSource, ...] = ()
    limits: Mapping[str, float] = field(default_factory=dict)

    def estimator(self, seed: int = 0, n_jobs: int = 1) -> BaseEstimator:
        module, name = self.estimator_path.split(":")
        cls = getattr(importlib.import_module(module), name)
        given = {SEED: seed, N_JOBS: n_jobs}
        return cls(
            **{k: given.get(v, v) if isinstance(v, str) else v for k, v in self.defaults.items()}
        )


CLASSIFIERS: dict[str, ClassifierSpec] = {}

# The steps `featx.classify.pipeline` puts around every classifier.
PIPELINE_TYPES = (
    "sklearn.pipeline:Pipeline",
    "sklearn.preprocessing:StandardScaler",
    "sklearn.decomposition:PCA",
    "sklearn.decomposition:IncrementalPCA",
    "sklearn.preprocessing:Normalizer",
    "featx.classify.pipeline:LayerFeatures",
    "featx.classify.pipeline:ConcatLayers",
)
trust_types(*PIPELINE_TYPES)


def register_classifier(spec: ClassifierSpec) -> ClassifierSpec:
    """Add a classifier under `spec.name`: `featx fit --clf NAME` trains it, `featx
    classifiers` lists it, and model files holding it load (in a process that registered it)."""
    if ":" not in spec.estimator_path:
        raise ValueError(f"estimator_path is 'module:Class', not {spec.estimator_path!r}")
    CLASSIFIERS[spec.name] = spec
    trust_types(spec.estimator_path, *spec.holds)
    return spec


def _distance_metrics() -> list[type]:
    """The metric types a fitted knn's search tree holds (private classes behind a factory)."""
    from sklearn.metrics import DistanceMetric

    return [
        type(DistanceMetric.get_metric(name, **kwargs))
        for name, kwargs in (
            ("euclidean", {}),
            ("manhattan", {}),
            ("chebyshev", {}),
            ("minkowski", {"p": 3}),
        )
    ]


def _sgd_losses() -> list[type]:
    from sklearn.linear_model import SGDClassifier

    return [loss for loss, *_ in SGDClassifier.loss_functions.values()]


ITERATIONS = 1_000_000  # the most optimiser iterations or epochs a parameter may ask for
# Defaults are chosen for standardised CNN features: thousands of dimensions, few samples.
for _spec in (
    ClassifierSpec(
        "logreg",
        "multinomial logistic regression (L2, lbfgs)",
        "sklearn.linear_model:LogisticRegression",
        {"C": 1.0, "max_iter": 1000, "random_state": SEED},
        limits={"max_iter": ITERATIONS},
    ),
    ClassifierSpec(
        "linearsvm",
        "linear SVM, one-vs-rest (no probabilities)",
        "sklearn.svm:LinearSVC",
        {"C": 1.0, "dual": "auto", "max_iter": 5000, "random_state": SEED},
        limits={"max_iter": ITERATIONS},
    ),
    ClassifierSpec(
        "svm",
        "RBF-kernel SVM (no probabilities)",
        "sklearn.svm:SVC",
        {"C": 1.0, "kernel": "rbf", "gamma": "scale", "random_state": SEED},
        limits={"max_iter": ITERATIONS, "cache_size": 1 << 20},
    ),
    ClassifierSpec(
        "knn",
        "k nearest neighbours (k=5)",
        "sklearn.neighbors:KNeighborsClassifier",
        {"n_neighbors": 5, "n_jobs": N_JOBS},
        holds=("sklearn.neighbors:KDTree", "sklearn.neighbors:BallTree", _distance_metrics),
        limits={"leaf_size": 1 << 20},
    ),
    ClassifierSpec(
        "rf",
        "random forest (300 trees)",
        "sklearn.ensemble:RandomForestClassifier",
        {"n_estimators": 300, "random_state": SEED, "n_jobs": N_JOBS},
        holds=("sklearn.tree:DecisionTreeClassifier", "sklearn.tree._tree:Tree"),
        limits={"n_estimators": 100_000, "max_depth": 10_000, "max_leaf_nodes": 1 << 24},
    ),
    ClassifierSpec(
        "ridge",
        "ridge classifier (no probabilities)",
        "sklearn.linear_model:RidgeClassifier",
        {"alpha": 1.0},
        holds=("sklearn.preprocessing:LabelBinarizer",),
        limits={"max_iter": ITERATIONS},
    ),
    ClassifierSpec(
        "sgd",
        "logistic regression by SGD",
        "sklearn.linear_model:SGDClassifier",
        {"loss": "log_loss", "alpha": 1e-4, "random_state": SEED, "n_jobs": N_JOBS},
        streams=True,
        holds=(_sgd_losses,),
        limits={"max_iter": ITERATIONS, "n_iter_no_change": ITERATIONS},
    ),
    ClassifierSpec(
        "mlp",
        "torch MLP head, Dense(256)-Dropout(0.5)",
        "featx.classify.mlp:MLPClassifier",
        {"random_state": SEED},
        streams=True,
        holds=("featx.models.heads:TorchHead",),
        limits={
            "hidden_sizes": 65_536,
            "epochs": ITERATIONS,
            "batch_size": 1 << 20,
            "patience": ITERATIONS,
        },
    ),
):
    register_classifier(_spec)


def streaming_classifiers() -> list[str]:
    """The classifiers that can train out-of-core."""
    return [name for name, spec in CLASSIFIERS.items() if spec.streams]


def classifier_help() -> str:
    """The `--clf` help, from the registry."""
    names = list(CLASSIFIERS)
    listed = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
    return f"Classifier: {listed} (see `featx classifiers`); repeat to compare. Default: logreg."


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
        f"{s.name:<10} {'stream' if s.streams else '':<7} {s.summary}"
        + ("; trains out-of-core" if s.streams else "")
        for s in CLASSIFIERS.values()
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
    scikit-learn's sentence when a value is out of range or of the wrong type, or ours when a
    number is NaN or past the classifier's `limits` (or, for a whole number, past int32)."""
    import numpy as np
    from sklearn.base import clone

    limits = classifier_spec(classifier).limits if classifier in CLASSIFIERS else {}
    for name, value in params.items():
        _check_bounded(classifier, name, value, limits.get(name))
    est = clone(estimator).set_params(**params)
    # A fit on a few random rows runs the estimator's own parameter validation (public API).
    rows = np.random.RandomState(0).rand(8, 3)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est.fit(rows, np.arange(8) % 2)
    except (ValueError, TypeError, OverflowError) as error:
        text = first_line(error).rstrip(".")
        raise UsageError(f"bad parameter for {classifier}: {text}.") from None


INT32_MAX = 2**31 - 1  # no whole-number parameter goes past this


def _check_bounded(classifier: str, name: str, value: Any, limit: float | None) -> None:
    """No NaN in `value` (nor in a tuple of it), no whole number past `limit` (default
    INT32_MAX), and no number past a declared `limit`."""
    values = value if isinstance(value, tuple | list) else (value,)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        bound = limit if limit is not None else INT32_MAX if isinstance(v, int) else None
        if v != v or (bound is not None and abs(v) > bound):
            raise UsageError(
                f"bad parameter for {classifier}: {name}={value!r} is out of range"
                + (f"; it must be at most {bound:,} in size." if bound is not None else ".")
            )
