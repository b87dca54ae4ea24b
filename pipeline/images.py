"""Reading one image of a SourceItem for a stage: bytes, decoded picture, and its source record."""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ddaug.sources import ImageDecodeError, ImageRef, SourceItem, decode_image

from .job import SampleFailure

# Pillow format name -> the member extension that keeps the original bytes readable.
FORMAT_MEMBER_EXT = {"PNG": "png", "JPEG": "jpg", "MPO": "jpg", "WEBP": "webp", "GIF": "gif",
                     "BMP": "bmp", "TIFF": "tif"}
ORIENTATION_TAG = 0x0112


def fail_decode(exc: Exception, uri: str) -> SampleFailure:
    return SampleFailure("decode", f"{exc}: {uri}")


def probe_image(data: bytes, uri: str) -> tuple[str, tuple[int, int], int, bool]:
    """Format, size, EXIF orientation and whether it is animated, from the header only."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                orientation = img.getexif().get(ORIENTATION_TAG, 1) if img.format in ("JPEG", "MPO", "PNG", "WEBP",
                                                                                      "TIFF") else 1
                return (img.format or "unknown", img.size, orientation if orientation in range(1, 9) else 1,
                        getattr(img, "n_frames", 1) > 1)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise fail_decode(ImageDecodeError(f"decompression bomb refused: {exc}"), uri) from None
    except Image.UnidentifiedImageError:
        raise fail_decode(ImageDecodeError("not an image (unrecognised format)"), uri) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise fail_decode(ImageDecodeError(f"broken image: {exc}"), uri) from None


def check_decodes(data: bytes, fmt: str, uri: str) -> None:
    """Decode and drop, so a broken file goes to the ledger before a request is spent on it.
    A JPEG is decoded at 1/8 scale: its whole entropy-coded stream is still read and checked,
    at a fraction of the cost."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if fmt in ("JPEG", "MPO"):
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise fail_decode(ImageDecodeError(f"broken image: {exc}"), uri) from None


@dataclass
class LoadedImage:
    data: bytes              # the file's bytes, untouched
    image: Image.Image       # RGB, EXIF orientation applied, possibly downsized
    source: dict[str, Any]   # uri, sha256, width, height, format (+ resized_to)


def check_decodable_size(data: bytes, uri: str) -> None:
    """Refuse, from the header alone, an image larger than Pillow's decompression-bomb limit
    (Image.MAX_IMAGE_PIXELS, about 89 MP), with a reason that says so: decoding it would cost
    its full size in memory before any cap could downsize it."""
    limit = Image.MAX_IMAGE_PIXELS
    if not limit:
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
        pixels = width * height
    except Image.DecompressionBombError as exc:  # over twice the limit: Pillow refuses to open it
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = int(found.group(1)) if found else 2 * limit + 1
    except Exception:  # not readable as an image: decode_image gives the reason
        return
    if pixels > limit:
        raise SampleFailure("decode", f"image too large: {pixels / 1e6:.0f} MP is over the {limit / 1e6:.0f} MP "
                                      f"that ddaug decodes (Pillow's decompression bomb limit); downsize it "
                                      f"first: {uri}")


def read_image(item: SourceItem, index: int, max_side: int | None = None,
               max_pixels: int | None = None) -> LoadedImage:
    """Read and decode image `index` of an item; raises SampleFailure("read"/"decode").

    max_side / max_pixels downsize (LANCZOS, aspect kept) and record it in the source record.
    """
    ref = item.images[index]
    try:
        data = ref.read()
    except OSError as exc:
        raise SampleFailure("read", f"{exc.strerror or exc}: {ref.uri}") from None
    check_decodable_size(data, ref.uri)
    try:
        img, fmt = decode_image(data)
    except ImageDecodeError as exc:
        raise SampleFailure("decode", f"{exc}: {ref.uri}") from None
    source = {"uri": ref.uri, "sha256": hashlib.sha256(data).hexdigest(), "width": img.width,
              "height": img.height, "format": fmt}
    scale = 1.0
    if max_side and max(img.size) > max_side:
        scale = max_side / max(img.size)
    if max_pixels and img.width * img.height * scale * scale > max_pixels:
        scale = (max_pixels / (img.width * img.height)) ** 0.5
    if scale < 1.0:
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        if max_pixels and size[0] * size[1] > max_pixels:  # rounding up must not break the cap
            size = (max(1, int(img.width * scale)), max(1, int(img.height * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS)
        source["resized_to"] = [img.width, img.height]
    return LoadedImage(data, img, source)


@dataclass
class OriginalImage:
    data: bytes              # the file's bytes, untouched: what the shard stores
    ext: str                 # the member extension of its real format
    source: dict[str, Any]   # uri, sha256, width, height, format


def read_storable(ref: ImageRef) -> tuple[bytes, str, tuple[int, int], int]:
    """An image's bytes, format, size and EXIF orientation (from its header), for a stage that
    stores the bytes unchanged; SampleFailure("read"/"decode") if it cannot be read or its
    format cannot be stored as it is."""
    try:
        data = ref.read()
    except OSError as exc:
        raise SampleFailure("read", f"{exc.strerror or exc}: {ref.uri}") from None
    if not data:
        raise fail_decode(ImageDecodeError("empty file (0 bytes)"), ref.uri)
    fmt, size, orientation, _animated = probe_image(data, ref.uri)
    if fmt not in FORMAT_MEMBER_EXT:
        raise SampleFailure("decode", f"{fmt} images cannot be stored unchanged in a shard: {ref.uri}")
    return data, fmt, size, orientation


def read_original(item: SourceItem, index: int) -> OriginalImage:
    """Image `index` of an item as it is, for a stage that changes only the text: checked to
    decode (a broken file goes to the ledger, not into training data), never re-encoded, so
    the traits its pixels carry stay bit for bit. Raises SampleFailure("read"/"decode")."""
    ref = item.images[index]
    data, fmt, (width, height), _ = read_storable(ref)
    check_decodes(data, fmt, ref.uri)
    return OriginalImage(data, FORMAT_MEMBER_EXT[fmt], {"uri": ref.uri, "sha256": hashlib.sha256(data).hexdigest(),
                                                        "width": width, "height": height, "format": fmt})
