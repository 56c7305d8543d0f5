"""Faults around a run: caches that are damaged, blocked or read-only, a run log that cannot be
written or was crafted, report outputs that cannot be written, a killed writer's leftovers.

A cache problem costs time, never the run; a run-log problem costs one warning line, never
the fit it records (exit 0, the model kept); an output that cannot be written is one `featx:`
sentence with exit 2 and nothing left behind. The cases run the real command line in this
process (they cannot crash it), except the ones that need a fresh interpreter."""

from __future__ import annotations

import base64
import platform
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_one_sentence_error, invoke_featx, make_folder
from PIL import Image
from test_runlog import BAD_ROWS, LOCKER, _crafted_log, make_store

from featx import extract
from featx.runlog import log_path, record_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = ("--backbone", "resnet18", "--image-size", "32", "--workers", "0", "--quiet")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A data folder, a real store of it and a weights file of resnet18."""
    import torch
    import torchvision

    root = tmp_path_factory.mktemp("faults")
    data = root / "data"
    make_folder(data, {"cat": 3, "dog": 3}, size=(40, 30))
    store = extract(data, store=root / "s.h5", backbone="resnet18", weights="none",
                    image_size=32, layers=["avgpool"], workers=0, quiet=True).store  # fmt: skip
    weights = root / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    return {"root": root, "data": data, "store": store, "weights": weights}


def _read_only(mount, fill=None) -> Path:
    folder = mount("size=1m")
    if fill:
        fill(folder)
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    return folder


# ---- caches -------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["blocked", "read-only"])
def test_a_weights_hash_cache_that_cannot_be_used_only_costs_hashing(world, tmp_path, monkeypatch,
                                                                      mount, how):  # fmt: skip
    if how == "blocked":
        cache = tmp_path / "cache"
        cache.mkdir()
        (cache / "weights-sha256").write_text("not a folder")
    else:
        cache = _read_only(mount)
    monkeypatch.setenv("FEATX_CACHE", str(cache))
    store = tmp_path / "s.h5"
    for _ in range(2):  # the second run neither reads nor writes a cached hash
        done = invoke_featx("extract", world["data"], *TINY, "--weights", world["weights"],
                            "--layer", "avgpool", "--engine", "eager", "--store", store,
                            "--overwrite")  # fmt: skip
        assert done.returncode == 0, done.stderr
    assert store.exists()


def test_an_inductor_cache_path_that_is_a_file_is_named(world, tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("not a folder")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "afile"))
    done = invoke_featx("extract", world["data"], *TINY, "--weights", "none", "--layer",
                        "avgpool", "--engine", "eager", "--store", tmp_path / "s.h5")  # fmt: skip
    message = assert_one_sentence_error(done)
    assert "TORCHINDUCTOR_CACHE_DIR" in message and "input" not in message
    assert not (tmp_path / "s.h5").exists()
    assert (tmp_path / "afile").read_text() == "not a folder"


@pytest.mark.slow
def test_a_damaged_openvino_cache_entry_is_converted_again(world, tmp_path, monkeypatch, capfd):
    """Garbage in the cached model a real run wrote: the next run converts again (quietly:
    no parser of another framework speaks), runs on OpenVINO, and caches a good entry."""
    pytest.importorskip("openvino")
    from featx.inference.engine import CONVERSIONS
    from featx.inference.openvino_engine import _entry_intact

    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "cache"))
    args = ("extract", world["data"], *TINY, "--weights", "none", "--layer", "avgpool",
            "--engine", "openvino", "--store", tmp_path / "s.h5", "--overwrite")  # fmt: skip

    def run() -> str:
        before = CONVERSIONS["openvino"]
        capfd.readouterr()
        done = invoke_featx(*args)
        out, err = capfd.readouterr()
        assert done.returncode == 0, done.stderr + err
        text = done.stderr + err
        assert "fell back" not in text and "tensorflow" not in text.lower(), text
        return CONVERSIONS["openvino"] - before

    assert run() == 1
    (xml,) = (tmp_path / "cache" / "openvino").glob("*.xml")
    xml.write_bytes(b"garbage <not a model")
    assert run() == 1  # converted again...
    assert _entry_intact(xml) and xml.read_bytes().startswith(b"<?xml")
    assert run() == 0  # ...and cached again
    weights = xml.with_suffix(".bin")
    weights.write_bytes(b"\0" * weights.stat().st_size)  # same size, other bytes
    assert run() == 1 and run() == 0


def test_an_openvino_error_reads_as_what_failed():
    from featx.inference.openvino_engine import _readable

    error = RuntimeError(
        "Exception from src/inference/src/cpp/core.cpp:84:\n"
        "Exception from src/inference/src/model_reader.cpp:148:\n"
        'Unable to read the model: "m.xml" Please check that model format: ".xml" is supported.'
        "\n\n"
    )
    assert _readable(error).startswith('Unable to read the model: "m.xml"')


# ---- the run log --------------------------------------------------------------------------
def _fit(world: dict[str, Path], store: Path, model: Path) -> tuple:
    return ("fit", "--store", store, "--layer", "avgpool", "--cv", "2", "--quiet",
            "--model", model)  # fmt: skip


def _foreign(log: Path) -> None:
    with sqlite3.connect(log) as conn:
        conn.execute("CREATE TABLE users (name TEXT, password TEXT)")
    conn.close()


# name: (set up the log beside `store`, words of the warning)
LOG_CASES = {
    "a folder in its place": (lambda log: log.mkdir(), "is a folder, not a featx run log"),
    "a foreign SQLite file": (_foreign, "an SQLite file that featx did not write"),
    "a file of garbage": (lambda log: log.write_bytes(b"\0garbage" * 100), "run log"),
}


@pytest.mark.parametrize("case", list(LOG_CASES))
def test_a_run_log_problem_costs_one_warning_not_the_fit(world, tmp_path, case):
    make, words = LOG_CASES[case]
    store = Path(shutil.copy(world["store"], tmp_path / "s.h5"))
    make(log_path(store))
    before = {p.name for p in tmp_path.iterdir()}
    model = tmp_path / "m.featx"
    done = invoke_featx(*_fit(world, store, model))
    assert done.returncode == 0, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("warning: the fit run was not recorded: ") and words in line, line
    assert model.exists()
    assert {p.name for p in tmp_path.iterdir()} == before | {"m.featx"}  # no -wal, no -shm


@pytest.mark.parametrize("how", ["read-only", "full"])
def test_a_run_log_on_a_read_only_or_full_disk_costs_one_warning(world, tmp_path, mount, how):
    if how == "read-only":
        folder = _read_only(mount, lambda f: shutil.copy(world["store"], f / "s.h5"))
        words = "read-only"
    else:
        folder = mount("size=2m")
        shutil.copy(world["store"], folder / "s.h5")
        (folder / "filler").write_bytes(b"\0" * shutil.disk_usage(folder).free)
        words = "is full"
    model = tmp_path / "m.featx"
    done = invoke_featx(*_fit(world, folder / "s.h5", model))
    assert done.returncode == 0, done.stderr
    (line,) = done.stderr.splitlines()
    assert words in line and line.startswith("warning: the fit run was not recorded"), line
    assert model.exists()


@pytest.mark.slow
def test_a_run_log_locked_by_another_process_costs_one_warning(world, tmp_path):
    store = Path(shutil.copy(world["store"], tmp_path / "s.h5"))
    record_run(store, "fit", settings={"layer": "l"}, scores={"validation": {"accuracy": 1}})
    with sqlite3.connect(log_path(store)) as conn:
        conn.execute("PRAGMA journal_mode=DELETE")  # so the lock also holds readers off
    conn.close()
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(log_path(store))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert locker.stdout is not None and locker.stdout.readline() == "locked\n"
        done = invoke_featx(*_fit(world, store, tmp_path / "m.featx"))
        assert done.returncode == 0, done.stderr
        (line,) = done.stderr.splitlines()
        assert "is locked by another process" in line, line
        assert (tmp_path / "m.featx").exists()
        assert "is locked by another process" in assert_one_sentence_error(
            invoke_featx("runs", "--store", store)
        )
    finally:
        locker.communicate("\n", timeout=60)


def test_runs_and_report_on_rows_of_wrong_types_warn_once(tmp_path):
    store = _crafted_log(tmp_path)
    warning = (f"warning: skipped 11 of {len(BAD_ROWS) + 1} runs in {log_path(store)}: "
               "not in the run-log format.")  # fmt: skip
    for args in (("runs", "--store", store), ("report", tmp_path / "r.html", "--store", store)):
        done = invoke_featx(*args)
        assert done.returncode == 0, done.stderr
        assert done.stderr.splitlines() == [warning]
    assert (tmp_path / "r.html").read_text().count("<tr data-run=") == len(BAD_ROWS) + 1 - 11


def test_a_crafted_log_embeds_no_picture_outside_the_stores_folder(tmp_path):
    (tmp_path / "stores").mkdir()
    store = make_store(tmp_path / "stores" / "s.h5")
    secret = tmp_path / "secret.png"
    Image.new("RGB", (7, 5), "red").save(secret)
    (tmp_path / "stores" / "link.png").symlink_to(secret)
    for name in (str(secret), "../secret.png", "link.png", "/dev/zero"):
        record_run(store, "finetune", settings={}, scores={"validation": {"accuracy": 0.5}},
                   details={"augment_preview": name})  # fmt: skip
    done = invoke_featx("report", tmp_path / "r.html", "--store", store)
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "r.html").read_text()
    assert re.findall(r'src="data:image/png;base64,([^"]+)"', page) == []
    assert base64.b64encode(secret.read_bytes()).decode()[:40] not in page


# ---- report outputs -----------------------------------------------------------------------
@pytest.fixture
def logged(tmp_path: Path) -> Path:
    store = make_store(tmp_path / "s.h5")
    record_run(store, "fit", settings={"layer": "l"}, scores={"validation": {"accuracy": 1}})
    return store


def test_report_outputs_that_cannot_be_written_are_one_sentence(logged, tmp_path, mount):
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("x")
    full = mount("size=64k")
    (full / "filler").write_bytes(b"\0" * (64 << 10))
    cases = {
        tmp_path / "folder": "is a folder",
        tmp_path / "afile" / "r.html": "is not a folder",
        _read_only(mount) / "r.html": "read-only",
        full / "r.html": "disk full",
    }
    for out, words in cases.items():
        done = invoke_featx("report", out, "--store", logged)
        assert words in assert_one_sentence_error(done), out
    assert sorted(p.name for p in full.iterdir()) == ["filler"]  # no temporary file left
    assert list((tmp_path / "folder").iterdir()) == []
    assert (tmp_path / "afile").read_text() == "x"


def test_a_killed_report_s_temporary_file_is_removed_by_the_next_report(logged, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    stale = tmp_path / f".r.html.{platform.node()}.{dead}.tmp"
    stale.write_bytes(b"<html" * 1000)
    done = invoke_featx("report", tmp_path / "r.html", "--store", logged)
    assert done.returncode == 0, done.stderr
    assert not stale.exists() and (tmp_path / "r.html").exists()
