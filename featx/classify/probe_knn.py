"""The non-parametric probes on L2-normalised features: cosine k nearest neighbours with
temperature-weighted votes (DINO: each of the k neighbours votes for its class with weight
exp(cosine / 0.07)), and the nearest class mean (cosine to each class's mean feature).

The labelled rows (the bank) arrive in blocks, so a bank larger than memory streams: each block
is compared with every query, and only the best `max(ks)` neighbours of each query are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

__all__ = ["KNN_KS", "KNN_TEMPERATURE", "knn_logits", "ncm_logits", "normalised"]

KNN_KS = (10, 20, 100, 200)
KNN_TEMPERATURE = 0.07
QUERY_BLOCK = 4096  # queries compared with a bank block at a time

Bank = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
"""A zero-argument callable yielding (raw features, labels) blocks of the labelled rows."""


def normalised(X: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (zero rows stay zero), in float32 at least."""
    X = X.to(torch.promote_types(X.dtype, torch.float32))
    return X / X.norm(dim=1, keepdim=True).clamp_min(1e-12)


def knn_logits(
    bank: Bank,
    queries: torch.Tensor,
    ks: Sequence[int],
    n_classes: int,
    temperature: float = KNN_TEMPERATURE,
) -> dict[int, torch.Tensor]:
    """{k: log of the normalised class votes of each query} for each k of `ks` (each at most
    the bank's size)."""
    queries = normalised(queries)
    k_max = max(ks)
    best = torch.full((len(queries), 0), -torch.inf, dtype=queries.dtype, device=queries.device)
    labels = torch.zeros((len(queries), 0), dtype=torch.long, device=queries.device)
    for X, y in bank():
        X, y = normalised(X).to(queries.dtype), y.to(queries.device)
        merged, merged_labels = [], []
        for lo in range(0, len(queries), QUERY_BLOCK):
            sims = queries[lo : lo + QUERY_BLOCK] @ X.T
            sims = torch.cat([best[lo : lo + QUERY_BLOCK], sims], dim=1)
            cand = torch.cat([labels[lo : lo + QUERY_BLOCK], y.expand(len(sims), -1)], dim=1)
            top = sims.topk(min(k_max, sims.shape[1]), dim=1)
            merged.append(top.values)
            merged_labels.append(cand.gather(1, top.indices))
        best, labels = torch.cat(merged), torch.cat(merged_labels)
    out = {}
    for k in ks:
        weights = (best[:, :k] / temperature).exp()
        votes = torch.zeros((len(queries), n_classes), dtype=weights.dtype, device=weights.device)
        votes.scatter_add_(1, labels[:, :k], weights)
        out[k] = (votes / votes.sum(dim=1, keepdim=True)).clamp_min(1e-12).log()
    return out


def ncm_logits(
    bank: Bank, queries: torch.Tensor, n_classes: int, temperature: float = KNN_TEMPERATURE
) -> torch.Tensor:
    """Cosine similarity of each query to each class's mean normalised feature, divided by
    `temperature` (a class absent from the bank gets -inf)."""
    queries = normalised(queries)
    sums = torch.zeros((n_classes, queries.shape[1]), dtype=torch.float64, device=queries.device)
    for X, y in bank():
        sums.index_add_(0, y.to(queries.device), normalised(X).to(torch.float64))
    present = sums.abs().sum(dim=1) > 0
    means = normalised(sums).to(queries.dtype)
    logits = queries @ means.T / temperature
    logits[:, ~present] = -torch.inf
    return logits
