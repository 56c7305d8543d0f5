"""The CUDA paths of extraction (pinned memory, non-blocking copies, channels_last, fp16 and
bf16 weights): features on the GPU match the CPU's. CI has no GPU, so these skip there; they
run on any machine with CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_folder

from featx.extraction.run import extract
from featx.store.feature_store import FeatureStore

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _features(data, store, **options) -> np.ndarray:
    extract(
        data, "resnet18", ["layer4"], weights="none", image_size=64, pool="avg", store=store,
        workers=1, quiet=True, **options,
    )  # fmt: skip
    with FeatureStore(store) as s:
        return s.read("layer4@avg")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_gpu_features_match_the_cpus(tmp_path, precision):
    data = make_folder(tmp_path / "data", {"a": 6, "b": 6})
    cpu = _features(data, tmp_path / "cpu.h5", device="cpu")
    gpu = _features(data, tmp_path / "gpu.h5", device="cuda", precision=precision)
    cosine = (cpu * gpu).sum(1) / (np.linalg.norm(cpu, axis=1) * np.linalg.norm(gpu, axis=1))
    assert cosine.min() >= (0.99999 if precision == "fp32" else 0.999), cosine.min()
