"""Every benchmark the documentation cites runs at tiny sizes, exits 0 and prints its figures,
so that none of them rots between the runs that produce the published numbers."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The smoke runs take minutes on two cores: `pytest -m bench` runs them (the default run leaves
# them out, see pyproject.toml).
pytestmark = pytest.mark.bench

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def bench(name: str, *args: str, cache: Path) -> str:
    """Run benchmarks/NAME.py ARGS in a fresh process; return its standard output."""
    env = {**os.environ, "FEATX_CACHE": str(cache)}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, f"{name} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout


def merge_takes_rows() -> bool:
    return "--rows" in (BENCHMARKS / "bench_merge.py").read_text()


# (benchmark, tiny arguments (WORK is replaced by a fresh folder), text its figures include)
FAST = [
    ("bench_plan", ["--files", "20", "--classes", "2", "--repeats", "1"], "CSV manifest"),
]
# fmt: off
SLOW = [
    ("bench_batch", ["--networks", "resnet18:layer1:32", "--engines", "eager", "openvino",
                     "--batches", "4", "--images", "4", "--rounds", "1"], "img/s"),
    ("bench_conversion", ["--backbone", "resnet18", "--layer", "layer1", "--size", "32",
                          "--batch", "2"], "max relative difference"),
    ("bench_decode", ["--images", "1", "--repeats", "1", "--factors", "2"], "cosine min"),
    ("bench_engines", ["--backbone", "resnet18", "--layers", "layer1", "--size", "32",
                       "--batch", "2", "--repeats", "1", "--calls", "1",
                       "--only", "eager fp32", "openvino fp32 THROUGHPUT"], "openvino fp32"),
    ("bench_extract", ["--backbone", "resnet18", "--images", "4", "--batch-size", "4",
                       "--repeats", "1", "--photo-size", "64x48"], "plain loop"),
    ("bench_finetune", ["--images", "8", "--image-size", "32", "--batch-size", "4",
                        "--epochs", "1", "--precision", "fp32", "--workers", "0"], "s / epoch"),
    ("bench_fit", ["--per-class", "3", "--image-size", "32", "--stream-mb", "1",
                   "--chunk-mb", "1"], "Sweep on cached features"),
    ("bench_fitted_head", ["--work", "WORK", "--train-per-class", "5", "--test-per-class", "2",
                           "--epochs", "1"], "frozen logreg"),
    ("bench_ladder", ["--work", "WORK", "--smoke"], "mean ± std"),
    ("bench_memory", ["--images", "4", "--backbone", "resnet18", "--layer", "layer1",
                      "--image-size", "32", "--weights", "none"], "peak resident"),
    ("bench_results", ["--work", "WORK", "--train-per-class", "5", "--test-per-class", "2",
                       "--image-size", "32", "--cv", "2"], "test accuracy"),
    ("bench_startup", ["--repeats", "1"], "featx --help"),
    ("bench_winograd", ["--size", "32", "--batch", "2", "--repeats", "1"], "NNPACK"),
]
# fmt: on


def run_case(name: str, args: list[str], marker: str, tmp_path: Path) -> None:
    work = tmp_path / "work"
    out = bench(name, *(str(work) if a == "WORK" else a for a in args), cache=tmp_path / "cache")
    assert marker in out, f"{name} printed no {marker!r}:\n{out[-3000:]}"


@pytest.mark.parametrize(("name", "args", "marker"), FAST, ids=[c[0] for c in FAST])
def test_benchmark_runs_at_tiny_size(name, args, marker, tmp_path):
    run_case(name, args, marker, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "args", "marker"), SLOW, ids=[c[0] for c in SLOW])
def test_slow_benchmark_runs_at_tiny_size(name, args, marker, tmp_path):
    run_case(name, args, marker, tmp_path)


@pytest.mark.xfail(
    not merge_takes_rows(), reason="bench_merge.py has no --rows option yet", strict=True
)
def test_bench_merge_runs_at_tiny_size(tmp_path):
    out = bench("bench_merge", "--shards", "4", "--rows", "40", "--repeats", "1",
                cache=tmp_path / "cache")  # fmt: skip
    assert "virtual" in out


@pytest.mark.slow
@pytest.mark.skipif(not has("nncf"), reason="int8 needs nncf (the int8 extra)")
def test_bench_int8_runs_at_tiny_size(tmp_path):
    out = bench("bench_int8", "--work", str(tmp_path / "work"), "--train-per-class", "2",
                "--per-class", "1", "--repeats", "1", cache=tmp_path / "cache")  # fmt: skip
    assert "cosine int8 vs fp32" in out and "openvino int8" in out


@pytest.mark.slow
@pytest.mark.skipif(not has("ray"), reason="--ray needs ray (the ray extra)")
def test_bench_ray_runs_at_tiny_size(tmp_path):
    out = bench("bench_ray", "--images", "4", "--repeats", "1", "--backbone", "resnet18",
                cache=tmp_path / "cache")  # fmt: skip
    assert "dynamic, one worker 3x slower" in out


KERAS_PYTHON = os.environ.get("FEATX_KERAS_PYTHON")


@pytest.mark.slow
@pytest.mark.skipif(
    not KERAS_PYTHON, reason="set FEATX_KERAS_PYTHON to a Python with tensorflow and keras"
)
def test_bench_keras_runs_at_tiny_size(tmp_path):
    out = bench("bench_keras", "--keras-python", KERAS_PYTHON, "--images", "2",
                "--image-size", "32", "--repeats", "1", cache=tmp_path / "cache")  # fmt: skip
    assert "| keras |" in out
