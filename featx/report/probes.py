"""Probe runs in the report: the records of one `featx probe` call gathered in a group that its
best layer stands for, and the group's accuracy at each depth (the ladder that compares a
probe with heads and fine-tunes is `featx.report.ladder`)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from featx.runlog import Run, ranked

__all__ = ["ProbeGroup", "collapse", "curve"]

MAX_LAYERS = 1_000


@dataclass(frozen=True)
class ProbeGroup:
    """The probed layers of one `featx probe` call: `best` stands for the group, `layers` are
    every record in network order and `order` names every probed layer in that order."""

    best: Run
    layers: list[Run]
    order: list[str]

    @property
    def others(self) -> list[Run]:
        return [r for r in self.layers if r is not self.best]


def _probe(run: Run) -> dict[str, Any]:
    value = run.settings.get("probe")
    return value if isinstance(value, dict) else {}


def _order(run: Run) -> list[str]:
    layers = _probe(run).get("layers")
    return [str(x) for x in layers[:MAX_LAYERS]] if isinstance(layers, list) else []


def _depth(run: Run) -> float:
    depth = _probe(run).get("depth")
    if isinstance(depth, bool) or not isinstance(depth, int | float) or not math.isfinite(depth):
        return math.inf
    return float(depth)


def _key(run: Run) -> tuple[Any, ...]:
    """What the records of one probe call share: their log and the call's id, or for records
    written without one, their process, start time, protocol and layers."""
    probe = _probe(run)
    if isinstance(probe.get("call"), str):
        return (str(run.log), probe["call"])
    return (str(run.log), run.host, run.pid, str(probe.get("created")),
            str(probe.get("protocol")), tuple(_order(run)))  # fmt: skip


def _group(runs: list[Run]) -> ProbeGroup:
    layers = sorted(runs, key=lambda r: (_depth(r), r.id))
    flagged = [r for r in layers if _probe(r).get("best") is True]
    best = flagged[0] if len(flagged) == 1 else ranked(layers)[0]
    order = max((_order(r) for r in layers), key=len)
    return ProbeGroup(best=best, layers=layers, order=order)


def collapse(runs: Iterable[Run]) -> list[tuple[Run, ProbeGroup | None]]:
    """The runs best first, each probe call once (its best layer, with its group); other runs
    with None."""
    groups: dict[tuple[Any, ...], list[Run]] = {}
    single: list[Run] = []
    for run in runs:
        if run.kind == "probe":
            groups.setdefault(_key(run), []).append(run)
        else:
            single.append(run)
    stands = {id(g.best): g for g in map(_group, groups.values())}
    return [(r, stands.get(id(r))) for r in ranked([*single, *(g.best for g in stands.values())])]


def _chosen(run: Run) -> str:
    return ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in run.params.items()
    )


def curve(group: ProbeGroup) -> list[dict[str, Any]]:
    """One point per probed layer in network order: its position, name, chosen setting and
    validation and test accuracy (None when not logged)."""
    names = list(dict.fromkeys(group.order))
    by_layer = {}
    for run in group.layers:
        if run.layer not in by_layer:
            by_layer[run.layer] = run
            if run.layer not in names:
                names.append(run.layer)
    points = []
    for position, name in enumerate(names[:MAX_LAYERS]):
        run = by_layer.get(name)
        points.append({
            "position": position,
            "layer": name,
            "chosen": _chosen(run) if run else "",
            "validation": run.metric("validation", "accuracy") if run else None,
            "test": run.metric("test", "accuracy") if run else None,
            "best": run is group.best,
        })  # fmt: skip
    return points
