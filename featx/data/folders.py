"""Image folders in, decoded RGB images out.

A dataset is `ROOT/CLASS/*.ext`, or `ROOT/{train,validation,test}/CLASS/*.ext` (`val` is read as
`validation`). Files are listed in a fixed order: split, then class, then relative path.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from featx.errors import UsageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
SPLIT_DIRS = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}
SPLITS = ("train", "validation", "test")
UNSPLIT = "unsplit"
SPLIT_ORDER = {s: i for i, s in enumerate((*SPLITS, UNSPLIT))}  # the row order of splits


@dataclass(frozen=True)
class ImageFile:
    """One candidate image: where it is, what class and split it belongs to, and its stat."""

    path: str  # relative to the dataset root, with forward slashes
    label: int
    split: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class ImageFolder:
    """The listing of an image-folder dataset (or of a manifest, see `featx.data.manifest`).

    `meta` holds a manifest's extra columns, one value per file in `files` order.
    """

    root: Path
    class_names: tuple[str, ...]
    files: tuple[ImageFile, ...]
    meta: dict[str, tuple] = field(default_factory=dict, compare=False)

    @property
    def fingerprint(self) -> str:
        """sha256 of every file's relative path, size and modification time."""
        digest = hashlib.sha256()
        for f in self.files:
            digest.update(f"{f.path}\0{f.size}\0{f.mtime_ns}\n".encode())
        return digest.hexdigest()

    @property
    def splits(self) -> tuple[str, ...]:
        present = {f.split for f in self.files}
        return tuple(s for s in (*SPLITS, UNSPLIT) if s in present)


def _is_image(entry: os.DirEntry) -> bool:
    return (
        not entry.name.startswith(".")
        and entry.is_file()
        and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
    )


def _images_below(folder: Path) -> list[os.DirEntry]:
    """Image files anywhere below `folder`, hidden files and folders excluded."""
    found, pending = [], [folder]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    pending.append(Path(entry.path))
                elif _is_image(entry):
                    found.append(entry)
    return found


def _subdirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def scan_image_folder(root: str | os.PathLike) -> ImageFolder:
    """List an image-folder dataset; raise UsageError if it is missing, empty or mixed."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"data directory {root} does not exist or is not a directory.")
    top = _subdirs(root)
    split_dirs = [d for d in top if d in SPLIT_DIRS]
    if split_dirs:
        others = [d for d in top if d not in SPLIT_DIRS]
        if others:
            raise UsageError(
                f"{root} mixes split folders ({', '.join(split_dirs)}) with other folders "
                f"({', '.join(others[:3])}); use either DATA/CLASS/ or DATA/SPLIT/CLASS/."
            )
        if "val" in split_dirs and "validation" in split_dirs:
            raise UsageError(f"{root} has both val/ and validation/; keep one of them.")
        layout = [(SPLIT_DIRS[d], root / d) for d in split_dirs]
    else:
        layout = [(UNSPLIT, root)]

    per_split = {
        split: {c: _images_below(base / c) for c in _subdirs(base)} for split, base in layout
    }
    class_names = sorted({c for classes in per_split.values() for c in classes})
    if not class_names:
        raise UsageError(f"{root} has no class folders; expected DATA/CLASS/*.jpg.")
    for split, classes in per_split.items():
        for name, entries in classes.items():
            if not entries:
                where = name if split == UNSPLIT else f"{split}/{name}"
                raise UsageError(f"class folder {root / where} holds no images.")

    files = []
    for split in sorted(per_split, key=SPLIT_ORDER.__getitem__):
        for label, name in enumerate(class_names):
            entries = per_split[split].get(name, [])
            rel = sorted((Path(e.path).relative_to(root).as_posix(), e) for e in entries)
            for path, entry in rel:
                st = entry.stat()
                files.append(ImageFile(path, label, split, st.st_size, st.st_mtime_ns))
    return ImageFolder(root, tuple(class_names), tuple(files))


class BadImage(Exception):
    """A file that cannot be decoded as an image; the message is the reason."""


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        pixels = np.clip(pixels * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(pixels).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image file as RGB with its EXIF orientation applied; raise BadImage if it can't."""
    try:
        if not os.path.exists(path):
            raise BadImage("missing file")
        if os.path.getsize(path) == 0:
            raise BadImage("empty file")
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        text = str(error) or type(error).__name__
        if "truncated" in text.lower():
            text = "truncated image"
        elif isinstance(error, PermissionError):
            text = "unreadable (permission denied)"
        raise BadImage(text) from None
