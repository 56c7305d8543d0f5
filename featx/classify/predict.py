"""`featx predict`: classify image files with a model file, no store needed.

The model records how its features were made; predict repeats exactly that: the backbone with
the same weights (checked by sha256), the same preprocessing, the same module tapped with the
same pooling, and the same cast to the stored dtype, then the fitted pipeline. So an image gets
the class that `featx evaluate` gives its row in a store.
"""

from __future__ import annotations

import csv
import io
import os
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from featx.data.folders import BadImage, list_images, printable
from featx.errors import UsageError, check_choice, check_range
from featx.models.file import FeatxModel, load_model
from featx.runtime import atomic_write, check_output_file

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from featx.data.augment import AugmentConfig
    from featx.data.preprocessing import Preprocessing

__all__ = ["Predictions", "collect_images", "predict", "tta_inputs"]


def collect_images(
    paths: list[str | os.PathLike],
) -> tuple[list[Path], list[tuple[str, str]]]:
    """Image files named in `paths` or found below folders in it (sorted, hidden ones left
    out); paths that do not exist, folders that cannot be read and entries that are not image
    files (broken links, FIFOs, link loops) are returned as skipped."""
    files: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            listing = list_images(path)
            files.extend(sorted(p for p, _ in listing.files))
            for where, reason in [*listing.folders, *listing.skipped]:
                skipped.append((printable(where), reason))
        elif path.is_file():
            files.append(path)
        elif path.exists():
            skipped.append((printable(path), "not a regular file"))
        else:
            skipped.append((printable(path), "no such file or directory"))
    return list(dict.fromkeys(files)), skipped


@dataclass
class Predictions:
    """One row per image that could be read: the predicted class and every class's score."""

    paths: list[str]
    predicted: list[str]
    scores: np.ndarray  # (n_images, n_classes), columns in `class_names` order
    class_names: list[str]
    probabilities: bool  # scores are probabilities (else the classifier's decision values)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def top(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(class indices, scores) of the k best classes of each image, best first."""
        k = min(k, len(self.class_names))
        order = np.argsort(-self.scores, axis=1, kind="stable")[:, :k]
        return order, np.take_along_axis(self.scores, order, axis=1)

    def to_csv(self, top_k: int = 3) -> str:
        """path, predicted, then top{i} and top{i}_probability (or _score) for i = 1..k."""
        kind = "probability" if self.probabilities else "score"
        k = min(top_k, len(self.class_names))
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        header = ["path", "predicted"]
        for i in range(1, k + 1):
            header += [f"top{i}", f"top{i}_{kind}"]
        writer.writerow(header)
        order, values = self.top(k)
        for path, predicted, classes, scores in zip(
            self.paths, self.predicted, order, values, strict=True
        ):
            row = [path, predicted]
            for c, v in zip(classes, scores, strict=True):
                row += [self.class_names[c], f"{v:.6f}" if np.isfinite(v) else ""]
            writer.writerow(row)
        return buffer.getvalue()

    def write_csv(self, path: str | os.PathLike, top_k: int = 3) -> Path:
        return atomic_write(path, self.to_csv(top_k).encode())


class _Images:
    """A map-style dataset: (index, views or None, reason it could not be read). The views are
    the preprocessed image, then `tta` augmented versions of it, stacked."""

    def __init__(self, files: list[Path], preprocessing, tta: int = 0, augment=None):
        self.files, self.preprocessing, self.tta, self.augment = files, preprocessing, tta, augment

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        import torch

        try:
            image = self.preprocessing.load(self.files[i])
        except BadImage as bad:
            return i, None, str(bad)
        views = self.preprocessing(image).unsqueeze(0)
        if self.tta:
            key = zlib.crc32(self.files[i].name.encode())  # the same views whatever else is passed
            extra = tta_inputs(image, self.preprocessing, self.augment, self.tta, key=key)
            views = torch.cat([views, extra])
        return i, views, None


def tta_inputs(
    image: Image.Image,
    preprocessing: Preprocessing,
    augment: AugmentConfig | None,
    views: int,
    seed: int = 0,
    key: int = 0,
) -> torch.Tensor:
    """A batch of `views` augmented versions of `image` for test-time augmentation (average
    the model's probabilities over them), made as in training: at the network's input size,
    view v seeded by `view_seed(seed, key, v)`; `augment` None uses the default settings."""
    import torch

    from featx.data.augment import AugmentConfig, Augmenter, view_seed

    augmenter = Augmenter(augment or AugmentConfig())
    return torch.stack(
        [
            preprocessing(image, lambda im, v=v: augmenter(im, view_seed(seed, key, v)))
            for v in range(1, views + 1)
        ]
    )


