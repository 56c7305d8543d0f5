"""Crash safety, resume and concurrency of `featx extract`, run as real processes.

The runs extract resnet18's `conv1` (2.4 MB a row at 192 x 192, so a chunk of featx's
CHUNK_BYTES holds only a dozen rows) together with `avgpool` (so the whole network runs and is
slow enough to be stopped mid-run), over three chunks of photos and one broken file. The
processes are killed with real signals once STORE.partial/ holds a chunk, then the same command
resumes; the result must equal, bit for bit, a store made without interruption.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import psutil
import pytest
from conftest import FEATX, as_from_a_terminal, file_digest, make_folder, run_featx

from featx import FeatureStore, extract
from featx.errors import StoreLocked
from featx.extraction.run import CHUNK_BYTES

BATCH = 4
ROW_BYTES = (64 * 96 * 96 + 512) * 4  # conv1 and avgpool at 192 x 192, float32
CHUNK_ITEMS = BATCH * max(1, CHUNK_BYTES // (ROW_BYTES * BATCH))  # as featx sizes its chunks
N_IMAGES = 3 * CHUNK_ITEMS
N_FILES = N_IMAGES + 1  # and one broken file, first in the listing, so it lands in chunk 0
N_CHUNKS = math.ceil(N_FILES / CHUNK_ITEMS)
BROKEN = "left/broken.jpg"
LAYERS = ["avgpool", "conv1"]
ARGS = (
    "--backbone", "resnet18", "--weights", "none", "--image-size", "192",
    "--layer", "conv1", "--layer", "avgpool", "--batch-size", str(BATCH), "--device", "cpu",
)  # fmt: skip


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    data = tmp / "photos"
    make_folder(data, {"left": N_IMAGES // 2, "right": N_IMAGES // 2}, size=(64, 48))
    (data / BROKEN).write_text("not a photo")
    yield tmp, data
    shutil.rmtree(tmp, ignore_errors=True)  # about 1 GB of stores


def start(tmp: Path, data: Path, store: Path, workers: int) -> subprocess.Popen:
    """Start `featx extract` in its own process group, its output going to tmp/logs/."""
    logs = tmp / "logs"
    logs.mkdir(exist_ok=True)
    with (
        open(logs / f"{store.name}.stdout", "w") as out,
        open(logs / f"{store.name}.err", "w") as err,
    ):
        return subprocess.Popen(
            [*FEATX, "extract", str(data), *ARGS, "--workers", str(workers), "--store", str(store)],
            cwd=tmp,
            stdout=out,
            stderr=err,
            start_new_session=True,
            preexec_fn=as_from_a_terminal,
        )


def finish(proc: subprocess.Popen, tmp: Path, store: Path) -> tuple[int, str, str]:
    """Wait for the process; its exit code, stdout and stderr."""
    code = proc.wait(timeout=600)
    out, err = ((tmp / "logs" / f"{store.name}.{kind}").read_text() for kind in ("stdout", "err"))
    return code, out, err


def wait_for(path_glob: tuple[Path, str], proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll until a file matching the glob exists; fail if the process ends first."""
    folder, pattern = path_glob
    deadline = time.monotonic() + timeout
    while not (folder.is_dir() and any(folder.glob(pattern))):
        if proc.poll() is not None:
            pytest.fail(f"featx ended (exit {proc.returncode}) before {folder}/{pattern} appeared")
        if time.monotonic() > deadline:
            pytest.fail(f"{folder}/{pattern} did not appear within {timeout} s")
        time.sleep(0.02)


def partial_of(store: Path) -> Path:
    return store.with_name(store.name + ".partial")


def datasets(path: Path) -> dict[str, np.ndarray]:
    found = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, obj: (
                found.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
            )
        )
    return found


def assert_same_rows_and_layers(path: Path, reference: Path, layers: list[str]) -> None:
    got, want = datasets(path), datasets(reference)
    for name in ("classes", "rows/path", "rows/label", "rows/split", "rows/source", "rows/view"):
        assert np.array_equal(got[name], want[name]), name
    for layer in layers:
        a, b = got[f"features/{layer}"], want[f"features/{layer}"]
        assert a.dtype == b.dtype and a.shape == b.shape, layer
        assert np.array_equal(a, b), layer


