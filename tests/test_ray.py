"""Extraction on a real local Ray instance (no mocks): a two-shard job equals the one-process
store, and a job whose shard worker is killed with SIGKILL still ends complete, with no row
lost or duplicated."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import numpy as np
import psutil
import pytest
from conftest import FEATX, make_folder

from featx import FeatureStore, extract

pytest.importorskip("ray")
pytestmark = pytest.mark.slow
TINY = {"backbone": "resnet18", "weights": "none", "image_size": 32}
LAYERS = ["layer3", "avgpool"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """24 images and the store of one ordinary process."""
    root = tmp_path_factory.mktemp("ray")
    make_folder(root / "data", {"cat": 12, "dog": 12})
    options = {"workers": 0, "batch_size": 4, "device": "cpu", "quiet": True}
    whole = extract(root / "data", layers=LAYERS, store=root / "whole.h5", **TINY, **options)
    return root, whole.store


def assert_same_store(a, b):
    with FeatureStore(a) as sa, FeatureStore(b) as sb:
        assert sa.class_names == sb.class_names
        for column in ("paths", "labels", "sources", "views"):
            np.testing.assert_array_equal(getattr(sa, column)(), getattr(sb, column)())
        for key in LAYERS:
            np.testing.assert_allclose(sb.read(key), sa.read(key), rtol=1e-5, atol=1e-6)


def test_two_shards_on_ray_equal_one_process(job):
    from featx.extraction.distributed import extract_on_ray

    root, whole = job
    store = root / "two" / "s.h5"
    result = extract_on_ray(
        root / "data", layers=LAYERS, store=store, shards=2, batch_size=4, quiet=True, **TINY
    )
    assert result.store == store and result.n_rows == 24
    assert_same_store(whole, store)
    assert not list(store.parent.glob("*.shard-*"))  # merged, then removed
    with FeatureStore(store) as merged:
        assert len(merged.meta["history"][-1]["shards"]) == 2


def _shard_workers() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if cmdline.startswith("ray::_run_shard"):
            found.append(process)
    return found


def test_killed_shard_worker_is_retried_and_nothing_is_lost(job):
    root, whole = job
    store = root / "killed" / "s.h5"
    command = [*FEATX, "extract", root / "data", "--backbone", "resnet18", "--weights", "none",
               "--image-size", 32, "--layer", "layer3", "--layer", "avgpool", "--batch-size", 4,
               "--store", store, "--ray", "local", "--shards", 2, "--quiet"]  # fmt: skip
    process = subprocess.Popen(
        [str(c) for c in command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    killed = None
    deadline = time.monotonic() + 600
    while killed is None and process.poll() is None and time.monotonic() < deadline:
        for worker in _shard_workers():
            os.kill(worker.pid, signal.SIGKILL)
            killed = worker.pid
            break
        time.sleep(0.02)
    out, err = process.communicate(timeout=600)
    assert killed is not None, "no shard worker was seen running"
    assert process.returncode == 0, err
    assert_same_store(whole, store)


def _featx_on_ray(root, store, env=None, quiet=True) -> subprocess.Popen:
    command = [*FEATX, "extract", root / "data", "--backbone", "resnet18", "--weights", "none",
               "--image-size", 32, "--layer", "avgpool", "--batch-size", 4, "--store", store,
               "--ray", "local", "--shards", 2, *(["--quiet"] if quiet else [])]  # fmt: skip
    return subprocess.Popen(
        [str(c) for c in command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_ray_local_starts_its_own_instance_when_ray_address_is_set(job):
    root, whole = job
    store = root / "address" / "s.h5"
    process = _featx_on_ray(root, store, {"RAY_ADDRESS": "127.0.0.1:9"})  # nothing listens
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    assert err == ""  # --quiet: nothing of Ray's own reaches featx's output
    with FeatureStore(store) as merged:
        assert merged.n_rows == 24
    assert not list(store.parent.glob(".*.ray.log"))


def test_sigterm_stops_a_ray_driver_with_one_line(job):
    root, _ = job
    store = root / "term" / "s.h5"
    process = _featx_on_ray(root, store)
    deadline = time.monotonic() + 600
    while not _shard_workers() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, err
    assert err.splitlines() == ["featx: interrupted."], err
