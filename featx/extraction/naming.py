"""Where a store goes when none is named: one file per dataset and preprocessing."""

from __future__ import annotations

import os
import re
from pathlib import Path

from featx.data.manifest import is_manifest
from featx.data.sources import SOURCE_SUFFIXES

__all__ = ["default_store_path"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "data"


def default_store_path(
    data_dir: str | os.PathLike,
    backbone: str,
    weights: str = "default",
    image_size: int | None = None,
) -> Path:
    """stores/<dataset>-<backbone>-<weights>-<input size>.h5, one per preprocessing; the
    dataset is the folder's name, or for a manifest the name of the folder it is in (every
    project's `labels.csv` would otherwise get the same store), and for tar shards (a glob or
    brace notation) the name of their folder."""
    weights_tag = weights if weights in ("default", "none") else _slug(Path(weights).stem)
    size = f"s{image_size}" if image_size else "std"
    data = Path(data_dir).resolve()
    packed = is_manifest(data) or data.suffix.lower() in SOURCE_SUFFIXES  # also tar shards
    dataset = _slug(data.parent.name if packed else data.name)
    name = f"{dataset}-{_slug(backbone)}-{weights_tag}-{size}.h5"
    return Path("stores") / name
