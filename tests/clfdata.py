"""Real image folders and synthetic stores for the classifier-stage tests (fit, predict)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

from featx.store.feature_store import add_layer, write_store

COLOURS = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 60, 200)}
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def colour_image(colour: tuple[int, int, int], rng: np.random.Generator, size: int = 40):
    """A noisy image of one dominant colour with a random darker square on it."""
    pixels = np.array(colour, dtype=float) + rng.normal(0, 35, (size, size, 3))
    x, y = rng.integers(0, size // 2, 2)
    pixels[y : y + size // 3, x : x + size // 3] *= 0.5
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def colour_folder(
    root: Path, per_class: dict[str, int] | int = 12, seed: int = 0, classes=None
) -> Path:
    """ROOT/CLASS/*.jpg|png (`per_class` an int) or ROOT/SPLIT/CLASS/... (a dict of splits);
    JPEG and PNG alternate."""
    rng = np.random.default_rng(seed)
    classes = classes or list(COLOURS)
    layout = {None: per_class} if isinstance(per_class, int) else per_class
    for split, n in layout.items():
        for name in classes:
            folder = root / name if split is None else root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                suffix = "jpg" if i % 2 == 0 else "png"
                colour_image(COLOURS[name], rng).save(folder / f"{name}{i:03d}.{suffix}")
    return root


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): magic, dimension sizes, then unsigned bytes."""
    with gzip.open(path) as fh:
        data = fh.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist_folder(root: Path, per_split: dict[str, int]) -> Path:
    """ROOT/SPLIT/CLASS/*.png from the first Fashion-MNIST training images of each class,
    upscaled from 28 to 64 pixels."""
    images = read_idx(FASHION_MNIST / "train-images-idx3-ubyte.gz")
    labels = read_idx(FASHION_MNIST / "train-labels-idx1-ubyte.gz")
    start = 0
    for split, n in per_split.items():
        for c in range(10):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in np.flatnonzero(labels == c)[start : start + n]:
                image = Image.fromarray(images[i]).resize((64, 64), Image.BILINEAR)
                image.save(folder / f"{i:05d}.png")
        start += n
    return root


def digits_folder(root: Path, per_split: dict[str, int]) -> Path:
    """ROOT/SPLIT/CLASS/*.png from scikit-learn's 8 x 8 digits, upscaled to 64 pixels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)
    start = 0
    for split, n in per_split.items():
        for c in range(10):
            folder = root / split / str(c)
            folder.mkdir(parents=True, exist_ok=True)
            for i in np.flatnonzero(digits.target == c)[start : start + n]:
                image = Image.fromarray(images[i]).resize((64, 64), Image.BICUBIC)
                image.save(folder / f"{i:04d}.png")
        start += n
    return root


def synthetic_store(
    path: Path,
    n_rows: int,
    n_features: int,
    n_classes: int = 4,
    *,
    n_informative: int = 16,
    separation: float = 0.6,
    seed: int = 0,
    class_names: list[str] | None = None,
    labels_value: int | None = None,
    block_rows: int = 1024,
) -> Path:
    """A featx store with one float32 layer `feat` of Gaussian classes, rows sorted by class as
    extraction writes them, 80% train and 20% validation; written block by block, so that a
    store larger than memory can be made."""
    rng = np.random.default_rng(seed)
    means = np.zeros((n_classes, n_features), np.float32)
    k = min(n_informative, n_features)
    means[:, :k] = rng.normal(0, separation, (n_classes, k))
    labels = np.sort(np.arange(n_rows) % n_classes).astype(np.int32)
    if labels_value is not None:
        labels[:] = labels_value
    split = np.where(rng.random(n_rows) < 0.8, "train", "validation")
    order = np.argsort(split == "validation", kind="stable")  # train rows first
    labels, split = labels[order], split[order]
    paths = np.array([f"c{label}/{i:07d}.png" for i, label in enumerate(labels)], dtype=object)
    names = class_names if class_names is not None else [f"c{i}" for i in range(n_classes)]
    meta = {
        "backbone": "synthetic",
        "weights": "none (synthetic)",
        "weights_spec": "none",
        "weights_sha256": "0" * 64,
        "preprocessing": {
            "resize": 8,
            "crop": 0,
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "interpolation": "bilinear",
            "square": True,
        },
        "preprocessing_text": "synthetic",
        "dataset": {"root": str(path.parent), "fingerprint": "0" * 64, "n_files": n_rows},
        "augment": None,
        "created": "2024-01-01T00:00:00+0000",
        "versions": {},
        "history": [],
    }
    rows = {
        "path": paths,
        "label": labels,
        "split": split.astype(object),
        "source": np.arange(n_rows, dtype=np.int64),
        "view": np.zeros(n_rows, np.int32),
    }
    files = {
        "path": paths,
        "label": labels,
        "split": split.astype(object),
        "size": np.zeros(n_rows, np.int64),
        "mtime_ns": np.zeros(n_rows, np.int64),
    }

    def blocks():
        for start in range(0, n_rows, block_rows):
            y = labels[start : start + block_rows]
            noise = rng.standard_normal((len(y), n_features), dtype=np.float32)
            yield noise + means[np.clip(y, 0, n_classes - 1)]

    attrs = {"layer": "feat", "module": "feat", "pool": "none", "precision": "fp32"}
    with write_store(path, meta, names, files, rows, []) as out:
        add_layer(out, "feat", n_rows, (n_features,), "float32", "none", attrs, blocks())
    return path
