"""Where OpenVINO's conversion of a featx tap spends its time, one fresh conversion each.

`convert_model(module)` is what featx did before: OpenVINO traces the module itself on the
whole example batch. featx now traces the tap on one image (`torch.jit.trace`, unchecked) and
converts the traced module; the outputs are compared with the tap's on a full batch.

    python benchmarks/bench_conversion.py
    python benchmarks/bench_conversion.py --backbone vgg16 --layer block5_pool --size 150
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import openvino as ov
import torch

from featx.backbones import get_backbone
from featx.backbones.layers import prepare_tap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--layer", nargs="+", default=["layer3", "avgpool"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    record = get_backbone(args.backbone)
    modules = [record.module_path(layer) for layer in args.layer]
    tap = prepare_tap(record.load("none").model, modules, "avg", torch.device("cpu"), args.size)
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(args.batch, 3, args.size, args.size, generator=generator)
    shape = [(-1, 3, args.size, args.size)]
    with torch.no_grad():
        reference = tap(batch)
        start = time.perf_counter()
        ov.convert_model(tap, example_input=batch, input=shape)
        whole = time.perf_counter() - start
        start = time.perf_counter()
        traced = torch.jit.trace(tap, batch[:1], strict=False, check_trace=False)
        trace = time.perf_counter() - start
        start = time.perf_counter()
        model = ov.convert_model(traced, example_input=batch[:1], input=shape)
        convert = time.perf_counter() - start
    out = ov.Core().compile_model(model, "CPU")(batch.numpy())
    worst = max(
        float(np.abs(np.asarray(out[index]) - reference[name].numpy()).max())
        / float(reference[name].abs().max())
        for index, port in enumerate(model.outputs)
        for name in port.get_names()
    )
    print(f"{args.backbone} {'+'.join(args.layer)} at {args.size} px, batch {args.batch}, "
          f"torch {torch.__version__}, openvino {ov.__version__}")  # fmt: skip
    print(f"convert_model(module), traced by OpenVINO on the batch: {whole:.1f} s")
    print(f"featx: trace on one image {trace:.1f} s + convert the traced tap {convert:.1f} s "
          f"= {trace + convert:.1f} s ({whole / (trace + convert):.1f}x less)")  # fmt: skip
    print(f"outputs vs the tap, max relative difference: {worst:.1e}")


if __name__ == "__main__":
    main()
