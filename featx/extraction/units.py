"""Work units on a Ray cluster, handed out as workers free up.

The rows are cut into `n` shards (units), more than there are workers, and a pool of Ray
actors runs them: each actor loads the network once, then extracts unit after unit (the
ordinary `extract(..., shard=(i, n))` into `STORE.shard-IofN.h5`), and a unit goes to the next
actor that is free, so a slow node runs fewer units instead of holding the job. An actor whose
process or node dies is restarted by Ray where resources allow; its unit goes back to the
queue and resumes from its saved chunks on whichever actor takes it.
"""

from __future__ import annotations

import collections
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from featx.errors import FeatxError, StoreLocked
from featx.extraction.settings import ExtractSettings

__all__ = ["Progress", "UnitWorker", "WorkersLost", "run_units", "unit_count"]

UNITS_PER_WORKER = 4  # enough for a slow worker to fall behind by less than a unit's share
MIN_UNIT_FILES = 64  # below this, a unit's set-up (planning, store, merge) outweighs its work
POLL_SECONDS = 0.5
LOCK_PATIENCE = 120.0  # seconds a unit waits for the lock of a dead worker's process to go
RESUME = "finished units are kept: run the same command again to resume."


class WorkersLost(FeatxError):
    """The job's Ray workers died more often than it retries; finished work is kept."""


class UnitWorker:
    """The Ray actor: extracts one unit at a time into its shard store, keeping the network
    loaded between units."""

    def __init__(self, data: str, settings: ExtractSettings, threads: int):
        import torch

        from featx.extraction.kept import keeping_networks

        torch.set_num_threads(threads)
        self.data, self.settings = data, settings
        self._networks = contextlib.ExitStack()
        self._networks.enter_context(keeping_networks())

    def ready(self) -> bool:
        return True

    def run(self, shard: tuple[int, int]) -> int:
        from featx.extraction.run import extract

        return extract(self.data, self.settings, shard=shard, quiet=True).n_rows


def unit_count(n_files: int, workers: int) -> int:
    """How many units: UNITS_PER_WORKER per worker, each of at least MIN_UNIT_FILES files,
    and never fewer units than workers (nor more than files)."""
    wanted = min(UNITS_PER_WORKER * workers, n_files // MIN_UNIT_FILES)
    return max(1, min(n_files, max(workers, wanted)))


@dataclass
class _Queue:
    """The units left, with each unit's failed attempts and, for a unit refused by the lock
    of a dead worker's lingering process, when it may be tried again."""

    todo: collections.deque
    max_retries: int
    failures: collections.Counter = field(default_factory=collections.Counter)
    not_before: dict[int, float] = field(default_factory=dict)
    locked_since: dict[int, float] = field(default_factory=dict)

    def next(self) -> int | None:
        now = time.monotonic()
        for _ in range(len(self.todo)):
            unit = self.todo.popleft()
            if self.not_before.get(unit, 0.0) <= now:
                return unit
            self.todo.append(unit)
        return None

    def died(self, unit: int, n: int) -> None:
        self.failures[unit] += 1
        if self.failures[unit] > self.max_retries:
            raise WorkersLost(
                f"the Ray worker running shard {unit}/{n} died {self.failures[unit]} times; "
                + RESUME
            )
        self.todo.appendleft(unit)

    def locked(self, unit: int, error: StoreLocked) -> None:
        now = time.monotonic()
        if now - self.locked_since.setdefault(unit, now) > LOCK_PATIENCE:
            raise StoreLocked(str(error)) from None
        self.not_before[unit] = now + 1.0
        self.todo.append(unit)


def run_units(
    ray,
    actors: list,
    units: Iterable[int],
    n: int,
    progress: Callable[[set[int], set[int]], None],
    max_retries: int,
) -> None:
    """Run `units` (indices of shards of `n`) on `actors`, each unit given to the next actor
    that is ready; a unit whose actor dies goes back to the queue (at most `max_retries`
    times). `progress` is called with the finished and the running units as the job goes."""
    queue = _Queue(collections.deque(units), max_retries)
    remaining = len(queue.todo)
    finished: set[int] = set()
    calls: dict[Any, tuple[Any, int | None]] = {_ready(a): (a, None) for a in actors}
    idle: list = []
    while remaining:
        while idle and (unit := queue.next()) is not None:
            actor = idle.pop()
            calls[actor.run.remote((unit, n))] = (actor, unit)
        ready, _ = ray.wait(list(calls), num_returns=1, timeout=POLL_SECONDS)
        for ref in ready:
            actor, unit = calls.pop(ref)
            if _finished(ray, ref, unit, n, queue):
                idle.append(actor)
                if unit is not None:
                    finished.add(unit)
                    remaining -= 1
            elif unit is not None:  # the actor died: wait for Ray to restart it
                calls[_ready(actor)] = (actor, None)
        if not calls:
            if not idle:
                raise WorkersLost(f"every Ray worker of the job died for good; {RESUME}")
            time.sleep(POLL_SECONDS)  # only units waiting for a lock to go
        progress(finished, {unit for _, unit in calls.values() if unit is not None})


def _ready(actor) -> Any:
    """A call that returns once `actor` is up, waiting through its restarts (a call to an
    actor that is restarting fails at once without `max_task_retries`); it fails only when
    the actor is dead for good."""
    return actor.ready.options(max_task_retries=-1).remote()


def _finished(ray, ref, unit: int | None, n: int, queue: _Queue) -> bool:
    """Whether the call `ref` of an actor (a unit, or a readiness check when `unit` is None)
    succeeded; a unit refused by a lock is queued again; featx's own errors are raised as
    they are (one sentence), others as the Ray error."""
    try:
        ray.get(ref)
        return True
    except ray.exceptions.RayActorError:
        if unit is not None:
            queue.died(unit, n)
        return False
    except ray.exceptions.RayTaskError as error:
        cause = error.as_instanceof_cause()
        if isinstance(cause, StoreLocked) and unit is not None:
            queue.locked(unit, cause)
            return True
        if isinstance(cause, FeatxError):  # as featx's own class, for its exit code
            kind = next(k for k in type(cause).__mro__ if k.__module__.startswith("featx."))
            raise kind(str(cause.args[0] if cause.args else cause)) from None
        raise


class Progress:
    """One bar for the job: the finished units' work items and the saved chunks of the
    others, read from their `.partial/` folders."""

    def __init__(self, paths: list[Path], sizes: list[int], quiet: bool):
        self.paths, self.sizes = paths, sizes
        self.bar = tqdm(
            total=sum(sizes), unit="img", desc="extract (ray)", disable=quiet, file=sys.stderr
        )

    def __call__(self, finished: set[int], running: set[int] = frozenset()) -> None:
        done = sum(self.sizes[i] for i in finished)
        done += sum(_saved(self.paths[i], self.sizes[i]) for i in running - finished)
        if done != self.bar.n:
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def _saved(shard_store: Path, size: int) -> int:
    """Work items a unit has saved: all of them once its store exists, else from its
    `.partial/` chunk files."""
    if shard_store.exists():
        return size
    partial = shard_store.with_name(shard_store.name + ".partial")
    try:
        chunk_items = json.loads((partial / "run.json").read_text())["chunk_items"]
    except (OSError, ValueError, KeyError):
        return 0
    return min(size, chunk_items * len(list(partial.glob("chunk-*.npz"))))
