"""Staged end-to-end fine-tuning on an image folder, with random augmentation throughout.

Stage 1 (`head`) trains only the new head: the base is frozen (no gradients, eval mode, its
weights bit-for-bit unchanged). Stage 2 (`full`) trains every layer from `--unfreeze-from` on
together with the head, with one learning rate per block (see `featx.finetuning.network`).

Every epoch ends with an atomic checkpoint (`last.pt`) holding the weights, optimiser,
scheduler, history and early-stopping state, so `--resume` continues a killed run. Each epoch is
a pure function of that state and the seed (data order, augmentation and dropout are seeded
per epoch), so a resumed run trains exactly as an uninterrupted one would.

Output folder: `config.json`, `last.pt`, `best.pt` (lowest validation loss), `history.json`,
`history.png`, `metrics.json` and `model.featx` (for `featx predict`/`featx evaluate`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featx.errors import Interrupted, UsageError, check_range
from featx.finetuning.config import STAGES, FinetuneConfig, FinetuneResult
from featx.finetuning.network import Network
from featx.finetuning.session import Session
from featx.models.heads import FittedHead, load_fitted_head
from featx.runtime import (
    atomic_write,
    library_versions,
    now,
    write_json,
)

__all__ = ["default_run_dir", "finetune", "load_checkpoint"]

CHECKPOINT_FORMAT = "featx-finetune-checkpoint"
CHECKPOINT_VERSION = 1
LAST, BEST, REFIT = "last.pt", "best.pt", "refit-history.json"


# ---- checkpoints -------------------------------------------------------------------------
def save_atomic(obj: Any, path: Path) -> None:
    """torch.save through a temporary file and a rename: a crash never leaves half a file."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by fine-tuning (tensors and plain data only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UsageError(f"cannot read checkpoint {path} ({type(error).__name__}).") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path} is not a featx fine-tuning checkpoint.")
    return state


RUN_FILES = (
    "config.json",
    LAST,
    BEST,
    "history.json",
    "history.png",
    "metrics.json",
    "model.featx",
    "base.safetensors",
    REFIT,
)


def default_run_dir(data_dir: str | os.PathLike, backbone: str) -> Path:
    """runs/<data folder>-<backbone>."""
    slug = "".join(
        c if c.isalnum() or c in "_.-" else "-"
        for c in f"{Path(data_dir).resolve().name}-{backbone}"
    )
    return Path("runs") / slug.strip("-")


# ---- the run -----------------------------------------------------------------------------
def finetune(
    data_dir: str | os.PathLike,
    config: FinetuneConfig,
    *,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    workers: int | None = None,
    device: str = "auto",
    quiet: bool = False,
    command: str | None = None,
    trust_pickle: bool = False,
    store: str | os.PathLike | None = None,
) -> FinetuneResult:
    """Fine-tune `config.backbone` on the image folder `data_dir`, writing the run to `out`
    (default runs/<data>-<backbone>). `resume` continues from `out/last.pt`. A `--head` model
    file that is a legacy pickle is loaded only with `trust_pickle`. With `store` (a feature
    store of the same backbone, weights and preprocessing holding the feature layer), stage 1
    trains the head on the store's cached rows instead of on the images, and the run is
    recorded in the store's experiment log."""
    out = Path(out) if out is not None else default_run_dir(data_dir, config.backbone)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; fine-tuning writes a run folder there.")
    check_range("workers", workers, 0)
    log = (lambda *_: None) if quiet else (lambda text: print(text, file=sys.stderr))
    # The head model is read before the run folder is touched: a refused file leaves no run.
    fitted = (
        load_fitted_head(config.head, trust_pickle=trust_pickle) if config.fitted_head else None
    )
    state, config = _start(out, config, resume, overwrite)

    def open_session(c: FinetuneConfig, merge: bool = False) -> Session:
        head = fitted
        if merge and c.fitted_head:  # training changed the head the first session was given
            head = load_fitted_head(c.head, trust_pickle=trust_pickle)
        return Session(data_dir, c, workers=workers, device=device, quiet=quiet, fitted=head,
                       store=store, merge_validation=merge)  # fmt: skip

    session = open_session(config)
    if store is not None and state is None and config.layer is None and fitted is None:
        from featx.finetuning.cached import best_stored_layer

        layer = best_stored_layer(session, store, log)
        if layer != session.layer_info.name:
            session.close()
            config = dataclasses.replace(config, layer=layer)
            session = open_session(config)
        session.layer_from_store = True
    seen = _validation_seen(fitted, session) if fitted is not None else None
    if seen:
        log(
            f"Note: {seen}, so its validation loss is optimistic and stage 2 is kept only if "
            "it beats that; give the data a validation/ folder and fit with --refit train for "
            "an honest comparison."
        )
    try:
        return _run(
            session, out, state, log, command or " ".join(sys.argv), Path(store) if store else None,
            lambda: open_session(session.config, merge=True),
        )  # fmt: skip
    except KeyboardInterrupt:
        raise Interrupted(
            "interrupted; add --resume to the same command to continue from the last "
            "finished epoch."
        ) from None
    finally:
        session.close()


