"""`featx predict --engine` and `featx evaluate DATA --engine`: the engine is chosen as
extraction chooses it and said in one line, and every engine gives eager's probabilities.

OpenVINO runs only in featx subprocesses of its own: its thread pool crashes a process that
later forks DataLoader workers (see test_engines.py)."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from clfdata import colour_folder
from conftest import assert_one_sentence_error, invoke_featx, run_featx

import featx

needs_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None, reason="openvino is not installed"
)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[Path, Path]:
    """(image folder with a test split, logreg model file on resnet18 layer4 at 32 px)."""
    root = tmp_path_factory.mktemp("engines")
    data = colour_folder(root / "colours", {"train": 6, "test": 4}, seed=5)
    store = root / "s.h5"
    featx.extract(
        data, "resnet18", ["layer4"], store=store, weights="none", image_size=32, pool="avg",
        workers=0, quiet=True,
    )  # fmt: skip
    model = root / "logreg.featx"
    featx.fit(store, "layer4@avg", "logreg", model=model, log=False)
    return data, model


def probabilities(csv_path: Path) -> dict[tuple[str, str], float]:
    """{(path, class): probability} from a predict CSV that lists every class."""
    out = {}
    with csv_path.open() as fh:
        for row in csv.DictReader(fh):
            k = 1
            while f"top{k}" in row:
                out[row["path"], row[f"top{k}"]] = float(row[f"top{k}_probability"])
                k += 1
    return out


@needs_openvino
@pytest.mark.slow
def test_openvino_gives_eagers_probabilities_and_says_so(fitted, tmp_path):
    data, model = fitted
    n_classes = len(featx.load_model(model).class_names)
    results = {}
    for engine in ("eager", "openvino"):
        out = tmp_path / f"{engine}.csv"
        done = run_featx(  # with a decoding worker forked beside the engine
            "predict", "--model", model, data / "test", "--engine", engine, "--out", out,
            "--top-k", n_classes, "--workers", 1, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert f"Engine: {engine}." in done.stderr.splitlines(), done.stderr
        assert "fell back" not in done.stderr
        results[engine] = probabilities(out)
    eager, openvino = results["eager"], results["openvino"]
    assert eager.keys() == openvino.keys() and len(eager) == 12 * n_classes
    keys = sorted(eager)
    np.testing.assert_allclose(
        [openvino[k] for k in keys], [eager[k] for k in keys], rtol=1e-4, atol=2e-6
    )


@needs_openvino
@pytest.mark.slow
def test_evaluate_on_an_image_folder_takes_the_engine(fitted, tmp_path):
    data, model = fitted
    scores = {}
    for engine in ("eager", "openvino"):
        report = tmp_path / f"{engine}.json"
        done = run_featx(
            "evaluate", "--model", model, data, "--split", "test", "--engine", engine,
            "--report", report, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert f"Engine: {engine}." in done.stderr.splitlines(), done.stderr
        scores[engine] = json.loads(report.read_text())
    e, o = scores["eager"]["metrics"], scores["openvino"]["metrics"]
    assert o["accuracy"] == e["accuracy"]
    assert o["log_loss"] == pytest.approx(e["log_loss"], rel=1e-4)


@pytest.mark.slow
def test_an_unknown_engine_is_one_sentence(fitted):
    data, model = fitted
    message = assert_one_sentence_error(
        invoke_featx("predict", "--model", model, data / "test", "--engine", "onnx")
    )
    assert "--engine" in message and "auto" in message and "openvino" in message
