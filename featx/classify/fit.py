"""`featx fit`: classifiers trained on stored layers, every layer x classifier combination,
ranked by a validation score.

Rows. The training rows are the store's `train` split (or, for a dataset without split
folders, the `unsplit` rows). Validation rows are the store's `validation` split when it has
one; otherwise a hold-out of `val_fraction` of the training images, stratified by class and
drawn by source image, so that augmented views of a held-out image are not trained on. With
`cv=K`, training and validation rows together are cut into K stratified folds grouped by source
image. Only original images (view 0) are ever scored; augmented views are only trained on. The
test split is never touched: `featx evaluate` reports it.

Grids. Several values of a hyper-parameter are searched with GridSearchCV: on the validation
rows (a PredefinedSplit; the best setting is then refit on the training rows alone so that its
validation metrics stay honest) or by cross-validation (refit on all rows).

Memory. A layer is read into memory once and shared by every classifier. When its rows would
need more than the memory budget (about `IN_MEMORY_COPIES` float32 copies; by default half of
the memory available when fit starts), or when `stream=True`, it is trained out-of-core instead:
StandardScaler and IncrementalPCA learn with partial_fit over row chunks, then `sgd` or `mlp`
take partial_fit passes over block-shuffled chunks, with early stopping on the validation rows
(loss for mlp, accuracy for sgd, as their scikit-learn counterparts do).
Peak memory then depends on the chunk size (`chunk_bytes`), not on the store.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.metrics import log_loss
from sklearn.model_selection import (
    GridSearchCV,
    ParameterGrid,
    PredefinedSplit,
    StratifiedGroupKFold,
    train_test_split,
)
from sklearn.pipeline import Pipeline

from featx.backbones.registry import POOLS
from featx.classify.metrics import (
    SUMMARY,
    classification_metrics,
    format_number,
    metrics_table,
    plot_confusion_matrix,
)
from featx.classify.pipeline import PipelineConfig, build_pipeline
from featx.classify.registry import (
    as_param_specs,
    check_params,
    classifier_spec,
    param_grids,
)
from featx.classify.streaming import fit_streamed
from featx.errors import UsageError, check_choice, check_range
from featx.models.file import (
    FeatxModel,
    combined_layer_record,
    layer_provenance,
    model_provenance,
    store_provenance,
)
from featx.runtime import available_memory, human_size, now, to_json
from featx.store.feature_store import FeatureStore
from featx.store.rows import DEFAULT_CHUNK_BYTES, LAYER_JOIN, ConcatRows, LayerRows, open_rows

__all__ = ["FitResult", "Selection", "Sweep", "default_memory_budget", "fit", "select_rows"]

# --metric -> (scikit-learn scorer, key in the metrics dict)
METRICS = {
    "accuracy": ("accuracy", "accuracy"),
    "balanced_accuracy": ("balanced_accuracy", "balanced_accuracy"),
    "f1_macro": ("f1_macro", "macro_f1"),
}
IN_MEMORY_COPIES = 3  # the rows as stored, their float32 features, the scaled features
MEMORY_FRACTION = 0.5  # default budget: this share of the memory available at start
REFITS = ("train", "all")


# ---- rows ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Selection:
    """Which store rows train and which validate."""

    train: np.ndarray  # sorted row indices the model is fitted on before refitting
    validation: np.ndarray | None  # sorted row indices scored (view 0); None with CV
    folds: list[tuple[np.ndarray, np.ndarray]] | None  # CV: positions into `train`
    description: str
    pool: str = "train"  # the split the training rows come from ("train" or "unsplit")
    validation_split: bool = False  # the store has a validation split (not a hold-out)
    in_pool: np.ndarray | None = None  # CV: which of `train` are rows of `pool`

    @property
    def default_refit(self) -> str:
        """`train` when the store has a validation split, else `all` (a hold-out or CV folds
        carved out of the training images)."""
        return "train" if self.validation_split else "all"


def select_rows(
    store: FeatureStore, *, cv: int | None = None, val_fraction: float = 0.2, seed: int = 0
) -> Selection:
    """Training and validation rows (or CV folds) of `store`; see the module docstring."""
    splits = store.splits
    pool = "train" if "train" in splits else "unsplit" if "unsplit" in splits else None
    if pool is None:
        raise UsageError(
            f"store {store.path} has no training rows (its splits: {', '.join(splits)}); "
            "fit needs a train split or a dataset without split folders."
        )
    split_of, views = store.split_of_rows(), store.views()
    sources, labels = store.sources(), store.labels()
    _check_labels(store, labels[split_of == pool])
    if cv is not None:
        check_range("cv", cv, 2)
        dev = np.flatnonzero((split_of == pool) | (split_of == "validation"))
        splitter = StratifiedGroupKFold(n_splits=cv, shuffle=True, random_state=seed)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # a class smaller than cv
                folds = [
                    (train, test[views[dev[test]] == 0])
                    for train, test in splitter.split(dev, labels[dev], groups=sources[dev])
                ]
        except ValueError as error:
            raise UsageError(f"cannot make {cv} cross-validation folds: {error}") from None
        what = "train and validation" if "validation" in splits else pool
        return Selection(
            dev,
            None,
            folds,
            f"{cv}-fold cross-validation over the {what} rows, stratified by class and "
            f"grouped by source image (seed {seed})",
            pool=pool,
            validation_split="validation" in splits,
            in_pool=split_of[dev] == pool,
        )
    train_rows = np.flatnonzero(split_of == pool)
    if "validation" in splits:
        validation = np.flatnonzero((split_of == "validation") & (views == 0))
        return Selection(
            train_rows,
            validation,
            None,
            "the store's validation split",
            pool=pool,
            validation_split=True,
        )
    check_range("val-fraction", val_fraction, 0, 1, above=True, below=True)
    images, first = np.unique(sources[train_rows], return_index=True)
    image_labels = labels[train_rows][first]
    try:
        _, held = train_test_split(
            images, test_size=val_fraction, stratify=image_labels, random_state=seed
        )
    except ValueError:
        raise UsageError(
            f"cannot hold out {val_fraction:.0%} of the {len(images)} {pool} images with every "
            f"class on both sides ({len(np.unique(image_labels))} classes, smallest has "
            f"{np.bincount(image_labels).min(initial=len(images))} images); change "
            "--val-fraction or use --cv."
        ) from None
    is_held = np.isin(sources[train_rows], held)
    validation = train_rows[is_held & (views[train_rows] == 0)]
    return Selection(
        train_rows[~is_held],
        validation,
        None,
        f"a {val_fraction:.0%} hold-out of the {pool} images, stratified by class and drawn "
        f"by source image (seed {seed})",
        pool=pool,
    )


def _check_labels(store: FeatureStore, labels: np.ndarray) -> None:
    if not store.class_names or len(labels) == 0 or labels.min() < 0:
        raise UsageError(
            f"store {store.path} has no class labels; fit needs images in class folders."
        )
    present = np.unique(labels)
    if len(present) < 2:
        raise UsageError(
            f"store {store.path} has a single class ({store.class_names[present[0]]}) in its "
            "training rows; a classifier needs at least two."
        )


# ---- results ------------------------------------------------------------------------------
@dataclass
class FitResult:
    """One layer x classifier experiment: the chosen hyper-parameters, scores and model."""

    layer: str
    classifier: str
    params: dict[str, Any]  # the grid values chosen (empty: featx's defaults)
    score: float  # the selection metric on the validation rows, or its CV mean
    metrics: dict[str, Any]  # {"validation": {...}} or {"cv": {...}}
    model: FeatxModel
    seconds: float
    streamed: bool = False
    search: list[dict[str, Any]] = field(default_factory=list)  # every grid point's score
    warnings: list[str] = field(default_factory=list)
    # streamed: the stopping criterion after each pass (validation loss for mlp, error for sgd)
    epochs: list[float] = field(default_factory=list)
    rank: int = 0

    def summary_metrics(self) -> dict[str, float | None]:
        """accuracy, balanced_accuracy, macro_f1, log_loss on validation (or CV means)."""
        if "cv" in self.metrics:
            cv = self.metrics["cv"]
            return {k: (cv[k]["mean"] if cv.get(k) else None) for k in SUMMARY}
        return {k: self.metrics["validation"][k] for k in SUMMARY}

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "layer": self.layer,
            "classifier": self.classifier,
            "params": self.params,
            "estimator": self.model.provenance["estimator"],
            "score": self.score,
            "metrics": self.metrics,
            "seconds": round(self.seconds, 3),
            "streamed": self.streamed,
            "epochs": self.epochs,
            "search": self.search,
            "warnings": self.warnings,
        }


@dataclass
class Sweep:
    """Every experiment of one `fit` call, best first."""

    results: list[FitResult]
    metric: str
    store: Path
    selection: str
    config: dict[str, Any]
    command: str | None = None
    created: str = field(default_factory=now)

    @property
    def best(self) -> FitResult:
        return self.results[0]

    def leaderboard(self) -> str:
        """A table of every experiment, best first; `*` marks the column it is sorted by."""
        cv = "cv" in self.best.metrics
        _, sort_key = METRICS[self.metric]
        header = ["rank", "layer", "classifier", "params"]
        header += [f"{label}*" if key == sort_key else label for key, label in SUMMARY.items()]
        header += ["fit s", "notes"]
        rows = []
        for r in self.results:
            m = r.summary_metrics()
            values = []
            for key in SUMMARY:
                text = format_number(m[key])
                if cv and m[key] is not None:
                    text += f" ± {format_number(r.metrics['cv'][key]['std'])}"
                values.append(text)
            notes = []
            if r.streamed:
                notes.append(f"streamed, {len(r.epochs)} passes")
            if r.warnings:
                notes.append(f"{len(r.warnings)} warning(s)")
            params = ", ".join(f"{k}={_abbreviated(v)}" for k, v in r.params.items()) or "-"
            rows.append(
                [str(r.rank), r.layer, r.classifier, params, *values, f"{r.seconds:.1f}"]
                + ["; ".join(notes)]
            )
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
        numeric = {0, 4, 5, 6, 7, 8}
        lines = [
            f"sorted by {self.metric} on "
            + ("the cross-validation folds (mean ± std)" if cv else "the validation rows")
            + (
                "; the models were then refit on training + validation rows (--refit all)"
                if self.config.get("refit") == "all"
                else ""
            )
        ]
        for row in [header, *rows]:
            cells = [
                c.rjust(w) if i in numeric else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ]
            lines.append("  ".join(cells).rstrip())
        lines.insert(2, "  ".join("-" * w for w in widths).rstrip())
        return "\n".join(lines)

    def details(self) -> str:
        """The best experiment's full validation metrics (or CV summary)."""
        best = self.best
        title = f"best: {best.classifier} on {best.layer}"
        if "validation" in best.metrics:
            return metrics_table(best.metrics["validation"], f"{title}, validation")
        cv = best.metrics["cv"]
        lines = [f"{title}, {cv['folds']}-fold cross-validation"]
        for key, label in SUMMARY.items():
            if cv.get(key):
                lines.append(
                    f"  {label:<18} {cv[key]['mean']:.4f} ± {cv[key]['std']:.4f}  "
                    f"(folds: {', '.join(f'{v:.3f}' for v in cv[key]['folds'])})"
                )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        from featx import __version__

        return {
            "featx": __version__,
            "created": self.created,
            "command": self.command,
            "store": str(self.store),
            "metric": self.metric,
            "selection": self.selection,
            "config": self.config,
            "results": [r.to_dict() for r in self.results],
        }

    def record(self, model_path: str | os.PathLike | None = None) -> list[int]:
        """Append one run per experiment to the store's run log (`featx.runlog`): settings
        (layer, classifier, params, pipeline, refit), the validation scores (CV means with
        CV; measured before any refit) and, in details, per-class metrics and the confusion
        matrix. `model_path` is recorded with the best experiment. Returns the run ids."""
        from featx.runlog import record_run

        ids = []
        for result in self.results:
            p = result.model.provenance
            if "cv" in result.metrics:
                scores = {"validation": result.summary_metrics()}
                details = {"cv": result.metrics["cv"]}
            else:
                scores, details = {"validation": result.metrics["validation"]}, {}
            settings = {
                "layer": result.layer,
                "classifier": result.classifier,
                "params": result.params,
                "pipeline": p["pipeline"],
                "refit": p["trained_on"]["refit"],
                "trained_on": p["trained_on"],
                "scored_on": self.selection,
                "metric": self.metric,
                "rank": result.rank,
                "seconds": round(result.seconds, 3),
            }
            best = result is self.best and model_path is not None
            ids.append(
                record_run(
                    self.store,
                    "fit",
                    settings=settings,
                    scores=scores,
                    details=details,
                    model_path=os.fspath(model_path) if best else None,
                    command=self.command,
                )
            )
        return ids

    def write_report(self, path: str | os.PathLike) -> list[Path]:
        """The JSON report, and the best experiment's validation confusion matrix as PNG."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, default=to_json) + "\n")
        written = [path]
        if "validation" in self.best.metrics:
            written.append(
                plot_confusion_matrix(
                    self.best.metrics["validation"],
                    path.with_name(f"{path.stem}-confusion.png"),
                    f"{self.best.classifier} on {self.best.layer}: validation",
                )
            )
        return written


def _abbreviated(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:21] + "..."


# ---- memory -------------------------------------------------------------------------------


def default_memory_budget() -> int:
    """Half the memory available now."""
    return int(available_memory() * MEMORY_FRACTION)


# ---- fit ----------------------------------------------------------------------------------
def fit(
    store: FeatureStore | str | os.PathLike,
    layers: str | Sequence[str],
    classifiers: str | Sequence[str] = "logreg",
    *,
    params: Mapping[str, Any] | Sequence[str] | None = None,
    scale: bool = True,
    pca: int | None = None,
    l2: bool = False,
    pool: str | None = None,
    cv: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    metric: str = "accuracy",
    n_jobs: int = 1,
    stream: bool | None = None,
    memory_budget: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    refit: str | None = None,
    model: str | os.PathLike | None = None,
    report: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
    command: str | None = None,
    log: bool = True,
) -> Sweep:
    """Fit every classifier on every layer of `store`, select hyper-parameters, rank them.

    `params`: `--param` texts (`"C=0.01,0.1"`, `"svm.gamma=scale"`) or a mapping
    {"[clf.]name": value, or [values] for a grid}. `pool`: avg/max/avgmax over the spatial
    maps of a layer stored unpooled (default: flatten). `stream`: True trains out-of-core,
    False never does, None decides by `memory_budget` (bytes; default half the available
    memory). `model` saves the best experiment's model file, `report` the JSON report (and a
    confusion-matrix PNG beside it). `progress` receives one line per finished experiment.

    A layer may be several stored layers joined by `+` (`"blocks.4+bn2"`): each is pooled
    (spatial maps by `pool`, average by default), standardised and concatenated.

    `refit`: after the hyper-parameters are chosen, `"all"` fits the chosen pipeline again on
    the training and validation rows together, `"train"` keeps the one fitted on the training
    rows. Default: `"train"` when the store has a validation split, `"all"` when the
    validation rows were carved out of the training images (a hold-out, or CV folds). Scores
    stay those measured before the refit. Streamed fits are not refit (they stop early on the
    validation rows). `log` appends one record per experiment to the store's run log
    (`featx.runlog`).
    """
    if refit is not None:
        check_choice("refit", refit, REFITS)
    request = _Request.checked(
        layers=layers,
        classifiers=classifiers,
        params=params,
        config=PipelineConfig(pool or "none", scale, pca, l2),
        pool=pool,
        cv=cv,
        val_fraction=val_fraction,
        seed=seed,
        metric=metric,
        n_jobs=n_jobs,
        stream=stream,
        budget=default_memory_budget() if memory_budget is None else memory_budget,
        chunk_bytes=chunk_bytes,
        command=command,
    )
    owned = not isinstance(store, FeatureStore)
    store = FeatureStore(store) if owned else store
    try:
        keys = list(dict.fromkeys(_resolve(store, layer) for layer in request.layers))
        for key in keys:
            store.check_finite(key, chunk_bytes=request.chunk_bytes)
            if LAYER_JOIN not in key:
                _check_pool(store, key, request.config.pool)
        selection = select_rows(store, cv=cv, val_fraction=val_fraction, seed=seed)
        refit = refit or selection.default_refit
        plans = [_plan(store, key, selection, request) for key in keys]
        results = _run(store, plans, selection, request, refit, progress or (lambda _text: None))
    finally:
        if owned:
            store.close()
    sweep = Sweep(
        results=_ranked(results),
        metric=metric,
        store=store.path,
        selection=selection.description,
        config={
            "layers": keys,
            "classifiers": request.classifiers,
            "params": {name: grid for name, grid in request.grids.items() if grid},
            "pool": request.config.pool,
            "scale": scale,
            "pca": pca,
            "l2": l2,
            "cv": cv,
            "refit": refit,
            "val_fraction": val_fraction if selection.validation is not None else None,
            "seed": seed,
            "stream": stream,
            "memory_budget": request.budget,
            "chunk_bytes": chunk_bytes,
        },
        command=command,
    )
    if model is not None:
        sweep.best.model.save(model)
    if report is not None:
        sweep.write_report(report)
    if log:
        sweep.record(model)
    return sweep


def _resolve(store: FeatureStore, layer: str) -> str:
    """The store key of a layer, or the `+`-joined keys of several (each at most once)."""
    keys = [store.resolve(part.strip()) for part in layer.split(LAYER_JOIN)]
    if len(set(keys)) != len(keys):
        raise UsageError(f"--layer {layer} names the same stored layer twice.")
    return LAYER_JOIN.join(keys)


@dataclass(frozen=True)
class _Request:
    """What `fit` was asked to do, checked before any store is opened."""

    layers: list[str]
    classifiers: list[str]
    grids: dict[str, dict[str, list[Any]]]
    config: PipelineConfig
    cv: int | None
    val_fraction: float
    seed: int
    metric: str
    n_jobs: int
    stream: bool | None
    budget: int
    chunk_bytes: int
    command: str | None

    @classmethod
    def checked(cls, *, layers, classifiers, params, pool, **settings: Any) -> _Request:
        """UsageError naming the first option that cannot work."""
        layers = [layers] if isinstance(layers, str) else list(dict.fromkeys(layers))
        classifiers = (
            [classifiers] if isinstance(classifiers, str) else list(dict.fromkeys(classifiers))
        )
        if not layers:
            raise UsageError("give at least one --layer; `featx info STORE` lists them.")
        if not classifiers:
            raise UsageError("give at least one --clf.")
        check_choice("metric", settings["metric"], METRICS)
        if pool is not None:
            check_choice("pool", pool, POOLS)
        pca, n_jobs = settings["config"].pca, settings["n_jobs"]
        if pca is not None and pca < 1:
            raise UsageError(f"--pca must be a positive number of components, not {pca}.")
        if n_jobs == 0 or n_jobs < -1:
            raise UsageError(f"--n-jobs must be a positive number or -1 (all cores), not {n_jobs}.")
        if settings["chunk_bytes"] < 1:
            raise UsageError("--chunk-mb must be positive.")
        for name in classifiers:
            classifier_spec(name)
        grids = param_grids(classifiers, as_param_specs(params))
        for name, grid in grids.items():
            estimator = classifier_spec(name).estimator(settings["seed"])
            for point in ParameterGrid(grid):
                check_params(estimator, point, name)
        return cls(layers=layers, classifiers=classifiers, grids=grids, **settings)


def _run(
    store: FeatureStore,
    plans: list[tuple[str, bool]],
    selection: Selection,
    request: _Request,
    refit: str,
    say: Callable[[str], None],
) -> list[FitResult]:
    """Every classifier on every planned layer, each layer read once (or streamed)."""
    labels = store.labels()
    results = []
    for key, streamed in plans:
        with open_rows(store, key, request.chunk_bytes) as rows:
            if streamed:
                say(
                    f"{key}: training out-of-core in chunks of {rows.chunk_rows} rows "
                    f"({human_size(rows.nbytes(rows.chunk_rows))})"
                )
                X = None
            else:
                X, y = _read(rows, selection, labels)
            for name in request.classifiers:
                experiment = _Experiment(
                    store=store,
                    key=key,
                    name=name,
                    grid=request.grids[name],
                    config=request.config,
                    selection=selection,
                    seed=request.seed,
                    metric=request.metric,
                    n_jobs=request.n_jobs,
                    refit=refit,
                    row_shapes=rows.row_shapes if isinstance(rows, ConcatRows) else None,
                )
                if streamed:
                    result = experiment.run_streamed(rows, labels)
                else:
                    result = experiment.run_in_memory(X, y)
                result.model.provenance["command"] = request.command
                results.append(result)
                say(
                    f"{key:<24} {name:<10} {request.metric} {format_number(result.score)}  "
                    f"({result.seconds:.1f} s)"
                )
            del X
    return results


def _ranked(results: list[FitResult]) -> list[FitResult]:
    """Best score first (NaN scores last), with their ranks set."""
    ranked = sorted(results, key=lambda r: -r.score if r.score == r.score else np.inf)
    for rank, result in enumerate(ranked, start=1):
        result.rank = rank
    return ranked


def _check_pool(store: FeatureStore, key: str, pool: str) -> None:
    if pool == "none":
        return
    info = store.layer(key)
    if len(info.shape) != 3:
        stored = info.attrs.get("pool", "none")
        shape = "x".join(map(str, info.shape))
        why = (
            f"was pooled ({stored}) at extraction" if stored != "none" else "is not a C x H x W map"
        )
        raise UsageError(
            f"--pool {pool} needs a spatial map, but layer {key} has rows of shape {shape} "
            f"(it {why}); drop --pool."
        )


def _plan(
    store: FeatureStore, key: str, selection: Selection, request: _Request
) -> tuple[str, bool]:
    """(key, streamed) for a layer; UsageError when it must stream but cannot."""
    config, stream, cv = request.config, request.stream, request.cv
    budget, chunk_bytes, classifiers = request.budget, request.chunk_bytes, request.classifiers
    shapes = [store.layer(part).shape for part in key.split(LAYER_JOIN)]
    n_rows = len(selection.train) + (
        len(selection.validation) if selection.validation is not None else 0
    )
    n_values = sum(int(np.prod(shape)) for shape in shapes)
    need = n_rows * n_values * 4 * IN_MEMORY_COPIES
    streamed = stream if stream is not None else need > budget
    if len(shapes) > 1:
        pool = "avg" if config.pool == "none" else config.pool
        n_features = sum(
            s[0] * (2 if pool == "avgmax" else 1) if len(s) == 3 else int(np.prod(s))
            for s in shapes
        )
    else:
        n_features = (
            n_values
            if config.pool == "none"
            else shapes[0][0] * (2 if config.pool == "avgmax" else 1)
        )
    if streamed:  # IncrementalPCA learns from one chunk at a time
        smallest, what = max(1, chunk_bytes // max(1, n_values * 4)), "rows in a chunk"
    elif selection.folds:
        smallest, what = min(len(t) for t, _ in selection.folds), "training rows in a fold"
    else:
        smallest, what = len(selection.train), "training rows"
    if config.pca and config.pca > min(smallest, n_features, len(selection.train)):
        raise UsageError(
            f"--pca {config.pca} is more than layer {key} allows: it has {n_features} features "
            f"and {min(smallest, len(selection.train))} {what}"
            + ("; raise --chunk-mb or lower --pca." if streamed else ".")
        )
    if not streamed:
        return key, False
    if len(shapes) > 1:
        raise UsageError(
            f"layer {key} joins several layers, which are fitted in memory only, but "
            + (
                "--stream was given."
                if stream
                else f"it needs about {human_size(need)}, more than the memory budget of "
                f"{human_size(budget)}; raise --memory-budget or join pooled layers."
            )
        )
    why = (
        "--stream was given"
        if stream
        else (
            f"layer {key} needs about {human_size(need)} in memory, more than the memory budget of "
            f"{human_size(budget)}"
        )
    )
    if cv is not None:
        raise UsageError(
            f"{why}, and a streamed fit cannot cross-validate; drop --cv to score on the "
            "validation rows" + ("." if stream else ", or raise --memory-budget.")
        )
    cannot = [name for name in classifiers if not classifier_spec(name).streams]
    if cannot:
        raise UsageError(
            f"{why}, but only sgd and mlp can train out-of-core, not {', '.join(cannot)}"
            + ("." if stream else "; raise --memory-budget, or pool or select a smaller layer.")
        )
    return key, True


def _read(
    rows: LayerRows | ConcatRows, selection: Selection, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Training rows, then validation rows (if any), as one array with their labels."""
    index = selection.train
    if selection.validation is not None:
        index = np.concatenate([selection.train, selection.validation])
    order = np.argsort(index, kind="stable")
    X = np.empty((len(index), *rows.row_shape), dtype=rows.dtype)
    for positions, chunk in rows.iter(index[order]):
        X[order[positions]] = chunk
    return X, labels[index]