def leftovers(store: Path) -> list[str]:
    """Files next to the store that belong to it (lock, partial dir, temporary stores)."""
    return sorted(p.name for p in store.parent.iterdir() if store.name in p.name and p != store)


@pytest.fixture(scope="module")
def reference(workspace):
    """An uninterrupted run, which a second concurrent run on the same store must not disturb.

    The first process is paused (SIGSTOP) while it holds the store, so the second one meets it
    mid-run however fast this machine is; then it continues and must finish a valid store."""
    tmp, data = workspace
    store = tmp / "reference.h5"
    first = start(tmp, data, store, workers=0)
    try:
        wait_for((partial_of(store), "run.json"), first)
        os.kill(first.pid, signal.SIGSTOP)
        try:
            second = run_featx("extract", data, *ARGS, "--workers", "0", "--store", store, cwd=tmp)
        finally:
            os.kill(first.pid, signal.SIGCONT)
    except BaseException:
        first.kill()
        raise
    code, stdout, stderr = finish(first, tmp, store)
    return {"store": store, "first": (first.pid, code, stdout, stderr), "second": second}


@pytest.mark.slow
def test_second_concurrent_extract_is_refused_and_the_first_completes(reference):
    pid, code, stdout, stderr = reference["first"]
    second = reference["second"]
    assert second.returncode == 2, second.stderr
    assert "Traceback" not in second.stderr
    store = reference["store"]
    assert (
        f"featx: store {store} is being written by another featx process (pid {pid}); wait for "
        "it to finish, or stop it and run this command again."
    ) in second.stderr

    assert code == 3, stderr  # done, with the broken file skipped
    assert stdout.strip() == str(store)
    assert f"  {BROKEN}: not an image" in stderr
    with FeatureStore(store) as s:
        assert s.layers == LAYERS and s.n_rows == N_IMAGES
        assert s.skipped == [(BROKEN, "not an image")]
        assert s.layer("conv1").shape == (64, 96, 96)
        assert np.isfinite(s.read("avgpool")).all()
        assert len(s.meta["history"]) == 1
    assert leftovers(store) == []  # lock and partial results removed


def kill_when(pattern: str, proc: subprocess.Popen, folder: Path) -> None:
    """SIGKILL the process (and its DataLoader worker) once `folder` holds `pattern`."""
    try:
        wait_for((folder, pattern), proc)
        children = psutil.Process(proc.pid).children(recursive=True)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    for child in children:  # a worker notices that its parent is gone; make sure it is
        try:
            child.wait(timeout=15)
        except psutil.TimeoutExpired:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def saved_chunks(store: Path) -> int:
    partial = partial_of(store)
    run = json.loads((partial / "run.json").read_text())
    assert run["chunk_items"] == CHUNK_ITEMS and run["n_items"] == N_FILES
    return len(list(partial.glob("chunk-*.npz")))


def resume(tmp: Path, data: Path, store: Path, done: int) -> None:
    result = run_featx("extract", data, *ARGS, "--workers", "1", "--store", store, cwd=tmp)
    assert result.returncode == 3, result.stderr
    assert f"Resuming {store}: {done} of {N_FILES} images already done." in result.stderr
    assert result.stdout.strip() == str(store)


