"""Start-up: the commands that need no network (help, listings, `info STORE`, usage errors
featx checks itself, an extraction whose layers are all cached) never import torch, so they
answer in well under a second instead of the 5-6 s that importing torch, torchvision and timm
costs. Each runs in a fresh interpreter that reports whether torch was imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_folder, run_featx

# Runs the CLI, then says on stderr whether torch got imported (the CLI exits via SystemExit).
PROBE = (
    "import atexit, sys; "
    "atexit.register(lambda: print('torch-imported' if 'torch' in sys.modules else "
    "'torch-not-imported', file=sys.stderr)); "
    "from featx.cli import app; app()"
)


def probe(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def cached(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("startup")
    data = root / "pets"
    make_folder(data, {"cat": 3, "dog": 3})
    store = root / "pets.h5"
    result = run_featx(
        "extract", data, "--backbone", "resnet18", "--weights", "none", "--image-size", 32,
        "--layer", "layer2", "--pool", "avg", "--workers", 0, "--device", "cpu",
        "--store", store, "--quiet", cwd=root,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return data, store


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--version"],
        ["backbones"],
        ["classifiers"],
        ["extract", "--help"],
    ],
    ids=lambda a: " ".join(a),
)
@pytest.mark.slow
def test_listings_import_no_torch(args, tmp_path):
    result = probe(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "torch-not-imported" in result.stderr


@pytest.mark.slow
def test_info_and_a_cached_rerun_import_no_torch(cached, tmp_path):
    data, store = cached
    info = probe("info", store, cwd=tmp_path)
    assert info.returncode == 0 and "torch-not-imported" in info.stderr, info.stderr
    rerun = probe(
        "extract", data, "--backbone", "resnet18", "--weights", "none", "--image-size", 32,
        "--layer", "layer2", "--pool", "avg", "--store", store, cwd=tmp_path,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    assert "nothing to compute" in rerun.stderr
    assert "torch-not-imported" in rerun.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["extract", "no/such/folder", "--backbone", "resnet18", "--layer", "layer2"],
        ["extract", ".", "--backbone", "resnet9000", "--layer", "layer2"],
        ["fit", "--store", "missing.h5", "--layer", "x", "--clf", "logreg"],
        ["info", "missing.h5"],
    ],
    ids=["missing-data", "unknown-backbone", "missing-store", "info-missing"],
)
@pytest.mark.slow
def test_usage_errors_import_no_torch(args, tmp_path):
    result = probe(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "torch-not-imported" in result.stderr