# ---- one experiment -----------------------------------------------------------------------
@dataclass
class _Experiment:
    store: FeatureStore
    key: str
    name: str
    grid: dict[str, list[Any]]
    config: PipelineConfig
    selection: Selection
    seed: int
    metric: str
    n_jobs: int
    refit: str = "train"
    row_shapes: list[tuple[int, ...]] | None = None  # of each joined layer

    @property
    def points(self) -> list[dict[str, Any]]:
        return list(ParameterGrid(self.grid))

    def _pipeline(self, n_jobs: int, streamed: bool = False) -> Pipeline:
        estimator = classifier_spec(self.name).estimator(self.seed, n_jobs)
        return build_pipeline(estimator, self.config, self.seed, streamed, self.row_shapes)

    # ---- in memory ----------------------------------------------------------------------
    def _check_neighbours(self) -> None:
        """knn cannot ask for more neighbours than a fit has training rows."""
        folds = self.selection.folds
        smallest = min(len(t) for t, _ in folds) if folds else len(self.selection.train)
        default = self._pipeline(1).get_params().get("clf__n_neighbors")
        for point in self.points:
            k = point.get("n_neighbors", default)
            if k is not None and k > smallest:
                raise UsageError(
                    f"{self.name} n_neighbors={k} needs at least {k} training rows, but layer "
                    f"{self.key} has {smallest} per fit; lower n_neighbors."
                )

    def run_in_memory(self, X: np.ndarray, y: np.ndarray) -> FitResult:
        start = time.perf_counter()
        self._check_neighbours()
        scorer, key = METRICS[self.metric]
        grid = {f"clf__{k}": v for k, v in self.grid.items()}
        search_log: list[dict[str, Any]] = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if self.selection.folds is not None:
                pipeline, metrics, best, search_log = self._cross_validate(X, y, grid)
                score = metrics["cv"][key]["mean"]
            else:
                n_train = len(self.selection.train)
                best = self.points[0]
                if len(self.points) > 1:
                    test_fold = np.r_[np.full(n_train, -1), np.zeros(len(y) - n_train)]
                    search = GridSearchCV(
                        self._pipeline(1),
                        grid,
                        scoring=scorer,
                        cv=PredefinedSplit(test_fold),
                        refit=False,
                        n_jobs=self.n_jobs,
                        error_score="raise",
                    ).fit(X, y)
                    results = search.cv_results_
                    best = self.points[int(np.argmin(results["rank_test_score"]))]
                    search_log = [
                        {"params": p, "score": float(s)}
                        for p, s in zip(self.points, results["mean_test_score"], strict=True)
                    ]
                pipeline = self._pipeline(self.n_jobs).set_params(
                    **{f"clf__{k}": v for k, v in best.items()}
                )
                pipeline.fit(X[:n_train], y[:n_train])
                X_val, y_val = X[n_train:], y[n_train:]
                proba = (
                    pipeline.predict_proba(X_val) if hasattr(pipeline, "predict_proba") else None
                )
                metrics = {
                    "validation": classification_metrics(
                        y_val,
                        pipeline.predict(X_val),
                        self.store.class_names,
                        proba,
                        pipeline.classes_,
                    )
                }
                score = metrics["validation"][key]
            pipeline, trained_on = self._refit(pipeline, X, y)
        result = self._result(
            pipeline, best, score, metrics, start, search_log, caught, streamed=False
        )
        result.model.provenance["trained_on"] = trained_on
        result.model.provenance["n_train"] = trained_on["n_rows"]
        return result

    def _refit(
        self, pipeline: Pipeline, X: np.ndarray, y: np.ndarray
    ) -> tuple[Pipeline, dict[str, Any]]:
        """The final pipeline and which rows it saw (`trained_on`). `pipeline` was fitted on
        every row of X with CV, else on the first len(selection.train) rows."""
        s = self.selection
        everything = np.ones(len(y), bool)
        if s.folds is not None:
            fitted_on, train_rows = everything, s.in_pool
        else:
            fitted_on = train_rows = np.arange(len(y)) < len(s.train)
        rows = everything if self.refit == "all" else train_rows
        if not np.array_equal(rows, fitted_on):
            pipeline = clone(pipeline).fit(X[rows], y[rows])
        splits = [s.pool]
        if self.refit == "all" and s.validation_split:
            splits.append("validation")
        elif self.refit == "all" and s.folds is None:
            splits.append(f"{s.pool} hold-out (original images)")
        return pipeline, {"refit": self.refit, "splits": splits, "n_rows": int(rows.sum())}

    def _cross_validate(self, X, y, grid):
        scoring = {name: scorer for name, (scorer, _) in METRICS.items()}
        probabilistic = all(
            hasattr(
                self._pipeline(1).set_params(**{f"clf__{k}": v for k, v in p.items()}),
                "predict_proba",
            )
            for p in self.points
        )
        if probabilistic:
            scoring["neg_log_loss"] = _all_class_log_loss(len(self.store.class_names))
        search = GridSearchCV(
            self._pipeline(1),
            grid,
            scoring=scoring,
            cv=self.selection.folds,
            refit=self.metric,
            n_jobs=self.n_jobs,
            error_score="raise",
        ).fit(X, y)
        results, i = search.cv_results_, search.best_index_
        folds = len(self.selection.folds)
        cv: dict[str, Any] = {"folds": folds}
        for name, (_, key) in {**METRICS, "neg_log_loss": (None, "log_loss")}.items():
            if name not in scoring:
                cv[key] = None
                continue
            sign = -1.0 if name == "neg_log_loss" else 1.0
            values = [sign * float(results[f"split{f}_test_{name}"][i]) for f in range(folds)]
            cv[key] = {
                "mean": float(np.mean(values)),
                "std": float(np.std(values)),
                "folds": values,
            }
        search_log = [
            {"params": p, "score": float(s)}
            for p, s in zip(self.points, results[f"mean_test_{self.metric}"], strict=True)
        ]
        return search.best_estimator_, {"cv": cv}, self.points[i], search_log

    # ---- out of core --------------------------------------------------------------------
    def run_streamed(self, rows: LayerRows, labels: np.ndarray) -> FitResult:
        """Fit each grid point out-of-core; keep the one with the best validation metric."""
        start = time.perf_counter()
        _, key = METRICS[self.metric]
        best = None
        search_log = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for point in self.points:
                pipeline, metrics, epochs = self._fit_streamed(rows, labels, point)
                score = metrics["validation"][key]
                search_log.append({"params": point, "score": score})
                if best is None or score > best[2]:
                    best = (pipeline, metrics, score, point, epochs)
        pipeline, metrics, score, point, epochs = best
        result = self._result(
            pipeline,
            point,
            score,
            metrics,
            start,
            search_log if len(self.points) > 1 else [],
            caught,
            streamed=True,
        )
        result.epochs = epochs
        result.model.provenance["trained_on"] = {
            "refit": "train",
            "splits": [self.selection.pool],
            "n_rows": len(self.selection.train),
        }
        if self.refit == "all":
            result.warnings.append(
                "not refit on the validation rows: a streamed fit stops early on them"
            )
        return result

    def _fit_streamed(self, rows: LayerRows, labels: np.ndarray, point: dict[str, Any]):
        pipeline = self._pipeline(self.n_jobs, streamed=True).set_params(
            **{f"clf__{k}": v for k, v in point.items()}
        )
        return fit_streamed(
            pipeline, rows, labels, self.selection, self.store.class_names, self.seed
        )

    # ---- the result ---------------------------------------------------------------------
    def _result(
        self, pipeline, params, score, metrics, start, search_log, caught, streamed
    ) -> FitResult:
        seconds = time.perf_counter() - start
        messages = list(
            dict.fromkeys(
                f"{w.category.__name__}: {str(w.message).strip().splitlines()[0]}" for w in caught
            )
        )
        estimator = pipeline.steps[-1][1]

        layers = [layer_provenance(self.store, k) for k in self.key.split(LAYER_JOIN)]
        provenance = model_provenance(
            store_provenance(self.store),
            layers[0] if len(layers) == 1 else combined_layer_record(layers),
            self.store.class_names,
            layers=layers,
            classifier=self.name,
            params=dict(params),
            estimator=" ".join(repr(estimator).split()),
            estimator_params={
                k: v
                for k, v in estimator.get_params(deep=False).items()
                if v is None or isinstance(v, bool | int | float | str | tuple | list)
            },
            pipeline=self.config.describe(len(layers)),
            pipeline_config={
                "pool": self.config.pool,
                "scale": self.config.scale,
                "pca": self.config.pca,
                "l2": self.config.l2,
            },
            selection=self.selection.description,
            metric=self.metric,
            seed=self.seed,
            n_train=len(self.selection.train),
            streamed=streamed,
            metrics=metrics,
        )
        return FitResult(
            layer=self.key,
            classifier=self.name,
            params=dict(params),
            score=float(score),
            metrics=metrics,
            model=FeatxModel(pipeline, provenance),
            seconds=seconds,
            streamed=streamed,
            search=search_log,
            warnings=messages,
        )


def _all_class_log_loss(n_classes: int):
    """A negated log-loss scorer over every class of the store, so that a fold whose training
    part lacks a small class still scores (that class gets probability 0)."""

    def score(estimator, X, y) -> float:
        proba = np.zeros((len(X), n_classes))
        proba[:, estimator.classes_.astype(int)] = estimator.predict_proba(X)
        proba /= proba.sum(axis=1, keepdims=True)
        return -log_loss(y, proba, labels=np.arange(n_classes))

    return score