def _start(
    out: Path, config: FinetuneConfig, resume: bool, overwrite: bool
) -> tuple[dict | None, FinetuneConfig]:
    """The checkpoint to resume from (None for a new run), after checking the folder, and the
    config to run: a resumed run keeps the feature layer its store chose."""
    last = out / LAST
    if resume:
        if not last.is_file():
            raise UsageError(
                f"cannot resume: {out} has no checkpoint {LAST}; run without --resume to start."
            )
        state = load_checkpoint(last)
        if state.get("layer_from_store") and config.layer is None:
            config = dataclasses.replace(config, layer=state["config"]["layer"])
        differences = [
            f"--{k.replace('_', '-')} was {state['config'].get(k)!r}, now {v!r}"
            for k, v in config.to_dict().items()
            if state["config"].get(k) != v
        ]
        if differences:
            raise UsageError(
                f"run {out} was started with other options ({'; '.join(differences)}); resume "
                "with the same options, or start a new run with another --out."
            )
        return state, config
    if any((out / name).exists() for name in RUN_FILES):
        if not overwrite:
            raise UsageError(
                f"{out} already holds a fine-tuning run; add --resume to continue it, "
                "--overwrite to start again, or choose another --out."
            )
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    return None, config


def _validation_seen(fitted: FittedHead, session: Session) -> str | None:
    """Why a fitted head's validation loss is no honest baseline, or None: its model was
    fitted on rows of the split this run validates on (`trained_on` in the model file; a
    hold-out that fit carved is not the one fine-tuning carves)."""
    seen = fitted.provenance.get("trained_on") or {}
    split = session.split
    where = "validation" if split.how == "validation folder" else None
    if where is None and split.validation:
        where = session.folder.files[split.validation[0]].split
    if where not in seen.get("splits", []):
        return None
    return (
        f"--head {fitted.path} was fitted on {seen['n_rows']} rows of "
        f"{' + '.join(seen['splits'])} (--refit {seen['refit']}), among them this run's "
        "validation images"
    )


