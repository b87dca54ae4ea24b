"""`augment` as a pipeline Stage: decode -> DiffusionFlavour in size buckets -> encode members."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ddaug.pipeline import SampleFailure
from ddaug.pipeline.images import read_image
from ddaug.pipeline.passthrough import TextOnlyCounter, text_only_units
from ddaug.pipeline.timing import StageTimes
from ddaug.shards.codec import FORMAT_EXT, encode_image
from ddaug.shards.schema import build_sample, count_image_tags, encode_sample_json, image_member_names
from ddaug.sources import SourceItem

from .recipe import DiffusionFlavour, sample_seed


@dataclass
class ImageUnit:
    pixels: np.ndarray          # padded to its canvas (DiffusionFlavour.pad_image)
    size: tuple[int, int]       # the image's own H, W
    seed: int
    source: dict[str, Any]


def check_conversation(item: SourceItem) -> None:
    tags = count_image_tags(item.messages)
    if item.messages and tags != len(item.images):
        raise SampleFailure("read", f"conversation has {tags} <image> tags for {len(item.images)} images")


class AugmentStage:
    command = "augment"

    def __init__(self, flavour: DiffusionFlavour, *, image_format: str = "png", quality: int = 95,
                 max_side: int | None = None, max_pixels: int | None = None,
                 tags: dict[str, Any] | None = None):
        self.flavour = flavour
        self.image_format = image_format
        self.quality = quality
        self.max_side = max_side
        self.max_pixels = max_pixels
        self.tags = tags or {}
        self.provenance = flavour.provenance()
        self.times = StageTimes()  # the job adds its parts; the flavour adds the GPU's
        flavour.times = self.times
        self.counts: Counter = Counter()
        self.text_only = TextOnlyCounter(self.counts)

    def load(self, item: SourceItem) -> list[ImageUnit]:
        if not item.images:
            return text_only_units(item)
        check_conversation(item)
        units = []
        for i in range(len(item.images)):
            loaded = read_image(item, i, self.max_side, self.max_pixels)
            pixels = np.asarray(loaded.image, dtype=np.uint8)
            # Padded here, in the loader threads, so any sizes that pad alike can share a batch.
            units.append(ImageUnit(self.flavour.pad_image(pixels), pixels.shape[:2],
                                   sample_seed(self.flavour.settings.seed, item.key, i), loaded.source))
        return units

    @property
    def batch_size(self) -> int | None:
        return self.flavour.batch_size

    @property
    def device(self):
        """Where the model runs (the job samples the GPU's utilization there)."""
        return self.flavour.device

    def bucket(self, unit: ImageUnit):
        return unit.pixels.shape[:2]

    def batch_limit(self, bucket) -> int | None:
        return self.flavour.batch_for(bucket)

    def launch_share(self, units: list[ImageUnit]) -> float:
        """The share of the device memory budget this batch's launch holds (pipeline/job.py).
        A compiled VAE's takes all of it, so its launches take turns: torch.compile's Dynamo is
        not thread-safe (pytorch/pytorch#118260; a compile in one thread fails a call in another)."""
        if self.flavour.compiled:
            return 1.0
        return self.flavour.memory_share(len(units), units[0].pixels.shape[:2])

    def prepare(self, units: list[ImageUnit]):
        return self.flavour.stage([u.pixels for u in units], [u.seed for u in units], [u.size for u in units])

    def run(self, units: list[ImageUnit], prepared=None) -> list[Any]:
        return self.launch(units, prepared)()

    def launch(self, units: list[ImageUnit], prepared=None) -> Callable[[], list[Any]]:
        finish = self.flavour.launch_staged(prepared or self.prepare(units))

        def results() -> list[Any]:
            return [(out, u) if out is not None else
                    SampleFailure("augment", "non-finite model output (NaN/inf); not written")
                    for out, u in zip(finish(), units)]
        results.ready = finish.ready
        return results

    def build(self, item: SourceItem, results: list[Any]) -> dict[str, bytes]:
        tags = {"domain": "general", "task": "conversation" if item.messages else "image", "stage": None}
        tags.update({k: v for k, v in item.tags.items() if k in ("domain", "task", "stage")})
        tags.update({k: v for k, v in self.tags.items() if v is not None})
        if not results:
            return self.text_only.members(item, tags, "augment", {"run_seed": self.flavour.settings.seed})
        ext = FORMAT_EXT[self.image_format]
        names = image_member_names(item.key, [ext] * len(results))
        files = {}
        for name, (pixels, _) in zip(names, results):
            files[name[len(item.key) + 1:]] = encode_image(pixels, self.image_format, self.quality)
        block = dict(self.provenance)
        block["canvases"] = [list(u.pixels.shape[:2]) for _, u in results]  # H, W each image was computed at
        if self.flavour.settings.mode == "img2img" or self.flavour.settings.latent == "sample":
            block["seeds"] = [u.seed for _, u in results]
        block["run_seed"] = self.flavour.settings.seed
        sample = build_sample(item.key, messages=item.messages, image_names=names,
                              source={"uri": item.uri, "images": [u.source for _, u in results]},
                              tags=tags, block_name="augment", block=block, extra=item.extra)
        files["json"] = encode_sample_json(sample)
        return files
