"""The optimiser and learning-rate schedule of a fine-tuning stage."""

from __future__ import annotations

import torch

from featx.finetuning.config import ONECYCLE_WARMUP, FinetuneConfig
from featx.finetuning.network import Network

__all__ = ["make_optimizer", "make_scheduler"]


def make_optimizer(
    net: Network, config: FinetuneConfig, start: int | None, lr: float
) -> torch.optim.Optimizer:
    """An optimiser over the head and the base from `start` on (None: the head only), one
    parameter group per block, the head at `lr` and each earlier block at `lr_mult` times the
    next later one's rate. Sets which parameters train."""
    c = config
    net.set_trainable(start)
    groups = net.param_groups(start, lr, c.lr_mult, c.weight_decay)
    if c.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=groups[-1]["lr"], momentum=c.momentum, nesterov=c.momentum > 0
        )
    if c.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=groups[-1]["lr"], momentum=0.0)
    if c.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=groups[-1]["lr"])
    return torch.optim.Adam(groups, lr=groups[-1]["lr"])


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: FinetuneConfig, steps: int, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule of a stage of `epochs` epochs of `steps` batches, stepped
    after every batch."""
    c = config
    steps = max(1, steps)
    total = epochs * steps
    if c.schedule == "onecycle" and total >= 3:  # torch's one-cycle needs 3 steps or more
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=total,
            pct_start=max(ONECYCLE_WARMUP, 2 / total),  # at least 2 warm-up steps
            anneal_strategy="cos",
            cycle_momentum=c.optimizer in ("sgd", "adam", "adamw") and c.momentum > 0,
            base_momentum=min(0.85, c.momentum),
            max_momentum=c.momentum,
        )
    if c.schedule == "cosine-restarts" and total >= 2:
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=steps, T_mult=2)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
