"""`STORE.partial/`: the finished chunks of an extraction that has not been assembled yet,
saved atomically by a writer thread, and the write lock that keeps a second process out."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import filelock
import numpy as np

from featx.errors import StoreLocked, UsageError
from featx.runtime import atomic_write

__all__ = ["ChunkWriter", "Partial", "remove_finished_partial", "write_lock"]


# ---- locking -----------------------------------------------------------------------------
@contextlib.contextmanager
def write_lock(store: Path) -> Iterator[None]:
    """Hold an exclusive lock on STORE.lock (`filelock`); StoreLocked if another process holds
    it. The lock goes with its holder: a child forked while it is held (a DataLoader worker)
    does not keep it, so a killed run can be re-run at once."""
    lock_path = store.with_name(store.name + ".lock")
    lock = filelock.FileLock(lock_path, blocking=False, on_acquired=_write_pid)
    try:
        lock.acquire()
    except filelock.Timeout:
        try:
            holder = lock_path.read_text(errors="replace").strip()[:32] or "unknown"
        except OSError:
            holder = "unknown"
        raise StoreLocked(
            f"store {store} is being written by another featx process (pid {holder}); "
            "wait for it to finish, or stop it and run this command again."
        ) from None
    except OSError as error:
        reason = (error.strerror or type(error).__name__).lower()
        raise UsageError(
            f"cannot write store {store}: its folder {store.parent} is not writable ({reason})."
        ) from None
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        lock.release()


def _write_pid(fd: int) -> None:
    """Name the holder in the lock file, for the message of a process that is refused."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)


# ---- partial results ---------------------------------------------------------------------
class Partial:
    """`STORE.partial/`: the run description and one .npz file per finished chunk."""

    BATCHING = ("batch_size", "chunk_items", "engine")  # a resumed run keeps the interrupted run's

    def __init__(
        self,
        store: Path,
        run: dict[str, Any],
        log=lambda _: None,
        upgrade: Callable[[dict[str, Any]], dict[str, Any]] = lambda before: before,
    ):
        """`upgrade` fills in what an older run.json did not record, as that run did it."""
        self.dir = store.with_name(store.name + ".partial")
        self.run = run
        description = self.dir / "run.json"
        if _check_own(self.dir):
            try:
                before = upgrade(json.loads(description.read_text()))
            except (OSError, ValueError, TypeError, AttributeError):
                before = {}
            if all(before.get(k) == v for k, v in run.items() if k not in self.BATCHING):
                self.run = before
            else:
                log(f"Discarding {self.dir}: it holds an interrupted run with other settings.")
                _clear(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if not description.exists():
            atomic_write(description, json.dumps(run, indent=1).encode())

    def chunk_path(self, k: int) -> Path:
        return self.dir / f"chunk-{k:06d}.npz"

    def done(self) -> int:
        """How many leading chunks are complete."""
        k = 0
        while self.chunk_path(k).exists():
            k += 1
        return k

    def save(self, k: int, index: np.ndarray, bad: list[tuple[int, str]], layers: list[np.ndarray]):
        arrays = {f"layer{i}": a for i, a in enumerate(layers)}
        atomic_write(
            self.chunk_path(k),
            lambda fh: np.savez(
                fh,
                index=index,
                bad_index=np.array([i for i, _ in bad], dtype=np.int64),
                bad_reason=np.array([r for _, r in bad], dtype=str),
                **arrays,
            ),
        )

    def load(self, k: int) -> dict[str, np.ndarray]:
        with np.load(self.chunk_path(k)) as data:
            return {name: data[name] for name in data.files}

    def remove(self) -> None:
        _clear(self.dir, keep_foreign=True)


_OWN = re.compile(r"run\.json|chunk-\d{6}\.npz|\.(run\.json|chunk-\d{6}\.npz)\..*\.tmp")


def _check_own(folder: Path) -> bool:
    """Whether `folder` exists; UsageError if it is not a folder of featx's own (a symbolic
    link, a file, or a folder holding anything featx did not write there)."""
    if folder.is_symlink():
        raise UsageError(
            f"{folder} is a symbolic link; featx keeps an unfinished extraction in a folder of "
            "its own at that path: move the link away and run again."
        )
    if not folder.exists():
        return False
    if not folder.is_dir():
        raise UsageError(
            f"{folder} is a file; featx keeps an unfinished extraction in a folder at that "
            "path: move the file away and run again."
        )
    foreign = sorted(e.name for e in os.scandir(folder) if not _OWN.fullmatch(e.name))
    if foreign:
        raise UsageError(
            f"{folder} holds {foreign[0]!r}, which featx did not write; featx keeps an "
            "unfinished extraction there: move that folder away and run again."
        )
    return True


def _clear(folder: Path, keep_foreign: bool = False) -> None:
    """Remove featx's files from `folder`, then the folder if that empties it; UsageError
    first if it holds anything else, unless `keep_foreign`."""
    if not keep_foreign:
        _check_own(folder)
    if folder.is_symlink() or not folder.is_dir():
        return
    for entry in os.scandir(folder):
        if _OWN.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
    with contextlib.suppress(OSError):
        folder.rmdir()


def remove_finished_partial(store: Path, stored_keys: set[str], log=lambda _: None) -> None:
    """Remove `STORE.partial/` when the store already holds every layer it was computing: a run
    killed after its final rename but before clean-up leaves one behind."""
    folder = store.with_name(store.name + ".partial")
    try:
        if not _check_own(folder):
            return
    except UsageError:
        return  # left for the run to name
    try:
        keys = json.loads((folder / "run.json").read_text())["keys"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if isinstance(keys, list) and set(keys) <= stored_keys:
        log(f"Removing {folder}: the store already holds the layers it was computing.")
        _clear(folder)


class ChunkWriter(threading.Thread):
    """Saves finished chunks off the inference thread; a bounded queue keeps memory flat."""

    def __init__(self, partial: Partial):
        super().__init__(daemon=True)
        self.partial, self.jobs, self.error = partial, queue.Queue(maxsize=1), None

    def run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.error is None:
                try:
                    self.partial.save(*job)
                except BaseException as error:  # reported by the main thread
                    self.error = error

    def put(self, *job) -> None:
        if self.error is not None:
            raise self.error
        self.jobs.put(job)

    def finish(self) -> None:
        self.jobs.put(None)
        self.join()
        if self.error is not None:
            raise self.error
