"""Networks kept loaded between extractions in one process (a Ray worker running one shard
after another): inside `keeping_networks()`, `load_network` returns the network an earlier
extraction of the block loaded for the same backbone, weights, layers and input size."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from featx.backbones.registry import Backbone, LoadedBackbone

__all__ = ["keeping_networks", "load_network"]

_kept: dict[tuple, LoadedBackbone] | None = None


def load_network(
    record: Backbone, weights: str, modules: Sequence[str], size: int
) -> LoadedBackbone:
    """`record.load(weights, modules, size)`, or the network kept from an earlier call of the
    enclosing `keeping_networks()` block. A kept network has been prepared for inference once
    (BatchNorm folded, on its device), which a second preparation leaves as it is."""
    if _kept is None:
        return record.load(weights, modules, size)
    key = (record.name, weights, tuple(modules), size)
    if key not in _kept:
        _kept.clear()  # one network at a time: a worker runs one job's shards
        _kept[key] = record.load(weights, modules, size)
    return _kept[key]


@contextlib.contextmanager
def keeping_networks() -> Iterator[None]:
    """Keep the networks `load_network` loads until the block ends."""
    global _kept
    _kept = {}
    try:
        yield
    finally:
        _kept = None
