"""Image folders: layouts, row order, formats, EXIF orientation, colour modes, bad files
(skipped, listed, exit 3, other rows intact) and unusable data directories (exit 2)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from conftest import assert_one_sentence_error, invoke_featx, make_folder, photo, run_featx
from PIL import Image

from featx import FeatureStore, extract
from featx.data.folders import BadImage, load_image, scan_image_folder
from featx.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "gif", "webp", "tif")


def fast_extract(data, store, **options):
    options = {
        "weights": "none", "image_size": 32, "workers": 0, "device": "cpu", "quiet": True,
        "batch_size": 4, **options,
    }  # fmt: skip
    return extract(data, "resnet18", ["layer2"], store=store, **options)


# ---- layouts and order --------------------------------------------------------------------
def test_split_layout_with_val_read_as_validation(tmp_path):
    root = tmp_path / "data"
    make_folder(root, {"b_dog": 2, "a_cat": 3}, split="train")
    make_folder(root, {"a_cat": 1, "b_dog": 1}, split="val", start=20)
    make_folder(root, {"a_cat": 1}, split="test", start=30)
    folder = scan_image_folder(root)
    assert folder.class_names == ("a_cat", "b_dog")
    assert folder.splits == ("train", "validation", "test")
    listed = [(f.split, f.label, f.path) for f in folder.files]
    assert listed == [
        ("train", 0, "train/a_cat/img-002.jpg"),
        ("train", 0, "train/a_cat/img-003.jpg"),
        ("train", 0, "train/a_cat/img-004.jpg"),
        ("train", 1, "train/b_dog/img-000.jpg"),
        ("train", 1, "train/b_dog/img-001.jpg"),
        ("validation", 0, "val/a_cat/img-020.jpg"),
        ("validation", 1, "val/b_dog/img-021.jpg"),
        ("test", 0, "test/a_cat/img-030.jpg"),
    ]
    result = fast_extract(root, tmp_path / "s.h5")
    with FeatureStore(result.store) as store:
        assert store.splits == ["train", "validation", "test"]
        assert list(store.labels("validation")) == [0, 1]
        assert list(store.paths()) == [p for _, _, p in listed]
        assert store.read("layer2", split="test").shape[0] == 1


def test_flat_layout_and_nested_folders(tmp_path):
    root = tmp_path / "flat"
    make_folder(root, {"zebra": 2, "ant": 2})
    nested = root / "ant" / "more"
    nested.mkdir()
    photo(9).save(nested / "deep.png")
    (root / "ant" / ".hidden.jpg").write_bytes(b"ignored")
    (root / "ant" / "notes.txt").write_text("ignored")
    (root / ".cache").mkdir()
    folder = scan_image_folder(root)
    assert folder.class_names == ("ant", "zebra") and folder.splits == ("unsplit",)
    assert [f.path for f in folder.files] == [
        "ant/img-002.jpg", "ant/img-003.jpg", "ant/more/deep.png",
        "zebra/img-000.jpg", "zebra/img-001.jpg",
    ]  # fmt: skip
    assert [f.label for f in folder.files] == [0, 0, 0, 1, 1]


def test_row_order_is_deterministic(tmp_path):
    names = ["b10.png", "a2.png", "B1.png", "a10.png", "c.png", "_x.png"]
    listings = []
    for root, order in ((tmp_path / "one", names), (tmp_path / "two", names[::-1])):
        (root / "k").mkdir(parents=True)
        for name in order:  # creation (and directory listing) order must not matter
            photo(len(name)).save(root / "k" / name)
        listings.append([f.path for f in scan_image_folder(root).files])
    assert listings[0] == listings[1] == [f"k/{n}" for n in sorted(names)]
    root = tmp_path / "one"
    assert scan_image_folder(root).fingerprint == scan_image_folder(root).fingerprint


def test_every_supported_extension_is_read(tmp_path):
    root = tmp_path / "formats"
    for i, ext in enumerate(EXTENSIONS):
        make_folder(root, {"all": 1}, ext=ext, start=i)
    (root / "all" / "upper.JPG").write_bytes((root / "all" / "img-000.jpg").read_bytes())
    folder = scan_image_folder(root)
    assert sorted(os.path.splitext(f.path)[1].lower() for f in folder.files) == sorted(
        [".jpg", *(f".{e}" for e in EXTENSIONS)]
    )
    for f in folder.files:
        image = load_image(root / f.path)
        assert image.mode == "RGB" and image.size == (80, 60)
    lossless = np.asarray(photo(2), dtype=np.int16)  # png
    assert np.array_equal(np.asarray(load_image(root / "all" / "img-002.png")), lossless)
    jpeg = np.asarray(load_image(root / "all" / "img-000.jpg"), dtype=np.int16)
    assert np.abs(jpeg - np.asarray(photo(0), dtype=np.int16)).mean() < 8
    result = fast_extract(root, tmp_path / "s.h5")
    assert result.n_rows == len(EXTENSIONS) + 1 and result.skipped == []


# ---- decoding -----------------------------------------------------------------------------
def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (80, 60), (220, 30, 30))  # red, with a blue left quarter
    image.paste((30, 30, 220), (0, 0, 20, 60))
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: display rotated 90 degrees clockwise
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    with Image.open(tmp_path / "rotated.jpg") as raw:
        assert raw.size == (80, 60) and raw.getexif()[0x0112] == 6

    decoded = load_image(tmp_path / "rotated.jpg")
    assert decoded.size == (60, 80)
    pixels = np.asarray(decoded).astype(int)
    blue_top, red_bottom = pixels[:18].mean(axis=(0, 1)), pixels[24:].mean(axis=(0, 1))
    assert blue_top[2] > 180 and blue_top[0] < 70
    assert red_bottom[0] > 180 and red_bottom[2] < 70


@pytest.mark.slow
def test_exif_rotated_file_gives_the_features_of_the_upright_image(tmp_path):
    upright = photo(3, size=(60, 80))
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "a" / "k").mkdir(parents=True)
    (tmp_path / "b" / "k").mkdir(parents=True)
    upright.save(tmp_path / "a" / "k" / "x.png")
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "b" / "k" / "x.png", exif=exif)
    assert np.array_equal(
        np.asarray(load_image(tmp_path / "b" / "k" / "x.png")), np.asarray(upright)
    )
    a = fast_extract(tmp_path / "a", tmp_path / "a.h5", image_size=None)
    b = fast_extract(tmp_path / "b", tmp_path / "b.h5", image_size=None)
    with FeatureStore(a.store) as sa, FeatureStore(b.store) as sb:
        assert np.array_equal(sa.read("layer2"), sb.read("layer2"))


def test_colour_modes_become_rgb(tmp_path):
    gray = Image.new("L", (40, 30), 77)
    gray.save(tmp_path / "gray.png")
    gray.save(tmp_path / "gray.jpg", quality=100)
    Image.new("RGB", (40, 30), (10, 200, 30)).quantize(8).save(tmp_path / "palette.png")
    Image.new("RGB", (40, 30), (10, 200, 30)).quantize(8).save(tmp_path / "palette.gif")
    Image.new("RGBA", (40, 30), (250, 120, 5, 255)).save(tmp_path / "rgba.png")
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    Image.new("CMYK", (40, 30), (0, 0, 0, 255)).save(tmp_path / "black-cmyk.tif")
    ramp = np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (30, 1))
    Image.fromarray(ramp).save(tmp_path / "sixteen.png")
    with Image.open(tmp_path / "sixteen.png") as raw:
        assert raw.mode.startswith("I")  # 16-bit grayscale on disk

    def rgb(name):
        image = load_image(tmp_path / name)
        assert image.mode == "RGB" and image.size == (40, 30), name
        return np.asarray(image).astype(int)

    assert (rgb("gray.png") == 77).all()
    assert np.abs(rgb("gray.jpg") - 77).max() <= 1
    assert (rgb("palette.png") == [10, 200, 30]).all()
    assert (rgb("palette.gif") == [10, 200, 30]).all()
    assert (rgb("rgba.png") == [250, 120, 5]).all()
    red = rgb("cmyk.jpg")
    assert (red[..., 0] > 240).all() and (red[..., 1:] < 15).all()
    assert (rgb("black-cmyk.tif") == 0).all()
    sixteen = rgb("sixteen.png")
    assert (sixteen[..., 0] == sixteen[..., 2]).all()
    assert sixteen[0, 0, 0] == 0 and sixteen[0, -1, 0] == 255  # 16-bit range scaled to 8 bits
    assert np.all(np.diff(sixteen[0, :, 0]) >= 0) and len(np.unique(sixteen)) > 30


# ---- bad files ----------------------------------------------------------------------------
def write_bad_files(folder) -> dict[str, str]:
    """Bad files of each kind in `folder`; returns {file name: a word its reason must contain}."""
    good = folder / "img-000.jpg"
    data = good.read_bytes()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a picture\n")
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    big = photo(11, size=(200, 150))
    big.save(folder / "bigsrc.png")
    png = (folder / "bigsrc.png").read_bytes()
    (folder / "bigsrc.png").unlink()
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "corrupt.png").write_bytes(png[:8] + bytes(range(256)) * 8)
    (folder / "dir.jpg").mkdir()  # a folder named like an image: not a row, listed by the scan
    expected = {
        "empty.jpg": "empty",
        "text.jpg": "not an image",
        "truncated.jpg": "truncated image",
        "truncated.png": "truncated image",
        "corrupt.png": "",
    }
    if os.geteuid() != 0:  # root reads any file whatever its mode
        locked = folder / "locked.jpg"
        locked.write_bytes(data)
        locked.chmod(0)
        expected["locked.jpg"] = "permission"
    return expected


def test_each_kind_of_bad_file_raises_bad_image(tmp_path):
    make_folder(tmp_path, {"k": 1})
    expected = write_bad_files(tmp_path / "k")
    for name, word in expected.items():
        with pytest.raises(BadImage) as error:
            load_image(tmp_path / "k" / name)
        assert word in str(error.value).lower(), (name, str(error.value))
        assert "\n" not in str(error.value)


def test_unreadable_file(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: a chmod 000 file is still readable")
    make_folder(tmp_path, {"k": 1})
    (tmp_path / "k" / "img-000.jpg").chmod(0)
    with pytest.raises(BadImage, match="permission denied"):
        load_image(tmp_path / "k" / "img-000.jpg")


@pytest.mark.slow
def test_bad_files_are_skipped_listed_and_exit_3(tmp_path):
    clean = tmp_path / "clean"
    make_folder(clean, {"cat": 3}, split="train")
    make_folder(clean, {"dog": 3}, split="train", start=3)
    make_folder(clean, {"cat": 1, "dog": 1}, split="validation", start=6)
    data = tmp_path / "dirty"
    shutil.copytree(clean, data)
    undecodable = write_bad_files(data / "train" / "cat")
    expected = {**undecodable, "dir.jpg": "folder"}
    args = ["--backbone", "resnet18", "--weights", "none", "--layer", "layer2", "--image-size",
            "32", "--batch-size", "3", "--workers", "1", "--device", "cpu"]  # fmt: skip
    result = run_featx("extract", data, *args, "--store", "dirty.h5", cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.strip() == "dirty.h5"
    assert f"{len(expected)} file(s) could not be read and were skipped" in result.stderr
    for name, word in expected.items():
        line = next(x for x in result.stderr.splitlines() if f"train/cat/{name}:" in x)
        assert word in line.lower()

    reference = fast_extract(clean, tmp_path / "clean.h5", batch_size=3)
    with FeatureStore(tmp_path / "dirty.h5") as dirty, FeatureStore(reference.store) as ok:
        skipped = dict(dirty.skipped)
        assert sorted(skipped) == sorted(f"train/cat/{name}" for name in expected)
        for name, word in expected.items():
            assert word in skipped[f"train/cat/{name}"].lower()
        assert dirty.n_rows == ok.n_rows == 8
        assert list(dirty.paths()) == list(ok.paths())
        assert list(dirty.labels()) == list(ok.labels())
        np.testing.assert_allclose(dirty.read("layer2"), ok.read("layer2"), rtol=1e-5, atol=1e-5)
        # every file, bad ones included, is recorded with its stat
        assert dirty.meta["dataset"]["n_files"] == 8 + len(undecodable)
        info = invoke_featx("info", tmp_path / "dirty.h5")
    assert f"skipped files: {len(expected)}" in info.stdout
    assert "train/cat/text.jpg: not an image" in info.stdout


def test_all_files_bad_still_writes_an_empty_store(tmp_path):
    root = tmp_path / "bad"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.jpg").write_text("nope")
    result = fast_extract(root, tmp_path / "s.h5")
    assert result.n_rows == 0 and result.skipped == [("a/x.jpg", "not an image")]
    with FeatureStore(result.store) as store:
        assert store.read("layer2").shape == (0, 128, 4, 4)


# ---- unusable data directories ------------------------------------------------------------
@pytest.mark.slow
def test_unusable_data_directories_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "hollow" / "cat").mkdir(parents=True)
    make_folder(tmp_path / "hollow", {"dog": 1})
    make_folder(tmp_path / "mixed", {"cat": 1}, split="train")
    make_folder(tmp_path / "mixed", {"dog": 1})
    cases = {
        "missing": "does not exist",
        "empty": "no class folders",
        "hollow": "holds no images",
        "mixed": "mixes split folders",
    }
    for name, words in cases.items():
        with pytest.raises(UsageError, match=words):
            scan_image_folder(tmp_path / name)
    for name in cases:
        result = invoke_featx(
            "extract", tmp_path / name, "--backbone", "resnet18", "--weights", "none",
            "--layer", "layer2", "--store", tmp_path / f"{name}.h5",
        )  # fmt: skip
        message = assert_one_sentence_error(result)
        assert cases[name] in message and name in message
        assert not (tmp_path / f"{name}.h5").exists()
    # and once through a fresh interpreter, as a user runs it
    result = run_featx(
        "extract", "hollow", "--backbone", "resnet18", "--weights", "none", "--layer", "layer2",
        cwd=tmp_path,
    )  # fmt: skip
    assert "hollow/cat holds no images" in assert_one_sentence_error(result)
    assert not (tmp_path / "stores").exists() or not any((tmp_path / "stores").iterdir())