def _run(
    session: Session, out: Path, state: dict | None, log, command: str, store: Path | None,
    open_merged: Callable[[], Session],
) -> FinetuneResult:  # fmt: skip
    config, net = session.config, session.net
    plan = config.stage_epochs
    if store is not None and config.epochs_head is None:
        from featx.finetuning.cached import DEFAULT_EPOCHS_CACHED

        # A fitted head (--head MODEL) was trained on these cached features already: it is
        # stage 1, and training a new head on the rows would throw it away.
        plan["head"] = 0 if config.fitted_head else DEFAULT_EPOCHS_CACHED
    rows = None
    if store is not None and state is None and plan["head"] and not config.fitted_head:
        from featx.finetuning.cached import cached_rows

        rows = cached_rows(session, store)  # refuses a mismatched store before any training
    out.mkdir(parents=True, exist_ok=True)
    if state is not None and state["dataset_fingerprint"] != session.folder.fingerprint:
        raise UsageError(
            f"the images in {session.folder.root} changed since run {out} started; "
            "start a new run (--overwrite or another --out)."
        )
    write_json(out / "config.json", _describe(session, command, plan, store))
    history: list[dict[str, Any]] = list(state["history"]) if state else []
    best = dict(state["best"]) if state else {"val_loss": math.inf, "epoch": 0}
    position = (STAGES.index(state["stage"]), state["stage_done"]) if state else (0, False)
    full_start = state.get("full_start") if state else None
    resumed_from = len(history)
    if state is not None:
        net.load_state_dict(state["network"])
        log(f"Resuming {out} after epoch {resumed_from}.")
    if rows is not None:
        history, best = _head_from_rows(session, rows, plan["head"], out, log)
        plan["head"] = len(history)  # early stopping ended it; epoch lines count what ran
        position = (0, True)
    elif state is None and config.fitted_head and not plan["head"]:
        best = _fitted_head_as_stage_one(session, out, log)
        position = (0, True)
    for index, stage in enumerate(STAGES):
        n = plan[stage]
        if n == 0 or index < position[0] or (index == position[0] and position[1]):
            continue
        here = state is not None and index == position[0]
        if stage == "full" and not here:
            if (out / BEST).is_file():  # stage 2 starts from the best weights of stage 1
                net.load_state_dict(load_checkpoint(out / BEST)["network"])
            full_start = best["val_loss"] if math.isfinite(best["val_loss"]) else None
        optimizer = session.optimizer(stage)
        scheduler = session.scheduler(optimizer, stage, n)
        first, bad = 0, 0
        if here:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            first, bad = state["stage_epoch"], state["bad_epochs"]
        for epoch in range(first, n):
            number = len(history) + 1
            entry = {"epoch": number, "stage": stage, "stage_epoch": epoch + 1}
            title = f"epoch {epoch + 1}/{n} ({stage})"
            entry |= session.train_epoch(optimizer, scheduler, stage, number, title)
            entry |= session.evaluate()
            entry["lr"] = {g["name"]: g["lr"] for g in optimizer.param_groups}
            history.append(entry)
            if entry["val_loss"] < best["val_loss"]:
                best = {"val_loss": entry["val_loss"], "epoch": number}
                save_atomic(_best_state(net, entry), out / BEST)
                bad = 0
            else:
                bad += 1
            stop = bool(config.patience) and bad >= config.patience
            _save_last(
                session, out, history, best, full_start, stage=stage, stage_epoch=epoch + 1,
                stage_done=stop or epoch + 1 == n, bad_epochs=bad,
                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            )  # fmt: skip
            write_json(out / "history.json", history)
            log(_epoch_line(entry, n))
            if stop:
                log(f"Early stopping: no better validation loss for {bad} epochs.")
                break
    # a resumed run given no --store retrains a cached stage 1 on the store it started with
    stored = store or (Path(state["store"]) if state and state.get("store") else None)
    ended = _Ended(history, best, full_start, resumed_from, dict(plan), open_merged, stored)
    return _finish(session, out, ended, log, command, store)


def _save_last(session: Session, out: Path, history, best, full_start, **position: Any) -> None:
    """last.pt: everything a resumed run needs to continue exactly."""
    save_atomic(
        {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": session.config.to_dict(),
            "layer_from_store": session.layer_from_store,
            "store": str(Path(session.store).resolve()) if session.store else None,
            "dataset_fingerprint": session.folder.fingerprint,
            **position,
            "best": best,
            "full_start": full_start,
            "history": history,
            "network": session.net.state_dict(),
        },
        out / LAST,
    )


def _head_from_rows(session: Session, rows, epochs: int, out: Path, log):
    """Stage 1 on cached rows; then the head is scored on the validation images, which is the
    loss stage 2 has to beat. Returns (history, best) and leaves best.pt and last.pt."""
    from featx.finetuning.cached import train_head_on_rows

    history = train_head_on_rows(session, rows, epochs, log)
    on_images = session.evaluate()
    best_epoch = min(history, key=lambda h: h["val_loss"])["epoch"]
    entry = {"epoch": best_epoch, **on_images}
    best = {"val_loss": on_images["val_loss"], "epoch": best_epoch}
    save_atomic(_best_state(session.net, entry), out / BEST)
    _save_last(
        session, out, history, best, None, stage="head", stage_epoch=len(history),
        stage_done=True, bad_epochs=0, optimizer=None, scheduler=None,
    )  # fmt: skip
    write_json(out / "history.json", history)
    log(
        f"Head on the validation images: loss {on_images['val_loss']:.4f}, accuracy "
        f"{on_images['val_accuracy']:.4f}."
    )
    return history, best