def _tta_augmentation(provenance: dict):
    """The augmentation a model was trained with (fine-tuning, or an augmented store), else the
    default settings."""
    from featx.data.augment import AugmentConfig

    if provenance.get("augment"):
        return AugmentConfig.from_dict(provenance["augment"])
    stored = (provenance.get("store") or {}).get("augment")
    return AugmentConfig.from_dict(stored["config"]) if stored else AugmentConfig()


def _collate(samples):
    import torch

    good = [(i, x) for i, x, _ in samples if x is not None]
    bad = [(i, reason) for i, x, reason in samples if x is None]
    return [i for i, _ in good], torch.stack([x for _, x in good]) if good else None, bad


def features_for_images(
    model: FeatxModel,
    files: list[Path],
    *,
    batch_size: int | None = None,
    device: str = "auto",
    workers: int = 0,
    tta: int = 0,
    quiet: bool = True,
    desc: str = "predict",
    engine: str = "auto",
) -> Iterator[tuple[list[int], np.ndarray | None, list[tuple[int, str]]]]:
    """The model's input rows for image `files`, made as the model's store made them: its
    backbone and weights (checked by sha256), preprocessing, every layer it reads tapped in
    one pass with the same pooling, precision and dtype cast (several layers flattened and
    concatenated, as `featx.store.ConcatRows` reads them).

    `engine` runs the network as `featx extract --engine` does: eager, compile, openvino, or
    auto (chosen by `resolve_engine` for this many images); an engine that cannot take the
    model falls back to eager. Unless `quiet`, the engine chosen is printed in one line.
    `batch_size` None chooses it as extraction does (`default_batch_size`), counting each
    image's 1 + `tta` views.

    Yields (indices into `files`, rows of shape (n * (1 + tta), ...) or None, [(index,
    reason)] of files that could not be decoded) per batch; with `tta`, each image's rows are
    followed by those of its augmented views.
    """
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from featx.backbones.layers import default_batch_size, prepare_tap, trace_layers
    from featx.backbones.registry import get_backbone
    from featx.data.preprocessing import Preprocessing
    from featx.extraction.engines import ENGINES, build_engine, cache_key, resolve_engine
    from featx.runtime import inference_device

    check_range("batch-size", batch_size, 1)
    check_range("workers", workers, 0)
    check_choice("engine", engine, ("auto", *ENGINES))
    p, layers = model.provenance, model.layers
    if not p.get("weights_spec"):
        raise UsageError(
            "the model does not record how to load its backbone weights (its store predates "
            "weights_spec); predict needs them."
        )
    preprocessing = Preprocessing.from_dict(p["preprocessing"])
    modules = [layer["module"] for layer in layers]
    size, precision = preprocessing.input_size, layers[0]["precision"]
    pools = {layer["pool"] for layer in layers}
    if len(pools) > 1:  # one tap applies one pooling to every module
        raise UsageError(
            f"the model's layers were pooled differently at extraction ({', '.join(pools)}); "
            "predict taps them with one pooling, so it cannot reproduce their features."
        )
    dev = inference_device(device, precision, engine)  # checked before any weights are read
    # only the weights up to the deepest of the model's layers, as extraction loads them
    loaded = get_backbone(p["backbone"]).load(p["weights_spec"], modules, size)
    if loaded.weights_sha256 != p["weights_sha256"]:
        raise UsageError(
            f"the {loaded.weights} weights now hash to {loaded.weights_sha256[:16]}, but the "
            f"model was trained on features of {p['weights_sha256'][:16]}; predict cannot "
            "reproduce its features."
        )
    # the same network set-up, precision and dtype cast as extraction
    tap = prepare_tap(loaded.model, modules, layers[0]["pool"], dev, size)
    # The tap is the one extraction builds for these modules: extraction's cache key, so a
    # conversion that `featx extract` cached is reused here.
    key = cache_key(loaded.name, loaded.weights_sha256, modules, layers[0]["pool"], size,
                    precision, "extract")  # fmt: skip
    if precision == "int8":
        # the quantized model extraction calibrated and cached: predict has no calibration
        # images; it runs that model (which may output more layers) and reads its own
        keys = {layer.get("calibration_engine_key", "") for layer in layers}
        if len(keys) > 1:
            raise UsageError(
                "the model's int8 layers were quantized in different extraction runs; predict "
                "runs one network, so extract them in one run."
            )
        key = keys.pop() or key
    flops = 0
    if engine == "auto" or batch_size is None:  # both judge the network on its trace
        record = get_backbone(p["backbone"])
        traced = trace_layers(record, record.skeleton(p["weights_spec"]), size)
        flops = max((i.flops for i in traced if i.module in modules), default=0)
    if batch_size is None:  # a forward pass runs each image's 1 + tta views
        views, why_batch = default_batch_size(traced, modules, size, dev)
        batch_size = max(1, views // (1 + tta))
        if not quiet:
            print(f"Batch size {batch_size} ({why_batch}).", file=sys.stderr)
    name, why = resolve_engine(engine, dev, precision, len(files) * (1 + tta), key, flops)
    if not quiet:
        print(f"Engine: {name}" + (f" ({why})." if why else "."), file=sys.stderr)
    loader = DataLoader(
        _Images(files, preprocessing, tta, _tta_augmentation(p) if tta else None),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
    )
    # The decoding workers fork here, before an engine starts its own thread pool (OpenVINO's
    # does not survive a fork beside it). The engine runs in the stored precision.
    batches = iter(loader)
    example = torch.zeros(batch_size * (1 + tta), 3, size, size)
    run = build_engine(tap, name, dev, precision, example=example, key=key)
    if run.fallback_reason and not quiet:
        print(f"Engine: {run.describe()}.", file=sys.stderr)
    bar = tqdm(total=len(files), unit="img", disable=quiet, desc=desc, file=sys.stderr)
    for index, batch, bad in batches:
        rows = None
        if batch is not None:
            outputs = run(batch.flatten(0, 1))
            parts = [
                outputs[layer["module"]].float().cpu().numpy().astype(layer["dtype"])
                for layer in layers
            ]
            rows = (
                parts[0]
                if len(parts) == 1
                else np.concatenate([part.reshape(len(part), -1) for part in parts], axis=1)
            )
        yield index, rows, bad
        bar.update(len(index) + len(bad))
    bar.close()


def predict(
    model: FeatxModel | str | os.PathLike,
    paths: list[str | os.PathLike],
    *,
    out: str | os.PathLike | None = None,
    top_k: int = 3,
    batch_size: int | None = None,
    device: str = "auto",
    workers: int = 0,
    tta: int = 0,
    quiet: bool = True,
    engine: str = "auto",
) -> Predictions:
    """Classify the images in `paths` (files or folders) with `model`.

    Files that cannot be decoded are skipped and listed in `Predictions.skipped`. `out` writes
    the CSV (see `Predictions.to_csv`). `tta` > 0 averages the scores of the image and that many
    augmented views of it (test-time augmentation, with the model's training augmentation).
    `engine` runs the network: auto, eager, compile or openvino (see `features_for_images`).
    """
    check_range("top-k", top_k, 1)
    check_range("batch-size", batch_size, 1)
    check_range("workers", workers, 0)
    check_range("tta", tta, 0)
    check_output_file("out", out)
    if not isinstance(model, FeatxModel):
        model = load_model(model)
    if not paths:
        raise UsageError("give at least one image file or folder to predict.")
    files, skipped = collect_images(paths)
    if not files:
        raise UsageError(f"no image files found in {', '.join(map(str, paths))}.")
    good: list[int] = []
    predicted: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    batches = features_for_images(
        model, files, batch_size=batch_size, device=device, workers=workers, tta=tta,
        quiet=quiet, engine=engine,
    )  # fmt: skip
    for index, features, bad in batches:
        skipped.extend((str(files[i]), reason) for i, reason in bad)
        if features is not None:
            labels, batch_scores = model.scores(features)
            if tta:
                batch_scores = batch_scores.reshape(len(index), 1 + tta, -1).mean(axis=1)
                labels = batch_scores.argmax(axis=1)
            good.extend(index)
            predicted.append(labels)
            scores.append(batch_scores)
    names = model.class_names
    result = Predictions(
        [str(files[i]) for i in good],
        [names[i] for i in np.concatenate(predicted)] if predicted else [],
        np.concatenate(scores) if scores else np.zeros((0, len(names))),
        names,
        model.has_proba,
        skipped,
    )
    if out is not None:
        result.write_csv(out, top_k)
    return result
