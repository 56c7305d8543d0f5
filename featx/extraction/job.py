"""One extraction pass once its network is planned: what to compute, how, and where it is
saved; and the loop that runs the network over the work items chunk by chunk."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featx.data.folders import ImageFolder
from featx.data.preprocessing import Preprocessing
from featx.errors import Interrupted
from featx.extraction.partial import ChunkWriter, Partial
from featx.extraction.plan import AugmentedViews, Work
from featx.extraction.settings import ExtractSettings
from featx.store.feature_store import FeatureStore

if TYPE_CHECKING:
    import torch

    from featx.backbones.registry import LoadedBackbone
    from featx.inference.engine import Calibration

__all__ = ["ENGINE_NAME", "Job", "run_network"]

ENGINE_NAME = "<U16"  # the dtype of a chunk's engine names, one per row


@dataclass
class Job:
    """One extraction pass once the network is loaded: what to compute and how to save it."""

    store: Path
    existing: FeatureStore | None
    folder: ImageFolder
    work: Work
    todo: list  # LayerInfo of the layers to compute
    keys: list[str]
    loaded: LoadedBackbone
    preprocessing: Preprocessing
    settings: ExtractSettings
    device: torch.device
    batch_size: int  # the interrupted run's, when resuming
    chunk_items: int
    engine: str  # resolved: a registered engine's name
    engine_key: str  # names the engine's cached conversion
    calibration: Calibration | None = None  # int8's
    partial: Partial | None = None  # STORE.partial/, opened once the run is described
    views: AugmentedViews | None = None  # the augmented views' transform
    augment_meta: dict | None = None  # what the store records of them
    batch_note: str = ""  # why this batch size, said unless a resumed run keeps its own
    engine_text: str = ""  # what ran, as the engine describes itself
    engine_quality: dict[str, float] | None = None  # int8's cosine to fp32 (Engine.quality)
    engine_choice: str = ""  # how `auto` chose the engine

    def calibration_record(self) -> dict[str, Any]:
        """What the store records of int8's calibration (empty for other precisions)."""
        c = self.calibration
        if c is None:
            return {}
        return {
            "images": c.n_images,
            "seed": c.seed,
            "identity": c.identity,
            "engine_key": self.engine_key,  # predict runs this cached quantized model
            **(self.engine_quality or {}),
        }

    def new_chunk(self) -> list[np.ndarray]:
        """Empty arrays for one chunk of every layer computed, and after them the name of the
        engine that computed each row (saved with the chunk, read by `engine_rows`)."""
        from featx.backbones.layers import pooled_shape

        shapes = [pooled_shape(i.shape, self.settings.pool) for i in self.todo]
        arrays = [np.empty((self.chunk_items, *shape), self.settings.dtype) for shape in shapes]
        return [*arrays, np.empty(self.chunk_items, ENGINE_NAME)]

    def engine_rows(self, chunk: dict[str, np.ndarray]) -> np.ndarray | None:
        """The engine of each row of a saved chunk (`Partial.load`); None for a chunk saved by
        a version of featx that did not record it."""
        return chunk.get(f"layer{len(self.todo)}")


def run_network(job: Job, start: int, why: str, log) -> None:
    """Compute the chunks from work item `start` on, saving each as it completes."""
    import torch
    from tqdm import tqdm

    from featx.backbones.layers import prepare_tap
    from featx.inference.images import Batches, image_loader
    from featx.inference.network import start_engine

    modules = [i.module for i in job.todo]
    settings, size, n_items = job.settings, job.preprocessing.input_size, len(job.work.items)
    tap = prepare_tap(job.loaded.model, modules, settings.pool, job.device, size)
    threads = torch.get_num_threads()  # auto may run torch on fewer: restored at the end
    loader = image_loader(
        job.work.images(job.folder, job.preprocessing, job.views),
        Batches(start, n_items, job.batch_size, job.chunk_items),
        settings.workers,
        pin_memory=job.device.type == "cuda",
    )
    batches, engine = start_engine(
        loader, tap, job.engine, why, precision=settings.precision, device=job.device,
        example=torch.zeros(job.batch_size, 3, size, size), key=job.engine_key,
        calibration=job.calibration, log=log,
    )  # fmt: skip
    job.engine_quality = engine.quality
    writer = ChunkWriter(job.partial)
    writer.start()
    arrays, filled, index, bad = job.new_chunk(), 0, [], []
    chunk, done = start // job.chunk_items, start
    bar = tqdm(
        total=n_items, initial=start, unit="img", disable=settings.quiet, smoothing=0.1,
        desc="extract", file=sys.stderr,
    )  # fmt: skip
    try:
        with torch.inference_mode():
            for batch_index, batch, batch_bad in batches:
                bad.extend(batch_bad)
                if batch is not None:
                    outputs = engine(batch)
                    for array, info in zip(arrays[:-1], job.todo, strict=True):
                        array[filled : filled + len(batch)] = outputs[info.module].float().cpu()
                    arrays[-1][filled : filled + len(batch)] = engine.name
                    filled += len(batch)
                    index.extend(batch_index)
                done += len(batch_index) + len(batch_bad)
                bar.update(len(batch_index) + len(batch_bad))
                if done % job.chunk_items == 0 or done == n_items:
                    layers = [array[:filled] for array in arrays]
                    writer.put(chunk, np.array(index, dtype=np.int64), bad, layers)
                    arrays, filled, index, bad = job.new_chunk(), 0, [], []
                    chunk += 1
    except KeyboardInterrupt:
        torch.set_num_threads(threads)
        bar.close()
        with contextlib.suppress(BaseException):
            writer.finish()
        raise Interrupted(
            f"interrupted after {job.partial.done() * job.chunk_items} of {n_items} "
            "images were saved; run the same command again to resume."
        ) from None
    torch.set_num_threads(threads)
    bar.close()
    writer.finish()
    job.engine_text, job.engine_choice = engine.describe(), engine.choice
