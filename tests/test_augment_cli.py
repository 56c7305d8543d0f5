"""Augmentation on the command line: the shared flags, settings files, and augment-preview."""

from __future__ import annotations

from pathlib import Path

import pytest
from ftdata import shapes_folder
from PIL import Image
from typer.testing import CliRunner

from featx.cli import app
from featx.cli.options import AugmentFlags
from featx.data.augment_config import AugmentConfig
from featx.data.preview import read_preview_settings
from featx.errors import UsageError


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return shapes_folder(tmp_path_factory.mktemp("preview") / "shapes", 3)


def invoke(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_flags_override_the_settings_file(tmp_path):
    settings = tmp_path / "augment.json"
    settings.write_text('{"rotation": 10, "zoom": 0.3, "noise": 0.05}')
    flags = AugmentFlags(settings, {"rotation": 20.0, "hflip": False, "zoom": None})
    assert flags.config() == AugmentConfig(rotation=20, zoom=0.3, noise=0.05, hflip=False)
    nothing = AugmentFlags(None, {"rotation": None})
    assert nothing.config() is None and nothing.config(default=True) == AugmentConfig()
    with pytest.raises(UsageError, match="Augmentation crop must be a number from 0 to just"):
        AugmentFlags(None, {"crop": 0.5}).config()


def test_preview_of_a_folder_shows_each_class_with_its_views(shapes, tmp_path):
    out = tmp_path / "preview.png"
    code, stdout, err = invoke(
        "augment-preview", shapes, "--n", 4, "--images", 3, "--tile", 64, "--rotation", 30,
        "--brightness", 0.3, "--out", out,
    )  # fmt: skip
    assert code == 0, err
    assert stdout.strip() == str(out)
    with Image.open(out) as sheet:
        assert sheet.size == (5 * 68 + 4, 3 * 68 + 4)  # original + 4 views, 3 rows
    recorded = read_preview_settings(out)
    assert recorded["config"] == AugmentConfig(rotation=30, brightness=0.3).to_dict()
    assert recorded["views"] == 4 and recorded["seed"] == 0
    classes = [Path(p).parent.name for p in recorded["images"]]
    assert sorted(classes) == ["circle", "square", "triangle"]


def test_preview_of_one_image_is_reproducible(shapes, tmp_path):
    image = next((shapes / "circle").iterdir())
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    for out in (first, second):
        code, _, err = invoke("augment-preview", image, "--n", 8, "--tile", 48, "--out", out)
        assert code == 0, err
    with Image.open(first) as a, Image.open(second) as b:
        assert a.size == (3 * 52 + 4, 3 * 52 + 4)
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--zoom", "1"], "featx: --zoom must be at least 0 and below 1, not 1."),
        (["--fill-value", "300"], "featx: --fill-value must be at least 0 and at most 255"),
        (["--fill", "wrap"], "featx: Invalid value for '--fill'"),
        (["--out", "preview.jpg"], "featx: --out must be a .png file"),
    ],
)
def test_preview_errors_are_one_sentence(shapes, tmp_path, options, message):
    code, _, err = invoke("augment-preview", shapes, *options)
    assert code == 2
    assert err.startswith(message) and err.count("\n") == 1, err
