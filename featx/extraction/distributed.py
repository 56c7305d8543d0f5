"""Extraction on a Ray cluster: the rows cut into work units (shards I/N, several per
worker), extracted by a pool of Ray workers that each take the next unit when they finish
one (`featx.extraction.units`), then one merge.

Each unit is the ordinary `extract(..., shard=(i, n))` into `STORE.shard-IofN.h5`. A unit
whose worker dies goes back to the queue and resumes from its finished chunks; a re-run of the
same command skips the units whose stores are complete, so a crash of the driver loses at
most one chunk per running unit. Progress is the sum of the units' saved chunks, shown as one
bar. The shard stores must be on storage every node can reach.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from featx.errors import UsageError, first_line
from featx.extraction.naming import default_store_path
from featx.extraction.plan import views_per_file
from featx.extraction.run import ExtractResult, extract
from featx.extraction.settings import ExtractSettings, extract_settings
from featx.extraction.shard import shard_files, shard_store_path
from featx.extraction.units import Progress, UnitWorker, run_units, unit_count
from featx.inference.images import open_images
from featx.inference.network import stderr_log
from featx.runtime import disk_errors
from featx.store.feature_store import FeatureStore, layer_key
from featx.store.merging import merge

__all__ = ["extract_on_ray", "mount_type"]

NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb", "smbfs", "lustre", "gpfs", "beegfs", "ceph")


def _ray():
    try:
        import ray
    except ImportError:
        raise UsageError(
            "--ray needs Ray, which is not installed: pip install featx[ray]."
        ) from None
    return ray


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
    """`featx.extract(data, settings, layers, **overrides)` cut into `shards` work units that
    a pool of Ray workers on the cluster at `address` (a local Ray instance when None) takes
    one at a time, merged into the store at the end. By default the units are sized to the
    cluster (several per worker), and a re-run reuses the units of an interrupted one."""
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
    unit_settings = dataclasses.replace(
        s,
        store=store.resolve(),
        workers=s.workers or 0,  # by default, decode in the worker's process
        command=s.command or " ".join(sys.argv),
    )
    per_file = views_per_file(folder, s.augment)
    with contextlib.ExitStack() as stack:
        if not ray.is_initialized():
            stack.enter_context(_native_output_aside(store))
            _init(ray, address)
            stack.callback(ray.shutdown)
        nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        pool = _Pool.sized(nodes, cpus_per_shard, gpus_per_shard)
        n = shards or _previous_units(store) or unit_count(len(per_file), pool.workers)
        if len(nodes) > 1 and not _shared(store.parent):
            log(f"Warning: {store.parent} looks node-local, but the cluster has several nodes.")
        paths = [shard_store_path(store, (i, n)) for i in range(n)]
        bounds = [shard_files(len(per_file), (i, n)) for i in range(n)]
        progress = Progress(paths, [int(per_file[b.start : b.stop].sum()) for b in bounds], s.quiet)
        stack.callback(progress.close)
        where = str(Path(data).resolve())
        done = {i for i in range(n) if _unit_done(where, unit_settings, paths[i], (i, n), keys)}
        progress(done)
        todo = [i for i in range(n) if i not in done]
        if todo:
            actors = pool.start(ray, where, unit_settings, len(todo))
            stack.callback(lambda: [ray.kill(a) for a in actors])
            run_units(ray, actors, todo, n, lambda d, r: progress(d | done, r), max_retries)
    merged = merge(store, paths, command=s.command)
    for path in paths:
        path.unlink()
    log(f"Merged {n} shards into {merged}.")
    with FeatureStore(merged) as result:
        return ExtractResult(merged, computed=keys, n_rows=result.n_rows, skipped=result.skipped)


@dataclasses.dataclass
class _Pool:
    """The Ray workers of a job: how many, and the CPUs and GPUs each asks for."""

    nodes: list[dict]  # the live nodes' Ray resources
    workers: int
    cpus: float | None
    gpus: float

    @classmethod
    def sized(cls, nodes: list[dict], cpus: float | None, gpus: float | None) -> _Pool:
        """As many workers as the cluster holds: one per GPU when it has GPUs, else one per
        CPU; UsageError when no node has what one worker asks for (Ray would wait for it
        forever)."""
        most = {
            kind: max((node.get(kind, 0) for node in nodes), default=0) for kind in ("CPU", "GPU")
        }
        total = {kind: sum(node.get(kind, 0) for node in nodes) for kind in ("CPU", "GPU")}
        gpus = (1 if total["GPU"] else 0) if gpus is None else gpus
        for flag, asked, kind in (("gpus", gpus, "GPU"), ("cpus", cpus or 0, "CPU")):
            if asked > most[kind]:
                raise UsageError(
                    f"--ray-{flag}-per-shard {asked:g} asks for more {kind}s than any node of "
                    f"the Ray cluster has ({most[kind]:g}); Ray would wait for them forever."
                )
        workers = total["GPU"] // gpus if gpus else total["CPU"] // (cpus or 1)
        return cls(nodes, max(1, int(workers)), cpus, gpus)

    def start(self, ray, data: str, settings: ExtractSettings, units: int) -> list:
        """The workers for `units` units, each restarted by Ray when its process or node dies
        (its unit is then queued again by `run_units`, not retried by Ray). Without GPUs,
        the cluster's CPUs are shared by the workers, within what a node has."""
        workers = min(self.workers, units)
        cpus = self.cpus
        if cpus is None:
            in_node = max(node.get("CPU", 1) for node in self.nodes)
            total = sum(node.get("CPU", 1) for node in self.nodes)
            cpus = 1 if self.gpus else max(1, min(total // workers, in_node))
        actor = ray.remote(UnitWorker).options(
            num_cpus=cpus, num_gpus=self.gpus, max_restarts=-1, max_task_retries=0
        )
        return [actor.remote(data, settings, max(1, int(cpus))) for _ in range(workers)]


def _unit_done(
    data: str, settings: ExtractSettings, path: Path, shard: tuple[int, int], keys: list[str]
) -> bool:
    """Whether the unit's shard store is complete, after extract's ordinary checks that it
    holds this data and these settings (a store made differently is refused)."""
    if not (path.exists() and _has_layers(path, keys)):
        return False
    extract(data, settings, shard=shard, quiet=True)
    return True


def _previous_units(store: Path) -> int | None:
    """The unit count of an interrupted job on STORE: N of its `STORE.shard-IofN.h5` stores
    or their `.partial/` folders, when they agree on one."""
    suffix = re.escape(store.suffix or ".h5")
    pattern = re.compile(re.escape(store.stem) + r"\.shard-\d+of(\d+)" + suffix + r"(\.partial)?$")
    counts = {
        int(m.group(1))
        for path in store.parent.glob(f"{glob.escape(store.stem)}.shard-*")
        if (m := pattern.match(path.name))
    }
    return counts.pop() if len(counts) == 1 else None


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
