"""The hostile corpus: bad image files, bad folder entries, bad output paths, faults and
out-of-range flags, run through the real command line.

Every case ends with a documented exit code (0 for odd but valid images, 2 for bad input,
3 for skipped files, 130 for a stop), never 1; a failure is one `featx: ...` sentence with no
traceback; and the good store and model file beside the case are left untouched.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import (
    FEATX,
    assert_one_sentence_error,
    file_digest,
    invoke_featx,
    make_folder,
    photo,
    run_featx,
)
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ("--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--workers", "0")


@dataclass
class Good:
    """A good dataset, store and model file that no case may change."""

    root: Path
    data: Path
    store: Path
    model: Path

    def digests(self) -> dict[Path, tuple[str, int]]:
        return {p: file_digest(p) for p in (self.store, self.model)}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Good:
    root = tmp_path_factory.mktemp("hostile")
    data = root / "good"
    make_folder(data, {"cat": 3, "dog": 3}, size=(40, 30))
    store = root / "good.h5"
    model = root / "good.joblib"
    done = invoke_featx("extract", data, *TINY, "--layer", "avgpool", "--store", store, "--quiet")
    assert done.returncode == 0, done.stderr
    done = invoke_featx(
        "fit", "--store", store, "--layer", "avgpool", "--model", model, "--cv", "2", "--quiet"
    )
    assert done.returncode == 0, done.stderr
    return Good(root, data, store, model)


def run_unprivileged(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    """Run `featx ARGS...` so that file permissions apply: as root, without the capabilities
    that let root ignore them (switching user would lose an interpreter installed in /root)."""
    drop = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot drop the permission override")
        drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    return subprocess.run(
        [*drop, *FEATX, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300
    )


# ---- bad entries in a data folder ---------------------------------------------------------
def _jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **kwargs)
    return buffer.getvalue()


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _bomb_png() -> bytes:
    """A valid PNG header declaring 60000 x 60000 pixels (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\0" * 1000)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", body)
        + _png_chunk(b"IEND", b"")
    )


def _bad_crc_png() -> bytes:
    data = bytearray(_png_bytes(photo(1, (20, 20))))
    data[29] ^= 0xFF  # inside IHDR's CRC
    return bytes(data)


def _animated_gif(path: Path) -> None:
    frames = [photo(i, (20, 20)).convert("P") for i in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)


def _write(name: str, payload: bytes | Callable[[Path], None]):
    """A case that puts one file `name` in class folder cat/."""

    def make(data: Path) -> str:
        path = data / "cat" / name
        if callable(payload):
            payload(path)
        else:
            path.write_bytes(payload)
        return name

    return make


def _save(name: str, image: Callable[[], Image.Image], **kwargs):
    return _write(name, lambda path: image().save(path, **kwargs))


def _symlink(name: str, target: str):
    def make(data: Path) -> str:
        os.symlink(target, data / "cat" / name)
        return name

    return make


def _fifo(data: Path) -> str:
    os.mkfifo(data / "cat" / "pipe.jpg")
    return "pipe.jpg"


def _dir_named_jpg(data: Path) -> str:
    (data / "cat" / "folder.jpg").mkdir()
    return "folder.jpg"


def _loop_to_parent(data: Path) -> str:
    os.symlink("..", data / "cat" / "up")
    return "up"