def _fitted_head_as_stage_one(session: Session, out: Path, log) -> dict[str, Any]:
    """With no stage-1 epochs, the fitted head as it came is stage 1: scored on the
    validation images (the loss stage 2 has to beat), saved as best.pt and last.pt."""
    scores = session.evaluate()
    best = {"val_loss": scores["val_loss"], "epoch": 0}
    save_atomic(_best_state(session.net, {"epoch": 0, **scores}), out / BEST)
    _save_last(
        session, out, [], best, None, stage="head", stage_epoch=0, stage_done=True,
        bad_epochs=0, optimizer=None, scheduler=None,
    )  # fmt: skip
    log(
        f"Stage 1: the head of {session.config.head} as fitted (0 epochs), on the validation "
        f"images: loss {scores['val_loss']:.4f}, accuracy {scores['val_accuracy']:.4f}."
    )
    return best


def _best_state(net: Network, entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "network": net.state_dict(),
        "epoch": entry["epoch"],
        "val_loss": entry["val_loss"],
        "val_accuracy": entry["val_accuracy"],
    }


def _epoch_line(entry: dict[str, Any], stage_total: int) -> str:
    """One epoch's line, numbered within its stage (`epoch 3/15 (full)`)."""
    return (
        f"epoch {entry['stage_epoch']}/{stage_total} ({entry['stage']}): "
        f"loss {entry['train_loss']:.4f} "
        f"acc {entry['train_accuracy']:.4f} | val loss {entry['val_loss']:.4f} "
        f"acc {entry['val_accuracy']:.4f} | {entry['seconds']:.1f} s, "
        f"{entry['images_per_second']:.1f} img/s"
    )


@dataclass
class _Ended:
    """Where the stages ended: what `_finish` turns into the run's files."""

    history: list[dict[str, Any]]
    best: dict[str, Any]
    full_start: float | None
    resumed_from: int
    plan: dict[str, int]
    open_merged: Callable[[], Session]  # a session training on train + validation
    store: Path | None  # the store of a cached stage 1


def _scores(session: Session, splits: tuple[str, ...]) -> dict[str, Any]:
    from featx.classify.metrics import classification_metrics

    classes = np.arange(len(session.class_names))
    metrics = {}
    for split in splits:
        p, y = session.predict(split)
        metrics[split] = classification_metrics(
            y, p.argmax(axis=1), session.class_names, p, classes
        )
    return metrics


def _finish(session, out, ended: _Ended, log, command, store) -> FinetuneResult:
    """Best weights back in; validation (and test) metrics with confusion matrices; with
    `--refit all` the retraining on train + validation, which the test split then scores; the
    model file, the history plot, and the record in the store's experiment log."""
    from featx.classify.metrics import plot_confusion_matrix
    from featx.finetuning.export import export_model
    from featx.finetuning.plots import plot_history

    history, best = ended.history, ended.best
    if (out / BEST).is_file():
        session.net.load_state_dict(load_checkpoint(out / BEST)["network"])
    splits = ("validation", "test") if session.data.test_images is not None else ("validation",)
    metrics = _scores(session, splits)
    final, refit = session, None
    if session.config.refit == "all":
        final, refit = _refit(session, out, ended, metrics, log, store)
    write_json(out / "metrics.json", {**metrics, **({"refit": refit} if refit else {})})
    write_json(out / "history.json", history)
    model = export_model(final, out, metrics, history, best, command, refit)
    title = f"{session.config.backbone} fine-tuning"
    plot_history(history, out / "history.png", title=title)
    for split in splits:
        plot_confusion_matrix(metrics[split], out / f"confusion-{split}.png", f"{title}: {split}")
    if store is not None:
        _record(final, store, out, metrics, history, model, command, refit)
    skipped = sorted({**session.skipped, **final.skipped}.items())
    log(_summary(metrics, ended, refit, out))
    return FinetuneResult(
        out, history, best["epoch"], metrics, model, ended.resumed_from, skipped, refit
    )


