"""Atomic, byte-reproducible webdataset shard writing."""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import tarfile
import threading
from typing import Any

TMP_SUFFIX = ".tmp"
# A process's temporary files end in .tmp-{token}: the pid alone is not unique once processes on
# several hosts share a folder (a cluster file system), so a random part follows it.
TOKEN_PATTERN = r"\d+\.[0-9a-f]{8}"
_token: tuple[int, str] | None = None


def process_token() -> str:
    """`{pid}.{8 hex}`, fixed for this process (renewed in a forked child)."""
    global _token
    if _token is None or _token[0] != os.getpid():
        _token = (os.getpid(), f"{os.getpid()}.{secrets.token_hex(4)}")
    return _token[1]


CRASH_ENV = "DDAUG_CRASH_AT"
STOP_ENV = "DDAUG_STOP_AT"
_crash_hits: dict[tuple[str, str], int] = {}


def crash_point(name: str) -> None:
    """Fault injection for the crash-safety tests: with DDAUG_CRASH_AT=name:n the process kills
    itself (SIGKILL: no cleanup, no finally) the nth time it passes this point; with
    DDAUG_STOP_AT=name:n it stops itself there (SIGSTOP, as a frozen or cut-off worker), until
    someone sends SIGCONT."""
    import signal

    for env, sig in ((CRASH_ENV, signal.SIGKILL), (STOP_ENV, signal.SIGSTOP)):
        spec = os.environ.get(env)
        if not spec:
            continue
        target, _, nth = spec.partition(":")
        if target != name:
            continue
        hits = _crash_hits[env, name] = _crash_hits.get((env, name), 0) + 1
        if hits == int(nth or 1):
            os.kill(os.getpid(), sig)


# A shard's bytes reach the disk as it grows, in the background, once this many are unsynced:
# the fsync at commit then has little left, and the GPU does not idle behind a whole shard's
# write-back (0.3-2.1 s per 1,000 COCO-sized PNGs on an H100 machine, bench/RESULTS.md, "Fused VAE norms and a host that does not wait").
SYNC_EVERY = 64 << 20

MAX_NAME_BYTES = 200  # file-system names stop at 255 bytes; leave room for what ddaug appends


def check_plain_name(name: str, what: str) -> str:
    """A flag that names files inside the output folder (--prefix, --name) must be a plain file
    name: no folder part, nothing that climbs out, nothing hidden or unprintable. Returns it, or
    raises ValueError with the reason."""
    if not name:
        raise ValueError(f"{what} is empty")
    if "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"{what} {name!r} must be a plain file name, without a folder part")
    if name.startswith("."):
        raise ValueError(f"{what} {name!r} must not start with '.' (hidden files are ddaug's own)")
    if any(not ch.isprintable() for ch in name):
        raise ValueError(f"{what} {name!r} has unprintable characters")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise ValueError(f"{what} is longer than {MAX_NAME_BYTES} bytes")
    return name


def write_temporary(path: str, data: bytes) -> str:
    """data in this process's temporary name for path (`path.tmp-{token}`), on disk; that name."""
    tmp = f"{path}{TMP_SUFFIX}-{process_token()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write a small file so readers see either the old or the complete new content."""
    tmp = write_temporary(path, data)
    name = os.path.basename(path)
    crash_point("stats-replace" if name.endswith(".stats.json") else name.split(".")[0] + "-replace")
    os.replace(tmp, path)


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, ensure_ascii=False, indent=1) + "\n").encode("utf-8"))


class _HashingFile:
    """File wrapper that counts and hashes what the tar stream writes."""

    def __init__(self, f):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data):
        self.sha256.update(data)
        self.bytes += len(data)
        return self._f.write(data)

    def flush(self):
        self._f.flush()


class TarStream:
    """webdataset's tar layout, written with the standard library: one member `key.suffix` per
    file, in sorted suffix order, mode 0444, a fixed owner and mtime 0, so the same samples give
    the same bytes, those of `webdataset.TarWriter(encoder=False, mtime=0)`. webdataset itself
    imports torch when it is installed: seconds of start-up for a job that only writes tars."""

    def __init__(self, fileobj, user: str = "ddaug", group: str = "ddaug"):
        self._tar = tarfile.open(fileobj=fileobj, mode="w|")
        self.user, self.group = user, group

    def write(self, key: str, files: dict[str, bytes]) -> None:
        for suffix in sorted(files):
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = len(files[suffix]), 0, 0o444
            info.uname, info.gname = self.user, self.group
            self._tar.addfile(info, io.BytesIO(files[suffix]))

    def close(self) -> None:
        self._tar.close()


class ShardWriter:
    """One shard, written under a temporary name (`<name>.tmp`, or tmp_path) and renamed to its
    final name on `commit()`; `finish()` completes it on disk under the temporary name and
    leaves placing it to the caller (shards/units.py links it into place once its unit commits).

    A crash at any point leaves either no file under the final name or a complete one. Members
    get a fixed mtime/owner so the same samples always give the same bytes.
    """

    def __init__(self, final_path: str, tmp_path: str | None = None):
        self.final_path = final_path
        self.tmp_path = tmp_path or final_path + TMP_SUFFIX
        self._file = open(self.tmp_path, "wb")
        self._hashing = _HashingFile(self._file)
        self._tar = TarStream(self._hashing)
        self.samples = 0
        self.text_only = 0  # samples with a json member only (records without images)
        self.keys: list[str] = []
        self._synced_to = 0
        self._sync: threading.Thread | None = None
        self._sync_error: OSError | None = None

    def write(self, key: str, files: dict[str, bytes]) -> None:
        """files maps member suffix ("png", "0.png", "json") to bytes."""
        self._tar.write(key, files)
        crash_point("tar-write")
        self.samples += 1
        self.text_only += set(files) == {"json"}
        self.keys.append(key)
        if self._hashing.bytes - self._synced_to >= SYNC_EVERY and not (self._sync and self._sync.is_alive()):
            self._file.flush()  # into the kernel; fdatasync then writes it back off this thread
            self._synced_to = self._hashing.bytes
            self._sync = threading.Thread(target=self._write_back, args=(self._file.fileno(),), daemon=True,
                                          name="shard-sync")
            self._sync.start()

    def _write_back(self, fd: int) -> None:
        try:
            getattr(os, "fdatasync", os.fsync)(fd)  # macOS has no fdatasync
        except OSError as exc:  # kept for commit: Linux reports a write-back error to one sync only
            self._sync_error = exc

    def _join_sync(self) -> None:
        if self._sync is not None:
            self._sync.join()  # before the descriptor is synced again or closed
            self._sync = None

    def commit(self) -> dict[str, Any]:
        info = self.finish()
        crash_point("tar-rename")
        os.replace(self.tmp_path, self.final_path)
        crash_point("tar-renamed")
        return info

    def finish(self) -> dict[str, Any]:
        """Close and fsync the temporary file; its size and sha256."""
        try:
            self._tar.close()
            self._file.flush()
            self._join_sync()
            if self._sync_error is not None:
                raise self._sync_error  # the fsync below would succeed on the lost bytes
            os.fsync(self._file.fileno())
            self._file.close()
        except BaseException:
            self.abort()  # nothing under the final name, no .tmp left behind
            raise
        return {"bytes": self._hashing.bytes, "sha256": self._hashing.sha256.hexdigest()}

    def abort(self) -> None:
        try:
            self._join_sync()
            self._file.close()
        finally:
            if os.path.exists(self.tmp_path):
                os.remove(self.tmp_path)
