"""Fine-tuning on a real dataset with real ImageNet weights beats frozen features.

scikit-learn's handwritten digits (8x8 scans, upscaled to 64x64) are far from ImageNet, the
setting where adapting the convolutional base pays off. EfficientNet-Lite0 with its offline
ImageNet weights; the baseline is logistic regression on its frozen, average-pooled final
feature map, given the best of three regularisation strengths on the same validation split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from featx.data.augment_config import AugmentConfig
from featx.extraction.run import extract
from featx.finetuning.config import FinetuneConfig
from featx.finetuning.run import finetune
from featx.store.feature_store import FeatureStore

pytestmark = pytest.mark.slow


def digits_folder(root: Path, train: int = 30, validation: int = 20, size: int = 64) -> Path:
    """root/{train,validation}/<digit>/*.png, a seeded sample of `train` and `validation`
    images per digit."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)
    rng = np.random.default_rng(0)
    for digit in range(10):
        chosen = rng.permutation(np.flatnonzero(digits.target == digit))[: train + validation]
        for n, i in enumerate(chosen):
            split = "train" if n < train else "validation"
            folder = root / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(images[i], mode="L").resize((size, size), Image.BICUBIC)
            image.save(folder / f"{i:04d}.png")
    return root


def test_fine_tuning_beats_logistic_regression_on_frozen_features(tmp_path):
    data = digits_folder(tmp_path / "digits")

    store = extract(
        data, "efficientnet_lite0", ["forward_features"], image_size=64, pool="avg",
        store=tmp_path / "frozen.h5", workers=0, quiet=True,
    ).store  # fmt: skip
    with FeatureStore(store) as s:
        x_train, y_train = s.read("forward_features@avg", "train"), s.labels("train")
        x_val, y_val = s.read("forward_features@avg", "validation"), s.labels("validation")
    frozen = max(
        make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))
        .fit(x_train, y_train)
        .score(x_val, y_val)
        for c in (0.1, 1.0, 10.0)
    )

    config = FinetuneConfig(
        backbone="efficientnet_lite0",
        image_size=64,
        epochs_head=3,
        epochs=8,
        lr_head=3e-3,
        lr=2e-3,
        lr_mult=0.5,
        unfreeze_from="blocks.2",
        patience=5,
        dropout=0.2,
        augment=AugmentConfig(rotation=10, shift=0.1, shear=0.1, zoom=0.1, hflip=False),
        refit="train",  # validation scores the network it chose either way
    )
    result = finetune(data, config, out=tmp_path / "run", workers=0, quiet=True)
    tuned = result.metrics["validation"]["accuracy"]

    assert 0.7 < frozen < 0.97  # the frozen features are good, not perfect
    assert tuned > frozen + 0.02, (tuned, frozen)
    assert result.metrics["validation"]["n_samples"] == 200
