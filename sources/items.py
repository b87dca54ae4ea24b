"""What every reader yields: one sample (one or more images plus an optional conversation)."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any


# What one input file may cost: a bigger file is refused with a ledger line instead of being read
# whole (a sparse 20 GB file, a symlink to a device). 80 MP of 16-bit RGB uncompressed is 480 MB.
MAX_INPUT_BYTES = 1 << 30


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str, max_bytes: int | None = MAX_INPUT_BYTES):
    """Open a plain file for reading, or raise OSError with a one-line reason.

    The type and size are checked on the opened descriptor (no race with the name): opening does
    not block on a FIFO, and FIFOs, devices (a symlink to /dev/zero) and folders are refused
    before anything is read, as is a file over max_bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"{_file_kind(st.st_mode)}, not a regular file; not read")
        if max_bytes is not None and st.st_size > max_bytes:
            raise OSError(errno.EFBIG, f"file of {st.st_size} bytes is over the {max_bytes}-byte "
                                       f"limit for one input; not read")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def printable(text: str) -> str:
    """text safe for JSON files: bytes of a non-UTF-8 file or tar member name (surrogate-escaped
    by Python) are shown as \\xNN escapes instead of failing when the ledger is written."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # lone surrogates that do not stand for bytes (from \ud800 in JSON)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class ImageRef:
    """Where one image's bytes live. Reading is lazy so enumeration stays cheap."""

    uri: str
    path: str  # file on disk (a plain file, or the tar holding the member)
    offset: int = 0  # byte offset of a tar member's data; 0 and size -1 for a plain file
    size: int = -1

    def __post_init__(self):
        object.__setattr__(self, "uri", printable(self.uri))  # it is written to JSON files

    def read(self) -> bytes:
        if self.size > MAX_INPUT_BYTES:
            raise OSError(errno.EFBIG, f"tar member of {self.size} bytes is over the {MAX_INPUT_BYTES}-byte "
                                       f"limit for one input; not read")
        with open_regular(self.path, None if self.size >= 0 else MAX_INPUT_BYTES) as f:
            if self.size < 0:
                data = f.read(MAX_INPUT_BYTES + 1)
                if len(data) > MAX_INPUT_BYTES:  # grew after the check, or lies about its size
                    raise OSError(errno.EFBIG, f"file is over the {MAX_INPUT_BYTES}-byte limit for one input")
                return data
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

    def __post_init__(self):
        self.uri = printable(self.uri)  # it is written to JSON files (samples, the ledger)


_SLUG_BAD = re.compile(r"[^A-Za-z0-9_-]+")


def make_key(name: str, uri: str) -> str:
    """A readable, stable, webdataset-safe key: a slug of the name plus a hash of the uri.

    webdataset splits a member name at the first dot of its basename, and the key becomes a file
    name on export, so only [A-Za-z0-9_-] survive.
    """
    slug = _SLUG_BAD.sub("_", name).strip("_")[:32] or "item"
    digest = hashlib.sha1(printable(uri).encode("utf-8")).hexdigest()[:12]
    return f"{slug}-{digest}"


def display_path(path: str) -> str:
    return os.path.abspath(path)
