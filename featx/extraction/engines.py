"""Inference engines for a layer tap: eager PyTorch, torch.compile (inductor, frozen weights)
and OpenVINO, behind one callable, with an on-disk cache so conversion is paid once.

A tap is any `nn.Module` whose forward takes a float NCHW batch and returns {module path:
tensor}, already pooled (featx's `LayerTap`). `build_engine` wraps it; an engine that cannot
take the model falls back to eager and says why in `Engine.fallback_reason`.

int8 is OpenVINO's post-training quantization (NNCF) of the converted tap, calibrated on real
preprocessed images of the dataset (`Calibration`); it has no eager fallback, since eager would
silently compute other features than the int8 a store records.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import io
import json
import logging
import os
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from featx.errors import UsageError, first_line
from featx.runtime import ENGINES, cache_root, check_precision

__all__ = [
    "CALIBRATION_IMAGES",
    "ENGINES",
    "INT8_COSINE",
    "Calibration",
    "Engine",
    "build_engine",
    "cache_key",
    "choose_engine",
    "resolve_engine",
]

ENGINE_VERSION = "2"  # part of every cache key: bump when a conversion changes
CALIBRATION_IMAGES = 300  # int8 calibration set: NNCF's default subset size
INT8_COSINE = 0.99  # issue 8's goal for int8 features' cosine to fp32; below it featx warns
# What accuracy control demands on the calibration images: a margin for the images it never saw
# (measured on Fashion-MNIST: demanding 0.99 there left 6 of 1,600 images at 0.984-0.99).
INT8_CALIBRATION_COSINE = 0.995

# torch.compile and NNCF import it, and on a machine without CUDA it warns so on stderr.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

# How many conversions/compilations actually ran in this process, per engine; the cache tests
# read it to see that a second build reused the cached model.
CONVERSIONS: Counter[str] = Counter()

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# int8 runs the quantized ops in int8 and the rest (e.g. pooling) in f32.
_OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}

Run = Callable[[torch.Tensor], dict[str, torch.Tensor]]


@dataclass
class Engine:
    """A ready-to-call inference engine: `engine(batch) -> {module path: float32 tensor}`."""

    name: str
    precision: str
    device: torch.device
    run: Run
    setup_seconds: float = 0.0  # conversion + compilation (or cache load) at construction
    fallback_reason: str | None = None  # set when the requested engine could not be built
    details: str = ""
    # int8: its features' cosine to fp32 on the calibration images (cosine_min, cosine_median)
    quality: dict[str, float] | None = None

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.run(batch)

    def describe(self) -> str:
        text = f"{self.name} {self.precision} on {self.device.type}"
        if self.details:
            text += f" ({self.details})"
        if self.setup_seconds >= 0.05:
            text += f", setup {self.setup_seconds:.1f}s"
        if self.fallback_reason:
            text += f"; fell back to eager: {self.fallback_reason}"
        return text


@dataclass(frozen=True)
class Calibration:
    """The images int8 quantization calibrates on.

    `batches()` yields preprocessed float NCHW batches of the dataset's images (called only when
    a quantization runs, so a cached conversion never decodes them); `identity` names them (the
    dataset, the preprocessing, the seeded choice) and is part of the int8 cache key."""

    batches: Callable[[], Iterable[torch.Tensor]]
    n_images: int
    seed: int
    identity: str

    def key(self) -> str:
        return f"calibration={self.identity}"


# ---- cache ----------------------------------------------------------------------------------


def cache_key(
    backbone: str,
    weights_sha256: str,
    layers: list[str],
    pool: str,
    input_size: int,
    precision: str,
    engine: str,
    calibration: str = "",
) -> str:
    """The string that identifies one conversion; callers may build their own. `calibration`
    (`Calibration.key()`) names an int8 conversion's calibration images."""
    return "|".join(
        [
            backbone,
            weights_sha256,
            ",".join(layers),
            pool,
            str(input_size),
            precision,
            engine,
            f"v{ENGINE_VERSION}",
            f"torch{torch.__version__}",
            *([calibration] if calibration else []),
        ]
    )


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _enable_inductor_cache(root: Path) -> None:
    """Point inductor's on-disk caches (FX graph cache, compiled kernels) under our root unless
    the user chose a directory. Torch writes its /tmp default into the environment the first
    time anything asks (importing timm does), so that default counts as not chosen."""
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")

    inductor_config.fx_graph_cache = True


