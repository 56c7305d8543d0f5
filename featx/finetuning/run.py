"""Staged end-to-end fine-tuning on an image folder, with random augmentation throughout.

Stage 1 (`head`) trains only the new head: the base is frozen (no gradients, eval mode, its
weights bit-for-bit unchanged). Stage 2 (`full`) trains every layer from `--unfreeze-from` on
together with the head, with one learning rate per block (see `featx.finetuning.network`).

Every epoch ends with an atomic checkpoint (`last.pt`) holding the weights, optimiser,
scheduler, history and early-stopping state, so `--resume` continues a killed run. Each epoch is
a pure function of that state and the seed (data order, augmentation and dropout are seeded
per epoch), so a resumed run trains exactly as an uninterrupted one would.

Output folder: `config.json`, `last.pt`, `best.pt` (lowest validation loss), `history.json`,
`history.png`, `metrics.json` and `model.joblib` (for `featx predict`/`featx evaluate`).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featx.errors import Interrupted, UsageError, check_range
from featx.finetuning.config import STAGES, FinetuneConfig, FinetuneResult
from featx.finetuning.network import Network
from featx.finetuning.session import Session
from featx.runtime import (
    atomic_write,
    library_versions,
    now,
    write_json,
)

__all__ = ["default_run_dir", "finetune", "load_checkpoint"]

CHECKPOINT_FORMAT = "featx-finetune-checkpoint"
CHECKPOINT_VERSION = 1
LAST, BEST = "last.pt", "best.pt"


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
    "model.joblib",
    "base.safetensors",
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
) -> FinetuneResult:
    """Fine-tune `config.backbone` on the image folder `data_dir`, writing the run to `out`
    (default runs/<data>-<backbone>). `resume` continues from `out/last.pt`."""
    out = Path(out) if out is not None else default_run_dir(data_dir, config.backbone)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; fine-tuning writes a run folder there.")
    check_range("workers", workers, 0)
    log = (lambda *_: None) if quiet else (lambda text: print(text, file=sys.stderr))
    state = _start(out, config, resume, overwrite)
    session = Session(data_dir, config, workers=workers, device=device, quiet=quiet)
    try:
        return _run(session, out, state, log, command or " ".join(sys.argv))
    except KeyboardInterrupt:
        raise Interrupted(
            "interrupted; add --resume to the same command to continue from the last "
            "finished epoch."
        ) from None
    finally:
        session.close()


def _start(out: Path, config: FinetuneConfig, resume: bool, overwrite: bool) -> dict | None:
    """The checkpoint to resume from (None for a new run), after checking the folder."""
    last = out / LAST
    if resume:
        if not last.is_file():
            raise UsageError(
                f"cannot resume: {out} has no checkpoint {LAST}; run without --resume to start."
            )
        state = load_checkpoint(last)
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
        return state
    if any((out / name).exists() for name in RUN_FILES):
        if not overwrite:
            raise UsageError(
                f"{out} already holds a fine-tuning run; add --resume to continue it, "
                "--overwrite to start again, or choose another --out."
            )
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    return None


def _run(session: Session, out: Path, state: dict | None, log, command: str) -> FinetuneResult:
    config, net = session.config, session.net
    out.mkdir(parents=True, exist_ok=True)
    if state is not None and state["dataset_fingerprint"] != session.folder.fingerprint:
        raise UsageError(
            f"the images in {session.folder.root} changed since run {out} started; "
            "start a new run (--overwrite or another --out)."
        )
    plan = config.stage_epochs
    write_json(out / "config.json", _describe(session, command, plan))
    history: list[dict[str, Any]] = list(state["history"]) if state else []
    best = dict(state["best"]) if state else {"val_loss": math.inf, "epoch": 0}
    position = (STAGES.index(state["stage"]), state["stage_done"]) if state else (0, False)
    resumed_from = len(history)
    if state is not None:
        net.load_state_dict(state["network"])
        log(f"Resuming {out} after epoch {resumed_from}.")
    for index, stage in enumerate(STAGES):
        n = plan[stage]
        here = state is not None and index == position[0]
        if n == 0 or index < position[0] or (here and position[1]):
            continue
        if stage == "full" and not here and (out / BEST).is_file():
            net.load_state_dict(load_checkpoint(out / BEST)["network"])  # best of stage 1
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
            entry |= session.train_epoch(optimizer, scheduler, stage, number)
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
            save_atomic(
                {
                    "format": CHECKPOINT_FORMAT,
                    "version": CHECKPOINT_VERSION,
                    "config": config.to_dict(),
                    "dataset_fingerprint": session.folder.fingerprint,
                    "stage": stage,
                    "stage_epoch": epoch + 1,
                    "stage_done": stop or epoch + 1 == n,
                    "bad_epochs": bad,
                    "best": best,
                    "history": history,
                    "network": net.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                },
                out / LAST,
            )
            write_json(out / "history.json", history)
            log(_epoch_line(entry, sum(plan.values())))
            if stop:
                log(f"Early stopping: no better validation loss for {bad} epochs.")
                break
    return _finish(session, out, history, best, resumed_from, log, command)


def _best_state(net: Network, entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "network": net.state_dict(),
        "epoch": entry["epoch"],
        "val_loss": entry["val_loss"],
        "val_accuracy": entry["val_accuracy"],
    }


def _epoch_line(entry: dict[str, Any], total: int) -> str:
    return (
        f"epoch {entry['epoch']}/{total} ({entry['stage']}): loss {entry['train_loss']:.4f} "
        f"acc {entry['train_accuracy']:.4f} | val loss {entry['val_loss']:.4f} "
        f"acc {entry['val_accuracy']:.4f} | {entry['seconds']:.1f} s, "
        f"{entry['images_per_second']:.1f} img/s"
    )


def _finish(session, out, history, best, resumed_from, log, command) -> FinetuneResult:
    """Best weights back in, validation metrics, the model file and the history plot."""
    from featx.classify.metrics import classification_metrics
    from featx.finetuning.export import export_model

    if (out / BEST).is_file():
        session.net.load_state_dict(load_checkpoint(out / BEST)["network"])
    p, y = session.predict()
    classes = np.arange(len(session.class_names))
    metrics = {
        "validation": classification_metrics(y, p.argmax(axis=1), session.class_names, p, classes)
    }
    write_json(out / "metrics.json", metrics)
    write_json(out / "history.json", history)
    model = export_model(session, out, metrics, history, best, command)
    from featx.finetuning.plots import plot_history

    plot_history(history, out / "history.png", title=f"{session.config.backbone} fine-tuning")
    skipped = sorted(session.skipped.items())
    log(
        f"Best epoch {best['epoch']}: validation accuracy "
        f"{metrics['validation']['accuracy']:.4f}. Wrote {out}."
    )
    return FinetuneResult(out, history, best["epoch"], metrics, model, resumed_from, skipped)


def _describe(session: Session, command: str, plan: dict[str, int]) -> dict[str, Any]:
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
        "learning_rates": groups,
        "device": str(session.device),
        "workers": session.workers,
        "versions": library_versions(),
    }
