"""The experiment log kept next to a feature store: one SQLite row per fit, fine-tune or
evaluation, read back as `Run`s for `featx runs` (a text leaderboard) and `featx report`.

For a store `x.h5` the log is `x.h5.runs.sqlite`. Several processes may append at once: the
database is in WAL mode with a busy timeout, and every record is one short transaction that is
committed before `record_run` returns, so a killed process loses at most the record it was
writing.

Columns: time (ISO 8601 with offset), kind, store (absolute path), host, pid, featx version,
settings / scores / details (JSON), model_path, command, and the store's provenance `meta` as it
was when the run was recorded (JSON, NULL when the store could not be read).

Conventional keys: settings has "layer", "classifier" and "params" (a dict); scores has
"validation" and/or "test", each a dict of scalar metrics ("accuracy", "macro_f1", ...).
"""

from __future__ import annotations

import json
import math
import os
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import h5py

from featx import __version__
from featx.errors import UsageError

__all__ = [
    "KINDS",
    "LEADERBOARD_COLUMNS",
    "LOG_SUFFIX",
    "SCHEMA_VERSION",
    "Run",
    "find_logs",
    "leaderboard",
    "leaderboard_rows",
    "log_path",
    "ranked",
    "read_runs",
    "record_run",
]

LOG_SUFFIX = ".runs.sqlite"
SCHEMA_VERSION = 1
KINDS = ("fit", "finetune", "evaluate")
BUSY_TIMEOUT_S = 60.0
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


def log_path(store: str | os.PathLike[str]) -> Path:
    """The run log of a store: `x.h5` -> `x.h5.runs.sqlite`, in the same folder."""
    store = Path(store)
    return store.with_name(store.name + LOG_SUFFIX)


@dataclass(frozen=True)
class Run:
    """One logged fit, fine-tune or evaluation."""

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
        number."""
        value = (self.scores.get(split) or {}).get(name)
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            return None
        return float(value)

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
    def params_text(self) -> str:
        """The key parameters as `k=v, ...`: settings["params"], else every setting other
        than layer and classifier."""
        params = self.settings.get("params")
        if not isinstance(params, dict):
            params = {
                k: v for k, v in self.settings.items() if k not in ("layer", "classifier", "params")
            }
        return ", ".join(f"{k}={_short(v)}" for k, v in params.items())

    @property
    def key(self) -> str:
        """An identifier unique across logs: `<log file stem>-<id>`."""
        return f"{self.log.name.removesuffix(LOG_SUFFIX)}-{self.id}"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), default=str)
    return str(value)


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


def _refuse_newer(path: Path, version: int) -> None:
    if version > SCHEMA_VERSION:
        raise UsageError(
            f"{path} was written by a newer featx (run-log schema {version}, this featx reads "
            f"up to {SCHEMA_VERSION}); upgrade featx to read or append to it."
        )


@contextmanager
def _connect(path: Path, *, create: bool) -> Iterator[sqlite3.Connection]:
    """A connection in autocommit mode (transactions are explicit) with a busy timeout."""
    if not create and not path.is_file():
        raise UsageError(f"{path} does not exist.")
    mode = "rwc" if create else "rw"
    try:
        conn = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode={mode}",
            uri=True,
            timeout=BUSY_TIMEOUT_S,
            isolation_level=None,
        )
    except sqlite3.OperationalError as e:
        raise UsageError(f"Cannot open the run log {path}: {e}.") from e
    try:
        yield conn
    except sqlite3.DatabaseError as e:
        if "not a database" in str(e) or "malformed" in str(e):
            raise UsageError(f"{path} is not a featx run log (not a readable SQLite file).") from e
        raise
    finally:
        conn.close()


def _use_wal(conn: sqlite3.Connection) -> None:
    # Switching to WAL needs a moment without other connections; when several processes create
    # the log together the switch can be refused (the pragma then reports the old mode).
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while conn.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
        if time.monotonic() > deadline:
            raise sqlite3.OperationalError("could not switch the run log to WAL mode")
        time.sleep(0.05)


def _ensure_schema(conn: sqlite3.Connection, path: Path) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    _refuse_newer(path, version)
    if version == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]  # another process may
        if version == 0:  # have created it while we waited for the lock
            conn.execute(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    _refuse_newer(path, version)


def record_run(
    store: str | os.PathLike[str],
    kind: str,
    *,
    settings: dict[str, Any],
    scores: dict[str, Any],
    details: dict[str, Any] | None = None,
    model_path: str | None = None,
    command: str | None = None,
) -> int:
    """Append one run to the store's log (created if needed) and return its id.

    `scores` may hold full `classification_metrics` dicts per split: their per-class table,
    confusion matrix and class names are kept in `details[split]` instead.
    """
    if kind not in KINDS:
        raise UsageError(f"A run's kind must be one of {', '.join(KINDS)}, not {kind!r}.")
    store = Path(store).resolve()
    path = log_path(store)
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
    with _connect(path, create=True) as conn:
        _use_wal(conn)
        _ensure_schema(conn, path)
        with conn:  # commits the transaction before returning, rolls it back on an error
            conn.execute("BEGIN IMMEDIATE")
            cursor = conn.execute(
                "INSERT INTO runs (time, kind, store, host, pid, featx_version, settings, "
                "scores, details, model_path, command, meta) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
        return int(cursor.lastrowid)


def _read_log(path: Path) -> list[Run]:
    with _connect(path, create=False) as conn:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        _refuse_newer(path, version)
        if version == 0:  # created but the schema not yet committed
            return []
        rows = conn.execute(
            "SELECT id, time, kind, store, settings, scores, details, model_path, command, "
            "meta, host, pid, featx_version FROM runs ORDER BY id"
        ).fetchall()
    return [
        Run(
            id=r[0],
            time=r[1],
            kind=r[2],
            store=Path(r[3]),
            settings=json.loads(r[4]),
            scores=json.loads(r[5]),
            details=json.loads(r[6]),
            model_path=r[7],
            command=r[8],
            meta=json.loads(r[9]) if r[9] else None,
            host=r[10],
            pid=r[11],
            featx_version=r[12],
            log=path,
        )
        for r in rows
    ]


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

    A store that exists but has no log yet has no runs; a missing store or log is an error.
    With neither argument, every log under ./stores is read.
    """
    paths: list[Path] = []
    if stores is None and logs is None:
        paths = find_logs()
    for store in stores or ():
        store = Path(store)
        if not store.exists() and not log_path(store).exists():
            raise UsageError(f"{store} does not exist.")
        if log_path(store).exists():
            paths.append(log_path(store))
    for log in logs or ():
        log = Path(log)
        if not log.is_file():
            raise UsageError(f"{log} does not exist.")
        paths.append(log)
    seen: set[Path] = set()
    runs: list[Run] = []
    for path in paths:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            runs.extend(_read_log(path))
    return sorted(runs, key=lambda r: (r.time, str(r.log), r.id))


