"""File facts a classifier can learn without looking at any trace: format, JPEG quality, size,
aspect. When business and another set differ in them, any measured gap (and the VLM's own
shortcut) may be that alone, so they are described per set and differences are warned about."""

from __future__ import annotations

import collections
import functools
import io
import statistics
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from .sets import ImageSet

FORMAT_SHARE_GAP = 0.3      # total-variation distance between format mixes that is worth a warning
QUALITY_GAP = 10            # JPEG quality steps
SIZE_RATIO = 1.25           # median longer sides this far apart
SQUARE_SHARE_GAP = 0.3
ASPECT_RATIO_GAP = 1.15


@functools.lru_cache(maxsize=1)
def _libjpeg_luma_tables() -> np.ndarray:
    """The luminance table libjpeg writes at each quality 1..100, taken from Pillow's own encoder
    (so the estimate matches what Pillow, and most software built on libjpeg, writes)."""
    tables = []
    for quality in range(1, 101):
        buffer = io.BytesIO()
        Image.new("L", (8, 8)).save(buffer, format="JPEG", quality=quality)
        with Image.open(buffer) as img:
            tables.append(img.quantization[0])
    return np.array(tables, dtype=np.int64)


def jpeg_quality(quantization: dict[int, Any] | None) -> int | None:
    """The libjpeg quality whose luminance table is nearest to this file's; None without tables."""
    if not quantization or 0 not in quantization or len(quantization[0]) != 64:
        return None
    table = np.asarray(quantization[0], dtype=np.int64)
    return int(np.abs(_libjpeg_luma_tables() - table).sum(axis=1).argmin()) + 1


def _share(counter: collections.Counter, total: int) -> dict[str, float]:
    return {k: round(v / total, 3) for k, v in counter.most_common()}


def describe(image_set: "ImageSet") -> dict[str, Any]:
    images = image_set.images
    n = len(images)
    longer = [max(im.width, im.height) for im in images]
    aspects = [im.width / im.height for im in images]
    qualities = [im.jpeg_quality for im in images if im.jpeg_quality is not None]
    sizes = collections.Counter(f"{im.width}x{im.height}" for im in images)
    return {
        "formats": _share(collections.Counter(im.format for im in images), n),
        "jpeg_quality": ({"median": statistics.median(qualities), "min": min(qualities), "max": max(qualities)}
                         if qualities else None),
        "longer_side": {"median": statistics.median(longer), "min": min(longer), "max": max(longer)},
        "top_sizes": _share(sizes, n) if len(sizes) <= 3 else dict(list(_share(sizes, n).items())[:3]),
        "aspect": {"median": round(statistics.median(aspects), 3),
                   "square": round(sum(abs(a - 1) < 0.02 for a in aspects) / n, 3)},
    }


def _formats_text(d: dict[str, Any]) -> str:
    formats = d["formats"]
    parts = [f"all {k}" if v == 1 else f"{k} {v:.0%}" for k, v in formats.items()]
    text = ", ".join(parts)
    if d["jpeg_quality"]:
        text += f" (JPEG q~{d['jpeg_quality']['median']:g})"
    return text


def summary_line(d: dict[str, Any]) -> str:
    """'all PNG, 1024x1024 100%, longer side ~1024, 100% square' style."""
    sizes = ", ".join(f"{k} {v:.0%}" for k, v in list(d["top_sizes"].items())[:2])
    return (f"{_formats_text(d)}; {sizes}; longer side ~{d['longer_side']['median']:g} px; "
            f"{d['aspect']['square']:.0%} square (median aspect {d['aspect']['median']:g})")


def compare(base_name: str, base: dict[str, Any], other_name: str, other: dict[str, Any]) -> list[str]:
    """Plain warnings for differences a classifier (or the VLM) can learn on their own."""
    warnings = []
    fa, fb = base["formats"], other["formats"]
    distance = 0.5 * sum(abs(fa.get(k, 0) - fb.get(k, 0)) for k in set(fa) | set(fb))
    if distance >= FORMAT_SHARE_GAP:
        warnings.append(f"format: {base_name} is {_formats_text(base)}, {other_name} is {_formats_text(other)}: "
                        f"compression alone tells them apart. Match them: augment with --image-format "
                        f"(png/webp keep the traits), or store both sets the same way")
    elif base["jpeg_quality"] and other["jpeg_quality"] and \
            abs(base["jpeg_quality"]["median"] - other["jpeg_quality"]["median"]) >= QUALITY_GAP:
        warnings.append(f"JPEG quality: {base_name} q~{base['jpeg_quality']['median']:g}, {other_name} "
                        f"q~{other['jpeg_quality']['median']:g}: match them with augment --image-format jpeg "
                        f"--quality")
    la, lb = base["longer_side"]["median"], other["longer_side"]["median"]
    if max(la, lb) / max(1, min(la, lb)) >= SIZE_RATIO:
        warnings.append(f"size: {base_name} longer side ~{la:g} px, {other_name} ~{lb:g} px: resolution alone "
                        f"tells them apart. Match them (augment --max-side downsizes the larger set)")
    aa, ab = base["aspect"], other["aspect"]
    if abs(aa["square"] - ab["square"]) >= SQUARE_SHARE_GAP or \
            max(aa["median"], ab["median"]) / min(aa["median"], ab["median"]) >= ASPECT_RATIO_GAP:
        warnings.append(f"aspect: {base_name} {aa['square']:.0%} square (median {aa['median']:g}), {other_name} "
                        f"{ab['square']:.0%} square (median {ab['median']:g}): crop or pick images to match "
                        f"if the model sees whole images")
    return warnings
