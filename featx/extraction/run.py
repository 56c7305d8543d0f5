"""Run a frozen backbone once over a dataset and write layer features to a store.

Work is cut into chunks of whole batches. Each finished chunk is saved atomically into
`STORE.partial/` by a writer thread; a killed run resumes from the first missing chunk. When
every chunk is there, the store is assembled into a temporary file and renamed over STORE, so
the store on disk is always either the previous complete one or the new complete one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featx.backbones.registry import Backbone, get_backbone
from featx.data.folders import ImageFolder
from featx.data.preprocessing import Preprocessing
from featx.errors import Interrupted, UsageError
from featx.extraction.assemble import assemble
from featx.extraction.job import Job, run_network
from featx.extraction.kept import load_network
from featx.extraction.naming import default_store_path
from featx.extraction.partial import Partial, remove_finished_partial, write_lock
from featx.extraction.plan import (
    Work,
    augmentation,
    calibration_images,
    differences,
    identity,
    upgraded_run,
)
from featx.extraction.settings import ExtractSettings, extract_settings
from featx.extraction.shard import check_shard, parse_shard, shard_store_path
from featx.inference.images import open_images
from featx.inference.network import stderr_log
from featx.runtime import available_memory, default_workers, disk_errors, inference_device
from featx.store.feature_store import FeatureStore, layer_key

if TYPE_CHECKING:  # torch loads only when the network runs: a cached re-run never imports it
    import torch

__all__ = ["ExtractResult", "default_store_path", "extract"]

CHUNK_BYTES = 32 << 20  # features held in memory per chunk before it is written


@dataclass
class ExtractResult:
    """What an extraction did: the store, which layers it computed and which it reused."""

    store: Path
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    n_rows: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    resumed_from: int = 0


@dataclass(frozen=True)
class RunRecord:
    """What an interrupted run must share with this one to be resumed (STORE.partial/run.json);
    a resumed run keeps the interrupted run's batch size, chunk size and engine."""

    identity: dict[str, Any]
    weights_sha256: str
    modules: list[str]
    keys: list[str]
    pool: str
    dtype: str
    precision: str
    device: str  # devices differ in the last bits: never mix them
    n_items: int
    engine: str
    batch_size: int
    chunk_items: int
    calibration: str | None = None  # int8's calibration images


def extract(
    data: str | os.PathLike,
    settings: ExtractSettings | str | None = None,
    layers: Sequence[str] | None = None,
    **overrides: Any,
) -> ExtractResult:
    """Extract the layers of a backbone for every image of `data` (an image folder or a
    manifest) into a feature store: `extract(data, settings, **overrides)`, where `overrides`
    replace fields of `settings` (an `ExtractSettings`; None: the defaults).
    `extract(data, "resnet18", ["layer2"], ...)` is short for the backbone and layers fields.

    Layers already in the store are reused; new ones are added in one pass. An interrupted run
    resumes where it stopped. `engine` runs the network (see `featx.inference.ENGINES`); `auto`
    runs the engine measured fastest on this machine for this network, set-up counted against
    the images left (measured on the run's first batches the first time; the store records
    which engine computed which rows). `precision="int8"` runs OpenVINO's post-training
    quantization, calibrated on up to 300 training images of the dataset chosen with `seed`,
    with the layers that cost most kept in fp32 until those images' features keep cosine >=
    0.99 to fp32. `augment` > 0 adds that many augmented views of each training image
    (`augment_config`: a `featx.data.augment.AugmentConfig`, classic Keras ranges by default).

    `shard="I/N"` (or `(i, n)`) computes only shard i (0-based) of n contiguous slices of the
    rows into `<store stem>.shard-IofN.h5` next to `store`; `featx.merge` joins the shards.

    `decode` is "reduced" (large JPEGs decoded at a reduced size, see `Preprocessing.decode`)
    or "full"; None keeps an existing store's decoding (full for a store that predates the
    choice) and is "reduced" for a new one. The decoding is part of the store's preprocessing.
    """
    s = _settled(settings, layers, overrides)
    record = get_backbone(s.backbone)
    folder = open_images(data)
    preprocessing = record.default_preprocessing(s.weights)
    if s.image_size:
        preprocessing = preprocessing.with_image_size(s.image_size)
    shard = check_shard(parse_shard(s.shard) if isinstance(s.shard, str) else tuple(s.shard)) \
        if s.shard else None  # fmt: skip
    work = Work.plan(folder, s.augment, shard)
    store = Path(s.store or default_store_path(data, s.backbone, s.weights, s.image_size))
    if shard:
        store = shard_store_path(store, shard)
    with disk_errors(store.parent):
        store.parent.mkdir(parents=True, exist_ok=True)
    given, store = store, Path(os.path.realpath(store))  # lock and write a link's target
    log = stderr_log(s.quiet)
    for note in getattr(folder, "notes", ()):  # what a manifest's reading left out
        log(note)
    with write_lock(store):
        existing = _open_existing(store, s.overwrite, log)
        try:
            result = _extract_locked(s, record, folder, work, store, existing, preprocessing, log)
            result.store = given
            return result
        except KeyboardInterrupt:  # outside the network loop: loading the model, or assembling
            raise Interrupted(
                f"interrupted before {store} was written; finished chunks are kept: run the "
                "same command again to resume."
            ) from None
        finally:
            if existing is not None:
                existing.close()


