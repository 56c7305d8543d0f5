"""Run a frozen backbone once over an image folder and write layer features to a store.

Work is cut into chunks of whole batches. Each finished chunk is saved atomically into
`STORE.partial/` by a writer thread; a killed run resumes from the first missing chunk. When
every chunk is there, the store is assembled into a temporary file and renamed over STORE, so
the store on disk is always either the previous complete one or the new complete one.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featx.backbones.registry import (
    POOLS,
    Backbone,
    LoadedBackbone,
    get_backbone,
)
from featx.data.folders import UNSPLIT, BadImage, ImageFolder
from featx.data.manifest import is_manifest, open_dataset
from featx.data.preprocessing import DECODE_POLICIES, Preprocessing
from featx.errors import Interrupted, UsageError, check_choice, check_range
from featx.extraction.partial import ChunkWriter, Partial, remove_finished_partial, write_lock
from featx.extraction.shard import check_shard, shard_files, shard_store_path
from featx.runtime import (
    ENGINES,
    INFERENCE_PRECISIONS,
    available_memory,
    default_workers,
    disk_errors,
    inference_device,
    library_versions,
    now,
)
from featx.store.feature_store import FeatureStore, add_layer, layer_key, write_store

if TYPE_CHECKING:  # torch loads only when the network runs: a cached re-run never imports it
    import torch
    from PIL import Image

    from featx.extraction.engines import Calibration

__all__ = ["ExtractResult", "default_store_path", "extract"]

DTYPES = ("float32", "float16")
COMPRESSIONS = ("none", "lzf", "gzip")
CHUNK_BYTES = 32 << 20  # features held in memory per chunk before it is written
AUGMENTED_SPLITS = ("train", UNSPLIT)


@dataclass
class ExtractResult:
    """What an extraction did: the store, which layers it computed and which it reused."""

    store: Path
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    n_rows: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    resumed_from: int = 0


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "data"


def default_store_path(
    data_dir: str | os.PathLike,
    backbone: str,
    weights: str = "default",
    image_size: int | None = None,
) -> Path:
    """stores/<dataset>-<backbone>-<weights>-<input size>.h5, one per preprocessing; the
    dataset is the folder's name, or the manifest's without its suffix."""
    weights_tag = weights if weights in ("default", "none") else _slug(Path(weights).stem)
    size = f"s{image_size}" if image_size else "std"
    data = Path(data_dir).resolve()
    dataset = _slug(data.stem if is_manifest(data) else data.name)
    name = f"{dataset}-{_slug(backbone)}-{weights_tag}-{size}.h5"
    return Path("stores") / name


# ---- work items and decoding -------------------------------------------------------------
@dataclass(frozen=True)
class _Work:
    """The rows to compute: (file index, view) pairs in store order."""

    items: list[tuple[int, int]]
    shard: dict[str, int] | None = None  # where the items sit among the whole dataset's

    @classmethod
    def plan(cls, folder: ImageFolder, views: int, shard: tuple[int, int] | None = None) -> _Work:
        files = shard_files(len(folder.files), shard) if shard else range(len(folder.files))
        items, first_row, n_rows_total = [], 0, 0
        for index, f in enumerate(folder.files):
            n = 1 + (views if f.split in AUGMENTED_SPLITS else 0)
            if index in files:
                items.extend((index, view) for view in range(n))
            elif index < files.start:
                first_row += n
            n_rows_total += n
        if shard is None:
            return cls(items)
        return cls(
            items,
            {
                "index": shard[0],
                "count": shard[1],
                "first_row": first_row,  # rows are work items: a store row unless skipped
                "n_rows": len(items),
                "n_rows_total": n_rows_total,
                "first_file": files.start,
                "n_files": len(files),
            },
        )


class _Images:
    """Decodes and preprocesses work items; a bad file yields its reason instead of a tensor."""

    def __init__(self, folder: ImageFolder, items, preprocessing: Preprocessing, augment=None):
        self.root, self.files, self.items = folder.root, folder.files, items
        self.preprocessing, self.augment = preprocessing, augment

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        file_index, view = self.items[i]
        try:
            image = self.preprocessing.load(self.root / self.files[file_index].path)
        except BadImage as bad:
            return i, None, str(bad)
        augment = None
        if view:  # augmented at the network's input size: far cheaper than on a full photo
            augment = functools.partial(self.augment, file_index=file_index, view=view)
        return i, self.preprocessing(image, augment), None


def _collate(samples):
    import torch

    good = [(i, x) for i, x, _ in samples if x is not None]
    bad = [(i, reason) for i, x, reason in samples if x is None]
    index = [i for i, _ in good]
    batch = torch.stack([x for _, x in good]) if good else None
    return index, batch, bad


class _Batches:
    """Consecutive batches of work indices from `start`, never crossing a chunk boundary."""

    def __init__(self, start: int, stop: int, batch_size: int, chunk_items: int):
        self.start, self.stop, self.batch_size, self.chunk_items = (
            start,
            stop,
            batch_size,
            chunk_items,
        )

    def __iter__(self):
        i = self.start
        while i < self.stop:
            end = min(
                i + self.batch_size, self.stop, (i // self.chunk_items + 1) * self.chunk_items
            )
            yield list(range(i, end))
            i = end

    def __len__(self) -> int:
        return sum(1 for _ in self)


# ---- provenance --------------------------------------------------------------------------
def _identity(
    backbone: Backbone,
    weights: str,
    preprocessing: Preprocessing,
    folder: ImageFolder,
    augment: dict | None,
    shard: dict | None,
) -> dict[str, Any]:
    """What makes a store the store it is; a store that differs in any of these is refused."""
    identity = {
        "backbone": backbone.name,
        "weights": backbone.weights_identity(weights),
        "preprocessing": preprocessing.to_dict(),
        "dataset_fingerprint": folder.fingerprint,
        "augment": augment,
        "shard": shard,
    }
    return json.loads(json.dumps(identity))  # as it reads back from a store: lists, not tuples


def _differences(
    stored: dict[str, Any], wanted: dict[str, Any], folder: ImageFolder, store: FeatureStore
) -> list[str]:
    out = []
    for name in ("backbone", "weights", "augment", "shard"):
        if stored.get(name) != wanted[name]:
            out.append(f"{name} is {stored.get(name)} in the store, {wanted[name]} now")
    old = Preprocessing.from_dict(stored["preprocessing"])
    new = Preprocessing.from_dict(wanted["preprocessing"])
    if old != new:  # as objects: a store from before a field existed reads with its default
        out.append(f"preprocessing is {old.describe()} in the store, {new.describe()} now")
    if stored["dataset"]["fingerprint"] != wanted["dataset_fingerprint"]:
        out.append(_dataset_change(store, folder))
    return out


def _dataset_change(store: FeatureStore, folder: ImageFolder) -> str:
    old = store.files()
    new = {f.path: (f.size, f.mtime_ns) for f in folder.files}
    added = sorted(new.keys() - old.keys())
    removed = sorted(old.keys() - new.keys())
    changed = sorted(p for p in new.keys() & old.keys() if new[p] != old[p])
    parts = [
        f"{len(v)} {what} (e.g. {v[0]})"
        for what, v in (("added", added), ("removed", removed), ("modified", changed))
        if v
    ]
    return "the dataset's files changed since extraction: " + (
        ", ".join(parts) or "renamed classes"
    )


# ---- the extraction ----------------------------------------------------------------------
def extract(
    data_dir: str | os.PathLike,
    backbone: str,
    layers: Sequence[str],
    *,
    store: str | os.PathLike | None = None,
    weights: str = "default",
    image_size: int | None = None,
    pool: str = "none",
    dtype: str = "float32",
    compression: str = "none",
    precision: str = "fp32",
    engine: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    device: str = "auto",
    overwrite: bool = False,
    quiet: bool = False,
    augment: int = 0,
    augment_config: Any = None,
    seed: int = 0,
    shard: tuple[int, int] | None = None,
    decode: str | None = None,
    command: str | None = None,
) -> ExtractResult:
    """Extract `layers` of `backbone` for every image under `data_dir` into a feature store.

    Layers already in the store are reused; new ones are added in one pass. An interrupted run
    resumes where it stopped. `engine` runs the network: eager PyTorch, `compile`
    (torch.compile) or `openvino`; `auto` picks by measured speed and run length.
    `precision="int8"` runs OpenVINO's post-training quantization, calibrated on up to 300
    training images of the dataset chosen with `seed`, with the layers that cost most kept in
    fp32 until those images' features keep cosine >= 0.99 to fp32.
    `augment` > 0 adds that many augmented views of each training
    image (`augment_config`: a `featx.data.augment.AugmentConfig`, classic Keras ranges by
    default).

    `shard=(i, n)` computes only shard i (0-based) of n contiguous slices of the rows into
    `<store stem>.shard-IofN.h5` next to `store`; `featx.merge` joins the shards.

    `decode` is "reduced" (large JPEGs decoded at a reduced size, see `Preprocessing.decode`)
    or "full"; None keeps an existing store's decoding (full for a store that predates the
    choice) and is "reduced" for a new one. The decoding is part of the store's preprocessing.
    """
    for name, value, choices in (
        ("pool", pool, POOLS),
        ("dtype", dtype, DTYPES),
        ("compression", compression, COMPRESSIONS),
        ("precision", precision, INFERENCE_PRECISIONS),
        ("engine", engine, ("auto", *ENGINES)),
        ("decode", decode or "full", DECODE_POLICIES),
    ):
        check_choice(name, value, choices)
    if not layers:
        raise UsageError("give at least one --layer; `featx layers BACKBONE` lists them.")
    check_range("batch-size", batch_size, 1)
    check_range("image-size", image_size, 16)
    check_range("augment", augment, 0)
    check_range("workers", workers, 0)
    record = get_backbone(backbone)
    folder = open_dataset(data_dir)
    preprocessing = record.default_preprocessing(weights)
    if image_size:
        preprocessing = preprocessing.with_image_size(image_size)
    augmenter, augment_meta = _augmentation(augment, augment_config, seed)
    work = _Work.plan(folder, augment, check_shard(shard) if shard else None)
    store = Path(store) if store else default_store_path(data_dir, backbone, weights, image_size)
    if shard:
        store = shard_store_path(store, shard)
    with disk_errors(store.parent):
        store.parent.mkdir(parents=True, exist_ok=True)
    given, store = store, Path(os.path.realpath(store))  # lock and write a link's target
    log = (lambda *_: None) if quiet else (lambda text: print(text, file=sys.stderr))
    command = command or " ".join(sys.argv)

    with write_lock(store):
        existing = None
        if store.exists() and overwrite:
            log(f"--overwrite: {store} will be replaced when this run finishes.")
        elif store.exists():
            existing = FeatureStore(store)
            remove_finished_partial(store, set(existing.layers), log)
        if decode is None:
            stored = existing.meta["preprocessing"] if existing else {"decode": "reduced"}
            decode = stored.get("decode", "full")  # a store from before the choice: full
        preprocessing = preprocessing.with_decode(decode)
        wanted = _identity(record, weights, preprocessing, folder, augment_meta, work.shard)
        if existing is not None:
            differences = _differences(existing.meta, wanted, folder, existing)
            if differences:
                existing.close()
                raise UsageError(
                    f"store {store} was made differently: {'; '.join(differences)}. "
                    "Use --overwrite to replace it, or --store to write another file."
                )
        try:
            names = [record.layer_name(record.module_path(n)) for n in layers]
            keys = [layer_key(n, pool) for n in names]
            present = set(existing.layers) if existing else set()
            for key in keys:
                stored = existing.layer(key).dtype if key in present else dtype
                if stored != dtype:
                    raise UsageError(
                        f"layer {key} is stored as {stored} in {store}, not {dtype}; ask for "
                        f"--dtype {stored}, or use --overwrite to rebuild the store."
                    )
            if existing and all(k in present for k in keys):
                log(f"All requested layers are already in {store}; nothing to compute.")
                return ExtractResult(
                    given, reused=keys, n_rows=existing.n_rows, skipped=existing.skipped
                )
            settings = _Settings(
                weights=weights,
                pool=pool,
                dtype=dtype,
                compression=compression,
                precision=precision,
                engine=engine,
                batch_size=batch_size,
                workers=default_workers() if workers is None else workers,
                device=inference_device(device, precision, engine),
                seed=seed,
                quiet=quiet,
                command=command,
                augmenter=augmenter,
                augment_meta=augment_meta,
            )
            result = _compute(
                record, folder, work, store, existing, layers, preprocessing, wanted, settings, log
            )
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


def _calibration(folder: ImageFolder, preprocessing: Preprocessing, seed: int) -> Calibration:
    """int8's calibration images: up to CALIBRATION_IMAGES of the training images (of all the
    images when there is no train split), chosen with `seed`, preprocessed as extraction does,
    without augmentation. Shards of one dataset choose the same images."""
    from featx.extraction.engines import CALIBRATION_IMAGES, Calibration

    train = [i for i, f in enumerate(folder.files) if f.split in AUGMENTED_SPLITS]
    candidates = train or list(range(len(folder.files)))
    n = min(len(candidates), CALIBRATION_IMAGES)
    chosen = np.random.default_rng(seed).choice(candidates, size=n, replace=False)
    images = _Images(folder, [(int(i), 0) for i in np.sort(chosen)], preprocessing)

    def batches():
        import torch

        for begin in range(0, len(images), 32):
            tensors = [images[i][1] for i in range(begin, min(begin + 32, len(images)))]
            tensors = [x for x in tensors if x is not None]  # unreadable files
            if tensors:
                yield torch.stack(tensors)

    identity = json.dumps(
        [folder.fingerprint, preprocessing.to_dict(), seed, n], sort_keys=True, default=str
    )
    return Calibration(batches, n, seed, hashlib.sha256(identity.encode()).hexdigest()[:16])


def _augmentation(views: int, config: Any, seed: int):
    if not views:
        return None, None
    from featx.data.augment import AugmentConfig, Augmenter

    config = config or AugmentConfig()
    return _ViewAugmenter(Augmenter(config), seed), {
        "views": views,
        "seed": seed,
        "config": config.to_dict(),
    }


@dataclass(frozen=True)
class _ViewAugmenter:
    """Augments view `view` of file `file_index` the same way in every run and worker."""

    augmenter: Any
    seed: int

    def __call__(self, image: Image.Image, file_index: int, view: int) -> Image.Image:
        from featx.data.augment import view_seed

        return self.augmenter(image, view_seed(self.seed, file_index, view))


@dataclass(frozen=True)
class _Settings:
    """How one extraction computes and stores features, as the user asked."""

    weights: str
    pool: str
    dtype: str
    compression: str
    precision: str
    engine: str  # as asked: auto, eager, compile or openvino
    batch_size: int | None  # None: chosen for the network and device
    workers: int
    device: torch.device
    seed: int  # augmentation's and int8 calibration's
    quiet: bool
    command: str
    augmenter: Any
    augment_meta: dict | None


@dataclass
class _Job:
    """One extraction pass once the network is loaded: what to compute and how to save it."""

    store: Path
    existing: FeatureStore | None
    folder: ImageFolder
    work: _Work
    partial: Partial
    todo: list  # LayerInfo of the layers to compute
    keys: list[str]
    loaded: LoadedBackbone
    preprocessing: Preprocessing
    settings: _Settings
    batch_size: int  # the interrupted run's, when resuming
    chunk_items: int
    engine: str  # resolved: eager, compile or openvino
    engine_key: str  # names the engine's cached conversion
    calibration: Calibration | None = None  # int8's
    engine_text: str = ""  # what ran, as the engine describes itself
    engine_quality: dict[str, float] | None = None  # int8's cosine to fp32 (Engine.quality)

    def calibration_record(self) -> dict[str, Any]:
        """What the store records of int8's calibration (empty for other precisions)."""
        c = self.calibration
        if c is None:
            return {}
        return {
            "images": c.n_images,
            "seed": c.seed,
            "identity": c.identity,
            "engine_key": self.engine_key,  # predict runs this cached quantized model
            **(self.engine_quality or {}),
        }


