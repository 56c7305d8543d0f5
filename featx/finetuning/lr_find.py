"""The learning-rate range test (Smith 2015; fastai's `lr_find`).

Train for up to `num_iter` mini-batches while the learning rate grows exponentially from
`start_lr` to `end_lr`; smooth the loss with a bias-corrected exponential moving average; stop
once it diverges (non-finite, or above `diverge` times its minimum). The model's weights and
buffers, its gradients and training modes, the optimiser's state and hyper-parameters and
torch's random generators are restored afterwards, so the test never changes the training that
follows.

Every parameter group keeps its ratio to the last group (the head): with differential learning
rates the whole ladder sweeps together, and the suggestion is the head's rate.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from featx.errors import UsageError, check_choice

__all__ = ["RangeTest", "find_lr", "lr_range_test"]

SKIP_START = 0.1  # share of the first points left out of the steepest-slope search


@dataclass
class RangeTest:
    """The sweep: learning rates (of the last group), raw and smoothed losses, and advice."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    diverged: bool = False
    steepest: float | None = None  # lr of the steepest descent of the smoothed loss
    minimum: float | None = None  # lr of the lowest smoothed loss

    @property
    def tenth_of_minimum(self) -> float | None:
        """A tenth of the rate of the lowest smoothed loss (fastai's `lr_min` rule)."""
        return self.minimum / 10 if self.minimum is not None else None

    @property
    def rule(self) -> str | None:
        """Which rule gave the suggestion: the more conservative (smaller) of the two."""
        if self.steepest is not None and (
            self.tenth_of_minimum is None or self.steepest <= self.tenth_of_minimum
        ):
            return "steepest descent of the smoothed loss"
        return "minimum of the smoothed loss / 10" if self.minimum is not None else None

    @property
    def suggestion(self) -> float | None:
        """The smaller of the steepest-descent rate and a tenth of the minimum's (Smith 2015;
        fastai's `valley`/`steep` and `minimum / 10` rules): the minimum itself sits at the
        edge of divergence."""
        candidates = [r for r in (self.steepest, self.tenth_of_minimum) if r is not None]
        return min(candidates) if candidates else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "lrs": self.lrs,
            "losses": self.losses,
            "smoothed": self.smoothed,
            "diverged": self.diverged,
            "steepest": self.steepest,
            "minimum": self.minimum,
            "tenth_of_minimum": self.tenth_of_minimum,
            "suggestion": self.suggestion,
            "rule": self.rule,
        }


def lr_range_test(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Any],
    step: Callable[[Any], float],
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_iter: int = 100,
    smooth: float = 0.98,
    diverge: float = 4.0,
    seed: int = 0,
    progress: bool = False,
) -> RangeTest:
    """Run the range test. `step(batch)` does one forward/backward/`optimizer.step()` and
    returns the loss; `batches` yields at least `num_iter` batches. Everything the sweep
    touches is restored before this returns (also on error)."""
    if not 0 < start_lr < end_lr:
        raise UsageError("the range test needs 0 < --start-lr < --end-lr.")
    if num_iter < 2:
        raise UsageError("the range test needs --num-iter of at least 2.")
    if not 0 <= smooth < 1:
        raise UsageError("the smoothing factor must be in [0, 1).")
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = {p: None if p.grad is None else p.grad.detach().clone() for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    saved = copy.deepcopy(optimizer.state_dict())
    groups = optimizer.param_groups
    ratios = [g["lr"] / groups[-1]["lr"] for g in groups]
    result = RangeTest()
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    bar = tqdm(total=num_iter, disable=not progress, unit="step", desc="lr-find", file=sys.stderr)
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            average, best = 0.0, math.inf
            for i in range(num_iter):
                lr = start_lr * (end_lr / start_lr) ** (i / (num_iter - 1))
                for group, ratio in zip(groups, ratios, strict=True):
                    group["lr"] = lr * ratio
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                loss = float(step(batch))
                bar.update()
                bar.set_postfix(lr=f"{lr:.1e}", loss=f"{loss:.3g}", refresh=False)
                if not math.isfinite(loss):
                    result.diverged = True
                    break
                average = smooth * average + (1 - smooth) * loss
                smoothed = average / (1 - smooth ** (i + 1))
                result.lrs.append(lr)
                result.losses.append(loss)
                result.smoothed.append(smoothed)
                if smoothed > diverge * best:
                    result.diverged = True
                    break
                best = min(best, smoothed)
    finally:
        bar.close()
        model.load_state_dict(weights)
        for p, g in grads.items():
            p.grad = g
        for m, training in modes.items():
            m.training = training
        optimizer.load_state_dict(saved)
    _advise(result)
    return result


def _advise(result: RangeTest) -> None:
    if not result.smoothed:
        return
    losses = np.array(result.smoothed)
    lrs = np.array(result.lrs)
    lowest = int(losses.argmin())
    result.minimum = float(lrs[lowest])
    first = int(len(losses) * SKIP_START)
    if lowest - first < 2:
        return
    # Central differences up to the minimum, the minimum itself left out: its one-sided slope
    # would make the minimum its own "steepest descent".
    slopes = np.gradient(losses[first : lowest + 1], np.log(lrs[first : lowest + 1]))[:-1]
    if slopes.min() < 0:
        result.steepest = float(lrs[first + int(slopes.argmin())])


def find_lr(
    data_dir: str | os.PathLike,
    config: Any,
    *,
    stage: str = "head",
    checkpoint: str | os.PathLike | None = None,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_iter: int = 100,
    plot: str | os.PathLike | None = None,
    workers: int | None = None,
    device: str = "auto",
    quiet: bool = False,
) -> RangeTest:
    """The range test for `stage` ("head": frozen base; "full": from `--unfreeze-from` on, at
    `--lr-mult` ratios) of the network `config` (a FinetuneConfig) describes, on the training
    images of `data_dir` with the run's augmentation. `checkpoint` (a fine-tuning run's
    best.pt or last.pt) starts from trained weights. `plot` writes the curve as PNG."""
    from featx.finetuning.config import STAGES
    from featx.finetuning.run import load_checkpoint
    from featx.finetuning.session import Session

    check_choice("stage", stage, STAGES)
    session = Session(data_dir, config, workers=workers, device=device, quiet=quiet)
    try:
        if checkpoint is not None:
            path = Path(checkpoint)
            if not path.is_file():
                raise UsageError(f"checkpoint {path} does not exist.")
            session.net.load_state_dict(load_checkpoint(path)["network"])
        optimizer = session.optimizer(stage)
        session.set_modes(stage)

        def endless() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            epoch, produced = 1, True
            while produced:
                produced = False
                for batch in session.training_batches(epoch):
                    produced = True
                    yield batch
                epoch += 1

        def step(batch) -> float:
            return session.train_step(*batch, optimizer, stage)[0]

        result = lr_range_test(
            session.net,
            optimizer,
            endless(),
            step,
            start_lr=start_lr,
            end_lr=end_lr,
            num_iter=num_iter,
            seed=config.seed,
            progress=not quiet,
        )
    finally:
        session.close()
    if plot is not None:
        from featx.finetuning.plots import plot_lr_curve

        plot_lr_curve(result, plot, f"{config.backbone}: range test ({stage} stage)")
    return result
