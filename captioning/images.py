"""One input image for captioning: what the shard stores, what the VLM is shown, and how.

The shard stores the input file's bytes unchanged (recaptioning must not alter the diffusion
traits the data carries), except for an EXIF-rotated input: the model sees it upright, so the
shard stores the upright pixels losslessly as PNG (a trainer that ignores EXIF would otherwise
learn an upright caption for a sideways picture); the source record keeps the original's
format, sha256 and orientation.

The openai backend never holds decoded pixels: an image the server can take as it is goes as
its original bytes (checked to decode, then dropped); one over --max-pixels is downsized
(antialiased bicubic, see downsize_for_request) and sent as JPEG q95 (~8 ms in all for
1456x816 -> 1 MP, against ~60 ms and 5-8x the bytes for PNG), or PNG with lossless=True. The
transformers backend gets the decoded, capped picture (LANCZOS).
"""

from __future__ import annotations

import functools
import hashlib
import io
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ddaug.pipeline.images import FORMAT_MEMBER_EXT, check_decodes, fail_decode, read_storable
from ddaug.sources import ImageDecodeError, SourceItem, decode_image

SEND_AS_IS = {"PNG": "image/png", "JPEG": "image/jpeg", "MPO": "image/jpeg", "WEBP": "image/webp",
              "GIF": "image/gif"}
JPEG_QUALITY = 95

# torch resizes 4-channel uint8 pixels (antialiased) with one single-threaded AVX2 kernel, the
# Pillow-SIMD algorithm: ~1 ms for 1456x816 -> 1 MP where Pillow takes 6 (BOX) to 12 (BICUBIC).
# Without AVX2 torch's generic kernel is slower than Pillow and wakes the OpenMP pool, whose idle
# workers then spin through the rest of each image's work (counted CPU time), so Pillow resizes
# there. Pillow lends its pixel memory through Arrow (11.2+); pyarrow, a dependency already, reads it.
# Asked on the first downsize: a run that sends every image as it is (the default) never loads torch.
@functools.cache
def torch_resize() -> bool:
    import torch

    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and hasattr(Image.Image, "__arrow_c_array__")


@dataclass
class CaptionImage:
    stored: bytes                    # the image member written to the shard
    ext: str                         # its extension
    source: dict[str, Any]           # uri, sha256, width, height, format (+ exif_orientation, stored_as)
    model_size: tuple[int, int]      # what the VLM is shown (before any resizing of the server's own)
    pixels: Image.Image | None = None  # transformers backend: the decoded, capped picture
    send: bytes | None = None        # openai backend: the bytes the request carries...
    mime: str | None = None          # ...and their type


def capped_size(size: tuple[int, int], max_pixels: int | None) -> tuple[int, int]:
    w, h = size
    if not max_pixels or w * h <= max_pixels:
        return size
    scale = (max_pixels / (w * h)) ** 0.5
    out = (max(1, round(w * scale)), max(1, round(h * scale)))
    if out[0] * out[1] > max_pixels:  # rounding up must not break the cap
        out = (max(1, int(w * scale)), max(1, int(h * scale)))
    return out


def _decode_capped(data: bytes, fmt: str, target: tuple[int, int], uri: str, *, fast: bool) -> Image.Image:
    """RGB, resized to target, of an input without EXIF rotation (rotated ones are decoded upright
    by _upright_png). fast (for a server that resizes again): a JPEG is decoded with DCT scaling
    for the bulk of a large reduction, without the copies of the general path, then an area
    filter (BOX) instead of LANCZOS."""
    try:
        if fast and fmt in ("JPEG", "MPO"):
            with Image.open(io.BytesIO(data)) as img:
                img.draft("RGB", target)
                img.load()
                pixels = img if img.mode == "RGB" else img.convert("RGB")
        else:
            pixels, _ = decode_image(data)
    except ImageDecodeError as exc:
        raise fail_decode(exc, uri) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise fail_decode(ImageDecodeError(f"broken image: {exc}"), uri) from None
    if pixels.size != target:
        pixels = downsize_for_request(pixels, target) if fast else pixels.resize(target, Image.Resampling.LANCZOS)
    return pixels


