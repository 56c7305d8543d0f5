"""Extraction on real Ray instances (no mocks): work units handed to a pool of Ray workers
give the one-process store, on a local instance and on a two-node cluster on this machine,
including when a worker process is killed with SIGKILL, when a node dies mid-run, and when a
re-run finds units already finished; a request for GPUs the cluster lacks is refused."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import time

import numpy as np
import psutil
import pytest
from conftest import FEATX, make_folder

from featx import FeatureStore, extract
from featx.errors import UsageError
from featx.extraction.units import unit_count

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="--ray needs ray (the ray extra)"
)
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


@pytest.fixture(scope="module")
def cluster():
    """A Ray cluster of two nodes of one CPU each on this machine (a head and a worker node)."""
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker_node = nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    yield nodes, worker_node
    nodes.shutdown()


def assert_same_store(a, b):
    """The same rows and the same feature bytes."""
    with FeatureStore(a) as sa, FeatureStore(b) as sb:
        assert sa.class_names == sb.class_names
        for column in ("paths", "labels", "sources", "views"):
            np.testing.assert_array_equal(getattr(sa, column)(), getattr(sb, column)())
        for key in LAYERS:
            np.testing.assert_array_equal(sb.read(key), sa.read(key))


@pytest.mark.slow
@needs_ray
def test_units_on_a_two_node_cluster_equal_one_process(job, cluster):
    from featx.extraction.distributed import extract_on_ray

    root, whole = job
    store = root / "units" / "s.h5"
    result = extract_on_ray(
        root / "data", layers=LAYERS, store=store, shards=6, batch_size=4, quiet=True,
        address=cluster[0].address, **TINY,
    )  # fmt: skip
    assert result.store == store and result.n_rows == 24
    assert_same_store(whole, store)
    assert not list(store.parent.glob("*.shard-*"))  # merged, then removed
    with FeatureStore(store) as merged:
        assert len(merged.meta["history"][-1]["shards"]) == 6


@pytest.mark.slow
@needs_ray
def test_a_rerun_skips_finished_units_and_keeps_their_count(job, cluster):
    """A unit finished by an interrupted job (here with batch size 2) is merged as it is, and
    the re-run, given no --shards, cuts the rows into the interrupted job's 6 units."""
    from featx.extraction.distributed import extract_on_ray

    root, whole = job
    store = root / "rerun" / "s.h5"
    extract(root / "data", layers=LAYERS, store=store, shard=(2, 6), batch_size=2, quiet=True,
            workers=0, **TINY)  # fmt: skip
    extract_on_ray(
        root / "data", layers=LAYERS, store=store, batch_size=4, quiet=True,
        address=cluster[0].address, **TINY,
    )  # fmt: skip
    with FeatureStore(store) as merged:
        assert len(merged.meta["history"][-1]["shards"]) == 6
        assert merged.layer("avgpool").attrs["batch_size"] == "2, 4"
    assert_same_store(whole, store)


def _unit_workers(running_only: bool = True) -> list[psutil.Process]:
    prefix = "ray::UnitWorker.run" if running_only else "ray::UnitWorker"
    found = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if " ".join(process.info["cmdline"] or []).startswith(prefix):
                found.append(process)
    return found


def _featx_extract(root, store, *options, env=None) -> subprocess.Popen:
    command = [*FEATX, "extract", root / "data", "--backbone", "resnet18", "--weights", "none",
               "--image-size", 32, "--layer", "layer3", "--layer", "avgpool", "--batch-size", 4,
               "--store", store, "--quiet", *options]  # fmt: skip
    return subprocess.Popen(
        [str(c) for c in command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.mark.slow
@needs_ray
def test_killed_worker_process_is_replaced_and_nothing_is_lost(job, cluster):
    root, whole = job
    store = root / "killed" / "s.h5"
    process = _featx_extract(root, store, "--ray", cluster[0].address, "--shards", 6)
    killed = None
    deadline = time.monotonic() + 600
    while killed is None and process.poll() is None and time.monotonic() < deadline:
        for worker in _unit_workers():
            os.kill(worker.pid, signal.SIGKILL)
            killed = worker.pid
            break
        time.sleep(0.02)
    out, err = process.communicate(timeout=600)
    assert killed is not None, "no unit was seen running"
    assert process.returncode == 0, err
    assert err == ""
    assert_same_store(whole, store)


@pytest.mark.slow
@needs_ray
def test_a_node_killed_mid_run_still_gives_the_one_process_store(job, cluster):
    """The worker node dies while both workers run units: the head's worker takes its unit
    and the rest; the job ends with the one-process store. The node is the last test's."""
    nodes, worker_node = cluster
    root, whole = job
    store = root / "node" / "s.h5"
    process = _featx_extract(root, store, "--ray", nodes.address, "--shards", 6)
    deadline = time.monotonic() + 600
    while len(_unit_workers()) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, process.communicate()
    nodes.remove_node(worker_node)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    assert err == ""  # what Ray prints when a node dies stays out of featx's output
    assert_same_store(whole, store)


@pytest.mark.slow
@needs_ray
def test_gpus_the_cluster_lacks_are_refused_in_one_line(job, cluster):
    root, _ = job
    store = root / "gpu" / "s.h5"
    process = _featx_extract(root, store, "--ray", cluster[0].address,
                             "--ray-gpus-per-shard", 1)  # fmt: skip
    out, err = process.communicate(timeout=300)
    assert process.returncode == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("featx: --ray-gpus-per-shard 1 "), err
    assert not store.exists()


@pytest.mark.slow
@needs_ray
def test_ray_local_starts_its_own_instance_when_ray_address_is_set(job):
    root, whole = job
    store = root / "address" / "s.h5"
    process = _featx_extract(
        root, store, "--ray", "local", "--shards", 2, env={"RAY_ADDRESS": "127.0.0.1:9"}
    )  # nothing listens at RAY_ADDRESS
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    assert err == ""  # --quiet: nothing of Ray's own reaches featx's output
    with FeatureStore(store) as merged:
        assert merged.n_rows == 24
    assert not list(store.parent.glob(".*.ray.log"))


@pytest.mark.slow
@needs_ray
def test_sigterm_stops_a_ray_driver_with_one_line(job):
    root, _ = job
    store = root / "term" / "s.h5"
    process = _featx_extract(root, store, "--ray", "local", "--shards", 2)
    deadline = time.monotonic() + 600
    while not _unit_workers(False) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, err
    assert err.splitlines() == ["featx: interrupted."], err


def test_units_are_several_per_worker_within_the_files():
    assert unit_count(10_000, 8) == 32  # 4 per worker
    assert unit_count(640, 8) == 10  # at least 64 files each
    assert unit_count(100, 8) == 8  # never fewer than the workers
    assert unit_count(5, 8) == 5  # nor more than the files


def test_workers_are_sized_to_the_cluster_and_impossible_requests_refused():
    from featx.extraction.distributed import _Pool

    two_nodes = [{"CPU": 4.0}, {"CPU": 2.0, "GPU": 2.0}]
    assert _Pool.sized(two_nodes, None, None).workers == 2  # one per GPU
    assert _Pool.sized(two_nodes, None, 0).workers == 6  # one per CPU
    assert _Pool.sized(two_nodes, 2, 0).workers == 3
    with pytest.raises(UsageError, match="more GPUs than any node"):
        _Pool.sized([{"CPU": 8.0}], None, 1)
    with pytest.raises(UsageError, match="more CPUs than any node"):
        _Pool.sized(two_nodes, 6, 0)