def _settled(settings, layers, overrides: dict[str, Any]) -> ExtractSettings:
    s = extract_settings(settings, layers, overrides)
    return dataclasses.replace(
        s,
        workers=default_workers() if s.workers is None else s.workers,
        command=s.command or " ".join(sys.argv),
    )


def _open_existing(store: Path, overwrite: bool, log) -> FeatureStore | None:
    if store.exists() and overwrite:
        log(f"--overwrite: {store} will be replaced when this run finishes.")
    elif store.exists():
        existing = FeatureStore(store)
        remove_finished_partial(store, set(existing.layers), log)
        return existing
    return None


def _extract_locked(
    s: ExtractSettings,
    record: Backbone,
    folder: ImageFolder,
    work: Work,
    store: Path,
    existing: FeatureStore | None,
    preprocessing: Preprocessing,
    log,
) -> ExtractResult:
    """The extraction once STORE is locked: the store's identity checked, then the layers
    not yet in it computed."""
    decode = s.decode
    if decode is None:
        stored = existing.meta["preprocessing"] if existing else {"decode": "reduced"}
        decode = stored.get("decode", "full")  # a store from before the choice: full
    preprocessing = preprocessing.with_decode(decode)
    views, augment_meta = augmentation(s.augment, s.augment_config, s.seed, preprocessing)
    wanted = identity(record, s.weights, preprocessing, folder, augment_meta, work.shard)
    if existing is not None:
        found = differences(existing.meta, wanted, folder, existing)
        if found:
            raise UsageError(
                f"store {store} was made differently: {'; '.join(found)}. "
                "Use --overwrite to replace it, or --store to write another file."
            )
    keys = [layer_key(record.layer_name(record.module_path(n)), s.pool) for n in s.layers]
    present = set(existing.layers) if existing else set()
    for key in keys:
        stored = existing.layer(key).dtype if key in present else s.dtype
        if stored != s.dtype:
            raise UsageError(
                f"layer {key} is stored as {stored} in {store}, not {s.dtype}; ask for "
                f"--dtype {stored}, or use --overwrite to rebuild the store."
            )
    if existing and all(k in present for k in keys):
        log(f"All requested layers are already in {store}; nothing to compute.")
        return ExtractResult(store, reused=keys, n_rows=existing.n_rows, skipped=existing.skipped)
    device = inference_device(s.device, s.precision, s.engine)
    job, why = _plan(s, record, folder, work, store, existing, preprocessing, device, log)
    job.views, job.augment_meta = views, augment_meta
    job.partial = Partial(store, _run_record(job, wanted), log, upgrade=upgraded_run)
    return _run(job, why, log)


