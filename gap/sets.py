"""A seeded sample of one image set (business, general, an augmented output), read through the
ordinary ddaug sources, with each image's features and file facts."""

from __future__ import annotations

import collections
import hashlib
import io
import logging
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ddaug.pipeline.command import UserError
from ddaug.sources import ImageDecodeError, ImageRef, decode_image, read_sources

from .features import FeatureExtractor, ImageFeatures
from .shortcuts import jpeg_quality

log = logging.getLogger(__name__)


@dataclass
class SampledImage:
    ref: ImageRef
    format: str
    width: int
    height: int
    jpeg_quality: int | None
    features: ImageFeatures


@dataclass
class ImageSet:
    name: str
    role: str                    # business | general | augmented
    inputs: list[str]
    images: list[SampledImage]
    available: int               # images the inputs name
    skipped: collections.Counter = field(default_factory=collections.Counter)  # reason -> count

    def matrix(self) -> np.ndarray:
        return np.stack([im.features.vector for im in self.images])

    def mean_spectrum(self) -> np.ndarray:
        return np.mean([im.features.spectrum for im in self.images], axis=0)


class _Skip(Exception):
    pass


def _image_seed(seed: int, uri: str) -> int:
    """Where the crops of one image lie: a pure function of the run seed and the image."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{uri}".encode("utf-8", "surrogateescape")).digest()[:8], "big")


def _measure(ref: ImageRef, extractor: FeatureExtractor, seed: int) -> SampledImage:
    try:
        data = ref.read()
    except OSError as exc:
        raise _Skip(f"unreadable: {exc.strerror or exc}") from None
    try:
        rgb, fmt = decode_image(data)
    except ImageDecodeError as exc:
        raise _Skip(str(exc)) from None
    if min(rgb.size) < extractor.crop:
        raise _Skip(f"smaller than the {extractor.crop}-pixel crop")
    quality = None
    if fmt in ("JPEG", "MPO"):
        with Image.open(io.BytesIO(data)) as header:
            quality = jpeg_quality(getattr(header, "quantization", None))
    features = extractor(np.asarray(rgb), np.random.default_rng(_image_seed(seed, ref.uri)))
    return SampledImage(ref, fmt, rgb.width, rgb.height, quality, features)


def load_set(name: str, role: str, inputs: list[str], *, samples: int, seed: int, extractor: FeatureExtractor,
             media_dir: str | None = None, workers: int = 4) -> ImageSet:
    """Draw `samples` usable images from the inputs, in an order seeded by (seed, name); an image
    that cannot be used is skipped, counted by reason, and replaced by the next one drawn."""
    items = read_sources(inputs, media_dir)
    skipped: collections.Counter = collections.Counter()
    refs = []
    for item in items:
        if item.error:
            skipped[item.error] += 1
        else:
            refs.extend(item.images)
    order = list(range(len(refs)))
    random.Random(f"{seed}:{name}").shuffle(order)
    chosen: list[SampledImage] = []
    position = 0
    with ThreadPoolExecutor(max(1, workers)) as pool:
        while len(chosen) < samples and position < len(order):
            batch = [refs[i] for i in order[position: position + samples - len(chosen)]]
            position += len(batch)
            futures = [pool.submit(_measure, ref, extractor, seed) for ref in batch]
            for ref, future in zip(batch, futures):
                try:
                    chosen.append(future.result())
                except _Skip as exc:
                    log.info("%s: skipping %s: %s", name, ref.uri, exc)
                    skipped[str(exc)] += 1
    if len(chosen) < 2:
        reasons = "; ".join(f"{reason} ({n})" for reason, n in skipped.most_common(3)) or "no images"
        raise UserError(f"--{role} {' '.join(inputs)}: {len(chosen)} usable image(s) of {len(refs)} ({reasons})")
    if skipped:
        log.warning("%s: skipped %d input(s): %s", name, sum(skipped.values()),
                    "; ".join(f"{reason} ({n})" for reason, n in skipped.most_common(3)))
    return ImageSet(name, role, list(inputs), chosen, len(refs), skipped)
