"""The inference core: an engine added in one place runs extraction; every command that takes
images opens them the same way; predict's CSV is safe to open in a spreadsheet."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from clfdata import colour_folder
from conftest import make_folder

import featx
from featx.classify.prediction import Predictions
from featx.errors import UsageError
from featx.extraction.naming import default_store_path
from featx.inference.images import Batches, open_images
from featx.store import FeatureStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# An engine registered by its author: one decorated builder, nothing else changed.
EXTRA_ENGINE = """
import json, sys
from featx.inference.engine import Engine
from featx.inference.engines import register_engine


@register_engine("plain", help="the tap called as it is")
def plain(tap, device, precision, example, key=None, calibration=None, **options):
    def run(batch):
        return {k: v.float() for k, v in tap(batch.to(device)).items()}

    return Engine("plain", precision, device, run, details="a test's engine")


from featx import extract

data, store = sys.argv[1], sys.argv[2]
extract(data, "resnet18", ["layer2", "avgpool"], store=store, weights="none", image_size=64,
        workers=0, quiet=True, engine="plain")
"""


@pytest.mark.slow
def test_an_engine_registered_in_one_place_runs_extraction(small_photos, tmp_path):
    store = tmp_path / "plain.h5"
    done = subprocess.run(
        [sys.executable, "-c", EXTRA_ENGINE, str(small_photos), str(store)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    reference = tmp_path / "eager.h5"
    featx.extract(
        small_photos, "resnet18", ["layer2", "avgpool"], store=reference, weights="none",
        image_size=64, workers=0, quiet=True, engine="eager",
    )  # fmt: skip
    with FeatureStore(store) as got, FeatureStore(reference) as want:
        assert got.meta["history"][-1]["engine"].startswith("plain fp32 on cpu")
        for key in want.layers:
            np.testing.assert_allclose(got.read(key), want.read(key), rtol=1e-5, atol=1e-6)


def test_an_unknown_engine_is_refused_once_with_the_registered_names(small_photos, tmp_path):
    with pytest.raises(UsageError, match=r"^--engine must be one of auto, eager, compile, "):
        featx.extract(small_photos, "resnet18", ["layer2"], store=tmp_path / "s.h5",
                      engine="tensorrt")  # fmt: skip
    assert not (tmp_path / "s.h5").exists()


def test_a_manifest_store_is_named_after_the_manifests_folder(tmp_path):
    manifest = tmp_path / "photos" / "labels.csv"
    manifest.parent.mkdir()
    manifest.write_text("path,label\n")
    assert default_store_path(manifest, "resnet18") == Path("stores/photos-resnet18-default-std.h5")
    assert default_store_path(tmp_path / "photos", "resnet18", "none", 96) == Path(
        "stores/photos-resnet18-none-s96.h5"
    )


def test_an_image_file_is_refused_as_data_saying_what_it_is(tmp_path):
    image = make_folder(tmp_path / "data", {"cat": 1})[0]
    with pytest.raises(UsageError) as error:
        open_images(image)
    message = str(error.value)
    assert "is a file, not a dataset" in message and "does not exist" not in message
    with pytest.raises(UsageError, match="is a file, not a dataset"):
        featx.extract(image, "resnet18", ["layer2"], store=tmp_path / "s.h5")


def test_predict_csv_escapes_formula_cells():
    predictions = Predictions(
        paths=["=HYPERLINK(x).jpg", "plain.jpg"],
        predicted=["+cmd", "@sum"],
        scores=np.array([[-0.5, 0.25, 0.1], [0.1, -1.0, 2.0]]),
        class_names=["+cmd", "@sum", "-minus"],
        probabilities=False,
    )
    rows = list(csv.reader(io.StringIO(predictions.to_csv(top_k=3))))
    assert rows[1][:2] == ["'=HYPERLINK(x).jpg", "'+cmd"]
    assert rows[2][:2] == ["plain.jpg", "'@sum"]
    assert set(rows[1][2::2]) == {"'+cmd", "'@sum", "'-minus"}
    assert "-0.500000" in rows[1]  # numbers keep their sign


def test_batches_never_cross_a_chunk():
    assert list(Batches(2, 11, 4, chunk_items=5)) == [[2, 3, 4], [5, 6, 7, 8], [9], [10]]
    assert list(Batches(0, 5, 2)) == [[0, 1], [2, 3], [4]]


@pytest.mark.slow
def test_evaluate_on_images_takes_a_manifest_and_gives_the_folders_scores(tmp_path):
    data = colour_folder(tmp_path / "colours", {"train": 6, "test": 4}, seed=2)
    manifest = data / "labels.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split"])
        for path in sorted(data.rglob("*")):
            if path.is_file() and path.suffix in (".jpg", ".png"):
                split, label = path.relative_to(data).parts[:2]
                writer.writerow([path.relative_to(data).as_posix(), label, split])
    store = tmp_path / "s.h5"
    featx.extract(data, "resnet18", ["layer4"], store=store, weights="none", image_size=64,
                  pool="avg", workers=0, quiet=True)  # fmt: skip
    model = tmp_path / "m.joblib"
    featx.fit(store, "layer4@avg", "logreg", model=model)
    by_folder = featx.classify.evaluate_images(model, data, "test", quiet=True)
    by_manifest = featx.classify.evaluate_images(model, manifest, "test", quiet=True)
    assert json.dumps(by_folder.metrics, sort_keys=True) == json.dumps(
        by_manifest.metrics, sort_keys=True
    )
    assert list(by_folder.paths) == list(by_manifest.paths)
