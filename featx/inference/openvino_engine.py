"""The OpenVINO engine on the CPU, with its on-disk cache of converted models, and int8:
OpenVINO's post-training quantization (NNCF) of the converted tap, calibrated on real
preprocessed images of the dataset (`Calibration`)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from featx.inference.engine import CONVERSIONS, Calibration, Engine, digest
from featx.runtime import cache_root

__all__ = ["INT8_CALIBRATION_COSINE", "is_converted", "openvino_engine"]

# What accuracy control demands on the calibration images: a margin for the images it never saw
# (on Fashion-MNIST, demanding 0.99 there left 6 of 1,600 images at 0.984-0.99).
INT8_CALIBRATION_COSINE = 0.995

# int8 runs the quantized ops in int8 and the rest (e.g. pooling) in f32.
_OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}


# A cache entry is NAME.xml and NAME.bin (the model), NAME.key (what it converts), NAME.json
# (int8's calibration quality) and NAME.sha256, written last: the digests of the .xml and .bin,
# checked before OpenVINO reads them, so a damaged entry is converted again, never read.
_ENTRY = (".xml", ".bin", ".key", ".json", ".sha256")


def _model_path(key: str) -> Path:
    return cache_root() / "openvino" / f"{digest(key)}.xml"


def is_converted(key: str) -> bool:
    """Whether the converted model for `key` is in this machine's cache."""
    path = _model_path(key)
    return path.exists() and path.with_suffix(".sha256").exists()


def _file_digests(path: Path) -> str:
    lines = []
    for part in (path, path.with_suffix(".bin")):
        with part.open("rb") as fh:
            lines.append(f"{hashlib.file_digest(fh, 'sha256').hexdigest()}  {part.name}\n")
    return "".join(lines)


def _entry_intact(path: Path) -> bool:
    """Whether the cached model at `path` (its .xml) is the pair featx wrote."""
    try:
        return path.with_suffix(".sha256").read_text() == _file_digests(path)
    except (OSError, UnicodeDecodeError):
        return False


def _remove_entry(path: Path) -> None:
    for suffix in _ENTRY:
        with contextlib.suppress(OSError):
            path.with_suffix(suffix).unlink()


def _readable(error: RuntimeError) -> str:
    """OpenVINO's message without the source locations it starts with (the first line of
    "Exception from src/inference/src/cpp/core.cpp:84:\nUnable to read the model: ..." says
    nothing); one line."""
    lines = [line.strip() for line in str(error).splitlines()]
    useful = [line for line in lines if line and not line.startswith(("Exception from ", "Check "))]
    return " ".join((useful or lines or [type(error).__name__])[:1])


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Each row's cosine between a and b (flattened per row)."""
    u, v = (np.asarray(x, np.float64).reshape(len(x), -1) for x in (a, b))
    return (u * v).sum(1) / np.maximum(np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1), 1e-30)


def quantize(model, calibration: Calibration) -> tuple[Any, dict[str, float]]:
    """`model` quantized to int8 by NNCF's post-training quantization with accuracy control:
    activation ranges (and bias corrections) estimated on the calibration images, one image per
    sample, then the layers that cost most reverted to fp32 until every calibration image's
    features keep cosine >= INT8_CALIBRATION_COSINE to the fp32 model's. Also returns how close
    it stayed: each calibration image's cosine (the lowest over the outputs), min and median."""
    import nncf
    import openvino as ov

    class Samples:  # NNCF iterates once per statistics pass: decoded again each time
        def __iter__(self):
            for batch in calibration.batches():
                for image in batch.float().numpy():
                    yield image[None]

    def compiled(m):
        return ov.Core().compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})

    # (index, image): the validation function gets raw items, maybe a subset, in any order
    items = list(enumerate(Samples()))
    fp32 = compiled(model)
    references = [[np.asarray(out) for out in fp32(image).values()] for _, image in items]

    def cosines(net, data) -> list[float]:
        return [
            min(
                float(cosine(np.asarray(out), ref)[0])
                for out, ref in zip(net(image).values(), references[index], strict=True)
            )
            for index, image in data
        ]

    logging.getLogger("nncf").setLevel(logging.ERROR)  # its notes
    # NNCF draws its progress bars on stdout, where featx prints only results (the store path).
    with contextlib.redirect_stdout(io.StringIO()):
        quantized = nncf.quantize_with_accuracy_control(
            model,
            nncf.Dataset(Samples()),
            nncf.Dataset(items, lambda item: item[1]),
            validation_fn=lambda net, data: min(cosines(net, data)),
            max_drop=1 - INT8_CALIBRATION_COSINE,
            drop_type=nncf.DropType.ABSOLUTE,
            subset_size=calibration.n_images,
        )
    final = cosines(compiled(quantized), items)
    quality = {"cosine_min": min(final), "cosine_median": float(np.median(final))}
    return quantized, {k: round(v, 5) for k, v in quality.items()}


