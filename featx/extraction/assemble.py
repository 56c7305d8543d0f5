"""The store written from an extraction's saved chunks: into a temporary file, renamed over
STORE when complete, so the store on disk is always the previous complete one or the new one."""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import numpy as np

from featx.data.folders import ImageFolder
from featx.errors import EXIT_SKIPPED, FeatxError, UsageError
from featx.extraction.job import Job
from featx.runtime import disk_errors, library_versions, now
from featx.store.feature_store import add_layer, write_store

__all__ = ["NothingRead", "assemble"]


class NothingRead(FeatxError):
    """No URL of a manifest of URLs could be read (a wrong host, no network, no credentials):
    no store is written. (A folder whose every file is broken gives an empty store.)"""

    exit_code = EXIT_SKIPPED


def assemble(job: Job, n_chunks: int) -> tuple[int, list[tuple[str, str]]]:
    """Write the complete store to a temporary file and rename it over STORE. Returns the
    number of rows and the skipped files."""
    sources, views, skipped = _decoded_rows(job, n_chunks)
    if not len(sources) and skipped and job.existing is None and job.work.shard is None:
        _check_some_url_read(job, skipped)
    files, rows = _columns(job.folder, sources, views, job.work.shard)
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
            _add_layers(job, out, len(sources), n_chunks)
            out.flush()
            os.fsync(out.id.get_vfd_handle())
        if job.store.exists():
            os.chmod(tmp, job.store.stat().st_mode & 0o7777)  # a read-only store stays so
        os.replace(tmp, job.store)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(sources), skipped


def _check_some_url_read(job: Job, skipped: list[tuple[str, str]]) -> None:
    """NothingRead when every row is a URL and none could be read."""
    if all("://" in where for where, _ in skipped):
        job.partial.remove()  # a re-run reads every URL again
        where, reason = skipped[0]
        raise NothingRead(
            f"none of the {len(skipped)} images of {job.folder.root} could be read "
            f"(the first, {where}: {reason}); no store was written."
        )


def _engine_ranges(job: Job, n_chunks: int) -> list[list]:
    """[[engine, first row, row after the last], ...]: which engine computed which rows of
    this pass, from the names saved with each chunk ("unknown" where a chunk has none)."""
    ranges: list[list] = []
    row = 0
    for k in range(n_chunks):
        chunk = job.partial.load(k)
        n = len(chunk["index"])
        names = job.engine_rows(chunk)
        for name in names.tolist() if names is not None else ["unknown"] * n:
            if ranges and ranges[-1][0] == name:
                ranges[-1][2] += 1
            else:
                ranges.append([name, row, row + 1])
            row += 1
    return ranges


def _add_layers(job: Job, out, n_rows: int, n_chunks: int) -> None:
    from featx.backbones.layers import pooled_shape

    s = job.settings
    ranges = _engine_ranges(job, n_chunks)
    engines = list(dict.fromkeys(name for name, _, _ in ranges)) or [job.engine]
    for i, (info, key) in enumerate(zip(job.todo, job.keys, strict=True)):
        add_layer(
            out,
            key,
            n_rows,
            pooled_shape(info.shape, s.pool),
            s.dtype,
            s.compression,
            {
                "layer": info.name,
                "module": info.module,
                "pool": s.pool,
                "precision": s.precision,
                "engine": ", ".join(engines),
                "engine_rows": json.dumps(ranges),
                "batch_size": job.batch_size,
                **{f"calibration_{k}": v for k, v in job.calibration_record().items()},
            },
            (job.partial.load(k)[f"layer{i}"] for k in range(n_chunks)),
        )


def _decoded_rows(job: Job, n_chunks: int) -> tuple[np.ndarray, np.ndarray, list]:
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
    folder: ImageFolder, sources: np.ndarray, views: np.ndarray, shard: dict | None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The store's /files and /rows columns. A shard's /files holds its own files only; its
    rows' sources index the whole dataset's files, as in the merged store."""
    first, n = (shard["first_file"], shard["n_files"]) if shard else (0, len(folder.files))
    files = folder.files[first : first + n]
    own = [files[s - first] for s in sources.tolist()]
    return {
        "path": np.array([f.path for f in files], dtype=object),
        "label": np.array([f.label for f in files], dtype=np.int32),
        "split": np.array([f.split for f in files], dtype=object),
        "size": np.array([f.size for f in files], dtype=np.int64),
        "mtime_ns": np.array([f.mtime_ns for f in files], dtype=np.int64),
    }, {
        "path": np.array([f.path for f in own], dtype=object),
        "label": np.array([f.label for f in own], dtype=np.int32),
        "split": np.array([f.split for f in own], dtype=object),
        "source": sources,
        "view": views.astype(np.int32),
        **{f"meta/{name}": np.array(values)[sources] for name, values in folder.meta.items()},
    }


def _store_meta(job: Job) -> dict[str, Any]:
    """The store's provenance: the existing store's, or a new one, with this run added to
    its history."""
    created = now()
    meta = job.existing.meta if job.existing is not None else _new_meta(job, created)
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
                **({"engine_choice": job.engine_choice} if job.engine_choice else {}),
                "precision": job.settings.precision,
                "batch_size": job.batch_size,
                **({"calibration": job.calibration_record()} if job.calibration else {}),
            },
        ],
    }


def _new_meta(job: Job, created: str) -> dict[str, Any]:
    return {
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
        "augment": job.augment_meta,
        **({"shard": job.work.shard} if job.work.shard else {}),
        "created": created,
        "history": [],
    }
