"""Shards: deterministic, contiguous slices of a dataset's rows, one per process or job.

Shard I of N takes the files `[I*F//N, (I+1)*F//N)` of the F files in store order, with all
their views, so augmented views stay with their image and the N slices concatenated in index
order are the rows of a one-process store.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from featx.errors import UsageError

__all__ = ["parse_shard", "shard_files", "shard_store_path", "slurm_shard"]


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` (0-based I) as (I, N); `slurm` reads the array task's place in its job array."""
    if text.strip().lower() == "slurm":
        return check_shard(slurm_shard(os.environ))
    index, _, count = text.partition("/")
    try:
        return check_shard((int(index), int(count)))
    except ValueError:
        raise UsageError(f"--shard takes I/N (e.g. 0/4) or slurm, not {text!r}.") from None


def slurm_shard(env: Mapping[str, str]) -> tuple[int, int]:
    """(I, N) of a Slurm array task: its place among the array's task ids, which must be evenly
    spaced (`--array=0-9`, `--array=1-7:2`, `--array=1,4,7`); Slurm does not tell a task the
    ids of an uneven list (`--array=1,2,7`), so those are refused."""
    try:
        task = int(env["SLURM_ARRAY_TASK_ID"])
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        step = int(env.get("SLURM_ARRAY_TASK_STEP", "1"))
        last = int(env.get("SLURM_ARRAY_TASK_MAX", str(first + step * (count - 1))))
    except (KeyError, ValueError):
        raise UsageError(
            "--shard slurm needs SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT; run it in "
            "a Slurm array job, or give --shard I/N."
        ) from None
    if count == 1 and task == first:
        return 0, 1
    if step < 1 or last != first + step * (count - 1) or (task - first) % step:
        raise UsageError(
            f"--shard slurm cannot place task {task} in an array of {count} tasks from {first} "
            f"to {last} by {step}: the task ids must be evenly spaced (--array=0-9, 1-7:2 or "
            "1,4,7); give --shard I/N instead."
        )
    return (task - first) // step, count


def check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"shard {index}/{count} does not exist: I/N needs 0 <= I < N.")
    return index, count


def shard_files(n_files: int, shard: tuple[int, int]) -> range:
    """The file indices of shard (I, N)."""
    index, count = check_shard(shard)
    if count > n_files:
        raise UsageError(f"{count} shards is more than the dataset's {n_files} files.")
    return range(index * n_files // count, (index + 1) * n_files // count)


def shard_store_path(store: str | os.PathLike, shard: tuple[int, int]) -> Path:
    """Where shard (I, N) of STORE is written: STORE's name with `.shard-IofN` before `.h5`."""
    store = Path(store)
    return store.with_name(f"{store.stem}.shard-{shard[0]}of{shard[1]}{store.suffix or '.h5'}")
