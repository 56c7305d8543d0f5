"""The transfer-learning ladder in the report: a store's best probe, head on the cached
features and fine-tuned network compared in one table, and, when several stores hold the same
experiment on other splits of the data, the ladder across them as mean ± std per step.

A step's run is the best of its kind in the store's log (by validation score): the best probed
layer; a fit on the cache or a fine-tune without stage 2 (`finetune --epochs 0`, the head
trained on the cached rows); a fine-tune with stage 2. Stores hold the same experiment when
their features come from the same backbone, weights and preprocessing; each such store is one
split, since a store's images and their split are fixed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from featx.runlog import Run, ranked

__all__ = ["across_splits", "ladder"]

RUNGS = ("best probe", "head on the cache", "fine-tuned")
SPLITS = ("test", "validation")


def _rung(run: Run) -> str | None:
    if run.kind == "probe":
        return RUNGS[0]
    if run.kind == "fit" or (run.kind == "finetune" and run.params.get("epochs") == 0):
        return RUNGS[1]
    return RUNGS[2] if run.kind == "finetune" else None


def ladder(runs: Sequence[Run]) -> dict[str, Any] | None:
    """The store's best probe, best head on the cache and best fine-tune, compared on the test
    split when each has a test score, else on validation; None without a probe or with nothing
    to compare it with."""
    rungs = []
    for name in RUNGS:
        mine = ranked(r for r in runs if _rung(r) == name)
        if mine:
            rungs.append((name, mine[0]))
    if not rungs or rungs[0][0] != RUNGS[0] or len(rungs) < 2:
        return None
    split = next(
        (s for s in SPLITS if all(r.metric(s, "accuracy") is not None for _, r in rungs)), None
    )
    base = rungs[0][1].metric(split, "accuracy") if split else None
    rows = []
    for name, run in rungs:
        value = run.metric(split, "accuracy") if split else None
        rows.append({
            "step": name, "run": run, "val": run.metric("validation", "accuracy"),
            "test": run.metric("test", "accuracy"), "value": value,
            "gain": None if value is None or base is None else 100 * (value - base),
        })  # fmt: skip
    missing = [name for name in RUNGS if name not in {n for n, _ in rungs}]
    return {"split": split, "rows": rows, "missing": missing}


def _experiment(meta: dict[str, Any] | None) -> tuple[str, ...] | None:
    """What stores of one experiment share: backbone, weights and preprocessing."""
    if not isinstance(meta, dict) or not meta.get("backbone"):
        return None
    fields = (meta.get("backbone"), meta.get("weights_sha256"), meta.get("preprocessing_text"))
    return tuple(str(f) for f in fields)


def _mean_std(values: list[float]) -> dict[str, float]:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.mean(values), "std": sd}


def across_splits(stores: Sequence[tuple[Path, dict[str, Any] | None, dict[str, Any]]]):
    """One comparison per experiment held by two stores or more, from (store, its meta, its
    `ladder`): each step's mean ± std over the stores (the splits), the fine-tuned step's gain
    over the best probe (points) as mean ± std, and per store its steps, gain and the
    standard error of its probe's accuracy. Only stores whose ladders score every step on the
    same split count; steps missing from any of them are left out."""
    groups: dict[tuple[Any, ...], list[tuple[Path, dict[str, Any]]]] = {}
    for store, meta, found in stores:
        experiment = _experiment(meta)
        if experiment is not None and found.get("split"):
            groups.setdefault((*experiment, found["split"]), []).append((store, found))
    out = []
    for key, members in groups.items():
        if len(members) < 2:
            continue
        steps = [n for n in RUNGS if all(n in _values(f) for _, f in members)]
        out.append(_comparison(key, members, steps))
    return out


def _values(found: dict[str, Any]) -> dict[str, float]:
    return {row["step"]: row["value"] for row in found["rows"] if row["value"] is not None}


def _comparison(key, members, steps) -> dict[str, Any]:
    split = key[-1]
    tuned = RUNGS[2] in steps
    rows, gains = [], []
    for store, found in members:
        values = _values(found)
        probe_run = found["rows"][0]["run"]
        n = probe_run.metric(split, "n_samples")
        p = values[RUNGS[0]]
        se = 100 * math.sqrt(p * (1 - p) / n) if n else None
        gain = 100 * (values[RUNGS[2]] - p) if tuned else None
        if gain is not None:
            gains.append(gain)
        rows.append({
            "store": store, "values": [values[s] for s in steps], "gain": gain, "se": se,
            "below": gain is not None and se is not None and gain < -se,
        })  # fmt: skip
    return {
        "backbone": key[0],
        "preprocessing": key[2],
        "split": split,
        "steps": steps,
        "summary": [_mean_std([_values(f)[s] for _, f in members]) for s in steps],
        "gain": _mean_std(gains) if gains else None,
        "wins": sum(g > 0 for g in gains),
        "stores": rows,
    }
