"""Torch heads kept out of a model file's skops pipeline, by reference: `HeadTensors` holds
each head's plain-data spec and its tensors (for heads.json and heads.safetensors), and within
a `head_tensors` block the head estimators (`TorchHead`, `MLPClassifier`) serialise their head
as `{"featx_head": NAME}` or resolve such a reference. The model file and the heads both use
this module, so neither imports the other for it."""

from __future__ import annotations

import contextvars
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from featx.errors import UsageError

if TYPE_CHECKING:
    import torch

__all__ = [
    "HeadTensors",
    "active_head_tensors",
    "head_tensors",
    "is_head_reference",
    "resolve_head_reference",
]


class HeadTensors:
    """Torch heads kept out of a model file's skops pipeline: each head's plain-data spec
    (sizes, dropout, classes) by name, and its tensors by "NAME/PARAM" (for safetensors).

    While `head_tensors(heads)` is active, `MLPClassifier` and `TorchHead` serialise their
    head as a reference `{"featx_head": NAME}` into `heads` (when saving) or resolve such a
    reference from it (when loading), so that skops never meets a torch type."""

    def __init__(
        self,
        specs: dict[str, dict[str, Any]] | None = None,
        tensors: dict[str, torch.Tensor] | None = None,
    ):
        self.specs = specs or {}
        self.tensors = tensors or {}
        self._owners: dict[int, str] = {}

    def put(self, spec: dict[str, Any], owner: object) -> dict[str, str]:
        """Keep the `head_spec` of `owner`; the reference that stands for it in the pipeline.
        skops may ask an object for its state more than once: each owner is kept once."""
        name = self._owners.get(id(owner))
        if name is None:
            name = self._owners[id(owner)] = f"head{len(self.specs)}"
            self.specs[name] = {k: v for k, v in spec.items() if k != "state_dict"}
            for key, tensor in spec["state_dict"].items():
                self.tensors[f"{name}/{key}"] = tensor.detach().float().cpu().contiguous()
        return {"featx_head": name}

    def get(self, reference: dict[str, Any]) -> dict[str, Any]:
        """The `head_spec` that `put` returned `reference` for; UsageError when absent."""
        name = reference.get("featx_head")
        if name not in self.specs:
            raise UsageError(f"the model file has no head named {name!r} in heads.json.")
        prefix = f"{name}/"
        state = {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}
        spec = self.specs[name]
        # The sizes must account for exactly the stored tensors, so that a crafted heads.json
        # cannot make featx allocate a network larger than the file.
        try:
            sizes = [spec["in_features"], *spec["hidden_sizes"], spec["n_outputs"]]
            valid = all(isinstance(n, int) and n > 0 for n in sizes)
            needed = sum(a * b + b for a, b in itertools.pairwise(sizes)) if valid else -1
        except (KeyError, TypeError):
            needed = -1
        if needed != sum(t.numel() for t in state.values()):
            raise UsageError(f"the model file's head {name} does not match its stored tensors.")
        dropouts = (spec.get("dropout", 0.0), spec.get("input_dropout", 0.0))
        if not all(isinstance(p, int | float) and 0 <= p < 1 for p in dropouts):
            raise UsageError(f"the model file's head {name} has a dropout outside [0, 1).")
        return {**spec, "state_dict": state}


_HEADS: contextvars.ContextVar[HeadTensors | None] = contextvars.ContextVar(
    "featx_heads", default=None
)


@contextmanager
def head_tensors(heads: HeadTensors) -> Iterator[HeadTensors]:
    """Within this block, heads are (de)serialised by reference through `heads`."""
    token = _HEADS.set(heads)
    try:
        yield heads
    finally:
        _HEADS.reset(token)


def active_head_tensors() -> HeadTensors | None:
    """The `HeadTensors` of the enclosing `head_tensors` block, if any."""
    return _HEADS.get()


def is_head_reference(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"featx_head"}


def resolve_head_reference(reference: dict[str, Any]) -> dict[str, Any]:
    """The head spec behind a `{"featx_head": NAME}` reference, from the active block."""
    heads = _HEADS.get()
    if heads is None:
        raise UsageError("a featx head reference can only be resolved while loading a model file.")
    return heads.get(reference)
