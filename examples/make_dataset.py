"""Write an offline real dataset as an image folder featx can read.

Fashion-MNIST comes from Debian's `dataset-fashion-mnist` package (gzipped IDX files under
/usr/share/datasets/fashion-mnist); where it is not installed, scikit-learn's bundled
handwritten digits (8x8, upscaled) are used instead.

    python examples/make_dataset.py data/fashion --train-per-class 100 --per-class 30

writes data/fashion/{train,validation,test}/<class>/<n>.png
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat",
                   "sandal", "shirt", "sneaker", "bag", "ankle-boot")  # fmt: skip


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format) from a gzipped file."""
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple]:
    train_x = read_idx(FASHION_DIR / "train-images-idx3-ubyte.gz")
    train_y = read_idx(FASHION_DIR / "train-labels-idx1-ubyte.gz")
    test_x = read_idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz")
    test_y = read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz")
    return train_x, train_y, test_x, test_y, FASHION_CLASSES


def load_digits_images() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    half = len(images) // 2
    names = tuple(str(d) for d in range(10))
    return images[:half], digits.target[:half], images[half:], digits.target[half:], names


def take(labels: np.ndarray, n_classes: int, per_class: int, rng, exclude=None) -> np.ndarray:
    """`per_class` seeded random indices of each class, avoiding `exclude`."""
    chosen = []
    for c in range(n_classes):
        pool = np.flatnonzero(labels == c)
        if exclude is not None:
            pool = np.setdiff1d(pool, exclude)
        chosen.append(rng.choice(pool, size=min(per_class, len(pool)), replace=False))
    return np.sort(np.concatenate(chosen))


def write_split(out: Path, split: str, images, labels, index, names, size: int) -> None:
    for i in index:
        folder = out / split / names[labels[i]]
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(images[i], mode="L")
        if size and size != image.width:
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        image.save(folder / f"{i:05d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=30, help="validation and test images")
    parser.add_argument("--size", type=int, default=0, help="resize to N px (0: keep)")
    parser.add_argument("--dataset", choices=("auto", "fashion-mnist", "digits"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    use_fashion = args.dataset == "fashion-mnist" or (
        args.dataset == "auto" and (FASHION_DIR / "train-images-idx3-ubyte.gz").exists()
    )
    loaded = load_fashion_mnist() if use_fashion else load_digits_images()
    train_x, train_y, test_x, test_y, names = loaded
    rng = np.random.default_rng(args.seed)
    n_classes = len(names)
    train = take(train_y, n_classes, args.train_per_class, rng)
    val = take(train_y, n_classes, args.per_class, rng, exclude=train)
    test = take(test_y, n_classes, args.per_class, rng)
    size = args.size or (0 if use_fashion else 32)
    write_split(args.out, "train", train_x, train_y, train, names, size)
    write_split(args.out, "validation", train_x, train_y, val, names, size)
    write_split(args.out, "test", test_x, test_y, test, names, size)
    source = "Fashion-MNIST" if use_fashion else "scikit-learn digits"
    print(f"{source}: {len(train)} train, {len(val)} validation, {len(test)} test -> {args.out}")


if __name__ == "__main__":
    main()
