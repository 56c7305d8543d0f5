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
from typing import TYPE_CHECKING, Any

import numpy as np

from featx.data.folders import list_images, printable
from featx.errors import UsageError
from featx.extraction.settings import PredictSettings, settled
from featx.models.file import FeatxModel, load_model
from featx.runtime import atomic_write, check_output_file

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from featx.data.augment_config import AugmentConfig
    from featx.data.preprocessing import Preprocessing

__all__ = [
    "Predictions",
    "TTAViews",
    "collect_images",
    "features_for_images",
    "predict",
    "tta_inputs",
]


def collect_images(
    paths: list[str | os.PathLike],
) -> tuple[list[os.PathLike], list[tuple[str, str]]]:
    """Image files named in `paths` or found below folders in it (sorted, hidden ones left
    out), and every row of the datasets in it that `featx.data.manifest.open_dataset` opens
    (tar shards, Parquet files of image bytes, saved Hugging Face datasets, manifests), in the
    dataset's order. Paths that do not exist, folders that cannot be read, entries that are
    not image files (broken links, FIFOs, link loops) and a dataset's unusable rows are
    returned as skipped."""
    from featx.data.manifest import MANIFEST_SUFFIXES, open_dataset
    from featx.data.sources import SOURCE_SUFFIXES, open_source

    files: list[os.PathLike] = []
    skipped: list[tuple[str, str]] = []
    for given in paths:
        path = Path(given)
        dataset = None
        if path.is_dir():
            dataset = open_source(path, labelled=False)  # a saved Hugging Face dataset, or None
        elif path.is_file() and path.suffix.lower() in (*MANIFEST_SUFFIXES, *SOURCE_SUFFIXES):
            dataset = open_dataset(path, labelled=False)  # labels are not needed to predict
        if dataset is not None:
            files.extend(dataset.root / f.path for f in dataset.files)
            skipped.extend((printable(dataset.root / where), why) for where, why in dataset.skipped)
        elif path.is_dir():
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


def _cell(text: str) -> str:
    """A text cell a spreadsheet will not run as a formula: one starting with =, +, - or @ gets
    a leading apostrophe (OWASP's CSV injection rule)."""
    return f"'{text}" if text[:1] in ("=", "+", "-", "@") else text


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
            row = [_cell(path), _cell(predicted)]
            for c, v in zip(classes, scores, strict=True):
                row += [_cell(self.class_names[c]), f"{v:.6f}" if np.isfinite(v) else ""]
            writer.writerow(row)
        return buffer.getvalue()

    def write_csv(self, path: str | os.PathLike, top_k: int = 3) -> Path:
        return atomic_write(path, self.to_csv(top_k).encode())


@dataclass(frozen=True)
class TTAViews:
    """An image's input and `views` augmented versions of it, stacked: test-time augmentation.
    File i's views are seeded by the crc32 of its name, the same whatever else is passed."""

    preprocessing: Preprocessing
    names: list[str]
    augment: AugmentConfig | None
    views: int

    def __call__(self, image: Image.Image, file_index: int, view: int) -> torch.Tensor:
        import torch

        key = zlib.crc32(self.names[file_index].encode())
        extra = tta_inputs(image, self.preprocessing, self.augment, self.views, key=key)
        return torch.cat([self.preprocessing(image).unsqueeze(0), extra])


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
    from featx.data.augment_config import AugmentConfig

    if provenance.get("augment"):
        return AugmentConfig.from_dict(provenance["augment"])
    stored = (provenance.get("store") or {}).get("augment")
    return AugmentConfig.from_dict(stored["config"]) if stored else AugmentConfig()


@dataclass
class _ModelNetwork:
    """The network that made a model's features, loaded as its store's extraction loaded it."""

    tap: Any
    preprocessing: Preprocessing
    device: torch.device
    precision: str
    key: str  # the cached conversion extraction made of this tap
    traced: list | None  # the skeleton's trace, when the engine or batch size is chosen


def _model_network(model: FeatxModel, s: PredictSettings) -> _ModelNetwork:
    """Load the backbone, weights (checked by sha256), tap, pooling and precision of the
    model's store; the device is checked before any weights are read."""
    from featx.backbones.layers import prepare_tap, trace_layers
    from featx.backbones.registry import get_backbone
    from featx.data.preprocessing import Preprocessing
    from featx.inference.engine import cache_key
    from featx.runtime import inference_device

    p, layers = model.provenance, model.layers
    if not p.get("weights_spec"):
        raise UsageError(
            "the model does not record how to load its backbone weights (its store predates "
            "weights_spec); predict needs them."
        )
    preprocessing = Preprocessing.from_dict(p["preprocessing"])
    modules, pool = [layer["module"] for layer in layers], layers[0]["pool"]
    size, precision = preprocessing.input_size, layers[0]["precision"]
    if len({layer["pool"] for layer in layers}) > 1:  # one tap applies one pooling
        raise UsageError(
            f"the model's layers were pooled differently at extraction "
            f"({', '.join({layer['pool'] for layer in layers})}); predict taps them with one "
            "pooling, so it cannot reproduce their features."
        )
    device = inference_device(s.device, precision, s.engine)
    record = get_backbone(p["backbone"])
    # only the weights up to the deepest of the model's layers, as extraction loads them
    loaded = record.load(p["weights_spec"], modules, size)
    if loaded.weights_sha256 != p["weights_sha256"]:
        raise UsageError(
            f"the {loaded.weights} weights now hash to {loaded.weights_sha256[:16]}, but the "
            f"model was trained on features of {p['weights_sha256'][:16]}; predict cannot "
            "reproduce its features."
        )
    tap = prepare_tap(loaded.model, modules, pool, device, size)
    # extraction's cache key, so a conversion that `featx extract` cached is reused here
    key = cache_key(loaded.name, loaded.weights_sha256, modules, pool, size, precision,
                    "extract")  # fmt: skip
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
    traced = None
    if s.engine == "auto" or s.batch_size is None:  # both judge the network on its trace
        traced = trace_layers(record, record.skeleton(p["weights_spec"]), size)
    return _ModelNetwork(tap, preprocessing, device, precision, key, traced)


