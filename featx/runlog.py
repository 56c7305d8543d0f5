"""The experiment log kept next to a feature store: one SQLite row per fit, probed layer,
fine-tune or evaluation, read back as `Run`s for `featx runs` (a text leaderboard) and
`featx report`.

For a store `x.h5` the log is `x.h5.runs.sqlite`. Several processes may append at once: the
database is in WAL mode with a short busy timeout, and every record is one short transaction
that is committed before `record_run` returns, so a killed process loses at most the record it
was writing.

A log problem never costs the run it records: a log that cannot be written (read-only, locked
by another process for longer than the busy timeout, a full disk, a folder in its place, an
SQLite file that featx did not create) is named in one warning line on stderr and the run goes
unrecorded; a file featx did not create is never changed. Reading skips rows that do not have
the documented types, with one warning line per log.

Columns: time (ISO 8601 with offset), kind, store (absolute path), host, pid, featx version,
settings / scores / details (JSON objects), model_path, command, and the store's provenance
`meta` as it was when the run was recorded (JSON, NULL when the store could not be read).

Conventional keys: settings has "layer", "classifier" and "params" (a dict); scores has
"validation" and/or "test", each a dict of scalar metrics ("accuracy", "macro_f1", ...).

A `probe` run is one layer of a `featx probe` call: its classifier is `probe-<protocol>`, its
params the chosen C or k, and settings["probe"] holds the protocol, the layer's depth, every
probed layer in network order, the call's start time and id, and whether this layer was the
best.
Logs written before the `probe` kind existed hold these records as kind `fit`; they are read
back as `probe` runs.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from featx import __version__
from featx.errors import UsageError

__all__ = [
    "KINDS",
    "LOG_SUFFIX",
    "SCHEMA_VERSION",
    "Run",
    "find_logs",
    "log_path",
    "ranked",
    "read_runs",
    "record_run",
]

LOG_SUFFIX = ".runs.sqlite"
SCHEMA_VERSION = 1
APPLICATION_ID = 0x66785247  # "fxRG" in the SQLite header: this file is a featx run log
KINDS = ("fit", "probe", "finetune", "evaluate")
# How long a record waits for another process's transaction; past it the run goes unrecorded.
BUSY_TIMEOUT_S = 5.0
# Per-split entries of a full classification_metrics() dict that belong in details, not scores.
LARGE_METRICS = ("per_class", "confusion_matrix", "class_names")

_SCHEMA = """
CREATE TABLE runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    kind TEXT NOT NULL,
    store TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    featx_version TEXT NOT NULL,
    settings TEXT NOT NULL,
    scores TEXT NOT NULL,
    details TEXT NOT NULL,
    model_path TEXT,
    command TEXT,
    meta TEXT
)
"""
_COLUMNS = (
    "id", "time", "kind", "store", "host", "pid", "featx_version", "settings", "scores",
    "details", "model_path", "command", "meta",
)  # fmt: skip


def log_path(store: str | os.PathLike[str]) -> Path:
    """The run log of a store: `x.h5` -> `x.h5.runs.sqlite`, in the same folder."""
    store = Path(store)
    return store.with_name(store.name + LOG_SUFFIX)


@dataclass(frozen=True)
class Run:
    """One logged fit, probed layer, fine-tune or evaluation."""

    id: int
    time: str
    kind: str
    store: Path
    settings: dict[str, Any]
    scores: dict[str, Any]
    details: dict[str, Any]
    model_path: str | None
    command: str | None
    meta: dict[str, Any] | None
    host: str = ""
    pid: int = 0
    featx_version: str = ""
    log: Path = field(default_factory=Path)

    def metric(self, split: str, name: str) -> float | None:
        """A scalar score of a split ("validation" or "test"), None when absent or not a
        finite number."""
        scores = self.scores.get(split)
        value = scores.get(name) if isinstance(scores, dict) else None
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return float(value) if math.isfinite(value) else None

    @property
    def best_score(self) -> float | None:
        """What the leaderboard sorts by: validation accuracy, else test accuracy."""
        value = self.metric("validation", "accuracy")
        return value if value is not None else self.metric("test", "accuracy")

    @property
    def macro_f1(self) -> float | None:
        """Macro F1 of the split that `best_score` comes from."""
        split = "validation" if self.metric("validation", "accuracy") is not None else "test"
        return self.metric(split, "macro_f1")

    @property
    def layer(self) -> str:
        return str(self.settings.get("layer") or "-")

    @property
    def classifier(self) -> str:
        return str(self.settings.get("classifier") or self.settings.get("backbone") or "-")

    @property
    def params(self) -> dict[str, Any]:
        """The key parameters: settings["params"], else every setting other than layer and
        classifier."""
        params = self.settings.get("params")
        if isinstance(params, dict):
            return params
        return {
            k: v for k, v in self.settings.items() if k not in ("layer", "classifier", "params")
        }

    @property
    def key(self) -> str:
        """An identifier unique across logs: `<log file stem>-<id>`."""
        return f"{self.log.name.removesuffix(LOG_SUFFIX)}-{self.id}"


def _jsonable(value: Any) -> Any:
    """json.dumps fallback: numpy scalars and arrays, paths, anything else as text."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, set | tuple):
        return list(value)
    return str(value)


