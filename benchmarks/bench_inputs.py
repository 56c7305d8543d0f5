"""The same JPEGs as an image folder, as WebDataset tar shards and as a Parquet file of image
bytes (Hugging Face's image struct): the time `open_dataset` takes to list each (the tar's
one header pass, the Parquet footer and label column) and the images/s of reading and decoding
every row in one process (`load_image`, full decode).

    python benchmarks/bench_inputs.py --images 2000 --shard-size 500
"""

from __future__ import annotations

import argparse
import io
import platform
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from featx.data import load_image, open_dataset


def write_inputs(root: Path, n: int, shard_size: int, size: tuple[int, int]) -> dict[str, str]:
    """The folder, the tar shards (brace notation) and the Parquet file of `n` JPEGs."""
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        photo = Image.fromarray(photos[i % len(photos)]).resize(size)
        pixels = np.asarray(photo).astype(np.int16) + rng.integers(-8, 9, (size[1], size[0], 3))
        buffer = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        rows.append((f"c{i % 10}", f"{i:07d}", buffer.getvalue()))
    for label, key, jpeg in rows:
        (root / "folder" / label).mkdir(parents=True, exist_ok=True)
        (root / "folder" / label / f"{key}.jpg").write_bytes(jpeg)
    (root / "shards").mkdir()
    n_shards = -(-n // shard_size)
    for s in range(n_shards):
        with tarfile.open(root / "shards" / f"part-{s:06d}.tar", "w") as tar:
            for label, key, jpeg in rows[s * shard_size : (s + 1) * shard_size]:
                for ext, payload in (("jpg", jpeg), ("txt", label.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    table = pa.table(
        {
            "image": [{"bytes": jpeg, "path": f"{key}.jpg"} for _, key, jpeg in rows],
            "label": [label for label, _, _ in rows],
        }
    )
    pq.write_table(table, root / "images.parquet", row_group_size=1000)
    return {
        "folder": str(root / "folder"),
        "tar shards": str(root / "shards" / f"part-{{000000..{n_shards - 1:06d}}}.tar"),
        "parquet": str(root / "images.parquet"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {args.images} JPEGs of "
          f"{args.width}x{args.height}, {args.shard_size} per tar shard")  # fmt: skip
    print(f"{'input':<12} {'list (s)':>9} {'read+decode (img/s)':>20}")
    with tempfile.TemporaryDirectory() as tmp:
        inputs = write_inputs(Path(tmp), args.images, args.shard_size, (args.width, args.height))
        for name, spec in inputs.items():
            start = time.perf_counter()
            dataset = open_dataset(spec)
            listed = time.perf_counter() - start
            start = time.perf_counter()
            for f in dataset.files:
                load_image(dataset.root / f.path)
            rate = len(dataset.files) / (time.perf_counter() - start)
            print(f"{name:<12} {listed:>9.3f} {rate:>20.0f}")


if __name__ == "__main__":
    main()
