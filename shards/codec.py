"""Image encoding for output members."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

FORMAT_EXT = {"png": "png", "webp": "webp", "jpeg": "jpg"}
# PNG level 1 is ~2.5x faster than Pillow's default 6 for ~10% more bytes (shared/NOTES.md); the
# pixels are identical, and speed matters on the GPU-bound path.
PNG_COMPRESS_LEVEL = 1


def encode_image(pixels: np.ndarray, image_format: str, quality: int = 95) -> bytes:
    """HxWx3 uint8 -> bytes. png and webp are lossless so the diffusion traits survive."""
    img = Image.fromarray(pixels, mode="RGB")
    buf = io.BytesIO()
    if image_format == "png":
        img.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    elif image_format == "webp":
        img.save(buf, format="WEBP", lossless=True, method=0, quality=100)
    elif image_format == "jpeg":
        img.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    else:
        raise ValueError(f"unknown image format {image_format!r}")
    return buf.getvalue()
