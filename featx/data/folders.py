"""Image folders in, decoded RGB images out.

A dataset is `ROOT/CLASS/*.ext`, or `ROOT/{train,validation,test}/CLASS/*.ext` (`val` is read as
`validation`). Files are listed in a fixed order: split, then class, then relative path.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from featx.errors import UsageError

__all__ = ["BadImage", "ImageFile", "ImageFolder", "load_image", "scan_image_folder"]

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
    skipped: tuple[tuple[str, str], ...] = ()  # entries left out when listing, with the reason
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


def printable(path: str | os.PathLike) -> str:
    """A path as text that any terminal and HDF5 string can hold (undecodable bytes escaped)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _os_reason(error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return "symbolic link loop"
    if error.errno == errno.ENAMETOOLONG:
        return "path longer than the system allows"
    if isinstance(error, PermissionError):
        return "permission denied"
    return (error.strerror or type(error).__name__).lower()


def _is_ancestor(link: Path, folder: Path) -> bool:
    """Whether `link` leads to `folder` or a folder above it (following it would loop)."""
    target, here = os.path.realpath(link), os.path.realpath(folder)
    return here == target or here.startswith(target.rstrip(os.sep) + os.sep)


class UnreadableFolder(UsageError):
    """A folder below the data folder that cannot be listed."""


@dataclass
class ImageListing:
    """Image files found below a folder, and the entries left out with the reason."""

    files: list[tuple[Path, os.stat_result]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    folders: list[tuple[Path, str]] = field(default_factory=list)  # could not be listed


def list_images(folder: Path) -> ImageListing:
    """Image files anywhere below `folder` (hidden ones excluded), following symbolic links
    once. Broken links, link loops, FIFOs and folders named like images, undecodable names and
    paths past the system's limit are noted in `skipped`; folders that cannot be listed in
    `folders`."""
    listing = ImageListing()
    try:
        top = os.stat(folder)
    except OSError as error:
        listing.folders.append((folder, _os_reason(error)))
        return listing
    seen = {(top.st_dev, top.st_ino)}
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            with os.scandir(current) as scan:
                entries = sorted(scan, key=lambda e: e.name)
        except OSError as error:
            if error.errno == errno.ENAMETOOLONG:
                listing.skipped.append((current, _os_reason(error)))
            else:
                listing.folders.append((current, _os_reason(error)))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                st = os.stat(entry.path)
            except OSError as error:
                broken = isinstance(error, FileNotFoundError)
                if _is_image_name(entry.name) or not broken:
                    reason = "broken symbolic link" if broken else _os_reason(error)
                    listing.skipped.append((path, reason))
                continue
            if stat.S_ISDIR(st.st_mode):
                if _is_image_name(entry.name):
                    listing.skipped.append((path, "a folder, not an image file"))
                elif (st.st_dev, st.st_ino) in seen or _is_ancestor(path, current):
                    listing.skipped.append((path, "symbolic link loop (folder already listed)"))
                else:
                    seen.add((st.st_dev, st.st_ino))
                    pending.append(path)
            elif _is_image_name(entry.name):
                if not stat.S_ISREG(st.st_mode):
                    listing.skipped.append((path, "not a regular file (a FIFO or device)"))
                elif printable(entry.name) != entry.name:
                    listing.skipped.append((path, "file name is not valid UTF-8"))
                else:
                    listing.files.append((path, st))
    return listing


def _subdirs(folder: Path) -> list[str]:
    try:
        with os.scandir(folder) as scan:
            entries = list(scan)
    except OSError as error:
        raise UnreadableFolder(f"cannot read folder {folder}: {_os_reason(error)}.") from None
    return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


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

    per_split: dict[str, dict[str, ImageListing]] = {}
    for split, base in layout:
        per_split[split] = {c: list_images(base / c) for c in _subdirs(base)}
    class_names = sorted({c for classes in per_split.values() for c in classes})
    if not class_names:
        raise UsageError(f"{root} has no class folders; expected DATA/CLASS/*.jpg.")
    for classes in per_split.values():
        for listing in classes.values():
            if listing.folders:
                folder, reason = listing.folders[0]
                raise UnreadableFolder(f"cannot read folder {printable(folder)}: {reason}.")
    for split, classes in per_split.items():
        for name, listing in classes.items():
            if not listing.files:
                where = name if split == UNSPLIT else f"{split}/{name}"
                raise UsageError(f"class folder {root / where} holds no images.")

    def relative(path: Path) -> str:
        return printable(path.relative_to(root).as_posix())

    def shortened(path: Path) -> str:
        text = relative(path)
        return text if len(text) <= 160 else f"{text[:100]}...{text[-50:]}"

    files, skipped = [], []
    for split in sorted(per_split, key=SPLIT_ORDER.__getitem__):
        for label, name in enumerate(class_names):
            listing = per_split[split].get(name, ImageListing())
            for path, st in sorted(listing.files, key=lambda f: relative(f[0])):
                files.append(ImageFile(relative(path), label, split, st.st_size, st.st_mtime_ns))
            skipped.extend((shortened(path), reason) for path, reason in listing.skipped)
    return ImageFolder(root, tuple(class_names), tuple(files), skipped=tuple(skipped))


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


def load_image(path: str | os.PathLike, draft: int | None = None) -> Image.Image:
    """Decode an image file as RGB with its EXIF orientation applied; raise BadImage if it can't.

    With `draft`, a JPEG whose shorter side is at least twice `draft` is decoded at a reduced
    size (libjpeg's DCT scaling by 1/2, 1/4 or 1/8, PIL's `Image.draft`) whose sides both stay
    at least `draft` pixels; other images decode at full size."""
    from featx.data.sources.location import Location

    try:
        if isinstance(path, Location):  # a row of tar shards, a table of image bytes, a URL
            path = path.open()
        elif not os.path.exists(path):
            raise BadImage("missing file")
        elif os.path.getsize(path) == 0:
            raise BadImage("empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data": decoded anyway
            with Image.open(path) as image:
                if draft and image.format == "JPEG" and min(image.size) >= 2 * draft:
                    # on the stored (unrotated) pixels; the request is square, so the EXIF
                    # rotation below cannot make a side fall short of `draft`. The mode is kept:
                    # only the scale changes, not the colour conversion.
                    image.draft(image.mode, (draft, draft))
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
