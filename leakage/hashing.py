"""Fingerprints of one picture: exact digests (bytes, decoded pixels) and a 64-bit DCT
perceptual hash (pHash), with a few crops of it so that a slightly cropped copy still lands
near one of them."""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image
from scipy import fft

HASH_BITS = 64
THUMB_SIDE = 32        # the pHash's DCT runs on a 32x32 grey thumbnail...
LOW_FREQUENCIES = 8    # ...and keeps its 8x8 lowest frequencies: 64 bits
# Crops hashed besides the whole picture (on the eval side only): (share of each side kept,
# where the crop sits on x and y, 0 left/top .. 1 right/bottom). A copy cropped by up to ~10%
# keeps most of its content in place relative to one of these.
CROPS = tuple((scale, ax, ay) for scale in (0.95, 0.9)
              for ax, ay in ((0.5, 0.5), (0, 0), (1, 0), (0, 1), (1, 1)))
_BIT_WEIGHTS = (np.uint64(1) << np.arange(HASH_BITS, dtype=np.uint64))


def bytes_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pixel_digest(rgb: Image.Image) -> str:
    """The decoded picture's digest: the same pixels in another container (a re-saved PNG, a
    PNG turned into lossless WebP) give the same digest."""
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    h.update(rgb.convert("RGB").tobytes())
    return h.hexdigest()


def grey_thumbnails(rgb: Image.Image, boxes: list[tuple[int, int, int, int] | None]) -> np.ndarray:
    """len(boxes) x THUMB_SIDE² uint8 luma of the picture's boxes (None: all of it), area-averaged."""
    grey = rgb.convert("L")
    return np.stack([np.asarray(grey.resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX, box=box))
                     for box in boxes])


def phash(thumb: np.ndarray) -> np.uint64:
    """64-bit pHash: the signs of the 8x8 lowest DCT frequencies against their median."""
    low = fft.dctn(thumb.astype(np.float32), norm="ortho")[:LOW_FREQUENCIES, :LOW_FREQUENCIES].ravel()
    return np.bitwise_or.reduce(_BIT_WEIGHTS[low > np.median(low)], initial=np.uint64(0))


def crop_boxes(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """The CROPS as pixel boxes of a width x height picture."""
    boxes = []
    for scale, ax, ay in CROPS:
        w, h = max(1, round(width * scale)), max(1, round(height * scale))
        x, y = round((width - w) * ax), round((height - h) * ay)
        boxes.append((x, y, x + w, y + h))
    return boxes


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two thumbnails: 1 for the same picture up to brightness and contrast."""
    a = a.astype(np.float32).ravel()
    b = b.astype(np.float32).ravel()
    a, b = a - a.mean(), b - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else float(np.array_equal(a, b))
