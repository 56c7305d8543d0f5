"""`--precision int8`: OpenVINO's post-training quantization, calibrated on the dataset, recorded
in the store, refused with the engines that have no int8, cached under its own key.

OpenVINO runs only in `featx` subprocesses: its thread pool crashes a process that forks later.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from conftest import assert_one_sentence_error, invoke_featx, make_folder, run_featx

from featx.errors import UsageError
from featx.inference import Calibration, cache_key
from featx.runtime import check_precision
from featx.store import FeatureStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")

needs_nncf = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None or importlib.util.find_spec("nncf") is None,
    reason="openvino or nncf is not installed",
)
TINY = ("--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--pool", "avg",
        "--layer", "layer3", "--layer", "avgpool", "--workers", "0")  # fmt: skip


@pytest.mark.parametrize("engine", ["eager", "compile"])
def test_int8_is_refused_on_engines_without_it(tmp_path, engine):
    make_folder(tmp_path / "data", {"a": 2, "b": 2})
    result = invoke_featx(
        "extract", tmp_path / "data", *TINY, "--precision", "int8", "--engine", engine,
        "--store", tmp_path / "s.h5",
    )  # fmt: skip
    message = assert_one_sentence_error(result)
    assert "--precision int8 runs only on the openvino engine" in message and engine in message
    assert not (tmp_path / "s.h5").exists()


def test_int8_needs_the_cpu_and_stays_out_of_training_precisions():
    import torch

    check_precision(torch.device("cpu"), "int8", "openvino")
    check_precision(torch.device("cpu"), "int8", "auto")
    with pytest.raises(UsageError, match="--device cpu"):
        check_precision(torch.device("cuda"), "int8", "openvino")
    with pytest.raises(UsageError, match="precision"):
        check_precision(torch.device("cpu"), "int8")  # no engine: fine-tuning's vocabulary


def test_int8_cache_key_names_its_calibration():
    def calibration(identity: str) -> Calibration:
        return Calibration(lambda: [], 300, 0, identity)

    args = ("resnet18", "sha", ["layer3"], "avg", 32)
    fp32 = cache_key(*args, "fp32", "extract")
    int8 = cache_key(*args, "int8", "extract", calibration("dataset-a").key())
    assert len({fp32, int8, cache_key(*args, "int8", "extract")}) == 3
    assert int8 != cache_key(*args, "int8", "extract", calibration("dataset-b").key())


@needs_nncf
@pytest.mark.slow
def test_int8_store_records_precision_and_calibration(tmp_path):
    make_folder(tmp_path / "data", {"a": 6, "b": 6})
    env = {"FEATX_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    for name, options in (("fp32", ("--engine", "eager")), ("int8", ("--precision", "int8"))):
        done = run_featx("extract", "data", *TINY, *options, "--seed", "3", "--store",
                         f"{name}.h5", cwd=tmp_path, env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr
    assert "Engine: openvino (int8" in done.stderr  # auto picks openvino for int8
    assert "Quantizing to int8 on 12 calibration images" in done.stderr
    # stdout holds the store's path alone: NNCF's progress bars do not reach it
    assert done.stdout.strip().splitlines() == ["int8.h5"], done.stdout
    with FeatureStore(tmp_path / "fp32.h5") as fp32, FeatureStore(tmp_path / "int8.h5") as int8:
        assert int8.layers == fp32.layers
        for key in fp32.layers:
            attrs = int8.layer(key).attrs
            assert attrs["precision"] == "int8" and attrs["engine"] == "openvino"
            assert attrs["calibration_images"] == 12 and attrs["calibration_seed"] == 3
            assert 0.9 < attrs["calibration_cosine_min"] <= attrs["calibration_cosine_median"]
            x, y = fp32.read(key), int8.read(key)
            assert x.shape == y.shape == (12, *fp32.layer(key).shape)
            cosine = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
            assert cosine.min() > 0.9, (key, cosine)  # random weights: a loose bound
        run = int8.meta["history"][-1]
        assert run["precision"] == "int8" and run["calibration"]["images"] == 12
        assert "calibrated on 12 images (seed 3)" in run["engine"]
    assert len(list((tmp_path / "cache" / "openvino").glob("*.xml"))) == 1
    info = run_featx("info", "int8.h5", cwd=tmp_path, env=env)
    assert "int8 openvino, calibrated on 12 images (seed 3), cosine to fp32 min" in info.stdout
    assert "fp32 eager" in run_featx("info", "fp32.h5", cwd=tmp_path, env=env).stdout

    # predict runs the quantized model extraction cached (it has no calibration images)
    for args in (
        ("fit", "--store", "int8.h5", "--layer", "avgpool@avg", "--clf", "logreg", "--model",
         "m.featx"),
        ("predict", "--model", "m.featx", "data", "--out", "p.csv", "--workers", "0"),
    ):  # fmt: skip
        done = run_featx(*args, cwd=tmp_path, env=env)
        assert done.returncode == 0, done.stderr
    assert "Engine: openvino (int8" in done.stderr, done.stderr
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 13
    done = run_featx("predict", "--model", "m.featx", "data", "--engine", "eager", cwd=tmp_path,
                     env=env)  # fmt: skip
    assert "--precision int8 runs only on the openvino engine" in assert_one_sentence_error(done)
