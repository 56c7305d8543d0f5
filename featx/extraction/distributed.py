"""Extraction on a Ray cluster: one Ray task per shard, each calling the ordinary
`extract(..., shard=(i, n))` into `STORE.shard-IofN.h5`, then one merge.

Ray schedules the tasks (one per GPU when the cluster has GPUs, else sized by CPUs) and
re-runs a task whose worker died (`max_retries`); a re-run shard resumes from its finished
chunks, and the task of a shard already complete returns at once, so running the same
command after a crash resumes at shard and at chunk level. Progress is the sum of the shards' saved
chunks, polled from their `.partial/` folders, shown as one bar. The shard stores must be on
storage every node can reach.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from featx.errors import UsageError, first_line
from featx.extraction.naming import default_store_path
from featx.extraction.plan import views_per_file
from featx.extraction.run import ExtractResult, extract
from featx.extraction.settings import ExtractSettings, extract_settings
from featx.extraction.shard import shard_files, shard_store_path
from featx.inference.images import open_images
from featx.inference.network import stderr_log
from featx.runtime import disk_errors
from featx.store.feature_store import FeatureStore, layer_key
from featx.store.merging import merge

__all__ = ["extract_on_ray", "mount_type"]

NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb", "smbfs", "lustre", "gpfs", "beegfs", "ceph")
POLL_SECONDS = 0.5


def _ray():
    try:
        import ray
    except ImportError:
        raise UsageError(
            "--ray needs Ray, which is not installed: pip install featx[ray]."
        ) from None
    return ray


def _run_shard(shard: tuple[int, int], threads: int, data: str, settings: ExtractSettings) -> dict:
    """The Ray task: one shard with the ordinary library call, in a Ray worker process."""
    import torch

    torch.set_num_threads(threads)
    result = extract(data, settings, shard=f"{shard[0]}/{shard[1]}", quiet=True)
    return {"n_rows": result.n_rows, "skipped": result.skipped}


def extract_on_ray(
    data: str | os.PathLike,
    settings: ExtractSettings | str | None = None,
    layers: Sequence[str] | None = None,
    *,
    shards: int | None = None,
    address: str | None = None,
    cpus_per_shard: float | None = None,
    gpus_per_shard: float | None = None,
    max_retries: int = 3,
    **overrides: Any,
) -> ExtractResult:
    """`featx.extract(data, settings, layers, **overrides)` split into `shards` Ray tasks on the
    cluster at `address` (a local Ray instance when None), merged into the store at the end."""
    ray = _ray()
    s = extract_settings(settings, layers, overrides)
    store = Path(s.store or default_store_path(data, s.backbone, s.weights, s.image_size))
    log = stderr_log(s.quiet)
    folder = open_images(data)
    keys = _layer_keys(s.backbone, s.layers, s.pool)
    if store.exists() and not s.overwrite:
        if _has_layers(store, keys):  # the ordinary checks: the same data and settings?
            return extract(data, s, store=store)
        raise UsageError(
            f"store {store} exists without these layers or for other files; --ray writes new "
            "stores only: use --overwrite, another --store, or extract without --ray."
        )

    if shards is not None and shards < 1:
        raise UsageError("--shards must be at least 1.")
    shard_settings = dataclasses.replace(
        s,
        store=store.resolve(),
        workers=s.workers or 0,  # by default, decode in the task's process
        command=s.command or " ".join(sys.argv),
    )
    with contextlib.ExitStack() as stack:
        if not ray.is_initialized():
            stack.enter_context(_native_output_aside(store))
            _init(ray, address)
            stack.callback(ray.shutdown)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        if gpus_per_shard is None:
            gpus_per_shard = 1 if gpus else 0
        if shards is None:
            shards = gpus or max(1, int(resources.get("CPU", 1) // (cpus_per_shard or 1)))
        if cpus_per_shard is None:
            cpus_per_shard = 1 if gpus else max(1, int(resources.get("CPU", 1) // shards))
        if len([n for n in ray.nodes() if n["Alive"]]) > 1 and not _shared(store.parent):
            log(f"Warning: {store.parent} looks node-local, but the cluster has several nodes.")
        task = ray.remote(_run_shard).options(
            num_cpus=cpus_per_shard,
            num_gpus=gpus_per_shard,
            max_retries=max_retries,
            retry_exceptions=False,
        )
        threads = max(1, int(cpus_per_shard))
        # a finished shard's task returns at once (its store has the layers), a started one
        # resumes from its saved chunks: extract's own checks decide, so stale shards are refused
        where = str(Path(data).resolve())
        running = {
            task.remote((i, shards), threads, where, shard_settings): i for i in range(shards)
        }
        paths = [shard_store_path(store, (i, shards)) for i in range(shards)]
        _wait(ray, running, paths, _shard_sizes(folder, s.augment, shards), s.quiet)
    merged = merge(store, paths, command=s.command)
    for path in paths:
        path.unlink()
    log(f"Merged {shards} shards into {merged}.")
    with FeatureStore(merged) as done:
        return ExtractResult(merged, computed=keys, n_rows=done.n_rows, skipped=done.skipped)


def _init(ray, address: str | None) -> None:
    """Join the cluster at `address`, or start a local instance (even when RAY_ADDRESS names
    a cluster); featx's SIGTERM handling is kept (Ray's own would exit with status 15)."""
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(
            address=address or "local",
            num_cpus=None if address else os.cpu_count(),
            include_dashboard=False,
            logging_level=logging.ERROR,
            log_to_driver=False,
        )
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        reason = first_line(error).rstrip(".")
        raise UsageError(f"could not start or join {where} ({reason}).") from None
    finally:
        if threading.current_thread() is threading.main_thread() and sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)


@contextlib.contextmanager
def _native_output_aside(store: Path) -> Iterator[None]:
    """Within the block, what Ray's native code and the processes it starts write to the
    standard error file descriptor (state dumps when a node dies, stack traces at exit) goes
    to `.STORE.ray.log`, removed when the block ends without an error; featx's own lines and
    progress bar still reach the terminal."""
    log_path = store.with_name(f".{store.name}.ray.log")
    with disk_errors(store.parent):
        store.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    terminal = os.dup(2)
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 2)
    python_stderr = sys.stderr
    sys.stderr = open(  # noqa: SIM115 - closed when the block ends
        terminal, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False
    )
    failed = True
    try:
        yield
        failed = False
    finally:
        sys.stderr.flush()
        sys.stderr.close()
        sys.stderr = python_stderr
        os.dup2(terminal, 2)
        os.close(terminal)
        if not failed:
            log_path.unlink(missing_ok=True)


def _shard_sizes(folder, augment: int, shards: int) -> list[int]:
    """The work items of each shard: its files, with their augmented views."""
    per_file = views_per_file(folder, augment)
    bounds = [shard_files(len(per_file), (i, shards)) for i in range(shards)]
    return [int(per_file[b.start : b.stop].sum()) for b in bounds]


def _wait(ray, running: dict, paths: list[Path], sizes: list[int], quiet: bool) -> None:
    """Wait for the shard tasks, showing the job's progress; raise the first failure."""
    finished: list[int] = []
    bar = tqdm(total=sum(sizes), unit="img", desc="extract (ray)", disable=quiet, file=sys.stderr)
    pending = list(running)
    try:
        while pending:
            ready, pending = ray.wait(pending, timeout=POLL_SECONDS)
            for ref in ready:
                try:
                    ray.get(ref)
                except ray.exceptions.RayTaskError as error:
                    cause = error.as_instanceof_cause()
                    if isinstance(cause, UsageError):
                        raise UsageError(str(cause.args[0] if cause.args else cause)) from None
                    raise
                finished.append(running[ref])
            done = sum(sizes[i] for i in finished)
            done += sum(_saved(paths[i], sizes[i]) for i in running.values() if i not in finished)
            if done != bar.n:
                bar.update(done - bar.n)
            time.sleep(0 if ready else 0.05)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()


