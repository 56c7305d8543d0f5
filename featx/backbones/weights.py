"""Weights on disk: reading a state-dict file lazily, a window at a time, and the sha256
digests that identify weights (cached per file, so a large file is hashed once)."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import socket
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from featx.errors import FeatxError, UsageError, first_line
from featx.runtime import atomic_write, cache_root

if TYPE_CHECKING:  # torch loads only when weights are read
    import torch
    from torch import nn

__all__ = [
    "Checkpoint",
    "file_sha256",
    "is_named",
    "reachable",
    "state_dict_sha256",
]

WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
# Bytes of a weights file read through one mapping before it is mapped afresh: pages read from
# a mapped file count as resident until it is unmapped, so this bounds what reading costs.
READ_WINDOW = 32 << 20


def is_named(weights: str) -> bool:
    """Whether `weights` names a pretrained set (`default`, `IMAGENET1K_V1`, `in1k`) rather
    than `none` or a local file."""
    return weights != "none" and not (
        weights.endswith(WEIGHT_FILE_SUFFIXES) or os.sep in weights or Path(weights).is_file()
    )


def reachable(url: str) -> bool:
    """Whether the host of `url` resolves: a quick check before a download that would fail
    only after retries on a machine without a network."""
    try:
        socket.getaddrinfo(urlparse(url).hostname, 443)
    except (OSError, UnicodeError):
        return False
    return True


class Checkpoint:
    """The tensors of a state-dict file, read lazily and a window at a time.

    A .pth/.pt/.bin is mapped with `torch.load(mmap=True, weights_only=True)` (zip files;
    older files are read whole), a .safetensors opened with `safe_open`. Nothing is read until
    a tensor is asked for, and after `READ_WINDOW` bytes the file is mapped afresh, so the
    pages read so far leave the process (a mapped page counts as resident until unmapped).
    """

    def __init__(
        self, path: Path, rename: Callable[[list[str], list[str]], list[str]] | None = None
    ):
        self.path = path
        self.rename = rename  # (file keys, model keys) -> the model key of each file key
        self._files: dict[str, str | None] = {}  # model key -> file key, once fitted
        self._layout: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        self._state: dict[str, torch.Tensor] | None = None
        self._safetensors = None
        self._read = 0
        self._open()

    def _open(self) -> None:
        import torch

        if not self.path.is_file():
            raise UsageError(f"weights file {self.path} does not exist.")
        try:
            if self.path.suffix == ".safetensors":
                from safetensors import safe_open

                self._safetensors = safe_open(str(self.path), framework="pt", device="cpu")
                self._keys = {k.removeprefix("module."): k for k in self._safetensors.keys()}
                return
            state = torch.load(
                self.path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(self.path)
            )
        except Exception as error:
            reason = first_line(getattr(error, "reason", None) or error, 120)
            raise UsageError(f"cannot read weights file {self.path}: {reason}.") from None
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise UsageError(f"weights file {self.path} does not hold a state dict of tensors.")
        self._state = state
        self._keys = {k.removeprefix("module."): k for k in state}

    def _shape(self, key: str | None) -> tuple[int, ...]:
        if key is None:  # a BatchNorm count the file lacks
            return ()
        if self._state is not None:
            return tuple(self._state[key].shape)
        return tuple(self._safetensors.get_slice(key).get_shape())

    def fit(self, model: nn.Module, name: str) -> None:
        """Match the file's tensors to every tensor of `model` (before any is dropped): a
        UsageError naming what is missing, unexpected or of the wrong shape."""
        path = self.path
        expected = model.state_dict()
        names = list(self._keys)
        if self.rename is not None:
            names = self.rename(names, list(expected))
        files = {
            model_key: self._keys[key] for model_key, key in zip(names, self._keys, strict=True)
        }
        for key in expected:
            # Files saved before torch 0.4.1 have no BatchNorm counts; torch loads them as 0.
            if key.rpartition(".")[2] == "num_batches_tracked" and key not in files:
                files[key] = None
        missing = [k for k in expected if k not in files]
        unexpected = [k for k in files if k not in expected]
        if missing or unexpected:
            detail = "; ".join(
                f"{len(keys)} {what} keys such as {keys[0]!r}"
                for what, keys in (("missing", missing), ("unexpected", unexpected))
                if keys
            )
            raise UsageError(f"weights file {path} does not fit {name}: {detail}.")
        wrong = [k for k in expected if tuple(expected[k].shape) != self._shape(files[k])]
        if wrong:
            raise UsageError(
                f"weights file {path} does not fit {name}: {wrong[0]!r} has shape "
                f"{self._shape(files[wrong[0]])}, expected {tuple(expected[wrong[0]].shape)}."
            )
        self._files = files
        self._layout = [(k, t.dtype, tuple(t.shape)) for k, t in expected.items()]

    def _rows(self, key: str, dtype: torch.dtype) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, stop, rows start:stop as `dtype`) of a tensor, about READ_WINDOW bytes at a
        time, mapping the file afresh whenever a window has been read."""
        shape = self._shape(self._files[key])
        if not shape:
            yield 0, 1, self._tensor(key, None).to(dtype)
            return
        row_bytes = max(1, math.prod(shape[1:]) * dtype.itemsize)
        step = max(1, READ_WINDOW // row_bytes)
        for start in range(0, shape[0], step):
            if self._read >= READ_WINDOW:
                self._remap()
            stop = min(start + step, shape[0])
            yield start, stop, self._tensor(key, slice(start, stop)).to(dtype)
            self._read += (stop - start) * row_bytes

    def _tensor(self, key: str, rows: slice | None) -> torch.Tensor:
        file_key = self._files[key]
        if file_key is None:
            import torch

            return torch.zeros((), dtype=torch.long)
        if self._state is not None:
            tensor = self._state[file_key]
            return tensor if rows is None else tensor[rows]
        if rows is None:
            return self._safetensors.get_tensor(file_key)
        return self._safetensors.get_slice(file_key)[rows]

    def _remap(self) -> None:
        self._state = self._safetensors = None
        self._open()
        self._read = 0

    def sha256(self) -> str:
        """`state_dict_sha256` of the fitted model once loaded with these tensors, hashed
        window by window; cached per file (path, size, mtime) and model layout."""
        layout = hashlib.sha256(repr((self._layout, self._files)).encode()).hexdigest()

        def compute() -> str:
            import torch

            digest = hashlib.sha256()
            for name, dtype, shape in self._layout:
                digest.update(f"{name}|{dtype}|{shape}\n".encode())
                for _, _, rows in self._rows(name, dtype):
                    digest.update(rows.contiguous().reshape(-1).view(torch.uint8).numpy())
            return digest.hexdigest()

        return cached_file_digest(self.path, layout, compute)

    def load_into(self, model: nn.Module) -> None:
        """Copy the file's tensors into every tensor `model` still has (allocating them first
        when they are on the meta device), then unmap the file."""
        import torch

        if any(t.is_meta for t in model.state_dict().values()):
            model.to_empty(device="cpu")
        with torch.no_grad():
            for key, target in model.state_dict(keep_vars=True).items():
                for start, stop, rows in self._rows(key, target.dtype):
                    (target[start:stop] if target.ndim else target).copy_(rows)
        self._state = self._safetensors = None


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, cached per file (path, size, mtime)."""

    def compute() -> str:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    return cached_file_digest(path, "bytes", compute)


def cached_file_digest(path: Path, what: str, compute: Callable[[], str]) -> str:
    """`compute()`, a sha256 hex digest of `what` in the file at `path`, remembered in featx's
    cache under the file's path, size and mtime, so a large weights file is hashed once."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{what}"
    cached = cache_root() / "weights-sha256" / hashlib.sha256(key.encode()).hexdigest()
    try:
        if cached.is_file():  # not a folder or a FIFO in its place, which would block
            value = cached.read_text().strip()
            if re.fullmatch(r"[0-9a-f]{64}", value):
                return value
    except OSError:
        pass
    value = compute()
    # A read-only, full or blocked cache only costs the hash again next time.
    with contextlib.suppress(OSError, FeatxError):
        atomic_write(cached, value.encode())
    return value


def state_dict_sha256(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape and bytes), in order."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
