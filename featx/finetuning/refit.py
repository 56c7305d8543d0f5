"""`--refit all`: once validation has chosen how long each stage trains, the network trains
again from the start on train + validation for exactly those epochs, as a frozen probe is
refit on all labelled rows once validation has chosen its C.

The retraining repeats the chosen run with more images: the same seed (so the same head
initialisation), the same stage-1 source (cached rows, the images, or a fitted head as it
came), and each stage's learning-rate schedule laid out over the stage's full length and
stopped at the chosen epoch, so the rate at every point is what it was in the run validation
judged. The validation images train, so they no longer score it: its validation score stays
that of the network validation chose, and the test split scores the retrained one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featx.finetuning.session import Session

__all__ = ["RefitPlan", "refit_plan", "retrain"]


@dataclass(frozen=True)
class RefitPlan:
    """Epochs to train again in each stage (`head`, `full`), each stage's planned length
    (its schedule's), and whether stage 1 trains on cached rows."""

    epochs: dict[str, int]
    lengths: dict[str, int]
    cached: bool

    @property
    def empty(self) -> bool:
        return not any(self.epochs.values())


def refit_plan(history: list[dict[str, Any]], best: dict[str, Any], plan: dict[str, int]):
    """The epochs validation chose: stage 1 up to its best epoch (the head stage 2 starts
    from), and stage 2 up to the kept epoch when the kept checkpoint is from stage 2; a fitted
    head kept as it came retrains nothing."""
    head = [h for h in history if h.get("stage") == "head"]
    kept = next((h for h in history if h["epoch"] == best["epoch"]), None)
    chosen_head = min(head, key=lambda h: h["val_loss"])["stage_epoch"] if head else 0
    full = kept["stage_epoch"] if kept is not None and kept["stage"] == "full" else 0
    cached = any(h.get("source") == "store" for h in head)
    return RefitPlan(
        epochs={"head": chosen_head, "full": full},
        lengths={"head": len(head) if cached else plan["head"], "full": plan["full"]},
        cached=cached,
    )


def retrain(
    make_session: Callable[[], Session], plan: RefitPlan, store: Path | None, first: int, log
) -> tuple[Session, list[dict[str, Any]]]:
    """A fresh session on train + validation (`make_session`), trained for `plan`'s epochs;
    returns it and one history entry per epoch (numbered on from `first`, without validation
    scores: the validation images train)."""
    session = make_session()
    n = len(session.split.train)
    log(
        f"Retraining on train + validation ({n} images) for the chosen epochs: "
        f"{plan.epochs['head']} of stage 1, {plan.epochs['full']} of stage 2 (--refit all)."
    )
    history: list[dict[str, Any]] = []
    if plan.cached and plan.epochs["head"]:
        from featx.finetuning.cached import cached_rows, train_head_on_rows

        rows = cached_rows(session, store)
        done = train_head_on_rows(session, rows, plan.epochs["head"], log, keep_last=True)
        history += [_entry(h, first + i, cached=True) for i, h in enumerate(done, 1)]
    for stage in ("full",) if plan.cached else ("head", "full"):
        epochs = plan.epochs[stage]
        if not epochs:
            continue
        optimizer = session.optimizer(stage)
        scheduler = session.scheduler(optimizer, stage, plan.lengths[stage])
        for epoch in range(epochs):
            number = first + len(history) + 1
            title = f"refit epoch {epoch + 1}/{epochs} ({stage})"
            entry = session.train_epoch(optimizer, scheduler, stage, number, title)
            history.append(
                {"epoch": number, "stage": stage, "stage_epoch": epoch + 1, "refit": True,
                 **entry, "lr": {g["name"]: g["lr"] for g in optimizer.param_groups}}
            )  # fmt: skip
            log(
                f"{title}: loss {entry['train_loss']:.4f} acc {entry['train_accuracy']:.4f} | "
                f"{entry['seconds']:.1f} s"
            )
    return session, history


def _entry(h: dict[str, Any], number: int, *, cached: bool) -> dict[str, Any]:
    """A cached stage-1 epoch of the retraining, without its (seen) validation scores."""
    out = {k: v for k, v in h.items() if not k.startswith("val_")}
    return {**out, "epoch": number, "refit": True, "source": "store" if cached else "images"}