def _plan(
    s: ExtractSettings,
    record: Backbone,
    folder: ImageFolder,
    work: Work,
    store: Path,
    existing: FeatureStore | None,
    preprocessing: Preprocessing,
    device: torch.device,
    log,
) -> tuple[Job, str]:
    """The layers to compute traced, the network loaded, the batch size and engine chosen."""
    from featx.backbones.layers import (
        MAX_BATCH,
        batch_size_for_memory,
        check_poolable,
        pooled_shape,
        resolve_layers,
        trace_layers,
    )
    from featx.inference.auto import resolve_engine
    from featx.inference.engine import cache_key
    from featx.inference.network import choose_batch_size

    size, batch_size = preprocessing.input_size, s.batch_size
    # Layers are traced on the weightless skeleton; only what they run is then loaded.
    skeleton = record.skeleton(s.weights)
    fitting = batch_size_for_memory(  # before the full-size trace: it refuses what cannot fit
        record, skeleton, size, batch_size or MAX_BATCH, available_memory()
    )
    traced = trace_layers(record, skeleton, size)
    infos = resolve_layers(record, traced, list(s.layers))
    check_poolable(skeleton, infos, s.pool)
    present = set(existing.layers) if existing else set()
    todo = [i for i in infos if layer_key(i.name, s.pool) not in present]
    modules = [i.module for i in todo]
    why_batch = ""
    if batch_size is None:
        batch_size, why_batch = choose_batch_size(traced, modules, size, device)
    del skeleton
    loaded = load_network(record, s.weights, modules, size)
    if existing is not None and existing.meta["weights_sha256"] != loaded.weights_sha256:
        raise UsageError(
            f"the {loaded.weights} weights now hash to {loaded.weights_sha256[:16]}, but store "
            f"{store} was made with {existing.meta['weights_sha256'][:16]}; use --overwrite."
        )
    if fitting < batch_size:
        log(f"Lowering the batch size from {batch_size} to {fitting} so its activations fit.")
        batch_size = fitting
    row_bytes = sum(math.prod(pooled_shape(i.shape, s.pool)) for i in todo)
    row_bytes *= np.dtype(s.dtype).itemsize
    per_chunk = max(1, CHUNK_BYTES // max(1, row_bytes * batch_size))
    calibration = calibration_images(folder, preprocessing, s.seed) if s.precision == "int8" \
        else None  # fmt: skip
    key = cache_key(loaded.name, loaded.weights_sha256, modules, s.pool, size, s.precision,
                    "extract", calibration.key() if calibration else "")  # fmt: skip
    engine, why = resolve_engine(s.engine, device, s.precision, len(work.items), key)
    job = Job(
        store=store, existing=existing, folder=folder, work=work, todo=todo,
        keys=[layer_key(i.name, s.pool) for i in todo], loaded=loaded,
        preprocessing=preprocessing, settings=s, device=device, batch_size=batch_size,
        chunk_items=batch_size * per_chunk, engine=engine, engine_key=key,
        calibration=calibration,
        batch_note=f"Batch size {batch_size} ({why_batch})." if why_batch else "",
    )  # fmt: skip
    return job, why


def _run_record(job: Job, wanted: dict[str, Any]) -> dict[str, Any]:
    s = job.settings
    return dataclasses.asdict(
        RunRecord(
            wanted,
            job.loaded.weights_sha256,
            [i.module for i in job.todo],
            job.keys,
            s.pool,
            s.dtype,
            s.precision,
            job.device.type,
            len(job.work.items),
            job.engine,
            job.batch_size,
            job.chunk_items,
            job.calibration.identity if job.calibration else None,
        )  # fmt: skip
    )


def _run(job: Job, why: str, log) -> ExtractResult:
    """Resume or start the pass, compute the missing chunks and assemble the store."""
    run = job.partial.run
    job.chunk_items = run["chunk_items"]
    if run["batch_size"] != job.batch_size:
        job.batch_size = run["batch_size"]
        log(f"Resuming with the interrupted run's batch size, {job.batch_size}, for identical "
            "values.")  # fmt: skip
    elif job.batch_note:
        log(job.batch_note)
    if run.get("engine", job.engine) != job.engine:
        job.engine, why = run["engine"], "the interrupted run's engine, for identical values"
    n_items = len(job.work.items)
    n_chunks = math.ceil(n_items / job.chunk_items)
    first = job.partial.done()
    start = min(first * job.chunk_items, n_items)
    if first:
        log(f"Resuming {job.store}: {start} of {n_items} images already done.")
    if first < n_chunks:
        run_network(job, start, why, log)
    n_rows, skipped = assemble(job, n_chunks)
    job.partial.remove()
    log(f"Wrote {len(job.keys)} layer(s) for {n_rows} rows to {job.store}.")
    reused = [k for k in (job.existing.layers if job.existing else []) if k not in job.keys]
    return ExtractResult(
        job.store, computed=job.keys, reused=reused, n_rows=n_rows, skipped=skipped,
        resumed_from=start,
    )  # fmt: skip