@pytest.mark.slow
def test_sigkill_while_adding_layers_keeps_the_old_store_and_resumes_equal(workspace, reference):
    tmp, data = workspace
    store = tmp / "killed.h5"
    extract(
        data, "resnet18", ["layer1"], store=store, weights="none", image_size=192,
        batch_size=4, workers=0, device="cpu", quiet=True, command="featx extract (old)",
    )  # fmt: skip
    old = file_digest(store)
    with FeatureStore(store) as s:
        old_layer1 = s.read("layer1")

    proc = start(tmp, data, store, workers=1)  # adds conv1 and avgpool
    kill_when("chunk-*.npz", proc, partial_of(store))

    # the old store is untouched and nothing else poses as a store
    assert file_digest(store) == old
    with FeatureStore(store) as s:
        assert s.layers == ["layer1"]
    assert not [p for p in leftovers(store) if p.endswith((".h5", ".tmp"))]
    saved = saved_chunks(store)
    assert 1 <= saved < N_CHUNKS, "the kill came too late to test a resume"

    resume(tmp, data, store, done=saved * CHUNK_ITEMS)
    assert_same_rows_and_layers(store, reference["store"], LAYERS)
    with FeatureStore(store) as s:
        assert s.layers == ["avgpool", "conv1", "layer1"]
        assert s.read("layer1").tobytes() == old_layer1.tobytes()
        assert s.skipped == [(BROKEN, "not an image")]
        assert [e["command"] for e in s.meta["history"]][0] == "featx extract (old)"
        assert len(s.meta["history"]) == 2
    assert leftovers(store) == []


@pytest.mark.slow
def test_ctrl_c_then_a_kill_while_assembling_then_resume_equal(workspace, reference):
    tmp, data = workspace
    store = tmp / "interrupted.h5"
    proc = start(tmp, data, store, workers=1)
    try:
        wait_for((partial_of(store), "chunk-*.npz"), proc)
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the whole process group
    code, stdout, stderr = finish(proc, tmp, store)
    assert code == 130, stderr
    assert "Traceback" not in stderr
    match = re.search(
        rf"featx: interrupted after (\d+) of {N_FILES} images were saved; run the same command "
        r"again to resume\.",
        stderr,
    )
    assert match, stderr
    assert stdout == ""
    assert not store.exists()  # no incomplete store is presented as complete
    saved = saved_chunks(store)
    assert int(match.group(1)) == saved * CHUNK_ITEMS
    assert 1 <= saved < N_CHUNKS

    # resume, but kill it while it writes the final store into its temporary file
    proc = start(tmp, data, store, workers=1)
    kill_when(f".{store.name}.*.tmp", proc, tmp)
    assert not store.exists()
    assert saved_chunks(store) == N_CHUNKS

    resume(tmp, data, store, done=N_FILES)
    got, want = datasets(store), datasets(reference["store"])
    assert sorted(got) == sorted(want)
    for name in want:
        assert np.array_equal(got[name], want[name]), name
    with FeatureStore(store) as a, FeatureStore(reference["store"]) as b:
        ignore = ("created", "history")
        assert {k: v for k, v in a.meta.items() if k not in ignore} == {
            k: v for k, v in b.meta.items() if k not in ignore
        }
        (event,) = a.meta["history"]
        assert event["command"].endswith(f"--workers 1 --store {store}")
    assert leftovers(store) == []  # no lock, partial results or temporary store left behind


HOLD_WITH_A_CHILD = """
import os, sys, time
from pathlib import Path
from featx.extraction.partial import write_lock

store, ready = Path(sys.argv[1]), Path(sys.argv[2])
with write_lock(store):
    if os.fork() == 0:  # as a DataLoader worker: forked while the lock is held, outlives us
        ready.write_text(str(os.getpid()))
        time.sleep(600)
        os._exit(0)
    time.sleep(600)
"""


def test_the_write_lock_goes_with_its_holder_even_with_a_forked_child(tmp_path):
    from featx.extraction.partial import write_lock

    store, ready = tmp_path / "s.h5", tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_WITH_A_CHILD, str(store), str(ready)])
    child = None
    try:
        while not ready.exists() or not ready.read_text():
            assert holder.poll() is None
            time.sleep(0.01)
        child = psutil.Process(int(ready.read_text()))
        with pytest.raises(StoreLocked, match=f"pid {holder.pid}"):
            with write_lock(store):
                pass
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=60)
        assert child.is_running()  # the child lives on...
        with write_lock(store):  # ...and the store can be written at once
            pass
    finally:
        holder.kill()
        if child is not None and child.is_running():
            child.kill()
    assert not (tmp_path / "s.h5.lock").exists()