def _dumps(value: Any) -> str:
    return json.dumps(value, default=_jsonable)


def _store_meta(store: Path) -> str | None:
    """The store's provenance JSON text, or None when the store cannot be read (missing, not
    HDF5, no meta attribute, locked by a writer): a run is logged regardless."""
    import h5py

    try:
        with h5py.File(store, "r") as f:
            meta = f.attrs["meta"]
        text = meta.decode() if isinstance(meta, bytes) else str(meta)
        json.loads(text)
        return text
    except Exception:
        return None


def _split_scores(
    scores: dict[str, Any], details: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Move the per-class table and confusion matrix of a full metrics dict out of scores
    into details[split], so scores stay small and the report still finds them."""
    small: dict[str, Any] = {}
    details = dict(details)
    for split, metrics in scores.items():
        if isinstance(metrics, dict) and any(k in metrics for k in LARGE_METRICS):
            small[split] = {k: v for k, v in metrics.items() if k not in LARGE_METRICS}
            moved = {k: metrics[k] for k in LARGE_METRICS if k in metrics}
            details[split] = {**moved, **(details.get(split) or {})}
        else:
            small[split] = metrics
    return small, details


class _NotOurs(UsageError):
    """The file is an SQLite database that featx did not create."""


def _refuse_newer(path: Path, version: int) -> None:
    if version > SCHEMA_VERSION:
        raise UsageError(
            f"{path} was written by a newer featx (run-log schema {version}, this featx reads "
            f"up to {SCHEMA_VERSION}); upgrade featx to read or append to it."
        )


def _is_ours(conn: sqlite3.Connection, path: Path) -> bool:
    """True for a featx run log, False for an empty database (a new log); _NotOurs for any
    other SQLite file. Only reads."""
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if app_id == 0 and version == 0 and not tables:
        return False
    if app_id in (0, APPLICATION_ID):
        _refuse_newer(path, version)
        columns = {r[1] for r in conn.execute("PRAGMA table_info(runs)")}
        if version == SCHEMA_VERSION and columns == set(_COLUMNS):
            return True
    raise _NotOurs(f"{path} is an SQLite file that featx did not write, not a featx run log.")


def _reason(error: BaseException, path: Path) -> str:
    """Why a run log could not be used, as a clause."""
    text = str(error).lower()
    if isinstance(error, UsageError):
        return str(error).rstrip(".")
    if "locked" in text or "busy" in text:
        return f"{path} is locked by another process (waited {BUSY_TIMEOUT_S:g} s)"
    writable = os.access(path.parent, os.W_OK) and (not path.exists() or os.access(path, os.W_OK))
    if "readonly" in text or "read-only" in text or not writable:
        return f"{path} is read-only"
    if "disk is full" in text or "no space" in text:
        return f"the disk holding {path} is full"
    if "not a database" in text or "malformed" in text:
        return f"{path} is not a featx run log (not a readable SQLite file)"
    return f"cannot use the run log {path} ({text.splitlines()[0] if text else 'unknown'})"


@contextmanager
def _connect(path: Path, *, write: bool) -> Iterator[sqlite3.Connection]:
    """A connection in autocommit mode (transactions are explicit) with a short busy timeout:
    read-write and creating the file for `write`, else read-only. Errors become UsageError."""
    if path.is_dir():
        raise UsageError(f"{path} is a folder, not a featx run log.")
    if not write and not path.is_file():
        raise UsageError(f"{path} does not exist.")
    query = "mode=rwc" if write else "mode=ro"
    if not write and not os.access(path.parent, os.W_OK):
        query += "&immutable=1"  # a read-only folder: nothing can change the file meanwhile
    conn = None
    try:
        conn = sqlite3.connect(
            f"{path.resolve().as_uri()}?{query}",
            uri=True,
            timeout=BUSY_TIMEOUT_S,
            isolation_level=None,
        )
        yield conn
    except sqlite3.Error as e:
        raise UsageError(_reason(e, path) + ".") from None
    finally:
        if conn is not None:
            conn.close()


def _use_wal(conn: sqlite3.Connection) -> None:
    # Switching to WAL needs a moment without other connections; when several processes create
    # the log together the switch can be refused (the pragma then reports the old mode).
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while conn.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
        if time.monotonic() > deadline:
            raise sqlite3.OperationalError("database is locked")
        time.sleep(0.05)


def _create_schema(conn: sqlite3.Connection, path: Path) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        if not _is_ours(conn, path):  # another process may have created it meanwhile
            conn.execute(_SCHEMA)
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _append(path: Path, row: tuple[Any, ...]) -> int:
    with _connect(path, write=True) as conn:
        if not _is_ours(conn, path):
            _create_schema(conn, path)
        _use_wal(conn)
        with conn:  # commits the transaction before returning, rolls it back on an error
            conn.execute("BEGIN IMMEDIATE")
            cursor = conn.execute(
                f"INSERT INTO runs ({', '.join(_COLUMNS[1:])}) VALUES "
                f"({', '.join('?' * len(_COLUMNS[1:]))})",
                row,
            )
        return int(cursor.lastrowid)


_UNUSABLE: dict[Path, str] = {}  # logs that failed in this process: not tried again


def _warn(text: str) -> None:
    print("warning: " + text.replace("\n", "\\n"), file=sys.stderr, flush=True)


def record_run(
    store: str | os.PathLike[str],
    kind: str,
    *,
    settings: dict[str, Any],
    scores: dict[str, Any],
    details: dict[str, Any] | None = None,
    model_path: str | None = None,
    command: str | None = None,
) -> int | None:
    """Append one run to the store's log (created if needed) and return its id, or None when
    the log cannot be written: one warning line says why, and later records for the same log
    in this process are skipped without waiting again.

    `scores` may hold full `classification_metrics` dicts per split: their per-class table,
    confusion matrix and class names are kept in `details[split]` instead.
    """
    if kind not in KINDS:
        raise UsageError(f"A run's kind must be one of {', '.join(KINDS)}, not {kind!r}.")
    store = Path(store).resolve()
    path = log_path(store)
    if path in _UNUSABLE:
        return None
    scores, details = _split_scores(scores, details or {})
    row = (
        datetime.now().astimezone().isoformat(timespec="seconds"),
        kind,
        str(store),
        socket.gethostname(),
        os.getpid(),
        __version__,
        _dumps(settings),
        _dumps(scores),
        _dumps(details),
        None if model_path is None else os.fspath(model_path),
        command,
        _store_meta(store),
    )
    try:
        return _append(path, row)
    except (UsageError, sqlite3.Error, OSError) as e:
        _UNUSABLE[path] = reason = _reason(e, path)
        _warn(f"the {kind} run was not recorded: {reason}.")
        return None


def _loads(text: Any, *, optional: bool = False) -> dict[str, Any] | None:
    """A JSON object column; ValueError for anything else (NULL only when `optional`)."""
    if text is None and optional:
        return None
    if not isinstance(text, str):
        raise ValueError("not text")
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("not an object")
    return value


def _kind(kind: str, settings: dict[str, Any]) -> str:
    """The logged kind, with a probed layer that an older featx logged as a fit read as `probe`."""
    classifier = settings.get("classifier")
    if kind == "fit" and isinstance(classifier, str) and classifier.startswith("probe-"):
        return "probe" if isinstance(settings.get("probe"), dict) else kind
    return kind


def _run_of(row: tuple[Any, ...], path: Path) -> Run | None:
    """The Run of one row, or None when a column does not have its documented type."""
    r = dict(zip(_COLUMNS, row, strict=True))
    texts = ("time", "kind", "store", "host", "featx_version")
    if not all(isinstance(r[k], str) and "\0" not in r[k] for k in texts):
        return None
    if not all(isinstance(r[k], int) for k in ("id", "pid")):
        return None
    if not all(r[k] is None or isinstance(r[k], str) for k in ("model_path", "command")):
        return None
    try:
        settings, scores, details = (_loads(r[k]) for k in ("settings", "scores", "details"))
        meta = _loads(r["meta"], optional=True)
    except (ValueError, RecursionError):
        return None
    return Run(
        id=r["id"], time=r["time"], kind=_kind(r["kind"], settings), store=Path(r["store"]),
        settings=settings, scores=scores, details=details, model_path=r["model_path"],
        command=r["command"], meta=meta, host=r["host"], pid=r["pid"],
        featx_version=r["featx_version"], log=path,
    )  # fmt: skip


def _read_log(path: Path) -> list[Run]:
    with _connect(path, write=False) as conn:
        if not _is_ours(conn, path):
            return []  # created, but the schema not yet committed
        rows = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM runs ORDER BY id").fetchall()
    runs = [_run_of(row, path) for row in rows]
    skipped = sum(run is None for run in runs)
    if skipped:
        _warn(f"skipped {skipped} of {len(rows)} runs in {path}: not in the run-log format.")
    return [run for run in runs if run is not None]


def find_logs(root: str | os.PathLike[str] = "stores") -> list[Path]:
    """Every `*.runs.sqlite` under `root` (recursively), sorted."""
    root = Path(root)
    return sorted(root.rglob(f"*{LOG_SUFFIX}")) if root.is_dir() else []


def read_runs(
    stores: Iterable[str | os.PathLike[str]] | None = None,
    *,
    logs: Iterable[str | os.PathLike[str]] | None = None,
) -> list[Run]:
    """The runs logged for `stores` and in `logs`, oldest first.

    A store that exists but has no log yet has no runs; a missing store or log, or a log that
    cannot be read, is an error. With neither argument, every log under ./stores is read, and
    one that cannot be read is skipped with a warning.
    """
    named: list[Path] = []
    for store in stores or ():
        store = Path(store)
        if not store.exists() and not log_path(store).exists():
            raise UsageError(f"{store} does not exist.")
        if log_path(store).exists():
            named.append(log_path(store))
    for log in logs or ():
        log = Path(log)
        if not log.exists():
            raise UsageError(f"{log} does not exist.")
        named.append(log)
    found = find_logs() if stores is None and logs is None else []
    seen: set[Path] = set()
    runs: list[Run] = []
    for path in [*named, *found]:
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        try:
            runs.extend(_read_log(path))
        except UsageError as e:
            if path in named:
                raise
            _warn(f"skipped {str(e).rstrip('.')}.")
    return sorted(runs, key=lambda r: (r.time, str(r.log), r.id))


def ranked(runs: Iterable[Run]) -> list[Run]:
    """Best first by `Run.best_score`; runs without a score last, newest first among ties."""
    by_time = sorted(runs, key=lambda r: r.time, reverse=True)
    return sorted(by_time, key=lambda r: (r.best_score is None, -(r.best_score or 0.0)))
