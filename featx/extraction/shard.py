"""Shards: deterministic, contiguous slices of a dataset's rows, one per process or job.

Shard I of N takes the files `[I*F//N, (I+1)*F//N)` of the F files in store order, with all
their views, so augmented views stay with their image and the N slices concatenated in index
order are the rows of a one-process store.
"""

from __future__ import annotations

import os
from pathlib import Path

from featx.errors import UsageError

__all__ = ["parse_shard", "shard_files", "shard_store_path"]


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` (0-based I) as (I, N); `slurm` reads the array task's id and count."""
    if text.strip().lower() == "slurm":
        try:
            task = int(os.environ["SLURM_ARRAY_TASK_ID"])
            first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
            count = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
        except (KeyError, ValueError):
            raise UsageError(
                "--shard slurm needs SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT; run it in "
                "a Slurm array job, or give --shard I/N."
            ) from None
        return check_shard((task - first, count))
    index, _, count = text.partition("/")
    try:
        return check_shard((int(index), int(count)))
    except ValueError:
        raise UsageError(f"--shard takes I/N (e.g. 0/4) or slurm, not {text!r}.") from None


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
