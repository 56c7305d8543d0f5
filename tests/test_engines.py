"""Inference engines: every engine returns eager fp32's features (fp32 within 1e-4, bf16 within
cosine 0.99), falls back to eager with a reason when it cannot run, and converts once per
cache key."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from featx.backbones import get_backbone
from featx.backbones.layers import prepare_tap, trace_layers
from featx.errors import UsageError
from featx.inference import openvino_engine
from featx.inference.engines import build_engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tap():
    loaded = get_backbone("resnet18").load("none")
    return prepare_tap(loaded.model, ["layer2", "avgpool"], "avg", CPU, 64)


@pytest.fixture(scope="module")
def batch():
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def compare(out, ref) -> tuple[float, float]:
    assert list(out) == list(ref)
    rel, cos = 0.0, 1.0
    for key, r in ref.items():
        a = out[key]
        assert a.dtype == torch.float32 and a.shape == r.shape
        rel = max(rel, ((a - r).abs().max() / r.abs().max()).item())
        cos = min(cos, torch.cosine_similarity(a.flatten(1), r.flatten(1)).min().item())
    return rel, cos


def check(engine, tap, batch, fp32: bool) -> None:
    ref = build_engine(tap, "eager", CPU, "fp32", batch)
    for x in (batch, batch[:3]):  # a full batch and the last, short one
        rel, cos = compare(engine(x), ref(x))
        if fp32:
            assert rel < 1e-4, engine.describe()
        else:
            assert cos > 0.99, engine.describe()


def test_eager_fp32_is_the_tap(tap, batch):
    engine = build_engine(tap, "eager", CPU, "fp32", batch)
    with torch.inference_mode():
        expected = tap(batch.contiguous(memory_format=torch.channels_last))
    rel, _ = compare(engine(batch), expected)
    assert rel == 0.0 and engine.name == "eager" and engine.fallback_reason is None


def test_eager_bf16_casts_a_copy(tap, batch):
    engine = build_engine(tap, "eager", CPU, "bf16", batch)
    check(engine, tap, batch, fp32=False)
    assert all(p.dtype == torch.float32 for p in tap.parameters())


@pytest.mark.slow
def test_compile_fp32_matches_eager(tap, batch):
    engine = build_engine(tap, "compile", CPU, "fp32", batch)
    assert engine.name == "compile", engine.fallback_reason
    check(engine, tap, batch, fp32=True)
    longer = torch.cat([batch, batch[:2]])  # split into a full batch and a padded one
    rel, _ = compare(engine(longer), build_engine(tap, "eager", CPU, "fp32", batch)(longer))
    assert rel < 1e-4


@pytest.mark.slow
def test_compile_bf16_close_to_eager(tap, batch):
    engine = build_engine(tap, "compile", CPU, "bf16", batch)
    assert engine.name == "compile", engine.fallback_reason
    check(engine, tap, batch, fp32=False)


def test_openvino_missing_falls_back_to_eager(tap, batch, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    engine = build_engine(tap, "openvino", CPU, "fp32", batch, key="k")
    assert engine.name == "eager"
    assert "openvino unavailable" in engine.fallback_reason
    assert engine.fallback_reason == "openvino unavailable (openvino is not installed)"
    assert "\n" not in engine.fallback_reason
    assert "fell back to eager" in engine.describe()
    check(engine, tap, batch, fp32=True)


def test_unconvertible_model_falls_back_to_eager(batch):
    class Untraceable(torch.nn.Module):
        def forward(self, x):
            return {"x": x.mean(dim=(2, 3))} if x.sum() > 0 else {"x": x.amax(dim=(2, 3))}

    def boom(*_args, **_kwargs):
        raise RuntimeError("cannot convert this\nsecond line")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(openvino_engine, "ov_model", boom)
        engine = build_engine(Untraceable(), "openvino", CPU, "fp32", batch)
    assert engine.name == "eager"
    assert engine.fallback_reason == "openvino unavailable (RuntimeError: cannot convert this)"


def test_unknown_engine_and_cpu_fp16_are_refused(tap, batch):
    with pytest.raises(ValueError, match="engine must be one of"):
        build_engine(tap, "tensorrt", CPU, "fp32", batch)
    with pytest.raises(UsageError, match="fp16 needs a CUDA or MPS device"):
        build_engine(tap, "eager", CPU, "fp16", batch)


def test_layers_carry_the_flops_that_reach_them():
    vgg = get_backbone("vgg16")
    infos = {i.name: i for i in trace_layers(vgg, vgg.skeleton("none"), 150)}
    conv1 = 2 * 150 * 150 * 64 * 3 * 9  # multiply-adds of a 3x3 convolution, times two
    assert infos["block1_conv1"].flops == conv1
    assert infos["block1_conv2"].flops == conv1 + 2 * 150 * 150 * 64 * 64 * 9
    assert infos["block5_pool"].flops < infos["classifier"].flops


# OpenVINO's thread pool stays alive in the process that loaded it, and later forks of that
# process (DataLoader workers in other tests) have crashed beside it: its checks run in a
# process of their own.
OPENVINO_CHECKS = """
import json, sys, torch
from featx.backbones import get_backbone
from featx.backbones.layers import prepare_tap
from featx.errors import UsageError
from featx.inference.engine import CONVERSIONS, cache_key
from featx.inference.engines import build_engine
from featx.runtime import cache_root

