"""The run log next to a feature store: round trips with the store's provenance, the schema
version, the leaderboard, and appends from several real processes, one of them killed."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

import featx
from featx.errors import UsageError
from featx.report.table import leaderboard
from featx.runlog import (
    SCHEMA_VERSION,
    Run,
    log_path,
    read_runs,
    record_run,
)

REPO = Path(__file__).resolve().parents[1]
META = {
    "backbone": "resnet18",
    "weights": "imagenet",
    "weights_sha256": "ab" * 32,
    "preprocessing_text": "resize 256, center crop 224, ImageNet mean/std",
    "dataset": {"root": "/data/birds", "fingerprint": "f00d" * 16, "n_files": 42},
    "augment": None,
    "created": "2026-11-01T10:00:00+0000",
    "versions": {"featx": "0.1.0", "torch": "2.5.0", "h5py": "3.12.1"},
    "history": [
        {"time": "2026-11-01T10:00:00+0000", "command": "featx extract data", "layers": ["avgpool"]}
    ],
}


def make_store(path: Path, meta: dict | None = None) -> Path:
    """A minimal store in the documented featx layout: the root attributes and the classes."""
    with h5py.File(path, "w") as f:
        f.attrs["featx_format"] = "featx-store"
        f.attrs["format_version"] = 1
        f.attrs["meta"] = json.dumps(META if meta is None else meta, indent=1)
        f.create_dataset("classes", data=["bird", "cat"], dtype=h5py.string_dtype())
    return path


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return make_store(tmp_path / "birds.h5")


def test_log_path_sits_next_to_the_store(tmp_path: Path) -> None:
    assert log_path(tmp_path / "x.h5") == tmp_path / "x.h5.runs.sqlite"
    assert log_path("stores/a.b.h5") == Path("stores/a.b.h5.runs.sqlite")


def test_round_trip_keeps_everything_and_the_provenance(store: Path) -> None:
    metrics = {
        "n_samples": 4,
        "accuracy": 0.75,
        "macro_f1": 0.7,
        "log_loss": None,
        "per_class": {"bird": {"precision": 1.0, "recall": 0.5, "f1": 0.67, "support": 2}},
        "confusion_matrix": [[1, 1], [0, 2]],
        "class_names": ["bird", "cat"],
    }
    history = [{"epoch": 1, "stage": "head", "train_loss": 1.0, "val_loss": 1.2}]
    run_id = record_run(
        store,
        "fit",
        settings={"layer": "avgpool", "classifier": "logreg", "params": {"C": 1.0}},
        scores={"validation": metrics, "test": {"accuracy": 0.5}},
        details={"history": history},
        model_path="models/m.joblib",
        command="featx fit birds.h5",
    )
    assert log_path(store).is_file()
    (run,) = read_runs([store])
    assert run.id == run_id
    assert run.kind == "fit" and run.store == store.resolve()
    assert run.settings == {"layer": "avgpool", "classifier": "logreg", "params": {"C": 1.0}}
    # the per-class table and confusion matrix move to details, the scalars stay in scores
    assert run.scores["validation"] == {
        "n_samples": 4,
        "accuracy": 0.75,
        "macro_f1": 0.7,
        "log_loss": None,
    }
    assert run.details["validation"]["confusion_matrix"] == [[1, 1], [0, 2]]
    assert run.details["validation"]["class_names"] == ["bird", "cat"]
    assert run.details["history"] == history
    assert run.model_path == "models/m.joblib" and run.command == "featx fit birds.h5"
    assert run.meta == META
    assert run.pid == os.getpid() and run.host and run.featx_version == featx.__version__
    assert run.time[:4].isdigit() and "T" in run.time
    assert run.best_score == 0.75 and run.macro_f1 == 0.7


def test_unreadable_store_is_logged_without_provenance(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.h5"
    bogus.write_text("not hdf5")
    record_run(bogus, "evaluate", settings={}, scores={"test": {"accuracy": 0.5}})
    (run,) = read_runs(logs=[log_path(bogus)])
    assert run.meta is None and run.scores == {"test": {"accuracy": 0.5}}


def test_numpy_values_and_paths_are_stored_as_json(store: Path) -> None:
    import numpy as np

    record_run(
        store,
        "fit",
        settings={"C": np.float32(0.5), "out": Path("a/b"), "layers": ("x", "y")},
        scores={"validation": {"accuracy": np.float64(0.25)}},
        details={"confusion_matrix": np.array([[1, 0], [0, 1]])},
    )
    (run,) = read_runs([store])
    assert run.settings == {"C": 0.5, "out": "a/b", "layers": ["x", "y"]}
    assert run.details["confusion_matrix"] == [[1, 0], [0, 1]]
    assert run.best_score == 0.25


def test_a_probed_layer_logged_as_a_fit_by_an_older_featx_reads_as_a_probe(store: Path) -> None:
    probe = {"protocol": "linear", "depth": 0, "layers": ["a"], "created": "t", "best": True}
    old = {"layer": "a", "classifier": "probe-linear", "params": {"C": 1.0}, "probe": probe}
    record_run(store, "fit", settings=old, scores={"validation": {"accuracy": 0.5}})
    record_run(store, "probe", settings=old, scores={"validation": {"accuracy": 0.6}})
    named = {**old, "probe": "not a probe's settings"}
    record_run(store, "fit", settings=named, scores={})
    record_run(store, "fit", settings={"classifier": "logreg", "probe": probe}, scores={})
    assert [r.kind for r in read_runs([store])] == ["probe", "probe", "fit", "fit"]


def test_wrong_kind_missing_inputs_and_a_foreign_file_are_refused(
    store: Path, tmp_path: Path
) -> None:
    with pytest.raises(UsageError, match="kind must be one of fit, probe, finetune, evaluate"):
        record_run(store, "train", settings={}, scores={})
    assert not log_path(store).exists()
    with pytest.raises(UsageError, match="does not exist"):
        read_runs([tmp_path / "nope.h5"])
    with pytest.raises(UsageError, match="does not exist"):
        read_runs(logs=[tmp_path / "nope.h5.runs.sqlite"])
    assert read_runs([store]) == []  # a store without a log has no runs yet
    foreign = tmp_path / "foreign.h5.runs.sqlite"
    foreign.write_bytes(b"definitely not sqlite" * 100)
    with pytest.raises(UsageError, match="is not a featx run log"):
        read_runs(logs=[foreign])


def test_a_log_from_a_newer_featx_is_refused_in_one_sentence(
    store: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    record_run(store, "fit", settings={}, scores={})
    with sqlite3.connect(log_path(store)) as conn:
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(UsageError) as info:
        read_runs([store])
    message = str(info.value)
    assert f"run-log schema {SCHEMA_VERSION + 1}" in message and "newer featx" in message
    assert message.count(". ") == 0 and message.endswith(".")
    capfd.readouterr()
    assert record_run(store, "fit", settings={}, scores={}) is None  # the run goes on
    (warning,) = capfd.readouterr().err.splitlines()
    assert warning.startswith("warning: the fit run was not recorded: ")
    assert f"run-log schema {SCHEMA_VERSION + 1}" in warning
    with sqlite3.connect(log_path(store)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 1


def test_leaderboard_is_sorted_by_validation_then_test_accuracy(tmp_path: Path) -> None:
    a, b = make_store(tmp_path / "a.h5"), make_store(tmp_path / "b.h5")
    record_run(a, "fit", settings={"layer": "l1", "classifier": "svm", "params": {"C": 0.1}},
               scores={"validation": {"accuracy": 0.6, "macro_f1": 0.55}})  # fmt: skip
    record_run(b, "evaluate", settings={"classifier": "logreg"},
               scores={"test": {"accuracy": 0.9, "macro_f1": 0.88}})  # fmt: skip
    record_run(a, "finetune", settings={"backbone": "resnet18", "lr": 0.001},
               scores={"validation": {"accuracy": 0.8, "macro_f1": 0.79},
                       "test": {"accuracy": 0.7}})  # fmt: skip
    record_run(b, "fit", settings={"classifier": "knn"}, scores={})
    runs = read_runs([a, b])
    assert len(runs) == 4
    lines = leaderboard(runs, wide=True).splitlines()
    assert lines[0].split()[:4] == ["rank", "run", "kind", "store"]
    body = [line.split() for line in lines[2:]]
    assert [row[2] for row in body] == ["evaluate", "finetune", "fit", "fit"]
    assert body[0][3] == "b.h5" and "0.9000" in body[0] and "0.8800" in body[0]
    assert body[1][:6] == ["2", "a.h5-2", "finetune", "a.h5", "-", "resnet18"]
    assert "0.8000" in body[1] and "0.7000" in body[1] and "0.7900" in body[1]
    assert "C=0.1" in lines[4] and "svm" in lines[4] and "0.6000" in lines[4]
    assert "knn" in lines[5] and lines[5].count(" - ") >= 3
    assert leaderboard([]) == "No runs logged."


def _run_key(run: Run) -> tuple[str, int]:
    return run.settings["worker"], run.settings["i"]


WRITER = """
import sys
from featx.runlog import record_run
store, worker, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(n):
    record_run(store, "fit", settings={"worker": worker, "i": i},
               scores={"validation": {"accuracy": i / max(n, 1)}})
    print(i, flush=True)