def ranked(runs: Iterable[Run]) -> list[Run]:
    """Best first by `Run.best_score`; runs without a score last, newest first among ties."""
    by_time = sorted(runs, key=lambda r: r.time, reverse=True)
    return sorted(by_time, key=lambda r: (r.best_score is None, -(r.best_score or 0.0)))


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


LEADERBOARD_COLUMNS = (
    "rank", "run", "kind", "store", "layer", "classifier", "params",
    "val acc", "test acc", "macro F1", "time",
)  # fmt: skip
MAX_PARAMS_WIDTH = 40


def leaderboard_rows(runs: Iterable[Run]) -> list[list[str]]:
    """The leaderboard as rows of text cells (LEADERBOARD_COLUMNS), best first."""
    rows = []
    for rank, run in enumerate(ranked(runs), 1):
        rows.append(
            [
                str(rank),
                run.key,
                run.kind,
                run.store.name,
                run.layer,
                run.classifier,
                run.params_text or "-",
                _score(run.metric("validation", "accuracy")),
                _score(run.metric("test", "accuracy")),
                _score(run.macro_f1),
                run.time,
            ]
        )
    return rows


def leaderboard(runs: Iterable[Run]) -> str:
    """A text table of the runs, best validation accuracy (else test accuracy) first."""
    rows = leaderboard_rows(runs)
    if not rows:
        return "No runs logged."
    for row in rows:
        params = row[6]
        if len(params) > MAX_PARAMS_WIDTH:
            row[6] = params[: MAX_PARAMS_WIDTH - 3] + "..."
    table = [list(LEADERBOARD_COLUMNS), *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(LEADERBOARD_COLUMNS))]
    numeric = {0, 7, 8, 9}
    lines = [
        "  ".join(
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ).rstrip()
        for row in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