def _long_path(data: Path) -> str:
    """25 nested folders of 200 characters with an image at the bottom: past PATH_MAX."""
    fd = os.open(data / "cat", os.O_RDONLY)
    try:
        for _ in range(25):
            os.mkdir("d" * 200, dir_fd=fd)
            child = os.open("d" * 200, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = child
        out = os.open("deep.jpg", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, _jpeg_bytes(photo(3, (20, 20))))
        os.close(out)
    finally:
        os.close(fd)
    return "path longer than the system allows"


def _non_utf8(data: Path) -> str:
    name = os.fsencode(data / "cat") + b"/caf\xe9.jpg"
    with open(name, "wb") as fh:
        fh.write(_jpeg_bytes(photo(4, (20, 20))))
    return "caf"


def _unreadable_file(data: Path) -> str:
    path = data / "cat" / "secret.jpg"
    path.write_bytes(_jpeg_bytes(photo(5, (20, 20))))
    path.chmod(0)
    return "secret.jpg"


def _unreadable_subfolder(data: Path) -> str:
    sub = data / "cat" / "private"
    sub.mkdir()
    (sub / "a.jpg").write_bytes(_jpeg_bytes(photo(6, (20, 20))))
    sub.chmod(0)
    return "private"


def _unreadable_class(data: Path) -> str:
    sub = data / "bird"
    sub.mkdir()
    (sub / "a.jpg").write_bytes(_jpeg_bytes(photo(6, (20, 20))))
    sub.chmod(0)
    return "bird"


JPEG = _jpeg_bytes(photo(2, (40, 30)))
IMAGE_CASES = {
    # name: (make the entry, expected exit code, run as an unprivileged user)
    "truncated-jpeg": (_write("t.jpg", JPEG[: len(JPEG) // 2]), 3, False),
    "jpeg-header-only": (_write("h.jpg", JPEG[:2]), 3, False),
    "zero-bytes": (_write("z.jpg", b""), 3, False),
    "random-bytes": (_write("r.jpg", np.random.default_rng(0).bytes(5000)), 3, False),
    "text-as-png": (_write("t.png", b"hello, I am not a picture\n" * 20), 3, False),
    "png-bad-crc": (_write("c.png", _bad_crc_png()), 3, False),
    "png-no-idat": (
        _write("n.png", _bomb_png()[:33] + _png_chunk(b"IEND", b"")),
        3,
        False,
    ),
    "decompression-bomb": (_write("bomb.png", _bomb_png()), 3, False),
    "truncated-gif": (_write("g.gif", b"GIF89a" + b"\x10\x00\x10\x00" + b"\0" * 5), 3, False),
    "garbage-bmp": (_write("b.bmp", b"BM" + b"\xff" * 60), 3, False),
    "garbage-tiff": (_write("t.tif", b"II*\x00" + b"\xff" * 60), 3, False),
    "truncated-webp": (_write("w.webp", b"RIFF\x10\x00\x00\x00WEBPVP8 "), 3, False),
    "one-pixel": (_save("p1.png", lambda: Image.new("RGB", (1, 1), (9, 99, 199))), 0, False),
    "sixteen-bit": (
        _save("s16.png", lambda: Image.fromarray(np.arange(400, dtype=np.uint16).reshape(20, 20))),
        0,
        False,
    ),
    "float-tiff": (
        _save("f.tif", lambda: Image.fromarray(np.random.default_rng(1).random((20, 20)))),
        0,
        False,
    ),
    "cmyk-jpeg": (_save("cmyk.jpg", lambda: photo(7, (20, 20)).convert("CMYK")), 0, False),
    "palette-transparent": (
        _save("pal.png", lambda: photo(8, (20, 20)).convert("P"), transparency=0),
        0,
        False,
    ),
    "grey-alpha": (_save("la.png", lambda: photo(9, (20, 20)).convert("LA")), 0, False),
    "animated-gif": (_write("anim.gif", _animated_gif), 0, False),
    "upper-case-ext": (_write("UP.JPG", JPEG), 0, False),
    "hidden-file": (_write(".hidden.jpg", b"junk"), 0, False),
    "broken-symlink": (_symlink("gone.jpg", "does-not-exist.jpg"), 3, False),
    "symlink-to-itself": (_symlink("self.jpg", "self.jpg"), 3, False),
    "symlink-loop-pair": (
        lambda d: (_symlink("a.jpg", "b.jpg")(d), _symlink("b.jpg", "a.jpg")(d))[0],
        3,
        False,
    ),
    "symlink-to-parent": (_loop_to_parent, 3, False),
    "fifo": (_fifo, 3, False),
    "directory-named-jpg": (_dir_named_jpg, 3, False),
    "long-path": (_long_path, 3, False),
    "non-utf8-name": (_non_utf8, 3, False),
    "unreadable-file": (_unreadable_file, 3, True),
    "unreadable-subfolder": (_unreadable_subfolder, 2, True),
    "unreadable-class-folder": (_unreadable_class, 2, True),
    "empty-class-folder": (lambda d: (d / "empty").mkdir() or "empty", 2, False),
}


@pytest.mark.parametrize("case", list(IMAGE_CASES))
@pytest.mark.slow
def test_bad_data_entry(case, good, tmp_path):
    make, code, unprivileged = IMAGE_CASES[case]
    data = tmp_path / "data"
    shutil.copytree(good.data, data)
    mention = make(data)
    before = good.digests()
    store = tmp_path / "out.h5"
    args = ("extract", data, *TINY, "--layer", "avgpool", "--store", store, "--quiet")
    if unprivileged:
        done = run_unprivileged(*args, cwd=tmp_path)
    else:
        done = invoke_featx(*args)
    assert "Traceback" not in done.stderr, done.stderr
    if code == 2:
        assert mention in assert_one_sentence_error(done, 2)
    elif code == 3:
        assert done.returncode == 3, (done.returncode, done.stderr)
        assert "could not be read and were skipped" in done.stderr, done.stderr
        assert mention in done.stderr, done.stderr
        with h5py.File(store) as f:
            assert f["rows/path"].shape[0] == 6
    else:
        assert done.returncode == 0, (done.returncode, done.stderr)
        with h5py.File(store) as f:
            assert f["rows/path"].shape[0] == 6 + (not mention.startswith("."))
    assert good.digests() == before


@pytest.mark.slow
def test_predict_on_bad_entries(good, tmp_path):
    """predict lists unreadable files and folders, broken links and FIFOs, and exits 3."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "ok.jpg").write_bytes(JPEG)
    (folder / "zero.jpg").write_bytes(b"")
    os.symlink("nowhere.jpg", folder / "gone.jpg")
    os.mkfifo(folder / "pipe.jpg")
    (folder / "sub").mkdir()
    (folder / "sub" / "x.jpg").write_bytes(JPEG)
    (folder / "sub").chmod(0)
    before = good.digests()
    done = run_unprivileged("predict", "--model", good.model, folder, "--quiet", cwd=tmp_path)
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr
    for name in ("zero.jpg", "gone.jpg", "pipe.jpg", "sub"):
        assert name in done.stderr, done.stderr
    assert "ok.jpg" in done.stdout
    assert good.digests() == before


# ---- bad output paths and flags -----------------------------------------------------------
def _fit(good: Good, *extra) -> tuple:
    return ("fit", "--store", good.store, "--layer", "avgpool", "--cv", "2", "--quiet", *extra)


def _extract(good: Good, tmp: Path, *extra) -> tuple:
    return ("extract", good.data, *TINY, "--layer", "avgpool", "--store", tmp / "s.h5", *extra)


def _finetune(good: Good, tmp: Path, *extra) -> tuple:
    return (
        "finetune",
        good.data,
        *TINY,
        "--epochs-head",
        "1",
        "--epochs",
        "0",
        "--out",
        tmp / "run",
        "--quiet",
        *extra,
    )


def _predict(good: Good, *extra) -> tuple:
    return ("predict", "--model", good.model, good.data, "--quiet", *extra)


ARGUMENT_CASES: dict[str, Callable[[Good, Path], tuple]] = {
    "fit-report-dir": lambda g, t: _fit(g, "--report", t),
    "fit-model-dir": lambda g, t: _fit(g, "--model", t),
    "predict-out-dir": lambda g, t: _predict(g, "--out", t),
    "finetune-out-file": lambda g, t: (
        (t / "taken").write_text("x"),
        _finetune(g, t, "--out", t / "taken"),
    )[1],
    "data-dir-is-file": lambda g, t: ("extract", g.model, *TINY, "--layer", "avgpool"),
    "extract-workers-negative": lambda g, t: _extract(g, t, "--workers", "-3"),
    "extract-batch-size-zero": lambda g, t: _extract(g, t, "--batch-size", "0"),
    "extract-image-size-zero": lambda g, t: _extract(g, t, "--image-size", "0"),
    "extract-augment-negative": lambda g, t: _extract(g, t, "--augment", "-1"),
    "extract-bad-pool": lambda g, t: _extract(g, t, "--pool", "median"),
    "extract-bad-dtype": lambda g, t: _extract(g, t, "--dtype", "int8"),
    "extract-bad-device": lambda g, t: _extract(g, t, "--device", "tpu"),
    "extract-bad-engine": lambda g, t: _extract(g, t, "--engine", "tensorrt"),
    "extract-fp16-on-cpu": lambda g, t: _extract(g, t, "--precision", "fp16", "--device", "cpu"),
    "extract-bad-decode": lambda g, t: _extract(g, t, "--decode", "half"),
    "extract-int8-eager": lambda g, t: _extract(g, t, "--precision", "int8", "--engine", "eager"),
    "extract-shard-out-of-range": lambda g, t: _extract(g, t, "--shard", "3/2"),
    "extract-shard-not-a-fraction": lambda g, t: _extract(g, t, "--shard", "half"),
    "extract-bad-manifest": lambda g, t: (
        (t / "m.csv").write_text("path,label\n"),
        ("extract", t / "m.csv", *TINY, "--layer", "avgpool"),
    )[1],
    "extract-huge-image": lambda g, t: _extract(g, t, "--image-size", "40000"),
    "timm-unknown-weights": lambda g, t: (
        "extract",
        g.data,
        "--backbone",
        "timm:resnet18",
        "--weights",
        "IMAGENET9K",
        "--layer",
        "forward_features",
        "--store",
        t / "s.h5",
        "--workers",
        "0",
    ),
    "layers-n-images-negative": lambda g, t: ("layers", "resnet18", "--n-images", "-5"),
    "layers-image-size-zero": lambda g, t: ("layers", "resnet18", "--image-size", "0"),
    "predict-workers-negative": lambda g, t: _predict(g, "--workers", "-3"),
    "predict-tta-negative": lambda g, t: _predict(g, "--tta", "-1"),
    "predict-top-k-zero": lambda g, t: _predict(g, "--top-k", "0"),
    "predict-batch-size-zero": lambda g, t: _predict(g, "--batch-size", "0"),
    "predict-bad-engine": lambda g, t: _predict(g, "--engine", "tensorrt"),
    "fit-knn-too-many-neighbours": lambda g, t: _fit(
        g, "--clf", "knn", "--param", "n_neighbors=100"
    ),
    "fit-cv-one": lambda g, t: ("fit", "--store", g.store, "--layer", "avgpool", "--cv", "1"),
    "fit-val-fraction-two": lambda g, t: _fit(g, "--val-fraction", "2"),
    "fit-pca-zero": lambda g, t: _fit(g, "--pca", "0"),
    "fit-n-jobs-zero": lambda g, t: _fit(g, "--n-jobs", "0"),
    "fit-chunk-mb-negative": lambda g, t: _fit(g, "--chunk-mb", "-1"),
    "fit-bad-metric": lambda g, t: _fit(g, "--metric", "speed"),
    "finetune-workers-negative": lambda g, t: _finetune(g, t, "--workers", "-3"),
    "finetune-batch-size-zero": lambda g, t: _finetune(g, t, "--batch-size", "0"),
    "finetune-epochs-negative": lambda g, t: _finetune(g, t, "--epochs", "-2"),
    "finetune-lr-zero": lambda g, t: _finetune(g, t, "--lr", "0"),
    "finetune-dropout-above-one": lambda g, t: _finetune(g, t, "--dropout", "1.5"),
    "finetune-bad-decode": lambda g, t: _finetune(g, t, "--decode", "half"),
    "lr-find-num-iter-zero": lambda g, t: ("lr-find", g.data, *TINY, "--num-iter", "0"),
    "preview-n-zero": lambda g, t: ("augment-preview", g.data, "--n", "0", "--out", t / "p.png"),
}


@pytest.mark.parametrize("case", list(ARGUMENT_CASES))
@pytest.mark.slow
def test_bad_argument(case, good, tmp_path):
    args = ARGUMENT_CASES[case](good, tmp_path)
    before = good.digests()
    done = invoke_featx(*args)
    assert_one_sentence_error(done, 2)
    assert good.digests() == before
    assert not list(tmp_path.glob("*.partial")), "a refused run left a partial folder"


# ---- faults -------------------------------------------------------------------------------
def test_read_only_store_folder(good, tmp_path):
    """A store folder the user cannot write to: one sentence, exit 2."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    done = run_unprivileged(*_extract(good, folder, "--quiet"), cwd=tmp_path)
    assert str(folder) in assert_one_sentence_error(done, 2)


def test_store_behind_a_symlink_stays_a_symlink(good, tmp_path):
    """Adding a layer through a symlink writes the target, keeps the link and the mode."""
    real = tmp_path / "real.h5"
    shutil.copy(good.store, real)
    real.chmod(0o444)
    link = tmp_path / "link.h5"
    link.symlink_to(real)
    done = invoke_featx(
        "extract", good.data, *TINY, "--layer", "layer4", "--store", link, "--quiet"
    )
    assert done.returncode == 0, done.stderr
    assert link.is_symlink()
    assert (real.stat().st_mode & 0o777) == 0o444
    with h5py.File(real) as f:
        assert {"avgpool", "layer4"} <= set(f["features"])
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.lock"))


def test_leftover_partial_after_rename_is_removed(good, tmp_path, monkeypatch):
    """kill -9 after the final rename but before clean-up: the next run removes the partial."""
    from featx.extraction.partial import Partial

    store = tmp_path / "s.h5"
    monkeypatch.setattr(Partial, "remove", lambda self: None)  # the run dies right here
    args = ("extract", good.data, *TINY, "--layer", "avgpool", "--store", store, "--quiet")
    assert invoke_featx(*args).returncode == 0
    assert (tmp_path / "s.h5.partial").is_dir()
    monkeypatch.undo()
    before = file_digest(store)
    done = invoke_featx(*args)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "s.h5.partial").exists()
    assert file_digest(store) == before


@pytest.fixture
def small_disk(mount):
    return mount("size=3m")


def test_disk_full_while_adding_a_layer(good, tmp_path, small_disk):
    """Disk full: one sentence, no temporary file left, finished chunks kept, resumable."""
    store = small_disk / "s.h5"
    shutil.copy(good.store, store)
    before = file_digest(store)
    ballast = small_disk / "ballast"
    free = shutil.disk_usage(small_disk).free
    ballast.write_bytes(b"\0" * max(0, free - 60_000))
    args = ("extract", good.data, *TINY, "--layer", "layer1", "--store", store, "--quiet")
    args += ("--batch-size", "2")
    done = invoke_featx(*args)
    assert "disk full" in assert_one_sentence_error(done, 2)
    assert file_digest(store) == before
    leftovers = [p.name for p in small_disk.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    ballast.unlink()
    done = invoke_featx(*args)
    assert done.returncode == 0, done.stderr
    with h5py.File(store) as f:
        assert {"avgpool", "layer1"} <= set(f["features"])


def test_disk_full_while_saving_a_model(good, small_disk):
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 4096))
    done = invoke_featx(*_fit(good, "--model", small_disk / "m.joblib"))
    assert "disk full" in assert_one_sentence_error(done, 2)
    assert [p.name for p in small_disk.iterdir()] == ["ballast"]


@pytest.mark.slow
def test_sigterm_stops_cleanly_and_resumes(tmp_path):
    """SIGTERM (batch schedulers) stops like Ctrl-C: one sentence, exit 130, resumable."""
    data = tmp_path / "data"
    make_folder(data, {"a": 40, "b": 40}, size=(64, 48))
    store = tmp_path / "s.h5"
    args = [*FEATX, "extract", str(data), "--backbone", "resnet18", "--weights", "none"]
    # layer1 at 320 px is 1.6 MB a row: chunks of 18 images, so the run has five and the
    # signal lands between them, not during the final assembly
    args += ["--image-size", "320", "--batch-size", "2", "--workers", "0", "--quiet"]
    args += ["--layer", "layer1", "--store", str(store)]
    process = subprocess.Popen(
        args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    partial = tmp_path / "s.h5.partial"
    while not list(partial.glob("chunk-*.npz")) and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    done = subprocess.CompletedProcess(args, process.returncode, "", stderr)
    if process.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert "interrupted" in assert_one_sentence_error(done, 130)
    assert list(partial.glob("chunk-*.npz"))
    again = run_featx(*args[3:], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert not partial.exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