def _saved(shard_store: Path, size: int) -> int:
    """Work items a running shard has saved, from its `.partial/` chunk files."""
    partial = shard_store.with_name(shard_store.name + ".partial")
    try:
        chunk_items = json.loads((partial / "run.json").read_text())["chunk_items"]
    except (OSError, ValueError, KeyError):
        return 0
    return min(size, chunk_items * len(list(partial.glob("chunk-*.npz"))))


def _layer_keys(backbone: str, layers: Sequence[str], pool: str) -> list[str]:
    from featx.backbones.registry import get_backbone

    record = get_backbone(backbone)
    return [layer_key(record.layer_name(record.module_path(n)), pool) for n in layers]


def _has_layers(path: Path, keys: list[str]) -> bool:
    with FeatureStore(path) as store:
        return set(keys) <= set(store.layers)


def _shared(folder: Path) -> bool:
    """Whether `folder` is on a network filesystem, by /proc/mounts (True when unknown)."""
    try:
        with open("/proc/mounts") as mounts:
            kind = mount_type(folder.resolve(), mounts.read())
    except OSError:
        return True  # unknown: do not warn
    return kind.split(".")[0] in NETWORK_FILESYSTEMS or kind.startswith("fuse")


def mount_type(folder: Path, mounts: str) -> str:
    """The filesystem type of the deepest mount point above `folder` in a /proc/mounts text,
    comparing paths by components (/data2 is not below /data); "" when none is."""
    best, kind = None, ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = Path(_unescaped(fields[1]))
        if (point == folder or point in folder.parents) and (
            best is None or len(point.parts) > len(best.parts)
        ):
            best, kind = point, fields[2]
    return kind


def _unescaped(field: str) -> str:
    """A /proc/mounts field with its octal escapes (\\040 for a space) decoded."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