def _refit(session: Session, out: Path, ended: _Ended, metrics, log, store):
    """(the network the test split scores, what the retraining did or None)."""
    from featx.finetuning.refit import refit_plan, retrain

    plan = refit_plan(ended.history, ended.best, ended.plan)
    store = store or ended.store
    if plan.cached and plan.epochs["head"] and (store is None or not Path(store).is_file()):
        where = f"store {store}, which is gone" if store else "its store"
        raise UsageError(
            f"--refit all retrains stage 1 on the cached rows of {where}; resume with --store "
            "naming the store the run started with."
        )
    if plan.empty:
        log("--refit all: validation kept the fitted head as it came; nothing to retrain.")
        return session, None
    session.close()
    final, history = retrain(ended.open_merged, plan, store, len(ended.history), log)
    write_json(out / REFIT, history)
    refit: dict[str, Any] = {
        "epochs": plan.epochs,
        "n_train": len(final.split.train),
        "seconds": sum(h["seconds"] for h in history),
    }
    if "test" in metrics:
        refit["validation_chosen"] = {
            "test": {k: metrics["test"][k] for k in ("accuracy", "macro_f1")}
        }
        metrics["test"] = _scores(final, ("test",))["test"]
    return final, refit


def _summary(metrics, ended: _Ended, refit, out: Path) -> str:
    """The run's last line: which checkpoint validation kept, and what the test split says."""
    best, full_start = ended.best, ended.full_start
    kept = next((h for h in ended.history if h["epoch"] == best["epoch"]), None)
    if best["epoch"] == 0:
        which = "the fitted head, untrained"
    elif kept is None:
        which = f"epoch {best['epoch']}"
    else:
        which = f"epoch {kept['stage_epoch']} of stage {kept['stage']}"
    since = (
        f" (stage 2 began at {full_start:.4f}; the model is never worse on validation than that)"
        if full_start is not None
        else ""
    )
    again = (
        f"; retrained on train + validation ({refit['n_train']} images) for those epochs"
        if refit
        else ""
    )
    test = f", test accuracy {metrics['test']['accuracy']:.4f}" if "test" in metrics else ""
    return (
        f"Kept the best checkpoint by validation loss over both stages: {which}, "
        f"validation loss {best['val_loss']:.4f}{since}; validation accuracy "
        f"{metrics['validation']['accuracy']:.4f}{again}{test}. Wrote {out}."
    )


def _record(session, store, out, metrics, history, model, command, refit) -> None:
    from featx.runlog import record_run

    c = session.config
    record_run(
        store,
        "finetune",
        settings={
            "layer": session.layer_info.name,
            "classifier": "finetune",
            "params": {
                "unfreeze_from": session.unfreeze_from,
                "epochs_head": c.epochs_head,
                "epochs": c.epochs,
                "lr": c.lr,
                "lr_head": c.lr_head,
                "lr_mult": c.lr_mult,
                "bn": c.bn,
                "schedule": c.schedule,
                "augment": c.augment.to_dict() if c.augment is not None else None,
                "seed": c.seed,
                "refit": c.refit,
            },
            "backbone": c.backbone,
            "run": str(out.resolve()),
        },
        scores=metrics,
        details={"history": history, "refit": refit},
        model_path=str(model),
        command=command,
    )


def _describe(
    session: Session, command: str, plan: dict[str, int], store: Path | None
) -> dict[str, Any]:
    """config.json: the options and everything they resolved to."""
    c, net, folder, split = session.config, session.net, session.folder, session.split
    groups = {
        stage: {
            g["name"]: g["lr"]
            for g in net.param_groups(session.stage_start(stage), c.stage_lr(stage), c.lr_mult, 0)
        }
        for stage in STAGES
    }
    return {
        "config": c.to_dict(),
        "command": command,
        "created": now(),
        "dataset": {
            "root": str(folder.root.resolve()),
            "fingerprint": folder.fingerprint,
            "class_names": session.class_names,
            "n_train": len(split.train),
            "n_validation": len(split.validation),
            "validation": split.how,
        },
        "backbone": {
            "name": session.loaded.name,
            "weights": session.loaded.weights,
            "weights_sha256": session.loaded.weights_sha256,
            "preprocessing": session.preprocessing.to_dict(),
            "preprocessing_text": session.preprocessing.describe(),
        },
        "network": {
            "layer": session.layer_info.name,
            "module": session.layer_info.module,
            "layer_shape": list(session.layer_info.shape),
            "pool": net.pool,
            "head": str(net.head),
            "blocks": [b.name for b in net.blocks],
            "unfreeze_from": session.unfreeze_from,
        },
        "stage_epochs": plan,
        "head_from_store": str(store.resolve()) if store is not None else None,
        "learning_rates": groups,
        "device": str(session.device),
        "workers": session.workers,
        "versions": library_versions(),
    }
