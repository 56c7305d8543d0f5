"""What `featx fit` returns: one `FitResult` per layer x classifier experiment, gathered in a
`Sweep` ranked by the validation score, with its leaderboard, report and run-log records."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featx.classify.fit_settings import METRICS
from featx.classify.metrics import (
    SUMMARY,
    format_number,
    metrics_table,
    plot_confusion_matrix,
)
from featx.models.file import FeatxModel
from featx.runtime import now, to_json

__all__ = ["FitResult", "Sweep"]


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