"""


def _writer(store: Path, worker: str, n: int) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(store), worker, str(n)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _integrity(path: Path) -> str:
    with sqlite3.connect(path) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]


@pytest.mark.slow
def test_four_processes_appending_at_once_lose_nothing(store: Path) -> None:
    procs = [_writer(store, f"w{k}", 50) for k in range(4)]
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        assert out.split() == [str(i) for i in range(50)]
    runs = read_runs([store])
    assert len(runs) == 200
    assert sorted(_run_key(r) for r in runs) == sorted(
        (f"w{k}", i) for k in range(4) for i in range(50)
    )
    assert len({r.id for r in runs}) == 200
    assert all(r.meta == META for r in runs)
    assert _integrity(log_path(store)) == "ok"
    with sqlite3.connect(log_path(store)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_killed_writer_loses_at_most_its_record_in_flight(store: Path) -> None:
    record_run(store, "fit", settings={"worker": "before", "i": 0}, scores={})
    proc = _writer(store, "victim", 100_000)
    assert proc.stdout is not None
    confirmed = -1
    while confirmed < 30:  # let it commit a few dozen records, then kill it mid-loop
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else "writer ended early"
        confirmed = int(line)
    os.kill(proc.pid, signal.SIGKILL)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    confirmed = max([confirmed, *map(int, rest.split())])
    assert _integrity(log_path(store)) == "ok"
    runs = read_runs([store])
    victim = sorted(r.settings["i"] for r in runs if r.settings["worker"] == "victim")
    # every confirmed record is there; beyond them at most the one being written when killed
    assert victim[: confirmed + 1] == list(range(confirmed + 1))
    assert len(victim) in (confirmed + 1, confirmed + 2)
    assert victim == list(range(len(victim)))
    record_run(store, "fit", settings={"worker": "after", "i": 0}, scores={})
    assert len(read_runs([store])) == len(victim) + 2


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _warned(capfd: pytest.CaptureFixture[str]) -> str:
    out, err = capfd.readouterr()
    (line,) = err.splitlines()
    assert line.startswith("warning: the fit run was not recorded: ") and line.endswith(".")
    return line


def _record(store: Path) -> int | None:
    return record_run(store, "fit", settings={"layer": "l"}, scores={"validation": {"accuracy": 1}})


def test_a_log_that_cannot_be_written_costs_one_warning_and_changes_nothing(
    tmp_path: Path, mount, capfd: pytest.CaptureFixture[str]
) -> None:
    folder = make_store(tmp_path / "folder.h5")
    log_path(folder).mkdir()
    assert _record(folder) is None
    assert "is a folder, not a featx run log" in _warned(capfd)

    foreign = make_store(tmp_path / "foreign.h5")
    with sqlite3.connect(log_path(foreign)) as conn:
        conn.execute("CREATE TABLE users (name TEXT, password TEXT)")
        conn.execute("INSERT INTO users VALUES ('ann', 'secret')")
    conn.close()
    lookalike = make_store(tmp_path / "lookalike.h5")
    with sqlite3.connect(log_path(lookalike)) as conn:
        conn.execute("CREATE TABLE runs (id INTEGER, what TEXT)")
        conn.execute("PRAGMA user_version=1")
    conn.close()
    for store in (foreign, lookalike):
        before = _snapshot(tmp_path)
        assert _record(store) is None
        assert "an SQLite file that featx did not write" in _warned(capfd)
        assert _snapshot(tmp_path) == before  # not switched to WAL, no -wal/-shm left
        with sqlite3.connect(log_path(store)) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        conn.close()
        with pytest.raises(UsageError, match="an SQLite file that featx did not write"):
            read_runs([store])

    readonly = mount("size=1m")
    kept = make_store(readonly / "kept.h5")
    assert _record(kept) == 1
    capfd.readouterr()
    subprocess.run(["mount", "-o", "remount,ro", str(readonly)], check=True)
    assert _record(kept) is None
    assert "read-only" in _warned(capfd)
    assert [r.id for r in read_runs([kept])] == [1]  # still readable

    full = mount("size=64k")
    (full / "filler").write_bytes(b"\0" * (64 << 10))
    assert _record(full / "s.h5") is None
    assert "is full" in _warned(capfd)


LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
"""


