"""Tests for featx.data.augment on drawn RGB images."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw, ImageOps

from featx.data.augment import Augmenter, preview_grid, view_seed
from featx.data.augment_config import AugmentConfig
from featx.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

W, H = 128, 96  # non-square to catch mixed-up axes
WHITE = (255, 255, 255)
SEEDS = range(40)


def photo() -> Image.Image:
    """A photo-like scene: smooth colour gradients with a few solid shapes, no black pixels."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    rgb = np.stack([60 + 120 * x / W, 80 + 100 * y / H, 160 - 60 * (x + y) / (W + H)], axis=-1)
    image = Image.fromarray(rgb.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse([10, 12, 50, 44], fill=(220, 180, 40))
    draw.rectangle([70, 50, 110, 80], fill=(40, 90, 200))
    draw.polygon([(60, 10), (90, 40), (40, 40)], fill=(200, 60, 70))
    return image


def square(size: int = 20) -> Image.Image:
    """A bright centred square on a dark background."""
    image = Image.new("RGB", (W, H), (20, 20, 20))
    left, top = (W - size) // 2, (H - size) // 2
    ImageDraw.Draw(image).rectangle([left, top, left + size - 1, top + size - 1], fill=WHITE)
    return image


def bright(image: Image.Image) -> np.ndarray:
    return np.asarray(image).mean(axis=2) > 128


def centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def only(**fields) -> Augmenter:
    return Augmenter(dataclasses.replace(AugmentConfig.none(), **fields))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


# Determinism


def test_same_seed_same_bytes_and_size_and_mode():
    augment = Augmenter(
        AugmentConfig(crop=0.1, contrast=0.2, brightness=0.2, noise=0.02, downsample=0.5)
    )
    first, second = augment(photo(), 123), augment(photo(), 123)
    assert first.tobytes() == second.tobytes()
    assert first.size == (W, H) and first.mode == "RGB"


def test_different_seeds_differ():
    augment = Augmenter(AugmentConfig())
    outputs = {augment(photo(), seed).tobytes() for seed in range(8)}
    assert len(outputs) == 8


def test_independent_of_global_rng_state():
    augment = Augmenter(AugmentConfig(noise=0.05, brightness=0.3))
    torch.manual_seed(1)
    np.random.seed(1)
    first = augment(photo(), 7).tobytes()
    torch.manual_seed(999)
    torch.rand(100)
    np.random.seed(999)
    assert augment(photo(), 7).tobytes() == first


def test_independent_of_call_order():
    augment = Augmenter(AugmentConfig(noise=0.05, contrast=0.3))
    forward = {seed: augment(photo(), seed).tobytes() for seed in range(5)}
    backward = {seed: augment(photo(), seed).tobytes() for seed in reversed(range(5))}
    assert forward == backward


def test_view_seed_is_deterministic_and_mixed():
    assert view_seed(0, 1, 2) == view_seed(0, 1, 2)
    seeds = {view_seed(b, i, v) for b in range(3) for i in range(30) for v in range(5)}
    assert len(seeds) == 3 * 30 * 5
    assert view_seed(0, 1, 0) != view_seed(1, 0, 0) != view_seed(0, 0, 1)
    assert all(0 <= s < 2**63 for s in seeds)


# Identity and ranges


def test_identity_config_returns_the_image():
    image = photo()
    out = Augmenter(AugmentConfig.none())(image, 5)
    assert np.array_equal(np.asarray(out), np.asarray(image))


def test_grayscale_input_comes_back_rgb():
    out = Augmenter(AugmentConfig())(photo().convert("L"), 0)
    assert out.mode == "RGB" and out.size == (W, H)


def bar_angle(image: Image.Image) -> float:
    """Orientation of the bright bar in degrees, counter-clockwise, from second moments."""
    ys, xs = np.nonzero(bright(image))
    x, y = xs - xs.mean(), -(ys - ys.mean())  # y up
    return math.degrees(0.5 * math.atan2(2 * (x * y).mean(), (x * x).mean() - (y * y).mean()))


def test_rotation_matches_sampled_angle_and_stays_in_range():
    bar = Image.new("RGB", (W, H), (20, 20, 20))
    ImageDraw.Draw(bar).rectangle([34, 45, 93, 50], fill=WHITE)
    augment = only(rotation=40.0)
    angles = []
    for seed in SEEDS:
        expected = augment.sample(seed).angle
        measured = bar_angle(augment(bar, seed))
        assert abs(measured - expected) < 2.0
        assert abs(measured) <= 40.0 + 2.0
        angles.append(measured)
    assert max(angles) > 20 and min(angles) < -20


def test_rotation_at_the_limit_matches_torchvision():
    image = photo()
    augment = only(rotation=40.0)
    for angle in (40.0, -40.0):
        params = dataclasses.replace(augment.sample(0), angle=angle)
        ours = pixels(augment.apply(image, params))
        reference = TF.rotate(TF.pil_to_tensor(image), angle, TF.InterpolationMode.BILINEAR)
        ref = reference.permute(1, 2, 0).numpy().astype(np.int16)
        inner = np.s_[30:66, 40:88]  # away from the filled corners
        assert np.abs(ours[inner] - ref[inner]).mean() < 3.0


def test_hflip_is_identity_or_mirror():
    image = photo()
    original, mirrored = np.asarray(image), np.asarray(ImageOps.mirror(image))
    flipped = 0
    for seed in SEEDS:
        out = np.asarray(only(hflip=True)(image, seed))
        is_mirror = np.array_equal(out, mirrored)
        assert is_mirror or np.array_equal(out, original)
        flipped += is_mirror
    assert 5 < flipped < 35


def test_vflip_is_identity_or_upside_down():
    image = photo()
    flipped = {np.asarray(only(vflip=True)(image, s)).tobytes() for s in SEEDS}
    assert flipped == {image.tobytes(), ImageOps.flip(image).tobytes()}


def test_shift_stays_within_range_and_covers_it():
    start_x, start_y = centroid(bright(square()))
    augment = only(shift=0.2)
    dxs, dys = [], []
    for seed in SEEDS:
        x, y = centroid(bright(augment(square(), seed)))
        dx, dy = (x - start_x) / W, (y - start_y) / H
        assert abs(dx) <= 0.2 + 0.01 and abs(dy) <= 0.2 + 0.01
        expected = augment.sample(seed).shift
        assert abs(dx - expected[0]) < 0.01 and abs(dy - expected[1]) < 0.01
        dxs.append(dx)
        dys.append(dy)
    assert max(map(abs, dxs)) > 0.15 and max(map(abs, dys)) > 0.15


def test_zoom_scales_area_within_range():
    before = bright(square()).sum()
    augment = only(zoom=0.2)
    ratios = []
    for seed in SEEDS:
        ratio = bright(augment(square(), seed)).sum() / before
        assert 0.8**2 - 0.05 <= ratio <= 1.2**2 + 0.05
        assert abs(ratio - augment.sample(seed).scale ** 2) < 0.1
        ratios.append(ratio)
    assert min(ratios) < 0.8 and max(ratios) > 1.2


def test_shear_keeps_area_and_slants_vertical_edges():
    augment = only(shear=0.2)
    before = bright(square(30)).sum()
    for seed in range(10):
        out = bright(augment(square(30), seed))
        assert abs(out.sum() / before - 1) < 0.05
        k = augment.sample(seed).shear
        rows = np.nonzero(out.any(axis=1))[0]
        top, bottom = rows[2], rows[-3]
        slope = (np.nonzero(out[bottom])[0][0] - np.nonzero(out[top])[0][0]) / (bottom - top)
        assert abs(slope - k) < 0.1


def test_crop_enlarges_and_keeps_size():
    before = bright(square()).sum()
    augment = only(crop=0.2)
    for seed in range(10):
        out = augment(square(), seed)
        assert out.size == (W, H)
        top, left, bottom, right = augment.sample(seed).crop
        expected = 1 / ((1 - top - bottom) * (1 - left - right))
        assert 1.0 - 0.05 <= bright(out).sum() / before
        assert abs(bright(out).sum() / before - expected) < 0.15 * expected


def test_downsample_blurs_fine_detail():
    checker = Image.fromarray(((np.indices((H, W)).sum(0) % 2) * 255).astype(np.uint8)).convert(
        "RGB"
    )
    augment = only(downsample=1.0)
    for seed in range(10):
        out = augment(checker, seed)
        assert out.size == (W, H)
        if augment.sample(seed).downsample > 1.3:
            assert pixels(out).std() < 0.5 * pixels(checker).std()


def test_brightness_factors_per_channel_within_bounds():
    grey = Image.new("RGB", (W, H), (128, 128, 128))
    augment = only(brightness=0.3)
    for seed in SEEDS:
        factors = pixels(augment(grey, seed)).mean(axis=(0, 1)) / 128
        assert np.all(factors >= 0.7 - 0.01) and np.all(factors <= 1.3 + 0.01)
        assert np.allclose(factors, augment.sample(seed).brightness, atol=0.01)


def test_contrast_scales_spread_within_bounds():
    image = Image.fromarray(np.tile(np.linspace(80, 176, W), (H, 1)).astype(np.uint8)).convert(
        "RGB"
    )
    augment = only(contrast=0.4)
    ratios = []
    for seed in SEEDS:
        ratio = pixels(augment(image, seed)).std() / pixels(image).std()
        assert 0.6 - 0.02 <= ratio <= 1.4 + 0.02
        assert abs(ratio - augment.sample(seed).contrast) < 0.02
        ratios.append(ratio)
    assert min(ratios) < 0.8 and max(ratios) > 1.2


def test_noise_std_matches_request():
    grey = Image.new("RGB", (W, H), (128, 128, 128))
    out = pixels(only(noise=0.05)(grey, 3))
    assert abs((out - 128).std() / 255 - 0.05) < 0.003
    assert abs((out - 128).mean()) < 0.5


# Fill modes


def corners(image: Image.Image) -> np.ndarray:
    a = pixels(image)
    return np.stack([a[0, 0], a[0, -1], a[-1, 0], a[-1, -1]])


def test_nearest_and_reflect_fill_leave_no_black_border():
    for fill in ("nearest", "reflect"):
        augment = only(rotation=40.0, zoom=0.2, fill=fill)
        params = dataclasses.replace(augment.sample(0), angle=40.0, scale=0.8)
        assert corners(augment.apply(photo(), params)).max(axis=1).min() > 60


def test_constant_fill_uses_fill_value():
    for value in (0, 200):
        augment = only(rotation=40.0, zoom=0.2, fill="constant", fill_value=value)
        params = dataclasses.replace(augment.sample(0), angle=40.0, scale=0.8)
        assert np.all(corners(augment.apply(photo(), params)) == value)


# Config validation and files


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rotation", -1.0),
        ("rotation", 181.0),
        ("rotation", "40"),
        ("shift", 1.5),
        ("shear", -0.1),
        ("zoom", 1.0),
        ("crop", 0.5),
        ("contrast", 1.5),
        ("brightness", -0.2),
        ("noise", -0.1),
        ("downsample", -1.0),
        ("zoom", float("nan")),
        ("hflip", "yes"),
        ("vflip", 1),
        ("fill", "wrap"),
        ("fill_value", 300),
        ("fill_value", 0.5),
    ],
)
def test_out_of_range_values_are_rejected(field, value):
    with pytest.raises(UsageError, match=field):
        AugmentConfig(**{field: value})


