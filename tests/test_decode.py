"""Reduced-size JPEG decoding: a large JPEG decodes smaller (DCT scaling) into the same network
input, other images decode at full size, EXIF rotation survives the draft, and the decode
policy is part of a store's recorded preprocessing: recorded, refused on a mismatch, and read
as full decoding from stores and run descriptions written before it was recorded."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from conftest import assert_one_sentence_error, invoke_featx, make_folder, photo
from PIL import Image

from featx import FeatureStore, extract
from featx.data.folders import load_image
from featx.data.preprocessing import DRAFT_FACTOR, Preprocessing
from featx.errors import UsageError
from featx.extraction.partial import Partial
from featx.extraction.plan import upgraded_run as _upgraded_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PREP = Preprocessing(32, 0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), square=True)
REDUCED = PREP.with_decode("reduced")
LARGE = (200, 160)  # shorter side >= 2 x DRAFT_FACTOR x 32: drafted by half, to 100x80


def save_jpeg(path, size, orientation: int | None = None):
    image = photo(3, size)
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(path, quality=92, exif=exif)
    return path


def test_a_large_jpeg_decodes_smaller_into_the_same_input(tmp_path):
    path = save_jpeg(tmp_path / "large.jpg", LARGE)
    full, reduced = PREP.load(path), REDUCED.load(path)
    assert full.size == LARGE and reduced.size == (100, 80)
    assert min(reduced.size) >= DRAFT_FACTOR * PREP.resize == REDUCED.draft_size
    a, b = PREP(full), REDUCED(reduced)
    assert a.shape == b.shape == (3, 32, 32)
    assert (a - b).abs().mean().item() < 0.05


def test_png_and_small_jpeg_decode_at_full_size(tmp_path):
    png = tmp_path / "large.png"
    photo(1, LARGE).save(png)
    small = save_jpeg(tmp_path / "small.jpg", (120, 100))  # shorter side < 2 x draft size
    for path in (png, small):
        reduced, full = REDUCED.load(path), load_image(path)
        assert reduced.size == full.size
        assert np.array_equal(np.asarray(reduced), np.asarray(full))


def test_exif_rotation_is_applied_after_the_draft(tmp_path):
    rotated = save_jpeg(tmp_path / "rotated.jpg", LARGE, orientation=6)  # 90 degrees
    full, reduced = PREP.load(rotated), REDUCED.load(rotated)
    assert full.size == (160, 200) and reduced.size == (80, 100)
    a, b = PREP(full), REDUCED(reduced)
    assert (a - b).abs().mean().item() < 0.05
    with Image.open(rotated) as stored:
        stored.draft(stored.mode, (64, 64))
        unrotated = REDUCED(stored.convert("RGB"))
    assert (a - unrotated).abs().mean().item() > 4 * (a - b).abs().mean().item()


def test_a_record_without_the_field_reads_as_full_decoding():
    old = {k: v for k, v in REDUCED.to_dict().items() if k != "decode"}
    assert Preprocessing.from_dict(old) == PREP
    assert Preprocessing.from_dict(REDUCED.to_dict()) == REDUCED
    assert "reduced size" in REDUCED.describe() and "decod" not in PREP.describe()
    with pytest.raises(UsageError, match="decode must be full or reduced"):
        PREP.with_decode("half")


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "pets"
    make_folder(root, {"cat": 2, "dog": 2}, size=(160, 128))  # drafted at --image-size 32
    return root


def quick(data, store, layers=("layer1",), **options):
    options = {
        "weights": "none", "image_size": 32, "workers": 0, "device": "cpu", "batch_size": 4,
        "quiet": True, **options,
    }  # fmt: skip
    return extract(data, "resnet18", list(layers), store=store, **options)


def stored_preprocessing(store) -> dict:
    with FeatureStore(store) as s:
        return s.meta["preprocessing"]


@pytest.mark.slow
def test_decode_is_recorded_followed_and_refused_on_a_mismatch(data, tmp_path):
    reduced, full = tmp_path / "reduced.h5", tmp_path / "full.h5"
    quick(data, reduced)
    quick(data, full, decode="full")
    assert stored_preprocessing(reduced)["decode"] == "reduced"
    assert stored_preprocessing(full)["decode"] == "full"
    with FeatureStore(reduced) as a, FeatureStore(full) as b:
        x, y = a.read("layer1"), b.read("layer1")
    assert x.shape == y.shape and not np.array_equal(x, y)  # the 160x128 photos were drafted

    quick(data, full, layers=("layer1", "layer2"))  # no --decode: the store's decoding
    assert stored_preprocessing(full)["decode"] == "full"
    args = ["extract", data, "--backbone", "resnet18", "--weights", "none", "--image-size", "32",
            "--layer", "layer3", "--workers", "0", "--device", "cpu", "--quiet"]  # fmt: skip
    message = assert_one_sentence_error(invoke_featx(*args, "--store", full, "--decode", "reduced"))
    assert "made differently" in message and "decoded at reduced size" in message
    message = assert_one_sentence_error(invoke_featx(*args, "--store", reduced, "--decode", "full"))
    assert "made differently" in message
    message = assert_one_sentence_error(invoke_featx(*args, "--decode", "half"))
    assert "decode" in message


@pytest.mark.slow
def test_a_store_from_before_the_field_keeps_working_as_full(data, tmp_path):
    store = tmp_path / "old.h5"
    quick(data, store, decode="full")
    with h5py.File(store, "r+") as h5:  # as a store written before the field existed
        meta = json.loads(h5.attrs["meta"])
        del meta["preprocessing"]["decode"]
        h5.attrs["meta"] = json.dumps(meta)
    assert quick(data, store).reused == ["layer1"]  # reuse, no --decode
    assert quick(data, store, decode="full").reused == ["layer1"]
    quick(data, store, layers=("layer1", "layer2"))  # extended with full decoding
    with pytest.raises(UsageError, match="made differently"):
        quick(data, store, layers=("layer3",), decode="reduced")


def test_a_run_description_from_before_the_field_resumes_as_full(tmp_path):
    identity = {"backbone": "resnet18", "preprocessing": PREP.to_dict()}
    old = {"identity": {**identity, "preprocessing": dict(PREP.to_dict())}, "keys": ["layer1"]}
    del old["identity"]["preprocessing"]["decode"]
    store = tmp_path / "s.h5"
    partial = store.with_name("s.h5.partial")
    partial.mkdir()
    (partial / "run.json").write_text(json.dumps(old))
    (partial / "chunk-000000.npz").write_bytes(b"kept")
    run = json.loads(json.dumps({"identity": identity, "keys": ["layer1"]}))
    assert Partial(store, run, upgrade=_upgraded_run).done() == 1  # resumed, not discarded
    reduced = {"identity": {**identity, "preprocessing": REDUCED.to_dict()}, "keys": ["layer1"]}
    assert Partial(store, json.loads(json.dumps(reduced)), upgrade=_upgraded_run).done() == 0


def test_fine_tuning_keeps_a_fitted_heads_or_stores_decoding(tmp_path):
    from types import SimpleNamespace

    from clfdata import synthetic_store

    from featx.finetuning.config import FinetuneConfig
    from featx.finetuning.session import _decode

    old_store = synthetic_store(tmp_path / "old.h5", 20, 4)  # its preprocessing has no decode field
    head = SimpleNamespace(provenance={"preprocessing": REDUCED.to_dict()})
    config = FinetuneConfig(backbone="resnet18")
    assert _decode(config, None, None) == "reduced"
    assert _decode(config, None, old_store) == "full"
    assert _decode(config, head, old_store) == "reduced"
    assert _decode(FinetuneConfig(backbone="resnet18", decode="full"), head, None) == "full"
    with pytest.raises(UsageError, match="decode"):
        FinetuneConfig(backbone="resnet18", decode="half")
