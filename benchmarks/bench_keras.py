"""featx against the classic Keras transfer-learning notebook, on the same photo-sized JPEGs.

The notebook's pipeline: VGG16 without its top at 150 px, images rescaled by 1/255 and read
in batches of 20 from the class folders, `conv_base.predict` per batch, features collected in
memory and saved. featx: `featx extract DATA --backbone vgg16 --layer block5_pool
--image-size 150`. Each run is a fresh process (imports, model set-up, decoding, inference
and saving included) and the two alternate. Speed and memory come from separate runs: the peak
resident memory of each process tree (the process and its DataLoader workers, PSS so shared
pages count once) is sampled every 0.05 s in runs of their own, because reading a process's
PSS walks its page tables (about 30-40 ms for a 1 GB process, under the process's memory lock)
and sampling that often takes half a core from the process it measures.

Keras runs from its own environment, given by --keras-python (a Python with tensorflow-cpu
and keras installed, e.g. `python -m venv kv && kv/bin/pip install tensorflow-cpu keras
pillow scipy`). Neither side can download ImageNet weights offline: Keras builds VGG16 with
random weights (its 58 MB no-top file is never read), featx reads a 528 MB torchvision VGG16
state dict saved by this script (the size of the real file; the speed is the same).

    python benchmarks/bench_keras.py --keras-python kv/bin/python --images 200 --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import make_photos  # noqa: E402

KERAS_PIPELINE = textwrap.dedent(
    """
    import sys
    import numpy as np
    import keras
    from keras.applications import VGG16

    data, out, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    conv_base = VGG16(weights=None, include_top=False, input_shape=(size, size, 3))
    try:
        from keras.preprocessing.image import ImageDataGenerator

        generator = ImageDataGenerator(rescale=1.0 / 255).flow_from_directory(
            data, target_size=(size, size), batch_size=20, class_mode="binary", shuffle=False
        )
        batches = (generator[i] for i in range(len(generator)))
    except ImportError:  # Keras 3 dropped ImageDataGenerator: its tf.data successor
        dataset = keras.utils.image_dataset_from_directory(
            data, image_size=(size, size), batch_size=20, shuffle=False, verbose=False
        )
        batches = ((x.numpy() / 255.0, y.numpy()) for x, y in dataset)
    features = [conv_base.predict(x, verbose=0) for x, _ in batches]
    np.save(out, np.concatenate(features))
    """
)


KERAS_MODEL_ONLY = textwrap.dedent(
    """
    import statistics, sys, time
    import numpy as np
    from keras.applications import VGG16

    size, batch = int(sys.argv[1]), int(sys.argv[2])
    conv_base = VGG16(weights=None, include_top=False, input_shape=(size, size, 3))
    x = np.random.default_rng(0).random((batch, size, size, 3), dtype=np.float32)
    conv_base.predict(x, verbose=0)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        conv_base.predict(x, verbose=0)
        times.append(time.perf_counter() - start)
    print(batch / statistics.median(times))
    """
)


def model_only(args, work: Path) -> None:
    """Images/s of the network alone, on random batches of the notebook's 20: Keras'
    `conv_base.predict`, and featx's eager and OpenVINO taps, with the machine's matmul rate."""
    import torch
    from bench_extract import matmul_gflops

    from featx.backbones import get_backbone
    from featx.backbones.layers import prepare_tap
    from featx.inference import build_engine, cache_key

    script = work / "keras_model_only.py"
    script.write_text(KERAS_MODEL_ONLY)
    done = subprocess.run([args.keras_python, str(script), str(args.image_size), "20"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    rates = {"keras conv_base.predict": float(done.stdout.split()[-1])}
    loaded = get_backbone("vgg16").load("none")
    tap = prepare_tap(loaded.model, ["features.30"], "none", torch.device("cpu"), args.image_size)
    x = torch.randn(20, 3, args.image_size, args.image_size)
    for engine in ("eager", "openvino"):
        key = cache_key("vgg16", loaded.weights_sha256, ["features.30"], "none",
                        args.image_size, "fp32", "bench-keras")  # fmt: skip
        run = build_engine(tap, engine, torch.device("cpu"), "fp32", example=x, key=key)
        run(x)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - start)
        rates[f"featx {engine}"] = 20 / statistics.median(times)
    gflop = 2 * 15.47 * (args.image_size / 224) ** 2  # torchvision's GMACs at 224, scaled
    print(f"\nmodel only, random batches of 20, medians of 5; fp32 matmul "
          f"{matmul_gflops(torch.device('cpu')):.0f} GFLOP/s")  # fmt: skip
    for name, rate in rates.items():
        print(f"{name}: {rate:.1f} img/s, {rate * gflop:.0f} GFLOP/s, "
              f"{rate / rates['keras conv_base.predict']:.2f}x Keras")  # fmt: skip


def run_timed(command: list[str]) -> float:
    """Wall seconds of one fresh process, unobserved."""
    start = time.perf_counter()
    process = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{process.stderr.decode()[-2000:]}")
    return seconds


def run_sampled(command: list[str]) -> float:
    """Peak PSS of the process tree of one fresh process, in bytes."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
        except psutil.NoSuchProcess:
            break
        peak = max(peak, total)
        time.sleep(0.05)
    if process.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{process.stderr.read().decode()[-2000:]}")
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keras-python", required=True, help="a Python with tensorflow+keras")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each")
    parser.add_argument("--memory-repeats", type=int, default=1, help="sampled runs of each")
    parser.add_argument("--engine", nargs="+", default=["auto"], help="featx engines to time")
    parser.add_argument(
        "--model-only", action="store_true", help="only the networks' rates on random batches"
    )
    args = parser.parse_args()

    import torch
    import torchvision

    work = Path(tempfile.mkdtemp(prefix="bench_keras-"))
    if args.model_only:
        try:
            model_only(args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    try:
        data = work / "photos"
        make_photos(data, args.images)
        weights = work / "vgg16.pth"
        torch.manual_seed(0)
        torch.save(torchvision.models.vgg16().state_dict(), weights)
        keras_script = work / "keras_pipeline.py"
        keras_script.write_text(KERAS_PIPELINE)
        runs = {"keras": [args.keras_python, str(keras_script), str(data), str(work / "k.npy"),
                          str(args.image_size)]}  # fmt: skip
        for engine in args.engine:
            runs[f"featx {engine}"] = [
                sys.executable, "-m", "featx.cli", "extract", str(data), "--backbone", "vgg16",
                "--weights", str(weights), "--layer", "block5_pool",
                "--image-size", str(args.image_size), "--engine", engine,
                "--store", str(work / "f.h5"), "--overwrite", "--quiet",
            ]  # fmt: skip
        times: dict[str, list[float]] = {name: [] for name in runs}
        peaks: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, command in runs.items():
                times[name].append(run_timed(command))
        for _ in range(args.memory_repeats):
            for name, command in runs.items():
                peaks[name].append(run_sampled(command))
        keras_seconds = statistics.median(times["keras"])
        keras_peak = statistics.median(peaks["keras"])
        print(
            f"VGG16 block5_pool at {args.image_size} px, {args.images} 640x480 JPEGs, fresh "
            f"processes; seconds: medians of {args.repeats} alternating unobserved runs, peak "
            f"PSS: medians of {args.memory_repeats} sampled runs; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads\n"
        )
        print(
            "| pipeline | seconds (range) | images/s | vs Keras | vs Keras, per round (range) "
            "| peak PSS | vs Keras |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name in runs:
            seconds, peak = statistics.median(times[name]), statistics.median(peaks[name])
            # each round ran Keras and featx back to back: their ratio drifts less with load
            rounds = [k / t for k, t in zip(times["keras"], times[name], strict=True)]
            print(
                f"| {name} | {seconds:.1f} ({min(times[name]):.1f}-{max(times[name]):.1f}) | "
                f"{args.images / seconds:.1f} | {keras_seconds / seconds:.2f}x | "
                f"{statistics.median(rounds):.2f}x ({min(rounds):.2f}-{max(rounds):.2f}) | "
                f"{peak / 2**20:.0f} MB | {peak / keras_peak:.2f}x |"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