def downsize_for_request(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """img shrunk to size for a request with an antialiased bicubic filter. torch's kernel (Pillow's
    BICUBIC within 2 levels of 255) reads Pillow's RGB memory in place (stored as RGBX) and
    Pillow maps its result in place, so the resize is the only work; that result is mode RGBX,
    which JPEG encodes as RGB. Without the AVX2 kernel, or for a picture over Pillow's 16 MB
    block (stored in pieces, not one run of memory), Pillow's BILINEAR (within 1 level of
    BICUBIC on average, at 2/3 of its cost; BOX, cheaper still, leaves moire on fine detail),
    after an integer box reduction to at most twice the size (reducing_gap: far cheaper for
    large reductions)."""
    if img.mode == "RGB" and torch_resize():
        import pyarrow as pa  # here: a run that never downsizes does not load it
        import torch

        try:
            flat = torch.from_dlpack(pa.array(img).values)
        except ValueError:  # "Image rows are not contiguous in memory"
            flat = None
        if flat is not None:
            rgbx = flat.view(1, img.height, img.width, 4).permute(0, 3, 1, 2)  # channels last, as stored
            out = torch.nn.functional.interpolate(rgbx, size=(size[1], size[0]), mode="bicubic", antialias=True)
            return Image.frombuffer("RGBX", size, out.permute(0, 2, 3, 1).contiguous().numpy(), "raw", "RGBX", 0, 1)
    return img.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


def encode_for_request(img: Image.Image, lossless: bool) -> tuple[bytes, str]:
    buf = io.BytesIO()
    if lossless:
        img = img if img.mode == "RGB" else img.convert("RGB")  # PNG has no RGBX
        img.save(buf, format="PNG", compress_level=1)
        return buf.getvalue(), "image/png"
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue(), "image/jpeg"


def _upright_png(data: bytes, uri: str) -> tuple[bytes, Image.Image]:
    try:
        img, _ = decode_image(data)
    except ImageDecodeError as exc:
        raise fail_decode(exc, uri) from None
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue(), img


def load_caption_image(item: SourceItem, *, max_pixels: int | None, for_server: bool,
                       lossless: bool = False) -> CaptionImage:
    """Read item's one image for a caption request. for_server: build what the openai backend
    sends (no pixels kept); otherwise the decoded picture for a local model. Raises SampleFailure."""
    ref = item.images[0]
    data, fmt, (w, h), orientation = read_storable(ref)
    upright = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    source: dict[str, Any] = {"uri": ref.uri, "sha256": hashlib.sha256(data).hexdigest(),
                              "width": upright[0], "height": upright[1], "format": fmt}
    target = capped_size(upright, max_pixels)
    stored, ext, pixels = data, FORMAT_MEMBER_EXT[fmt], None
    if orientation != 1:
        stored, pixels = _upright_png(data, ref.uri)
        ext = "png"
        source.update(exif_orientation=orientation, stored_as="png, EXIF orientation applied")
    out = CaptionImage(stored, ext, source, target)
    if not for_server:
        if pixels is None:
            pixels = _decode_capped(data, fmt, target, ref.uri, fast=False)
        elif pixels.size != target:
            pixels = pixels.resize(target, Image.Resampling.LANCZOS)
        out.pixels = pixels
        return out
    if pixels is None and target == upright and fmt in SEND_AS_IS:
        check_decodes(data, fmt, ref.uri)
        out.send, out.mime = data, SEND_AS_IS[fmt]
        return out
    if pixels is None:
        pixels = _decode_capped(data, fmt, target, ref.uri, fast=True)
    elif pixels.size != target:
        pixels = downsize_for_request(pixels, target)
    out.send, out.mime = encode_for_request(pixels, lossless)
    return out