def test_defaults_match_keras_recipe_and_round_trip():
    config = AugmentConfig()
    assert (config.rotation, config.shift, config.shear, config.zoom) == (40, 0.2, 0.2, 0.2)
    assert config.hflip and not config.vflip and config.fill == "nearest"
    assert AugmentConfig.from_dict(config.to_dict()) == config
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()


def test_integers_are_stored_as_floats():
    assert AugmentConfig(rotation=30).to_dict()["rotation"] == 30.0
    assert isinstance(AugmentConfig(rotation=30).rotation, float)


def test_toml_and_json_files_load_equal(tmp_path):
    toml = tmp_path / "aug.toml"
    toml.write_text('rotation = 30\nzoom = 0.1\nhflip = false\nfill = "reflect"\n')
    js = tmp_path / "aug.json"
    js.write_text(json.dumps({"rotation": 30.0, "zoom": 0.1, "hflip": False, "fill": "reflect"}))
    config = AugmentConfig.from_file(toml)
    assert config == AugmentConfig.from_file(js)
    assert config == AugmentConfig(rotation=30, zoom=0.1, hflip=False, fill="reflect")


def test_yaml_file_loads(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "aug.yaml"
    path.write_text("rotation: 10\nnoise: 0.01\n")
    assert AugmentConfig.from_file(path) == AugmentConfig(rotation=10, noise=0.01)


def test_unknown_key_lists_valid_keys(tmp_path):
    path = tmp_path / "aug.json"
    path.write_text(json.dumps({"rotation_range": 40}))
    with pytest.raises(UsageError, match="rotation_range") as info:
        AugmentConfig.from_file(path)
    assert all(name in str(info.value) for name in ("rotation", "shift", "fill_value"))


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("aug.txt", "", "must be a .toml"),
        ("aug.toml", "rotation = ", "not valid"),
        ("aug.json", "[1, 2]", "table of settings"),
    ],
)
def test_bad_config_files_are_rejected(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UsageError, match=message):
        AugmentConfig.from_file(path)


def test_missing_config_file_is_rejected(tmp_path):
    with pytest.raises(UsageError, match="Cannot read"):
        AugmentConfig.from_file(tmp_path / "missing.toml")


# Preview


def test_preview_grid_single_image_is_square_ish():
    sheet = preview_grid([photo()], AugmentConfig(), n=9, tile=64)
    assert sheet.size == (4 * 68 + 4, 3 * 68 + 4) and sheet.mode == "RGB"


def test_preview_grid_rows_per_image_start_with_original():
    sheet = preview_grid([photo(), square()], AugmentConfig(), n=3, tile=W)
    assert sheet.size == (4 * (W + 4) + 4, 2 * (W + 4) + 4)
    top = (W - H) // 2
    first_tile = sheet.crop((4, 4 + top, 4 + W, 4 + top + H))
    assert first_tile.tobytes() == photo().tobytes()


def test_preview_grid_rejects_no_images():
    with pytest.raises(UsageError):
        preview_grid([], AugmentConfig())
