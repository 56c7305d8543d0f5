"""Reduced-size JPEG decoding: let libjpeg scale by 1/2, 1/4 or 1/8 in the DCT while decoding,
when the image will be resized far below its size anyway.

Kept apart (PIL only) so it can move into featx's data module.
"""

from __future__ import annotations

import os

from PIL import Image, ImageOps


def decode_reduced(path: str | os.PathLike, target_size: int) -> Image.Image:
    """Decode `path` as RGB with EXIF orientation applied, at the smallest JPEG scale whose
    sides are both still at least `target_size` (the later resize's shorter side, or square
    side). Non-JPEGs, and JPEGs smaller than twice `target_size` on their shorter side, decode
    at full size."""
    with Image.open(path) as image:
        if image.format == "JPEG" and 2 * target_size <= min(image.size):
            # draft keeps both sides >= the requested size, so no detail the resize would keep
            # is lost; it works on the still-undecoded file only.
            image.draft("RGB", (target_size, target_size))
        image.load()
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")