@pytest.mark.slow
def test_a_log_locked_by_another_process_is_given_up_with_a_warning(
    store: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    assert _record(store) == 1
    with sqlite3.connect(log_path(store)) as conn:
        conn.execute("PRAGMA journal_mode=DELETE")  # so the lock also holds readers off
    conn.close()
    capfd.readouterr()
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(log_path(store))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert locker.stdout is not None and locker.stdout.readline() == "locked\n"
        assert _record(store) is None
        assert "is locked by another process (waited 5 s)" in _warned(capfd)
        assert _record(store) is None  # the same log is not waited for again
        assert capfd.readouterr().err == ""
        with pytest.raises(UsageError, match="is locked by another process"):
            read_runs([store])
    finally:
        locker.communicate("\n", timeout=60)
    assert [r.id for r in read_runs([store])] == [1]


GOOD_ROW = {
    "time": "2026-11-01T10:00:00+00:00", "kind": "fit", "store": "/data/s.h5", "host": "h",
    "pid": 1, "featx_version": "0.1.0", "settings": '{"layer": "l", "classifier": "svm"}',
    "scores": '{"validation": {"accuracy": 0.5}}', "details": "{}", "model_path": None,
    "command": None, "meta": None,
}  # fmt: skip
# Rows a crafted or damaged log may hold: each either skipped with the one warning, or shown
# as far as its values allow; none may stop `runs` or `report`.
BAD_ROWS = [
    {"settings": "not json"}, {"settings": "[1, 2]"}, {"settings": b"\x00\xff"},
    {"scores": "5"}, {"details": '{"a": '}, {"meta": "[1]"}, {"meta": "nan"},
    {"pid": "many"}, {"time": b"\x00"}, {"kind": 7.5}, {"store": "a\x00b"},
    {"settings": '{"params": 5, "layer": {"x": [1]}, "classifier": null}'},
    {"scores": '{"validation": [1], "test": 5}'},
    {"scores": '{"validation": {"accuracy": "high", "macro_f1": [1]}, "test": {"accuracy": NaN}}'},
    {"details": '{"history": "x", "lr_find": {"lrs": [0, -1, "a"], "losses": 5}}'},
    {"details": '{"history": [1, {"epoch": "a"}, {"epoch": 1, "train_loss": "x"}, {"epoch": 2,'
                ' "stage": 5, "val_loss": 1e999}]}'},
    {"details": '{"validation": {"confusion_matrix": [[1, 2], [3]], "per_class": [1]},'
                ' "confusion_matrix": "x", "class_names": 5, "augment_preview": 5}'},
    {"details": '{"test": {"per_class": {"a": 5, "b": {"f1": "x"}},'
                ' "confusion_matrix": [[1e308, -1], [true, 2]], "class_names": [1, 2]}}'},
    {"details": '{"lr_find": {"lrs": [1e-5, 1e-4], "smoothed": [1, 2], "suggestion": "x"}}'},
    {"meta": '{"dataset": "x", "versions": [1], "history": "x", "augment": {"a": 1}}'},
    {"meta": '{"history": [5, null], "versions": {"a": {"b": 1}}}'},
    {"model_path": 5, "command": b"\x01"},
]  # fmt: skip


def _crafted_log(tmp_path: Path) -> Path:
    """A log holding one good row and every row of BAD_ROWS (SQLite's types are per value)."""
    store = make_store(tmp_path / "crafted.h5")
    record_run(store, "fit", settings={"layer": "l0", "classifier": "svm"},
               scores={"validation": {"accuracy": 0.75}})  # fmt: skip
    with sqlite3.connect(log_path(store)) as conn:
        for bad in BAD_ROWS:
            row = {**GOOD_ROW, **bad}
            conn.execute(f"INSERT INTO runs ({', '.join(row)}) VALUES "
                         f"({', '.join('?' * len(row))})", list(row.values()))  # fmt: skip
    conn.close()
    return store


def test_rows_of_wrong_types_are_skipped_with_one_warning(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from featx.report import format_runs, write_report

    store = _crafted_log(tmp_path)
    runs = read_runs([store])
    (warning,) = capfd.readouterr().err.splitlines()
    assert warning == (
        f"warning: skipped 11 of {len(BAD_ROWS) + 1} runs in {log_path(store)}: "
        "not in the run-log format."
    )
    assert len(runs) == len(BAD_ROWS) + 1 - 11
    assert runs[-1].best_score == 0.75
    for fmt in ("table", "wide", "json", "csv"):
        assert format_runs(runs, fmt, 100)
    page = write_report(tmp_path / "r.html", runs).read_text()
    assert page.count("<tr data-run=") == len(runs)


@pytest.mark.slow
def test_runs_and_report_on_a_crafted_log_in_a_real_process(tmp_path: Path) -> None:
    store = _crafted_log(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for args in (["runs", "--store", store], ["report", tmp_path / "r.html", "--store", store]):
        done = subprocess.run([sys.executable, "-m", "featx.cli", *map(str, args)], env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stderr.splitlines() == [
            f"warning: skipped 11 of {len(BAD_ROWS) + 1} runs in {log_path(store)}: "
            "not in the run-log format."
        ]
    assert (tmp_path / "r.html").read_text().count("<tr data-run=") == len(BAD_ROWS) + 1 - 11
