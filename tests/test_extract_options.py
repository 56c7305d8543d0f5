"""Extraction options added late: a layer is reused only in the dtype it is stored in, a
resumed run keeps the interrupted run's batch size, and timm weights come from the Hugging Face
cache offline (or fail at once, naming it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch
from conftest import FEATX, assert_one_sentence_error, file_digest, invoke_featx, make_folder
from test_resume import datasets, partial_of, wait_for

from featx import FeatureStore, extract
from featx.backbones.weights import state_dict_sha256
from featx.errors import UsageError
from featx.extraction.run import CHUNK_BYTES

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("options") / "pets"
    make_folder(root, {"cat": 3, "dog": 3})
    return root


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without offline switches, plus `extra`."""
    offline = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return {**{k: v for k, v in os.environ.items() if k not in offline}, **extra}


def featx_cli(*args: object, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*FEATX, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


# ---- dtype --------------------------------------------------------------------------------
@pytest.mark.parametrize(("stored", "asked"), [("float32", "float16"), ("float16", "float32")])
@pytest.mark.slow
def test_a_layer_is_not_reused_in_another_dtype(pets, tmp_path, stored, asked):
    store = tmp_path / "s.h5"
    options = dict(weights="none", image_size=48, workers=0, device="cpu", quiet=True)
    extract(pets, "resnet18", ["layer2"], store=store, dtype=stored, **options)
    before = file_digest(store)
    sentence = (
        f"layer layer2 is stored as {stored} in {store}, not {asked}; ask for --dtype {stored}, "
        "or use --overwrite to rebuild the store."
    )

    with pytest.raises(UsageError) as error:
        extract(pets, "resnet18", ["layer2"], store=store, dtype=asked, **options)
    assert str(error.value) == sentence
    with pytest.raises(UsageError, match=f"stored as {stored}"):  # also next to a new layer
        extract(pets, "resnet18", ["layer3", "layer2"], store=store, dtype=asked, **options)
    assert file_digest(store) == before

    result = invoke_featx(
        "extract", pets, "--backbone", "resnet18", "--weights", "none", "--image-size", "48",
        "--layer", "layer2", "--dtype", asked, "--workers", "0", "--store", store,
    )  # fmt: skip
    assert assert_one_sentence_error(result) == f"featx: {sentence}"
    assert file_digest(store) == before
    assert sorted(os.listdir(tmp_path)) == ["s.h5"]  # no lock or partial results left

    # the stored dtype is reused as before, and --overwrite rebuilds in the new one
    same = extract(pets, "resnet18", ["layer2"], store=store, dtype=stored, **options)
    assert same.computed == [] and same.reused == ["layer2"]
    assert file_digest(store) == before
    rebuilt = extract(
        pets, "resnet18", ["layer2"], store=store, dtype=asked, overwrite=True, **options
    )
    assert rebuilt.computed == ["layer2"]
    with FeatureStore(store) as s:
        assert s.read("layer2").dtype == np.dtype(asked)


# ---- resume with another --batch-size ------------------------------------------------------
BATCH, OTHER_BATCH, SIZE = 4, 8, 256
ROW_BYTES = (64 * (SIZE // 2) ** 2 + 512) * 4  # conv1 and avgpool, float32
CHUNK_ITEMS = BATCH * max(1, CHUNK_BYTES // (ROW_BYTES * BATCH))  # as featx sizes its chunks
N_CHUNKS = 5
N_IMAGES = N_CHUNKS * CHUNK_ITEMS


def extract_args(data: Path, store: Path, batch: int) -> list[str]:
    return [
        "extract", str(data), "--backbone", "resnet18", "--weights", "none",
        "--image-size", str(SIZE), "--layer", "conv1", "--layer", "avgpool",
        "--batch-size", str(batch), "--workers", "0", "--device", "cpu", "--store", str(store),
    ]  # fmt: skip


@pytest.mark.slow
def test_resume_keeps_the_interrupted_runs_batch_size(tmp_path):
    assert CHUNK_ITEMS == BATCH  # a chunk of one batch (and of one batch of 8 for OTHER_BATCH)
    data = tmp_path / "photos"
    make_folder(data, {"left": N_IMAGES // 2, "right": N_IMAGES // 2}, size=(64, 48))
    store = tmp_path / "killed.h5"
    partial = partial_of(store)

    proc = subprocess.Popen(
        [*FEATX, *extract_args(data, store, BATCH)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for((partial, "chunk-*.npz"), proc)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not store.exists()
    run = json.loads((partial / "run.json").read_text())
    assert run["batch_size"] == BATCH and run["chunk_items"] == CHUNK_ITEMS
    saved = len(list(partial.glob("chunk-*.npz")))
    assert 1 <= saved < N_CHUNKS, "the kill came too late to test a resume"

    resumed = subprocess.run(
        [*FEATX, *extract_args(data, store, OTHER_BATCH)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert (
        f"Resuming with the interrupted run's batch size, {BATCH}, for identical values."
        in resumed.stderr
    )
    done = saved * CHUNK_ITEMS
    assert f"Resuming {store}: {done} of {N_IMAGES} images already done." in resumed.stderr
    assert not partial.exists()

    whole = tmp_path / "whole.h5"
    extract(
        data, "resnet18", ["conv1", "avgpool"], store=whole, weights="none", image_size=SIZE,
        batch_size=BATCH, workers=0, device="cpu", quiet=True,
    )  # fmt: skip
    got, want = datasets(store), datasets(whole)
    with h5py.File(store) as f:  # the batch that made the values is the one recorded
        assert {int(d.attrs["batch_size"]) for d in f["features"].values()} == {BATCH}
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert np.array_equal(got[name], want[name]), name


# ---- timm weights offline ------------------------------------------------------------------
def _online() -> bool:
    from featx.backbones.weights import reachable as _reachable

    return _reachable("https://huggingface.co")


offline_only = pytest.mark.skipif(_online(), reason="needs a machine without a network")


@offline_only
@pytest.mark.slow
def test_uncached_timm_weights_fail_at_once_offline(pets, tmp_path):
    hf_home, torch_home = tmp_path / "hf", tmp_path / "torch"
    hf_home.mkdir()
    torch_home.mkdir()
    store = tmp_path / "s.h5"
    result = featx_cli(
        "extract", pets, "--backbone", "timm:resnet18", "--layer", "layer3", "--image-size", "48",
        "--workers", "0", "--store", store,
        cwd=tmp_path, env=clean_env(HF_HOME=str(hf_home), TORCH_HOME=str(torch_home)),
    )  # fmt: skip
    message = assert_one_sentence_error(result)
    assert message == (
        f"featx: the default weights for timm:resnet18 are not in the Hugging Face cache "
        f"{hf_home / 'hub'} or the torch cache {torch_home / 'hub' / 'checkpoints'} and cannot "
        "be downloaded; pass --weights FILE with a local state dict."
    )
    assert result.stdout == ""
    assert sorted(os.listdir(tmp_path)) == ["hf", "torch"]  # no store, lock or partial results


@offline_only
@pytest.mark.slow
def test_timm_weights_in_the_hugging_face_cache_are_used_offline(pets, tmp_path):
    from huggingface_hub import try_to_load_from_cache
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(21)
        model = timm.create_model("resnet18").eval()
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--timm--resnet18.a1_in1k"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    save_file(model.state_dict(), snapshot / "model.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    # the layout huggingface_hub looks up
    found = try_to_load_from_cache(
        "timm/resnet18.a1_in1k", "model.safetensors", cache_dir=tmp_path / "hf" / "hub"
    )
    assert found == str(snapshot / "model.safetensors")
    env = clean_env(HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"))

    store = tmp_path / "s.h5"
    result = featx_cli(
        "extract", pets, "--backbone", "timm:resnet18", "--weights", "a1_in1k",
        "--layer", "layer3", "--pool", "avg", "--image-size", "48", "--workers", "0",
        "--device", "cpu", "--store", store, "--quiet",
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(store)
    with FeatureStore(store) as s:
        assert s.meta["weights"] == "timm:resnet18.a1_in1k"
        assert s.meta["weights_sha256"] == state_dict_sha256(model)
        features = s.read("layer3@avg")
    assert features.shape == (6, 256) and np.isfinite(features).all() and features.std() > 0