def _rows(outputs: dict, layers: list[dict]) -> np.ndarray:
    """The model's input rows from the tap's outputs: each layer cast to its stored dtype,
    several flattened and concatenated (as `featx.store.ConcatRows` reads them)."""
    parts = [
        outputs[layer["module"]].float().cpu().numpy().astype(layer["dtype"]) for layer in layers
    ]
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([part.reshape(len(part), -1) for part in parts], axis=1)


def features_for_images(
    model: FeatxModel,
    files: list[os.PathLike],
    settings: PredictSettings | None = None,
    *,
    desc: str = "predict",
    **overrides: Any,
) -> Iterator[tuple[list[int], np.ndarray | None, list[tuple[int, str]]]]:
    """The model's input rows for image `files`, made as the model's store made them: its
    backbone and weights (checked by sha256), preprocessing, every layer it reads tapped in
    one pass with the same pooling, precision and dtype cast.

    `settings` (a `PredictSettings`, with `overrides`): `engine` runs the network as `featx
    extract --engine` does (auto: chosen for this many images); an engine that cannot take
    the model falls back to eager. `batch_size` None chooses it as extraction does, counting
    each image's 1 + `tta` views. Unless `quiet`, the engine and batch size are said in one
    line each.

    Yields (indices into `files`, rows of shape (n * (1 + tta), ...) or None, [(index,
    reason)] of files that could not be decoded) per batch; with `tta`, each image's rows are
    followed by those of its augmented views.
    """
    import torch
    from tqdm import tqdm

    from featx.inference.auto import resolve_engine
    from featx.inference.images import Batches, Images, image_loader
    from featx.inference.network import (
        choose_batch_size,
        network_flops,
        start_engine,
        stderr_log,
    )

    s = settled(settings or PredictSettings(), overrides)
    log, layers = stderr_log(s.quiet), model.layers
    net = _model_network(model, s)
    modules, size, views = (
        [layer["module"] for layer in layers],
        net.preprocessing.input_size,
        1 + s.tta,
    )
    batch_size = s.batch_size
    if batch_size is None:  # a forward pass runs each image's 1 + tta views
        batch_size, why = choose_batch_size(net.traced, modules, size, net.device, views)
        log(f"Batch size {batch_size} ({why}).")
    flops = network_flops(net.traced, modules) if net.traced else 0
    name, why = resolve_engine(
        s.engine, net.device, net.precision, len(files) * views, net.key, flops
    )
    transform = None
    if s.tta:
        names = [os.path.basename(f) for f in files]
        transform = TTAViews(net.preprocessing, names, _tta_augmentation(model.provenance), s.tta)
    images = Images(files, net.preprocessing, transform=transform)
    loader = image_loader(images, Batches(0, len(files), batch_size), s.workers)
    batches, engine = start_engine(
        loader, net.tap, name, why, precision=net.precision, device=net.device,
        example=torch.zeros(batch_size * views, 3, size, size), key=net.key, log=log,
    )  # fmt: skip
    bar = tqdm(total=len(files), unit="img", disable=s.quiet, desc=desc, file=sys.stderr)
    for index, batch, bad in batches:
        rows = (
            None
            if batch is None
            else _rows(engine(batch.flatten(0, 1) if s.tta else batch), layers)
        )
        yield index, rows, bad
        bar.update(len(index) + len(bad))
    bar.close()


def predict(
    model: FeatxModel | str | os.PathLike,
    paths: list[str | os.PathLike],
    settings: PredictSettings | None = None,
    *,
    out: str | os.PathLike | None = None,
    **overrides: Any,
) -> Predictions:
    """Classify the images in `paths` (files or folders) with `model`, as `settings` (a
    `PredictSettings`, with `overrides` replacing its fields) asks.

    Files that cannot be decoded are skipped and listed in `Predictions.skipped`. `out` writes
    the CSV (see `Predictions.to_csv`). `tta` > 0 averages the scores of the image and that many
    augmented views of it (test-time augmentation, with the model's training augmentation).
    `engine` runs the network (see `features_for_images`).
    """
    s = settled(settings or PredictSettings(), overrides)
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
    for index, features, bad in features_for_images(model, files, s):
        skipped.extend((str(files[i]), reason) for i, reason in bad)
        if features is not None:
            labels, batch_scores = model.scores(features)
            if s.tta:
                batch_scores = batch_scores.reshape(len(index), 1 + s.tta, -1).mean(axis=1)
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
        result.write_csv(out, s.top_k)
    return result