def ov_model(
    tap: nn.Module, example: torch.Tensor, key: str | None, calibration: Calibration | None = None
):
    """The converted OpenVINO model (quantized to int8 when `calibration` is given): read from
    the cache when `key` was converted before, otherwise converted (dynamic batch) and saved
    atomically. A cache entry that is incomplete, damaged or unreadable is removed and
    converted again."""
    import openvino as ov

    path = _model_path(key) if key else None
    if path is not None and path.exists():
        if _entry_intact(path):
            quality = path.with_suffix(".json")
            try:
                return (
                    ov.Core().read_model(str(path), str(path.with_suffix(".bin"))),
                    True,
                    json.loads(quality.read_text()) if quality.exists() else None,
                )
            except (RuntimeError, ValueError, OSError):
                pass
        _remove_entry(path)
    x = example[:1].float().contiguous()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated
        # Traced here, on one image and unchecked: much faster than letting convert_model
        # trace the module on the whole batch (benchmarks/bench_conversion.py).
        traced = torch.jit.trace(tap, x, strict=False, check_trace=False)
        model = ov.convert_model(traced, example_input=x, input=[(-1, *x.shape[1:])])
    quality = None
    if calibration is not None:
        model, quality = quantize(model, calibration)
    CONVERSIONS["openvino"] += 1
    if path is not None:
        # A cache that cannot be written costs the next run a conversion, not this run.
        with contextlib.suppress(OSError):
            _save_entry(model, path, key, quality)
    return model, False, quality


def _save_entry(model, path: Path, key: str, quality: dict[str, float] | None) -> None:
    import openvino as ov

    path.parent.mkdir(parents=True, exist_ok=True)
    # Weights first, then the .xml, then the digests that make the entry count.
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        ov.save_model(model, str(Path(tmp) / "model.xml"), compress_to_fp16=False)
        os.replace(Path(tmp) / "model.bin", path.with_suffix(".bin"))
        os.replace(Path(tmp) / "model.xml", path)
        (path.with_suffix(".key")).write_text(key + "\n")
        if quality is not None:
            path.with_suffix(".json").write_text(json.dumps(quality) + "\n")
        (Path(tmp) / "digests").write_text(_file_digests(path))
        os.replace(Path(tmp) / "digests", path.with_suffix(".sha256"))


def _details(compiled, hint: str, precision: str, calibration, quality, cached: bool) -> str:
    n_requests = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    actual = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    n_streams = compiled.get_property("NUM_STREAMS")
    details = f"{hint}, streams={n_streams}, requests={n_requests}, runs {actual}"
    if actual != _OV_PRECISION[precision]:
        details += f" (this CPU has no {_OV_PRECISION[precision]})"
    if precision == "int8" and calibration is not None:
        details += f", calibrated on {calibration.n_images} images (seed {calibration.seed})"
    if quality:
        details += (
            f", cosine to fp32 on them min {quality['cosine_min']:.4f}, "
            f"median {quality['cosine_median']:.4f}"
        )
    if cached:
        details += ", cached model"
    return details


def openvino_engine(
    tap: nn.Module,
    precision: str,
    example: torch.Tensor,
    key: str | None = None,
    hint: str = "THROUGHPUT",
    streams: int | None = None,
    calibration: Calibration | None = None,
    threads: int | None = None,
) -> Engine:
    """OpenVINO on the CPU. The tap is converted in fp32 (dynamic batch), quantized to int8
    on `calibration` for int8, and compiled with INFERENCE_PRECISION_HINT f32 or bf16 (f32 for
    what int8 leaves unquantized). With more than one stream, a batch is split across the
    streams and run concurrently through an AsyncInferQueue."""
    import time

    import openvino as ov

    if precision not in ("fp32", "bf16", "int8"):
        raise ValueError("the openvino engine runs fp32, bf16 or int8")
    start = time.perf_counter()
    try:
        model, cached, quality = ov_model(
            tap, example, key, calibration if precision == "int8" else None
        )
    except RuntimeError as error:
        raise RuntimeError(_readable(error)) from None
    core = ov.Core()
    if key:
        # OpenVINO's own cache of compiled blobs: skips re-optimising the graph next time.
        core.set_property({"CACHE_DIR": str(cache_root() / "openvino" / "blobs")})
    config: dict[str, object] = {
        "PERFORMANCE_HINT": hint,
        "INFERENCE_PRECISION_HINT": _OV_PRECISION[precision],
    }
    if streams is not None:
        config["NUM_STREAMS"] = streams
    if threads is not None:  # `auto` measured fewer threads faster beside decoding
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        compiled = core.compile_model(model, "CPU", config)
    except RuntimeError as error:
        raise RuntimeError(_readable(error)) from None
    outputs = [(next(iter(o.get_names())), o) for o in compiled.outputs]
    n_requests = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    request = compiled.create_infer_request()
    queue = ov.AsyncInferQueue(compiled, n_requests) if n_requests > 1 else None
    setup = time.perf_counter() - start

    def collect(result) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(np.array(result[port])) for name, port in outputs}

    def run(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        x = np.ascontiguousarray(batch.detach().cpu().float().numpy())
        if queue is None or x.shape[0] < 2 * n_requests:
            return collect(request.infer(x, share_inputs=True))
        pieces = np.array_split(x, n_requests)
        results: list[dict[str, torch.Tensor] | None] = [None] * len(pieces)

        def done(req, index: int) -> None:
            results[index] = {
                name: torch.from_numpy(req.get_tensor(port).data.copy()) for name, port in outputs
            }

        queue.set_callback(done)
        for index, piece in enumerate(pieces):
            queue.start_async(piece, index)
        queue.wait_all()
        return {name: torch.cat([r[name] for r in results]) for name, _ in outputs}

    details = _details(compiled, hint, precision, calibration, quality, cached)
    return Engine(
        "openvino", precision, torch.device("cpu"), run, setup, details=details, quality=quality
    )