def _upgraded_run(before: dict[str, Any]) -> dict[str, Any]:
    """An interrupted run's run.json as this version records it: one written before the
    decode policy was recorded decoded every image at full size."""
    preprocessing = before.get("identity", {}).get("preprocessing")
    if isinstance(preprocessing, dict):
        preprocessing.setdefault("decode", "full")
    return before


def _compute(
    record: Backbone,
    folder: ImageFolder,
    work: _Work,
    store: Path,
    existing: FeatureStore | None,
    layers: Sequence[str],
    preprocessing: Preprocessing,
    wanted: dict[str, Any],
    settings: _Settings,
    log,
) -> ExtractResult:
    from featx.backbones.layers import (
        MAX_BATCH,
        batch_size_for_memory,
        check_poolable,
        default_batch_size,
        pooled_shape,
        resolve_layers,
        trace_layers,
    )
    from featx.extraction.engines import cache_key, resolve_engine

    pool, dtype, batch_size = settings.pool, settings.dtype, settings.batch_size
    # Layers are traced on the weightless skeleton; only what they run is then loaded.
    skeleton = record.skeleton(settings.weights)
    fitting = batch_size_for_memory(  # before the full-size trace: it refuses what cannot fit
        record, skeleton, preprocessing.input_size, batch_size or MAX_BATCH, available_memory()
    )
    traced = trace_layers(record, skeleton, preprocessing.input_size)
    infos = resolve_layers(record, traced, list(layers))
    check_poolable(skeleton, infos, pool)
    present = set(existing.layers) if existing else set()
    todo = [i for i in infos if layer_key(i.name, pool) not in present]
    keys = [layer_key(i.name, pool) for i in todo]
    why_batch = ""
    if batch_size is None:
        batch_size, why_batch = default_batch_size(
            traced, [i.module for i in todo], preprocessing.input_size, settings.device
        )
    del skeleton
    loaded = record.load(settings.weights, [i.module for i in todo], preprocessing.input_size)
    if existing is not None and existing.meta["weights_sha256"] != loaded.weights_sha256:
        raise UsageError(
            f"the {loaded.weights} weights now hash to {loaded.weights_sha256[:16]}, but store "
            f"{store} was made with {existing.meta['weights_sha256'][:16]}; use --overwrite."
        )
    if fitting < batch_size:
        log(f"Lowering the batch size from {batch_size} to {fitting} so its activations fit.")
        batch_size = fitting

    row_bytes = sum(math.prod(pooled_shape(i.shape, pool)) for i in todo) * np.dtype(dtype).itemsize
    per_chunk = max(1, CHUNK_BYTES // max(1, row_bytes * batch_size))
    calibration = (
        _calibration(folder, preprocessing, settings.seed) if settings.precision == "int8" else None
    )
    key = cache_key(
        loaded.name,
        loaded.weights_sha256,
        [i.module for i in todo],
        pool,
        preprocessing.input_size,
        settings.precision,
        "extract",
        calibration.key() if calibration else "",
    )
    engine, why = resolve_engine(
        settings.engine,
        settings.device,
        settings.precision,
        len(work.items),
        key,
        flops=max((i.flops for i in todo), default=0),
    )
    run = {
        "identity": wanted,
        "weights_sha256": loaded.weights_sha256,
        "modules": [i.module for i in todo],
        "keys": keys,
        "pool": pool,
        "dtype": dtype,
        "precision": settings.precision,
        **({"calibration": calibration.identity} if calibration else {}),
        "device": settings.device.type,  # devices differ in the last bits: never mix them
        "n_items": len(work.items),
        "engine": engine,
        "batch_size": batch_size,
        "chunk_items": batch_size * per_chunk,
    }
    partial = Partial(store, run, log, upgrade=_upgraded_run)
    chunk_items = partial.run["chunk_items"]
    if partial.run["batch_size"] != batch_size:
        batch_size = partial.run["batch_size"]
        log(f"Resuming with the interrupted run's batch size, {batch_size}, for identical values.")
    elif why_batch:
        log(f"Batch size {batch_size} ({why_batch}).")
    if partial.run.get("engine", engine) != engine:
        engine, why = partial.run["engine"], "the interrupted run's engine, for identical values"
    n_chunks = math.ceil(len(work.items) / chunk_items)
    first = partial.done()
    start = min(first * chunk_items, len(work.items))
    if first:
        log(f"Resuming {store}: {start} of {len(work.items)} images already done.")
    job = _Job(
        store=store,
        existing=existing,
        folder=folder,
        work=work,
        partial=partial,
        todo=todo,
        keys=keys,
        loaded=loaded,
        preprocessing=preprocessing,
        settings=settings,
        batch_size=batch_size,
        chunk_items=chunk_items,
        engine=engine,
        engine_key=key,
        calibration=calibration,
    )
    if first < n_chunks:
        log(f"Engine: {engine}" + (f" ({why})." if why else "."))
        _run_network(job, start)
    result = _assemble(job, n_chunks)
    result.resumed_from = start
    partial.remove()
    log(f"Wrote {len(keys)} layer(s) for {result.n_rows} rows to {store}.")
    return result


def _run_network(job: _Job, start: int) -> None:
    """Compute the chunks from work item `start` on, saving each as it completes."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from featx.backbones.layers import pooled_shape, prepare_tap
    from featx.extraction.engines import INT8_COSINE, build_engine, is_cached

    modules = [i.module for i in job.todo]
    device, size = job.settings.device, job.preprocessing.input_size
    tap = prepare_tap(job.loaded.model, modules, job.settings.pool, device, size)
    images = _Images(job.folder, job.work.items, job.preprocessing, job.settings.augmenter)
    loader = DataLoader(
        images,
        batch_sampler=_Batches(start, len(job.work.items), job.batch_size, job.chunk_items),
        num_workers=job.settings.workers,
        collate_fn=_collate,
        pin_memory=job.settings.device.type == "cuda",
        prefetch_factor=4 if job.settings.workers else None,
        persistent_workers=False,
    )
    # The decoding workers fork here, before an engine starts its own thread pool (OpenVINO's
    # does not survive a fork beside it).
    batches = iter(loader)
    if job.calibration and not is_cached(job.engine, job.engine_key) and not job.settings.quiet:
        print(
            f"Quantizing to int8 on {job.calibration.n_images} calibration images (once on "
            "this machine: the quantized model is cached).",
            file=sys.stderr,
        )
    engine = build_engine(
        tap,
        job.engine,
        device,
        job.settings.precision,
        example=torch.zeros(job.batch_size, 3, size, size),
        key=job.engine_key,
        calibration=job.calibration,
    )
    if engine.fallback_reason and not job.settings.quiet:
        print(f"Engine: {engine.describe()}.", file=sys.stderr)
    job.engine_text, job.engine_quality = engine.describe(), engine.quality
    if engine.quality and engine.quality["cosine_min"] < INT8_COSINE and not job.settings.quiet:
        print(
            f"Warning: int8 features are below cosine {INT8_COSINE} to fp32 on some calibration "
            f"images (min {engine.quality['cosine_min']:.4f}, median "
            f"{engine.quality['cosine_median']:.4f}); compare with an fp32 store before relying "
            "on them.",
            file=sys.stderr,
        )
    writer = ChunkWriter(job.partial)
    writer.start()

    def new_chunk() -> list[np.ndarray]:
        return [
            np.empty(
                (job.chunk_items, *pooled_shape(i.shape, job.settings.pool)), job.settings.dtype
            )
            for i in job.todo
        ]

    arrays, filled = new_chunk(), 0
    index: list[int] = []
    bad: list[tuple[int, str]] = []
    chunk = start // job.chunk_items
    bar = tqdm(
        total=len(job.work.items),
        initial=start,
        unit="img",
        disable=job.settings.quiet,
        smoothing=0.1,
        desc="extract",
        file=sys.stderr,
    )
    done = start
    try:
        with torch.inference_mode():
            for batch_index, batch, batch_bad in batches:
                bad.extend(batch_bad)
                if batch is not None:
                    outputs = engine(batch)
                    for array, info in zip(arrays, job.todo, strict=True):
                        array[filled : filled + len(batch)] = outputs[info.module].float().cpu()
                    filled += len(batch)
                    index.extend(batch_index)
                done += len(batch_index) + len(batch_bad)
                bar.update(len(batch_index) + len(batch_bad))
                if done % job.chunk_items == 0 or done == len(job.work.items):
                    layers = [array[:filled] for array in arrays]
                    writer.put(chunk, np.array(index, dtype=np.int64), bad, layers)
                    arrays, filled, index, bad = new_chunk(), 0, [], []
                    chunk += 1
    except KeyboardInterrupt:
        bar.close()
        with contextlib.suppress(BaseException):
            writer.finish()
        raise Interrupted(
            f"interrupted after {job.partial.done() * job.chunk_items} of {len(job.work.items)} "
            "images were saved; run the same command again to resume."
        ) from None
    bar.close()
    writer.finish()


def _assemble(job: _Job, n_chunks: int) -> ExtractResult:
    """Write the complete store to a temporary file and rename it over STORE."""
    from featx.backbones.layers import pooled_shape

    sources, views, skipped = _decoded_rows(job, n_chunks)
    files, rows = _columns(job.folder, sources, views)
    tmp = job.store.with_name(f".{job.store.name}.{os.getpid()}.tmp")
    for stale in job.store.parent.glob(f".{glob.escape(job.store.name)}.*.tmp"):
        stale.unlink(missing_ok=True)  # left by a run killed while assembling; we hold the lock
    try:
        with (
            disk_errors(job.store),
            write_store(
                tmp,
                _store_meta(job),
                list(job.folder.class_names),
                files=files,
                rows=rows,
                skipped=job.existing.skipped if job.existing is not None else skipped,
            ) as out,
        ):
            if job.existing is not None:
                for key in job.existing.layers:
                    job.existing.copy_layer(key, out)
            for i, (info, key) in enumerate(zip(job.todo, job.keys, strict=True)):
                add_layer(
                    out,
                    key,
                    len(sources),
                    pooled_shape(info.shape, job.settings.pool),
                    job.settings.dtype,
                    job.settings.compression,
                    {
                        "layer": info.name,
                        "module": info.module,
                        "pool": job.settings.pool,
                        "precision": job.settings.precision,
                        "engine": job.engine,
                        "batch_size": job.batch_size,
                        **{f"calibration_{k}": v for k, v in job.calibration_record().items()},
                    },
                    (job.partial.load(k)[f"layer{i}"] for k in range(n_chunks)),
                )
            out.flush()
            os.fsync(out.id.get_vfd_handle())
        if job.store.exists():
            os.chmod(tmp, job.store.stat().st_mode & 0o7777)  # a read-only store stays so
        os.replace(tmp, job.store)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    reused = [
        k for k in (job.existing.layers if job.existing is not None else []) if k not in job.keys
    ]
    return ExtractResult(
        job.store, computed=job.keys, reused=reused, n_rows=len(sources), skipped=skipped
    )


def _decoded_rows(job: _Job, n_chunks: int) -> tuple[np.ndarray, np.ndarray, list]:
    """(source file index, view) of every row the chunks hold, in order, and the skipped
    files with their reasons; UsageError if they differ from the rows of the store extended."""
    index_parts, bad = [], []
    for k in range(n_chunks):
        with np.load(job.partial.chunk_path(k)) as data:
            index_parts.append(data["index"])
            bad.extend(zip(data["bad_index"].tolist(), data["bad_reason"].tolist(), strict=True))
    index = np.concatenate(index_parts) if index_parts else np.zeros(0, np.int64)
    items = np.array(job.work.items, dtype=np.int64).reshape(-1, 2)[index]
    sources, views = items[:, 0], items[:, 1]
    if job.existing is not None and not (
        np.array_equal(job.existing.sources(), sources)
        and np.array_equal(job.existing.views(), views)
    ):
        raise UsageError(
            f"this pass decoded a different set of images than store {job.store} holds; "
            "use --overwrite to rebuild it."
        )
    skipped, seen = list(job.folder.skipped), set()
    for i, reason in bad:
        file_index = job.work.items[i][0]
        if file_index not in seen:
            seen.add(file_index)
            skipped.append((job.folder.files[file_index].path, reason))
    return sources, views, skipped


def _columns(
    folder: ImageFolder, sources: np.ndarray, views: np.ndarray
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The store's /files and /rows columns."""
    files = folder.files
    return {
        "path": np.array([f.path for f in files], dtype=object),
        "label": np.array([f.label for f in files], dtype=np.int32),
        "split": np.array([f.split for f in files], dtype=object),
        "size": np.array([f.size for f in files], dtype=np.int64),
        "mtime_ns": np.array([f.mtime_ns for f in files], dtype=np.int64),
    }, {
        "path": np.array([files[s].path for s in sources], dtype=object),
        "label": np.array([files[s].label for s in sources], dtype=np.int32),
        "split": np.array([files[s].split for s in sources], dtype=object),
        "source": sources,
        "view": views.astype(np.int32),
        **{f"meta/{name}": np.array(values)[sources] for name, values in folder.meta.items()},
    }


def _store_meta(job: _Job) -> dict[str, Any]:
    """The store's provenance: the existing store's, or a new one, with this run added to
    its history."""
    created = now()
    meta = (
        job.existing.meta
        if job.existing is not None
        else {
            "backbone": job.loaded.name,
            "weights": job.loaded.weights,
            "weights_spec": job.loaded.weights_spec,
            "weights_sha256": job.loaded.weights_sha256,
            "preprocessing": job.preprocessing.to_dict(),
            "preprocessing_text": job.preprocessing.describe(),
            "dataset": {
                "root": str(job.folder.root.resolve()),
                "fingerprint": job.folder.fingerprint,
                "n_files": len(job.folder.files),
            },
            "augment": job.settings.augment_meta,
            **({"shard": job.work.shard} if job.work.shard else {}),
            "created": created,
            "history": [],
        }
    )
    return {
        **meta,
        "versions": library_versions(),
        "history": [
            *meta.get("history", []),
            {
                "time": created,
                "command": job.settings.command,
                "layers": job.keys,
                "engine": job.engine_text or job.engine,
                "precision": job.settings.precision,
                "batch_size": job.batch_size,
                **({"calibration": job.calibration_record()} if job.calibration else {}),
            },
        ],
    }
