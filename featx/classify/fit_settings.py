"""What `featx fit` is asked to do (`FitSettings`), each option declared once as a field:
default, help, range, panel, choices. The command line derives its options from it, and
`featx.classify.fitting.fit` takes it. Importing this module imports neither scikit-learn nor
torch, so that `featx --help` stays fast."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal

from featx.backbones.registry import POOLS
from featx.classify.registry import classifier_help
from featx.errors import UsageError
from featx.settings import OUTPUT, TRAINING, option, seed_option

__all__ = ["METRICS", "FitSettings"]

# --metric -> (scikit-learn scorer, key in the metrics dict)
METRICS = {
    "accuracy": ("accuracy", "accuracy"),
    "balanced_accuracy": ("balanced_accuracy", "balanced_accuracy"),
    "f1_macro": ("f1_macro", "macro_f1"),
}
Metric = Literal[tuple(METRICS)]
Pool = Literal[POOLS]
Refit = Literal["train", "all"]
REFITS = typing.get_args(Refit)
DATA_PANEL, SEARCH = "Rows and validation", "Search"


@dataclasses.dataclass(frozen=True)
class FitSettings:
    """Every layer x classifier experiment `fit` runs, and how each is searched and scored.

    `params`: `--param` texts (`"C=0.01,0.1"`, `"svm.gamma=scale"`) or a mapping
    {"[clf.]name": value, or [values] for a grid}. `stream`: True trains out-of-core, False
    never does, None decides by `memory_budget` (bytes; None: half the available memory).
    `refit`: None is `train` when the store has a validation split, else `all`.
    """

    layers: list[str] = option(
        [],
        "Stored layer (see `featx info STORE`); repeat to compare layers. Join several with + "
        "(blocks.4+bn2): each pooled, standardised, concatenated.",
        flag="layer",
        common=True,
    )
    classifiers: list[str] = option(["logreg"], classifier_help(), flag="clf", common=True)
    params: list[str] | dict[str, Any] | None = option(
        [],
        "Hyper-parameter [CLF.]NAME=VALUE; several values (C=0.01,0.1,1) are searched on the "
        "validation rows or by --cv. Repeatable.",
        flag="param",
        panel=SEARCH,
    )
    scale: bool = option(True, "Standardise features before the classifier.", panel=TRAINING)
    pca: int | None = option(
        None,
        "Reduce features to N principal components.",
        panel=TRAINING,
        minimum=1,
        maximum=1_000_000,
    )
    l2: bool = option(
        False, "L2-normalise each feature vector (after scaling and PCA).", panel=TRAINING
    )
    pool: Pool | None = option(
        None,
        "avg, max or avgmax over a stored spatial map (default: flatten it).",
        panel=TRAINING,
    )
    cv: int | None = option(
        None,
        "Stratified K-fold cross-validation grouped by source image.",
        panel=DATA_PANEL,
        minimum=2,
        maximum=1000,
    )
    val_fraction: float = option(
        0.2,
        "Hold-out share of images when the store has no validation split.",
        panel=DATA_PANEL,
        minimum=0,
        maximum=1,
        above=True,
        below=True,
    )
    seed: int = seed_option("Seed of the hold-out, folds and classifiers.")
    metric: Metric = option(
        "accuracy", "Ranking metric: accuracy, balanced_accuracy or f1_macro.", panel=SEARCH
    )
    refit: Refit | None = option(
        None,
        "After choosing hyper-parameters: all refits on training + validation rows, train "
        "keeps the fit on training rows.",
        panel=SEARCH,
        default_text="train when the store has a validation split, all when the validation "
        "rows are a hold-out or CV folds",
    )
    n_jobs: int = option(
        1,
        "Parallel jobs for grid search and rf/knn/sgd (-1: all cores).",
        panel=SEARCH,
        minimum=-1,
        maximum=4096,
    )
    stream: bool | None = option(
        None,
        "Train out-of-core from row chunks (streaming classifiers only).",
        panel=TRAINING,
        default_text="only when the layer does not fit the memory budget",
    )
    memory_budget: int | None = option(
        None,
        "Memory for in-memory fits, in bytes (the command line takes sizes such as 4GB).",
        panel=TRAINING,
        minimum=1,
        maximum=2**50,
        default_text="half of what is free",
        metavar="SIZE",
    )
    chunk_mb: float = option(
        64.0,
        "Size of a row chunk when streaming, in MB of float32.",
        panel=TRAINING,
        minimum=0,
        maximum=1e6,
        above=True,
    )
    model: Path | None = option(
        None, "Save the best experiment's model file here (e.g. flowers.featx).", panel=OUTPUT
    )
    report: Path | None = option(
        None, "Write every experiment's metrics as JSON (plus a confusion PNG).", panel=OUTPUT
    )

    def __post_init__(self) -> None:
        for name in ("layers", "classifiers"):
            value = getattr(self, name)
            value = [value] if isinstance(value, str) else list(dict.fromkeys(value))
            object.__setattr__(self, name, value)
        if self.n_jobs == 0:
            raise UsageError("--n-jobs must be a positive number or -1 (all cores), not 0.")

    @property
    def chunk_bytes(self) -> int:
        return max(1, round(self.chunk_mb * 1e6))
