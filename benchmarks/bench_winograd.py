"""Would Winograd convolution beat oneDNN's direct convolution on this CPU? (It was tried for
featx and left out: this is the evidence.)

Winograd F(4x4, 3x3) (Lavin and Gray) computes a 3x3, stride-1 convolution with 36
multiplications per 4x4 output tile per channel pair instead of 144. Here it is written with
torch operations: the 6x6 input tiles transformed by one matmul with the 36x36 Kronecker matrix
B^T (x) B^T, 36 batched GEMMs against the transformed weights, and the 4x4 outputs
recovered by one 16x36 matmul. Each of VGG16's convolutions at 150 px (batch 20, channels_last,
fp32) is timed against `torch.nn.Conv2d` (oneDNN), medians of 7; then the whole of VGG16's
`features` with oneDNN and with NNPACK (PyTorch's Winograd-based AVX2 kernels, which it uses
when oneDNN is disabled).

    python benchmarks/bench_winograd.py
    python benchmarks/bench_winograd.py --size 32 --batch 2 --repeats 1   # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision

B_T = torch.tensor(
    [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ],
    dtype=torch.float64,
)
G = torch.tensor(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    dtype=torch.float64,
)
A_T = torch.tensor(
    [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    dtype=torch.float64,
)
INPUT = torch.kron(B_T, B_T).float()  # vec(B^T d B) = INPUT @ vec(d)
OUTPUT = torch.kron(A_T, A_T).float()  # vec(A^T m A) = OUTPUT @ vec(m)
BATCH, SIZE = 20, 150


def winograd_weights(weight: torch.Tensor) -> torch.Tensor:
    """(K, C, 3, 3) -> (36, C, K): G g G^T for every filter."""
    u = torch.einsum("ai,kcij,bj->abck", G, weight.double(), G)
    return u.reshape(36, weight.shape[1], weight.shape[0]).float().contiguous()


def winograd_conv(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 3x3 convolution, stride 1, padding 1, of a channels_last NCHW batch."""
    n, c, h, w = x.shape
    th, tw = -(-h // 4), -(-w // 4)
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 4 * tw + 1 - w, 1, 4 * th + 1 - h))
    tiles = padded.unfold(1, 6, 4).unfold(2, 6, 4)  # n, th, tw, c, 6, 6
    p = n * th * tw
    d = tiles.permute(4, 5, 0, 1, 2, 3).reshape(36, p * c)
    m = torch.bmm((INPUT @ d).view(36, p, c), u)  # 36, p, k
    k = u.shape[2]
    y = (OUTPUT @ m.view(36, p * k)).view(4, 4, n, th, tw, k)
    y = y.permute(2, 3, 0, 4, 1, 5).reshape(n, 4 * th, 4 * tw, k)[:, :h, :w]
    if bias is not None:
        y = y + bias
    return y.permute(0, 3, 1, 2)


def seconds(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=SIZE, help="input size, px")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--repeats", type=int, default=7, help="timings per median")
    args = parser.parse_args()
    torch.manual_seed(0)
    features = torchvision.models.vgg16().features.eval().to(memory_format=torch.channels_last)
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads; VGG16 at {args.size} px, "
        f"batch {args.batch}, fp32, channels_last, medians of {args.repeats}"
    )
    print("| layer | channels | size | oneDNN ms | Winograd ms | speed-up | max rel. error |")
    print("|---|---|---:|---:|---:|---:|---:|")
    size = args.size
    with torch.inference_mode():
        for index, layer in enumerate(features):
            if isinstance(layer, torch.nn.MaxPool2d):
                size //= 2
            if not isinstance(layer, torch.nn.Conv2d):
                continue
            x = torch.randn(args.batch, layer.in_channels, size, size).to(
                memory_format=torch.channels_last
            )
            u = winograd_weights(layer.weight)
            want, got = layer(x), winograd_conv(x, u, layer.bias)
            error = ((got - want).abs().max() / want.abs().max()).item()
            direct = seconds(lambda: layer(x), args.repeats)  # noqa: B023
            fast = seconds(lambda: winograd_conv(x, u, layer.bias), args.repeats)  # noqa: B023
            print(
                f"| features.{index} | {layer.in_channels} -> {layer.out_channels} | {size} | "
                f"{direct * 1e3:.1f} | {fast * 1e3:.1f} | {direct / fast:.2f}x | {error:.1e} |"
            )
        x = torch.randn(args.batch, 3, args.size, args.size).to(memory_format=torch.channels_last)
        onednn = args.batch / seconds(lambda: features(x), min(5, args.repeats))
        torch.backends.mkldnn.enabled = False
        plain = features.to(memory_format=torch.contiguous_format)
        nnpack = args.batch / seconds(lambda: plain(x.contiguous()), min(5, args.repeats))
    print(
        f"\nVGG16 features, whole: oneDNN {onednn:.2f} img/s, NNPACK {nnpack:.2f} img/s "
        f"({nnpack / onednn:.2f}x)"
    )


if __name__ == "__main__":
    main()
