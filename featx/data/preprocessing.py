"""How an RGB image becomes a network's input tensor: decoding policy, resize, crop and
normalisation, recorded with every store and model file."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from featx.errors import UsageError, first_line

if TYPE_CHECKING:  # torch and PIL load only when an image is preprocessed
    import torch
    from PIL import Image

__all__ = ["DECODE_POLICIES", "DRAFT_FACTOR", "IMAGENET_MEAN", "IMAGENET_STD", "Preprocessing"]

# Reduced-size decoding keeps a JPEG at least this many times the resize target a side: at 2x
# EfficientNet-Lite0's features keep cosine >= 0.999 to full decoding (see the performance page
# of the documentation, "Decoding").
DRAFT_FACTOR = 2
DECODE_POLICIES = ("full", "reduced")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB image becomes the network's input tensor.

    `resize` is the shorter side (aspect kept) when `square` is false, else the exact square
    side (aspect not kept, as Keras' `target_size`); `crop` is a centre crop, 0 for none.
    """

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    square: bool = False
    # "full", or "reduced": JPEGs at least twice DRAFT_FACTOR x `resize` on their shorter side
    # are decoded at a reduced size (libjpeg DCT scaling) still DRAFT_FACTOR x `resize` or more
    # on each side. A record without the field (made before it existed) reads as "full".
    decode: str = "full"

    def __post_init__(self) -> None:
        if self.decode not in DECODE_POLICIES:
            raise UsageError(f"decode must be {' or '.join(DECODE_POLICIES)}, not {self.decode!r}.")

    @property
    def input_size(self) -> int:
        return self.crop or self.resize

    @property
    def draft_size(self) -> int | None:
        """The smallest side a JPEG may be decoded to (None: full-size decoding)."""
        return DRAFT_FACTOR * self.resize if self.decode == "reduced" else None

    def load(self, path: str | os.PathLike) -> Image.Image:
        """Decode the image file at `path` as this preprocessing's decode policy says (BadImage
        if it cannot be decoded); every path from an image file to `__call__` goes through here."""
        from featx.data.folders import load_image

        return load_image(path, draft=self.draft_size)

    def with_decode(self, decode: str) -> Preprocessing:
        """The same preprocessing with the decode policy `decode` ("full" or "reduced")."""
        return replace(self, decode=decode)

    def __call__(
        self, image: Image.Image, augment: Callable[[Image.Image], Image.Image] | None = None
    ) -> torch.Tensor:
        """The network input for a decoded RGB image: resize and crop to the input size, then
        `augment` (at the input size, as Keras augments at `target_size`), then normalise.
        Extraction, prediction, test-time augmentation and fine-tuning all go through here."""
        image = self.fit(image)
        if augment is not None:
            image = augment(image)
        return self.to_tensor(image)

    def fit(self, image: Image.Image) -> Image.Image:
        """Resize (and centre-crop) to the network's input size."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        size = [self.resize, self.resize] if self.square else [self.resize]
        image = TF.resize(image, size, interpolation=InterpolationMode(self.interpolation))
        return TF.center_crop(image, [self.crop]) if self.crop else image

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """A network-sized image as a normalised float tensor."""
        import torch
        from torchvision.transforms import functional as TF

        tensor = TF.convert_image_dtype(TF.pil_to_tensor(image), torch.float)
        return TF.normalize(tensor, list(self.mean), list(self.std))

    def with_image_size(self, size: int) -> Preprocessing:
        """The same normalisation and decoding, with a direct resize to size x size and no
        crop."""
        return replace(self, resize=size, crop=0, square=True)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(
        cls, values: Mapping[str, Any], source: str = "a preprocessing record"
    ) -> Preprocessing:
        """The preprocessing `to_dict` recorded; UsageError naming `source` and the problem
        when `values` is not such a record (a file featx did not write as it is)."""
        try:
            values = dict(values)
            values["mean"], values["std"] = tuple(values["mean"]), tuple(values["std"])
            values.setdefault("decode", "full")  # recorded before reduced decoding existed
            return cls(**values)
        except KeyError as missing:
            problem = f"it has no field {missing}"
        except (TypeError, ValueError, UsageError) as error:
            problem = first_line(error).rstrip(".")
        raise UsageError(f"{source} is not one featx writes ({problem}).")

    def describe(self) -> str:
        resize = (
            f"resize to {self.resize}x{self.resize}"
            if self.square
            else (f"resize shorter side to {self.resize}")
        )
        crop = f", centre crop {self.crop}" if self.crop else ""
        decode = (
            f", JPEGs decoded at reduced size (at least {self.draft_size} px a side)"
            if self.decode == "reduced"
            else ""
        )
        return (
            f"{resize} ({self.interpolation}){crop}, normalise mean={self.mean} std={self.std}"
            f"{decode}"
        )
