"""Shared helpers for the extraction, store and resume tests: photo-like images cut from
scikit-image's sample photos, image-folder builders and a runner for the real `featx` CLI."""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

FEATX = [sys.executable, "-m", "featx.cli"]


def as_from_a_terminal() -> None:
    """`preexec_fn` for a featx process a test stops with Ctrl-C (SIGINT to its group): the
    default SIGINT disposition, as a shell gives a foreground command. An ignored SIGINT is
    inherited, and Python keeps it ignored, so a test runner's worker in that state would
    start a featx that Ctrl-C cannot stop."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


@functools.cache
def _photo(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()


def photo(index: int, size: tuple[int, int] = (80, 60)) -> Image.Image:
    """A deterministic natural-looking RGB image of `size` (width, height): a crop of one of
    scikit-image's sample photos, chosen and placed by `index`."""
    source = _photo(PHOTOS[index % len(PHOTOS)])
    rng = np.random.default_rng(1000 + index)
    h, w = source.shape[:2]
    ch, cw = int(h * rng.uniform(0.4, 0.8)), int(w * rng.uniform(0.4, 0.8))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = Image.fromarray(source[top : top + ch, left : left + cw])
    return crop.resize(size, Image.Resampling.BILINEAR)


def make_folder(
    root: Path,
    classes: dict[str, int],
    *,
    split: str | None = None,
    ext: str = "jpg",
    size: tuple[int, int] = (80, 60),
    start: int = 0,
) -> list[Path]:
    """Write `n` photos per class under root[/split]/CLASS/ as img-###.ext; return the paths."""
    base = root / split if split else root
    written, index = [], start
    for name, n in classes.items():
        folder = base / name
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(n):
            path = folder / f"img-{index:03d}.{ext}"
            photo(index, size).save(path)
            written.append(path)
            index += 1
    return written


def run_featx(
    *args: object,
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """Run `featx ARGS...` in a fresh interpreter, capturing text output."""
    return subprocess.run(
        [*FEATX, *map(str, args)],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def invoke_featx(*args: object, argv: bool = False) -> subprocess.CompletedProcess:
    """Run the `featx` command line in this process (typer's runner), for quick error checks
    that need no fresh interpreter; same result shape as `run_featx`. With `argv`, sys.argv
    reads `featx ARGS...` meanwhile, so that the command recorded in a store or run log is
    the one a shell would have run."""
    from typer.testing import CliRunner

    from featx.cli import app

    words = [str(a) for a in args]
    with pytest.MonkeyPatch.context() as patch:
        if argv:
            patch.setattr(sys, "argv", ["featx", *words])
        result = CliRunner().invoke(app, words, catch_exceptions=False)
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def assert_one_sentence_error(result: subprocess.CompletedProcess, code: int = 2) -> str:
    """The CLI failed with `code` and said why in one `featx: ...` line, with no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("featx: ")]
    assert len(lines) == 1, result.stderr
    message = lines[0]
    assert message.endswith("."), message
    return message


def rows_as_images(root: Path, paths: Iterable[str]) -> list[Image.Image]:
    """Decode dataset files the plain way (PIL, RGB), in the given order."""
    images = []
    for path in paths:
        with Image.open(root / path) as image:
            images.append(image.convert("RGB"))
    return images


@pytest.fixture(scope="session")
def small_photos(tmp_path_factory) -> Path:
    """A flat dataset: 2 classes x 4 photos of 80x60 (and one portrait 60x80 per class)."""
    root = tmp_path_factory.mktemp("small") / "pets"
    make_folder(root, {"cat": 4, "dog": 4})
    make_folder(root, {"cat": 1, "dog": 1}, size=(60, 80), start=50)
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small networks gain nothing from intra-op threads, which stall when the 2 cores are
    busy; modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seeded(builder, seed: int = 7, **kwargs):
    """`builder(**kwargs)` with seeded random weights, in eval mode, its BatchNorms perturbed
    (running statistics and affine parameters) so that they are not the identity they are at
    init; torch's global generator is left as it was."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builder(**kwargs)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.running_mean.uniform_(-0.2, 0.2)
                    module.running_var.uniform_(0.5, 1.5)
                    if module.affine:
                        module.weight.uniform_(0.5, 1.5)
                        module.bias.uniform_(-0.2, 0.2)
    return model.eval()


def file_digest(path: Path) -> tuple[str, int]:
    """The sha256 of a file's bytes and its modification time: equal when it was untouched."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest(), Path(path).stat().st_mtime_ns


@pytest.fixture(autouse=True, scope="session")
def engine_cache(tmp_path_factory) -> Path:
    """An empty engine cache for the session (inherited by the featx subprocesses): `auto`
    then never finds a conversion cached by other work on the machine, so the small runs of
    the tests stay eager unless a test asks for an engine."""
    path = tmp_path_factory.mktemp("engine-cache")
    os.environ["FEATX_CACHE"] = str(path)
    return path


@pytest.fixture
def mount(tmp_path: Path):
    """mount(options) -> a fresh tmpfs folder, unmounted afterwards (skips where mounting is
    not allowed)."""
    mounted = []

    def make(options: str) -> Path:
        path = tmp_path / f"mnt{len(mounted)}"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)
