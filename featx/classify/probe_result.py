"""What `featx probe` returns: one `LayerProbe` per layer (in network order), gathered in a
`ProbeResult` with its table, JSON report and run-log records."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from featx.classify.metrics import format_number
from featx.runtime import atomic_write, human_size, now, to_json

__all__ = ["LayerProbe", "ProbeResult"]


@dataclass
class LayerProbe:
    """One layer's probe: the chosen setting, the validation path, scores, few-shot runs."""

    layer: str
    depth: int  # position in network order among the probed layers, from 0
    n_features: int
    chosen: dict[str, Any]  # {"C": ...} (linear), {"k": ...} (knn), {} (ncm)
    path: list[dict[str, Any]]  # validation scores of every C or k
    validation: dict[str, Any]  # score_logits at the chosen setting
    test: dict[str, Any] | None  # after the refit; None without a test split
    temperature: float
    refit: str
    seconds: float
    streamed: bool
    memory_bytes: int
    dtype: str
    few_shot: dict[str, dict[str, Any]] = field(default_factory=dict)  # str(K) -> summary

    def score(self, metric: str) -> float:
        """The selection metric on the validation rows at the chosen setting."""
        return float(self.validation[metric])


@dataclass
class ProbeResult:
    """Every probed layer of one `probe` call, in network order."""

    layers: list[LayerProbe]
    protocol: str
    metric: str  # accuracy, or balanced_accuracy for unbalanced classes
    store: Path
    selection: str
    class_names: list[str]
    settings: dict[str, Any]
    device: str
    command: str | None = None
    created: str = field(default_factory=now)

    @property
    def best(self) -> LayerProbe:
        """The layer that transfers best: the highest validation score (the test rows never
        choose)."""
        return max(self.layers, key=lambda r: r.score(self.metric))

    def table(self) -> str:
        """One line per layer (network order), then the summary naming the best layer."""
        test = any(r.test is not None for r in self.layers)
        head = ["depth", "layer", "dim", "chosen", f"val {self._label}"]
        head += ["test acc", "per-class", "top-5", "ECE", "ECE (T)"] if test else []
        head += ["few-shot", "s"]
        lines = [head]
        for r in self.layers:
            chosen = ", ".join(f"{k}={v:.3g}" for k, v in r.chosen.items()) or "-"
            row = [str(r.depth), r.layer, str(r.n_features), chosen]
            row.append(format_number(r.score(self.metric)))
            if test:
                t = r.test or {}
                row += [format_number(t.get(k)) for k in ("accuracy", "balanced_accuracy", "top5")]
                row += [format_number(t.get("ece"), 3), format_number(t.get("ece_scaled"), 3)]
            shots = [
                f"{k}: {s['accuracy']['mean']:.3f}±{s['accuracy']['std']:.3f}"
                for k, s in r.few_shot.items()
            ]
            row += ["; ".join(shots) or "-", f"{r.seconds:.1f}"]
            lines.append(row)
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        text = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                for line in lines]  # fmt: skip
        text.insert(1, "  ".join("-" * w for w in widths))
        best = self.best
        where = "test" if best.test is not None else "validation"
        scored = best.test or best.validation
        text += [
            "",
            f"{self.protocol} probe, C or k chosen on {self.selection} by {self._label}; "
            + ("refit on training + validation rows." if best.refit != "train" else "no refit."),
            f"best layer: {best.layer} ({self._label} {best.score(self.metric):.4f} on "
            f"validation; {where} accuracy {scored['accuracy']:.4f})",
        ]
        memory = max(r.memory_bytes for r in self.layers)
        streamed = [r.layer for r in self.layers if r.streamed]
        text.append(
            f"memory for features: {human_size(memory)} at most per layer ({self.device})"
            + (f"; streamed from the store: {', '.join(streamed)}" if streamed else "")
        )
        return "\n".join(text)

    @property
    def _label(self) -> str:
        return "mean per-class acc" if self.metric == "balanced_accuracy" else "accuracy"

    def to_dict(self) -> dict[str, Any]:
        from featx import __version__

        return {
            "featx": __version__,
            "created": self.created,
            "command": self.command,
            "store": str(self.store),
            "protocol": self.protocol,
            "metric": self.metric,
            "selection": self.selection,
            "device": self.device,
            "class_names": self.class_names,
            "settings": self.settings,
            "best_layer": self.best.layer,
            "layers": [asdict(r) for r in self.layers],
        }

    def write_report(self, path: str | os.PathLike) -> Path:
        text = json.dumps(self.to_dict(), indent=1, default=to_json) + "\n"
        return atomic_write(path, text.encode())

    def record(self, model_path: str | os.PathLike | None = None) -> list[int | None]:
        """One `probe` run per layer in the store's run log, its settings holding the protocol,
        the chosen C or k, the layer's depth, every probed layer in network order and an id
        shared by this call's records (so that a report can draw accuracy against depth), its
        scores the validation and test summaries, its details the validation path, confusion
        matrices and few-shot runs."""
        from featx.runlog import record_run

        order = [r.layer for r in self.layers]
        call = uuid.uuid4().hex  # tells this call's records from another's started that second
        ids = []
        for r in self.layers:
            scores = {"validation": _small(r.validation)}
            if r.test is not None:
                scores["test"] = _small(r.test)
            settings = {
                "layer": r.layer,
                "classifier": f"probe-{self.protocol}",
                "params": dict(r.chosen),
                "probe": {"protocol": self.protocol, "depth": r.depth, "layers": order,
                          "created": self.created, "call": call,
                          "best": r.layer == self.best.layer},
                "refit": r.refit,
                "scored_on": self.selection,
                "metric": self.metric,
                "seconds": round(r.seconds, 3),
            }  # fmt: skip
            details = {
                "path": r.path,
                "few_shot": r.few_shot,
                "validation": _large(r.validation, self.class_names),
                **({"test": _large(r.test, self.class_names)} if r.test is not None else {}),
            }
            best = r is self.best and model_path is not None
            ids.append(
                record_run(
                    self.store,
                    "probe",
                    settings=settings,
                    scores=scores,
                    details=details,
                    model_path=os.fspath(model_path) if best else None,
                    command=self.command,
                )
            )
        return ids


LARGE = ("per_class_accuracy", "confusion_matrix")


def _small(scores: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in scores.items() if k not in LARGE}


def _large(scores: dict[str, Any], class_names: list[str]) -> dict[str, Any]:
    return {**{k: scores[k] for k in LARGE}, "class_names": class_names}
