"""What every reader yields: one sample (one or more images plus an optional conversation)."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ImageRef:
    """Where one image's bytes live. Reading is lazy so enumeration stays cheap."""

    uri: str
    path: str  # file on disk (a plain file, or the tar holding the member)
    offset: int = 0  # byte offset of a tar member's data; 0 and size -1 for a plain file
    size: int = -1

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.size < 0:
                return f.read()
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"tar member cut short: {len(data)} of {self.size} bytes")
        return data


@dataclass
class SourceItem:
    key: str
    uri: str
    images: list[ImageRef]
    messages: list[dict[str, Any]] = field(default_factory=list)
    tags: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # Set when the reader already knows the sample is unusable (e.g. a json naming no image).
    error: str | None = None


_SLUG_BAD = re.compile(r"[^A-Za-z0-9_-]+")


def make_key(name: str, uri: str) -> str:
    """A readable, stable, webdataset-safe key: a slug of the name plus a hash of the uri.

    webdataset splits a member name at the first dot of its basename, and the key becomes a file
    name on export, so only [A-Za-z0-9_-] survive.
    """
    slug = _SLUG_BAD.sub("_", name).strip("_")[:32] or "item"
    digest = hashlib.sha1(uri.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return f"{slug}-{digest}"


def display_path(path: str) -> str:
    return os.path.abspath(path)
