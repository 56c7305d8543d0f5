"""Planning cost: listing and fingerprinting a dataset before any image is decoded.

    python benchmarks/bench_plan.py --files 100000     # about a minute on the CI machine

Writes a tree of --files 1-byte `.jpg` files (scanning only stats them) as DATA/train/CLASS/,
and the equivalent CSV manifest, then times, in fresh passes alternating folder and manifest,
`scan_image_folder` + fingerprint and `read_manifest` + fingerprint. Prints the median seconds
and the linear projection for 1.28 million files.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

from featx.data.folders import scan_image_folder
from featx.data.manifest import read_manifest

IMAGENET = 1_281_167


def make_tree(root: Path, n_files: int, n_classes: int) -> Path:
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["path", "label", "split"])
        for i in range(n_files):
            name = f"class{i % n_classes:04d}"
            rel = f"train/{name}/img-{i:07d}.jpg"
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"\xff")
            out.writerow([rel, name, "train"])
    return manifest


def timed(listing) -> float:
    start = time.perf_counter()
    listing().fingerprint  # noqa: B018 - the fingerprint is part of planning
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        manifest = make_tree(root, args.files, args.classes)
        print(f"wrote {args.files} files in {time.perf_counter() - start:.1f} s")
        folder, table = [], []
        for _ in range(args.repeats):  # interleaved, so both see the same machine load
            folder.append(timed(lambda: scan_image_folder(root)))
            table.append(timed(lambda: read_manifest(manifest)))
    print(f"\n| listing ({args.files} files) | median s | projected s for 1.28 M |")
    print("|---|---|---|")
    for what, times in (("image folder", folder), ("CSV manifest", table)):
        median = statistics.median(times)
        print(f"| {what} | {median:.2f} | {median * IMAGENET / args.files:.0f} |")


if __name__ == "__main__":
    main()