cpu = torch.device("cpu")
model = get_backbone("resnet18").load("none").model
tap = prepare_tap(model, ["layer2", "avgpool"], "avg", cpu, 64)
batch = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
eager = build_engine(tap, "eager", cpu, "fp32", batch)
out = {}
for name, precision, hint in (("LATENCY", "fp32", "LATENCY"), ("THROUGHPUT", "fp32", "THROUGHPUT"),
                              ("bf16", "bf16", "THROUGHPUT")):
    engine = build_engine(tap, "openvino", cpu, precision, batch, ov_hint=hint)
    worst_rel, worst_cos = 0.0, 1.0
    for x in (batch, batch[:3]):
        got, ref = engine(x), eager(x)
        assert list(got) == list(ref)
        for key, r in ref.items():
            a = got[key]
            assert a.dtype == torch.float32 and a.shape == r.shape
            worst_rel = max(worst_rel, ((a - r).abs().max() / r.abs().max()).item())
            cos = torch.cosine_similarity(a.flatten(1), r.flatten(1)).min().item()
            worst_cos = min(worst_cos, cos)
    out[name] = {"engine": engine.name, "rel": worst_rel, "cos": worst_cos}
key = cache_key("resnet18", "abc", ["layer2", "avgpool"], "avg", 64, "fp32", "ov")
build_engine(tap, "openvino", cpu, "fp32", batch, key)
after_first = CONVERSIONS["openvino"]
second = build_engine(tap, "openvino", cpu, "fp32", batch, key)
out["cache"] = {"conversions": CONVERSIONS["openvino"] - after_first,
                "files": sorted(p.suffix for p in (cache_root() / "openvino").glob("*.*")),
                "cached": "cached model" in second.describe()}
print(json.dumps(out))
"""


@needs_openvino
@pytest.mark.slow
def test_openvino_matches_eager_and_converts_once(cache):
    import json
    import os
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", OPENVINO_CHECKS],
        capture_output=True,
        text=True,
        env={**os.environ, "FEATX_CACHE": str(cache), "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("LATENCY", "THROUGHPUT"):
        assert result[name]["engine"] == "openvino" and result[name]["rel"] < 1e-4, result
    assert result["bf16"]["engine"] == "openvino" and result["bf16"]["cos"] > 0.99, result
    assert result["cache"]["conversions"] == 0 and result["cache"]["cached"], result
    assert ".xml" in result["cache"]["files"] and ".bin" in result["cache"]["files"], result
