"""One layer x classifier experiment of `featx fit`: its grid searched on the validation rows
or by cross-validation (in memory), or point by point out-of-core; then the refit and the
model file's provenance.

Grids. Several values of a hyper-parameter are searched with GridSearchCV: on the validation
rows (a PredefinedSplit; the best setting is then refit on the training rows alone so that its
validation metrics stay honest) or by cross-validation (refit on all rows).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.metrics import log_loss
from sklearn.model_selection import GridSearchCV, ParameterGrid, PredefinedSplit
from sklearn.pipeline import Pipeline

from featx.classify.fit_settings import METRICS
from featx.classify.metrics import classification_metrics
from featx.classify.pipeline import PipelineConfig, build_pipeline
from featx.classify.registry import classifier_spec
from featx.classify.selection import Selection
from featx.classify.streaming import fit_streamed
from featx.classify.sweep import FitResult
from featx.errors import UsageError
from featx.models.file import (
    FeatxModel,
    combined_layer_record,
    layer_provenance,
    model_provenance,
    store_provenance,
)
from featx.store.feature_store import FeatureStore
from featx.store.rows import LAYER_JOIN, ConcatRows, LayerRows

__all__ = ["Experiment", "read_rows"]


def read_rows(
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


@dataclass
class Experiment:
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