# ---- helpers --------------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    if not str(error).strip():
        return type(error).__name__
    return f"{type(error).__name__}: {first_line(error)}"


def _cast(tap: nn.Module, precision: str) -> nn.Module:
    """The tap in `precision`; a copy unless fp32, so the caller's tap stays as it was."""
    if precision == "fp32":
        return tap
    return copy.deepcopy(tap).to(_DTYPES[precision])


def _as_input(batch: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    x = batch.to(device, dtype, non_blocking=True)
    return x if device.type == "mps" else x.contiguous(memory_format=torch.channels_last)


def _to_float(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in outputs.items()}


# ---- engines --------------------------------------------------------------------------------


def eager_engine(tap: nn.Module, device: torch.device, precision: str = "fp32") -> Engine:
    """Today's path: the tap as it is (channels_last), weights cast to bf16/fp16 when asked
    (real low-precision weights, not autocast), under inference_mode."""
    check_precision(device, precision)
    model = _cast(tap, precision)
    dtype = _DTYPES[precision]

    def run(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            return _to_float(model(_as_input(batch, device, dtype)))

    return Engine("eager", precision, device, run, details="channels_last")


def compile_engine(
    tap: nn.Module,
    device: torch.device,
    precision: str,
    example: torch.Tensor,
    mode: str = "default",
) -> Engine:
    """torch.compile (inductor) with frozen weights, for one batch size.

    The tap stops its forward by raising from a hook, which dynamo cannot follow in one graph,
    so the tap is first traced with make_fx (plain Python runs; the graph records the ops that
    executed) and the resulting FX graph is compiled. The graph is specialised to the example's
    batch size: smaller batches are zero-padded to it and larger ones split, so the last short
    batch of a run never triggers a second compilation.
    """
    from torch._inductor import config as inductor_config
    from torch.fx.experimental.proxy_tensor import make_fx

    check_precision(device, precision)
    _enable_inductor_cache(cache_root())
    model = _cast(tap, precision)
    dtype = _DTYPES[precision]
    x = _as_input(example, device, dtype)
    size = x.shape[0]
    start = time.perf_counter()
    with torch.no_grad():
        graph = make_fx(model, tracing_mode="real")(x)
    compiled = torch.compile(graph, mode=mode, dynamic=False)
    with torch.no_grad(), inductor_config.patch(freezing=True):
        compiled(x)  # compiles now, so setup time is paid (and measured) here
    CONVERSIONS["compile"] += 1
    setup = time.perf_counter() - start

    def run_full(x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad(), inductor_config.patch(freezing=True):
            return _to_float(compiled(x))

    def run(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        x = _as_input(batch, device, dtype)
        n = x.shape[0]
        if n == size:
            return run_full(x)
        parts = []
        for begin in range(0, n, size):
            part = x[begin : begin + size]
            short = part.shape[0]
            if short < size:
                pad = part.new_zeros((size - short, *part.shape[1:]))
                part = torch.cat([part, pad]).contiguous(memory_format=torch.channels_last)
            out = run_full(part)
            parts.append({k: v[:short] for k, v in out.items()})
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    return Engine("compile", precision, device, run, setup, details=f"mode={mode}, batch={size}")


def _quantize(model, calibration: Calibration) -> tuple[Any, dict[str, float]]:
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
                float(_cosine(np.asarray(out), ref)[0])
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


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Each row's cosine between a and b (flattened per row)."""
    u, v = (np.asarray(x, np.float64).reshape(len(x), -1) for x in (a, b))
    return (u * v).sum(1) / np.maximum(np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1), 1e-30)


def _ov_model(
    tap: nn.Module, example: torch.Tensor, key: str | None, calibration: Calibration | None = None
):
    """The converted OpenVINO model (quantized to int8 when `calibration` is given): read from
    the cache when `key` was converted before, otherwise converted (dynamic batch) and saved
    atomically."""
    import openvino as ov

    path = cache_root() / "openvino" / f"{_digest(key)}.xml" if key else None
    if path is not None and path.exists():
        quality = path.with_suffix(".json")
        return (
            ov.Core().read_model(str(path)),
            True,
            json.loads(quality.read_text()) if quality.exists() else None,
        )
    x = example[:1].float().contiguous()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated
        # Traced here, on one image and unchecked: converting ResNet-50 took 7.2 s when
        # convert_model traced the module on the batch, 1.9 s so (bench_conversion.py).
        traced = torch.jit.trace(tap, x, strict=False, check_trace=False)
        model = ov.convert_model(traced, example_input=x, input=[(-1, *x.shape[1:])])
    quality = None
    if calibration is not None:
        model, quality = _quantize(model, calibration)
    CONVERSIONS["openvino"] += 1
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Weights first, then the .xml that a reader checks for: never a half-written pair.
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            ov.save_model(model, str(Path(tmp) / "model.xml"), compress_to_fp16=False)
            os.replace(Path(tmp) / "model.bin", path.with_suffix(".bin"))
            os.replace(Path(tmp) / "model.xml", path)
        (path.with_suffix(".key")).write_text(key + "\n")
        if quality is not None:
            path.with_suffix(".json").write_text(json.dumps(quality) + "\n")
    return model, False, quality


def openvino_engine(
    tap: nn.Module,
    precision: str,
    example: torch.Tensor,
    key: str | None = None,
    hint: str = "THROUGHPUT",
    streams: int | None = None,
    calibration: Calibration | None = None,
) -> Engine:
    """OpenVINO on the CPU. The tap is converted in fp32 (dynamic batch), quantized to int8
    on `calibration` for int8, and compiled with INFERENCE_PRECISION_HINT f32 or bf16 (f32 for
    what int8 leaves unquantized). With more than one stream, a batch is split across the
    streams and run concurrently through an AsyncInferQueue."""
    import openvino as ov

    if precision not in ("fp32", "bf16", "int8"):
        raise ValueError("the openvino engine runs fp32, bf16 or int8")
    start = time.perf_counter()
    model, cached, quality = _ov_model(
        tap, example, key, calibration if precision == "int8" else None
    )
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
    compiled = core.compile_model(model, "CPU", config)
    outputs = [(next(iter(o.get_names())), o) for o in compiled.outputs]
    n_requests = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    actual = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    n_streams = compiled.get_property("NUM_STREAMS")
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
    return Engine(
        "openvino", precision, torch.device("cpu"), run, setup, details=details, quality=quality
    )


def build_engine(
    tap: nn.Module,
    engine: str,
    device: torch.device,
    precision: str,
    example: torch.Tensor,
    key: str | None = None,
    *,
    compile_mode: str = "default",
    ov_hint: str = "THROUGHPUT",
    ov_streams: int | None = None,
    calibration: Calibration | None = None,
) -> Engine:
    """The requested engine for `tap`, or eager with `fallback_reason` set when that engine
    cannot take this model here. `example` is one full batch (its size fixes compile's batch);
    `key` (see `cache_key`) names the cached conversion, None disables the cache.

    int8 needs `engine="openvino"` and `calibration` (unless `key`'s int8 model is cached); it
    never falls back: a failure is a UsageError that says why."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}")
    check_precision(device, precision, engine)
    if precision == "int8":
        return _int8_engine(tap, example, key, ov_hint, ov_streams, calibration)
    if engine == "eager":
        return eager_engine(tap, device, precision)
    try:
        if engine == "openvino":
            if device.type != "cpu":
                raise ValueError(f"the openvino engine runs on the CPU, not {device.type}")
            return openvino_engine(tap, precision, example, key, ov_hint, ov_streams)
        return compile_engine(tap, device, precision, example, compile_mode)
    except Exception as error:  # ImportError, conversion or compilation errors
        fallback = eager_engine(tap, device, precision)
        why = (
            f"{error.name or engine} is not installed"
            if isinstance(error, ImportError)
            else _one_line(error)
        )
        fallback.fallback_reason = f"{engine} unavailable ({why})"
        return fallback


def _int8_engine(
    tap: nn.Module,
    example: torch.Tensor,
    key: str | None,
    hint: str,
    streams: int | None,
    calibration: Calibration | None,
) -> Engine:
    if calibration is None and not is_cached("openvino", key or ""):
        raise UsageError(
            "the int8 model of these layers is not in this machine's engine cache and there are "
            "no calibration images here; run featx extract --precision int8 on this machine "
            "first (it calibrates on the dataset)."
        )
    try:
        return openvino_engine(tap, "int8", example, key, hint, streams, calibration)
    except ImportError as error:
        raise UsageError(
            f"--precision int8 needs {error.name or 'openvino'} (OpenVINO and NNCF); "
            'pip install "featx[int8]".'
        ) from None
    except Exception as error:  # conversion or quantization errors
        raise UsageError(
            f"the openvino engine could not quantize this model to int8 ({_one_line(error)})."
        ) from None


# ---- choosing -------------------------------------------------------------------------------


@functools.cache
def cpu_features() -> frozenset[str]:
    """The CPU flags that decide low-precision speed (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_class(flags: frozenset[str] | None = None) -> str:
    """The row of MEASURED a CPU belongs to: amx, avx512_bf16, avx512 or avx2."""
    flags = cpu_features() if flags is None else flags
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if "avx2" in flags else "other"


@dataclass(frozen=True)
class Measured:
    """One engine on one kind of machine, relative to eager fp32 channels_last."""

    speedup: float  # model-only images/s over eager fp32's
    setup_seconds: float  # first build: conversion + compilation
    cached_setup_seconds: float  # later builds, from the on-disk cache


# The avx2 rows: benchmarks/bench_engines.py on a 2-core AMD EPYC (Zen 3) KVM guest (flags avx
# avx2 fma f16c; no avx512*, avx512_bf16 or amx), ResNet-50 layer3+avgpool, avg pool, 224px,
# batch 16, speed-ups interleaved against eager fp32 channels_last, medians of 5.
# fp32 and the openvino rows: results/engines-2026-11-29-trace.txt, a quiet machine, after
# featx began tracing the tap itself (OpenVINO's conversion fell from 7.2 s to 1.9 s): eager fp32
# 15.7 img/s, openvino THROUGHPUT 1.25x (2.9 s to convert, compile and run the first batch,
# 1.2 s from the cache), compile 1.16x (15.2 s). Under load (7-19 on 2 cores,
# results/engines-2026-11-29.txt) openvino led by more (1.92-1.97x) and compile 1.20-1.46x, with
# every setup slowed alike, so the images needed to win a setup back stay about the same.
# bf16 on this CPU: torch runs it at 0.15x fp32 (no native bf16; its compile setup is the loaded
# run's), OpenVINO ignores the hint and runs f32 (1.24x). The inductor FX graph cache did not
# shorten a second compile in a fresh process (frozen weights), so compile's cached setup is its
# full setup. Other CPU classes and devices are absent on purpose: `auto` keeps eager until
# measured there.
REFERENCE_EAGER_FP32 = 15.7  # images/s, eager fp32, ResNet-50 224px on that machine
# What that reference network costs an image (torch's FlopCounterMode, `trace_layers`): another
# network's eager rate is estimated as REFERENCE_EAGER_FP32 scaled by the ratio of the FLOPs.
REFERENCE_FLOPS = 8.17e9
# The amx rows are issue 8's measurements on the 2-core CI machine (Xeon with AVX-512 and AMX),
# ResNet-50 at 224, batch 16, interleaved against eager fp32 channels_last (15.7 img/s in its
# first quiet run), medians of its three runs (two quiet, one loaded): compile fp32
# 1.5/1.5/1.65 (13-16 s to compile), compile bf16 4.4/4.4/4.1, eager with bf16 weights
# 2.7/2.5/2.0, OpenVINO fp32 1.0/0.9/2.2 and bf16 2.3/2.1/6.2. OpenVINO's setup times are the
# avx2 row's (not measured there).
MEASURED: dict[tuple[str, str, str], dict[str, Measured]] = {
    ("cpu", "amx", "fp32"): {
        "eager": Measured(1.0, 0.0, 0.0),
        "compile": Measured(1.5, 16.0, 16.0),
        "openvino": Measured(1.0, 2.9, 1.2),
    },
    ("cpu", "amx", "bf16"): {
        "eager": Measured(2.5, 0.0, 0.0),
        "compile": Measured(4.4, 16.0, 16.0),
        "openvino": Measured(2.3, 2.9, 1.2),
    },
    ("cpu", "avx2", "fp32"): {
        "eager": Measured(1.0, 0.0, 0.0),
        "compile": Measured(1.16, 15.2, 15.2),
        "openvino": Measured(1.25, 2.9, 1.2),
    },
    ("cpu", "avx2", "bf16"): {
        "eager": Measured(0.15, 0.0, 0.0),
        "compile": Measured(0.15, 63.0, 63.0),
        "openvino": Measured(1.24, 2.9, 1.2),
    },
}


def choose_engine(
    device: torch.device,
    precision: str,
    n_images: int,
    *,
    eager_rate: float | None = None,
    cached: frozenset[str] = frozenset(),
    available: frozenset[str] | None = None,
    flags: frozenset[str] | None = None,
) -> tuple[str, str]:
    """The engine `auto` should use, and why.

    Only measured rows count: the candidates are the engines in MEASURED for (device type, CPU
    class, precision), each with its speed-up over eager fp32. An engine is chosen when its
    setup is won back within this run, i.e. it minimises
        setup + n_images / (rate * speedup)
    where `rate` is the caller's eager fp32 rate for this model (images/s) or, without one, the
    reference ResNet-50 rate. `cached` names engines whose conversion is already on disk (their
    cached setup counts); `available` limits the candidates (e.g. openvino not installed).
    """
    key = (device.type, cpu_class(flags) if device.type == "cpu" else device.type, precision)
    table = MEASURED.get(key)
    row = "/".join(key)
    if not table:
        return "eager", f"no engine measurements for {row}"
    rate = eager_rate or REFERENCE_EAGER_FP32

    def seconds(name: str) -> float:
        m = table[name]
        setup = m.cached_setup_seconds if name in cached else m.setup_seconds
        return setup + n_images / (rate * m.speedup)

    candidates = [n for n in table if n == "eager" or available is None or n in available]
    best = min(candidates, key=seconds)
    eager = seconds("eager")
    if best == "eager":
        why = f"no measured engine wins back its setup within {n_images} images on {row}"
    else:
        why = (
            f"{table[best].speedup:.2f}x eager fp32 measured on {row}; its setup is won back: "
            f"~{seconds(best):.0f}s vs ~{eager:.0f}s eager for {n_images} images"
        )
    if table["eager"].speedup < 1:
        why += f" ({precision} eager runs at {table['eager'].speedup:.2f}x fp32 on this CPU)"
    return best, why


# ---- what extraction and prediction call ----------------------------------------------------
def is_cached(engine: str, key: str) -> bool:
    """Whether `engine`'s conversion for `key` is already on disk (only openvino caches one
    that later processes load; inductor's cache did not shorten a second compile here)."""
    return engine == "openvino" and (cache_root() / "openvino" / f"{_digest(key)}.xml").exists()


def resolve_engine(
    requested: str,
    device: torch.device,
    precision: str,
    n_images: int,
    key: str,
    flops: int = 0,
) -> tuple[str, str]:
    """`requested` ("auto" or an engine name) as an engine name, and the reason for `auto`'s
    choice ("" when the user named the engine). `flops` is what the tapped network costs an
    image (see `LayerInfo.flops`); 0 judges it as the reference ResNet-50."""
    if requested != "auto":
        return requested, ""
    import importlib.util

    if precision == "int8":
        return "openvino", "int8 is OpenVINO's quantized model"

    available = frozenset(
        name
        for name, module in (("openvino", "openvino"), ("compile", "torch._inductor"))
        if importlib.util.find_spec(module) is not None
    )
    cached = frozenset(name for name in ENGINES if is_cached(name, key))
    rate = REFERENCE_EAGER_FP32 * REFERENCE_FLOPS / flops if flops else None
    return choose_engine(
        device, precision, n_images, eager_rate=rate, cached=cached, available=available
    )
