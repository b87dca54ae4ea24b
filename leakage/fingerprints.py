"""The eval side, fingerprinted once and indexed; a training image is then matched against it,
cheapest stage first: the same bytes, the same decoded pixels, a perceptual hash near one of
the eval hashes (confirmed by the thumbnails' correlation), and (with a model) the embedding."""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ddaug.sources import ImageRef, decode_image

from .hashing import bytes_digest, correlation, crop_boxes, grey_thumbnails, phash, pixel_digest
from .index import HashIndex

EXACT_BYTES, EXACT_PIXELS, PHASH, EMBEDDING = "exact-bytes", "exact-pixels", "phash", "embedding"
STAGES = (EXACT_BYTES, EXACT_PIXELS, PHASH, EMBEDDING)
PREVIEW_SIDE = 192     # contact-sheet thumbnails of the training images that match
EMBED_SIDE = 448       # the largest side kept for the embedding model (its processor resizes further)


@dataclass
class Fingerprint:
    bytes_digest: str
    pixel_digest: str
    hashes: np.ndarray      # uint64: the whole picture first, then its crops (eval side)
    thumbs: np.ndarray      # the grey thumbnails the hashes came from, uint8


def fingerprint(data: bytes, crops: bool) -> tuple[Fingerprint, Image.Image]:
    """The fingerprint of an image file's bytes and its decoded picture. Raises ImageDecodeError."""
    rgb, _ = decode_image(data)
    thumbs = grey_thumbnails(rgb, [None, *(crop_boxes(rgb.width, rgb.height) if crops else [])])
    hashes = np.array([phash(t) for t in thumbs], dtype=np.uint64)
    return Fingerprint(bytes_digest(data), pixel_digest(rgb), hashes, thumbs), rgb


@dataclass
class EvalImage:
    key: str                # the eval item's key
    ref: ImageRef
    fingerprint: Fingerprint


@dataclass(frozen=True)
class Match:
    eval_position: int
    stage: str
    distance: int | None = None        # pHash bits that differ (of 64)
    correlation: float | None = None   # of the grey thumbnails
    similarity: float | None = None    # cosine of the embeddings


@dataclass(frozen=True)
class LeakageThresholds:
    """When two images count as the same picture (docs/leakage.md explains the defaults)."""

    phash_distance: int = 10         # at most this many of the 64 pHash bits differ
    min_correlation: float = 0.5     # and the grey 32x32 thumbnails correlate at least this much
    embed_similarity: float = 0.95   # --embed-model: cosine similarity of the embeddings


class EvalIndex:
    def __init__(self, images: list[EvalImage], thresholds: LeakageThresholds):
        self.images = images
        self.thresholds = thresholds
        self.by_bytes: dict[str, list[int]] = collections.defaultdict(list)
        self.by_pixels: dict[str, list[int]] = collections.defaultdict(list)
        owners, hashes, thumbs = [], [], []
        for pos, image in enumerate(images):
            fp = image.fingerprint
            self.by_bytes[fp.bytes_digest].append(pos)
            self.by_pixels[fp.pixel_digest].append(pos)
            owners.extend([pos] * len(fp.hashes))
            hashes.append(fp.hashes)
            thumbs.append(fp.thumbs)
        self.owners = np.array(owners, dtype=np.int64)
        self.thumbs = np.concatenate(thumbs) if thumbs else np.zeros((0, 1, 1), dtype=np.uint8)
        self.index = HashIndex(np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.uint64))
        self.embeddings: np.ndarray | None = None   # eval embeddings, set when a model is given

    def match(self, fp: Fingerprint) -> list[Match]:
        """The eval images this training image copies, by the cheapest stage that finds any."""
        if fp.bytes_digest in self.by_bytes:
            return [Match(pos, EXACT_BYTES) for pos in self.by_bytes[fp.bytes_digest]]
        if fp.pixel_digest in self.by_pixels:
            return [Match(pos, EXACT_PIXELS) for pos in self.by_pixels[fp.pixel_digest]]
        _, found, distances = self.index.query(fp.hashes[:1], self.thresholds.phash_distance)
        best: dict[int, Match] = {}
        for entry, distance in zip(found.tolist(), distances.tolist()):  # nearest first
            owner = int(self.owners[entry])
            corr = correlation(self.thumbs[entry], fp.thumbs[0])
            if corr >= self.thresholds.min_correlation and (owner not in best or corr > best[owner].correlation
                                                            and distance <= best[owner].distance):
                best[owner] = Match(owner, PHASH, distance=int(distance), correlation=round(corr, 4))
        return [best[pos] for pos in sorted(best)]

    def match_embeddings(self, embeddings: np.ndarray) -> list[list[Match]]:
        """Per training embedding, the eval images at or above the cosine threshold."""
        similarity = embeddings @ self.embeddings.T
        out = []
        for row in similarity:
            hits = np.nonzero(row >= self.thresholds.embed_similarity)[0]
            out.append([Match(int(pos), EMBEDDING, similarity=round(float(row[pos]), 4)) for pos in hits])
        return out


def preview(rgb: Image.Image, side: int = PREVIEW_SIDE) -> Image.Image:
    small = rgb.copy()
    small.thumbnail((side, side))
    return small
