"""Readers for every input kind: folders, path lists, webdataset tars, LLaMA-Factory json/jsonl.

Each reader turns one input argument into SourceItems in a stable order. Problems that belong to
one sample become an item with `error` set (so they reach the failure ledger); problems with
the argument itself raise SourceError.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from collections.abc import Iterable, Iterator
from typing import Any

from braceexpand import braceexpand

from .decode import IMAGE_EXTENSIONS
from .items import MAX_INPUT_BYTES, ImageRef, SourceItem, make_key, open_regular, printable
from .records import RecordError, read_record

log = logging.getLogger(__name__)

LIST_EXTENSIONS = (".txt", ".lst")
DATASET_EXTENSIONS = (".json", ".jsonl")
TAR_META_EXTENSIONS = ("json", "txt")
# Files that mark a folder as a ddaug output folder (shards/store.py writes them).
OUTPUT_MARKERS = ("run.json", "manifest.json")
# Fields of a ddaug shard's json that describe how the previous run made it, not the sample.
SHARD_PROVENANCE_FIELDS = ("key", "images", "source", "augment", "caption", "translate", "extra")
_COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bzip2", b"\xfd7zXZ": "xz"}


class SourceError(Exception):
    """An input argument that cannot be read at all (missing, unsupported kind)."""


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _file_item(path: str, name: str | None = None) -> SourceItem:
    uri = os.path.abspath(path)
    stem = name if name is not None else os.path.splitext(os.path.basename(path))[0]
    return SourceItem(key=make_key(stem, uri), uri=uri, images=[ImageRef(uri=uri, path=uri)])


def _error_item(name: str, uri: str, reason: str) -> SourceItem:
    """A ledger line for something that cannot become a sample (a bad record, file or folder)."""
    return SourceItem(key=make_key(name, uri), uri=uri, images=[], error=reason)


def is_output_folder(folder: str) -> bool:
    """Whether folder holds a ddaug run's output (its run.json or manifest.json)."""
    for marker in OUTPUT_MARKERS:
        try:
            with open_regular(os.path.join(folder, marker), 1 << 20) as f:
                data = json.loads(f.read())
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(data, dict) and "command" in data and ("config" in data or "shards" in data):
            return True
    return False


def _in_output(path: str, outputs: tuple[str, ...]) -> bool:
    """Whether path is one of the output folders (real paths) or a file written straight into one."""
    real = os.path.realpath(path)
    return real in outputs or (not os.path.isdir(real) and os.path.dirname(real) in outputs)


def read_directory(root: str, exclude: tuple[str, ...] = ()) -> Iterator[SourceItem]:
    """Every image file under root, recursively, in sorted order, then the samples of every
    webdataset .tar under it (so a ddaug output folder is an input too). Symlinked folders are
    not followed, which also makes symlink loops harmless. Below root, ddaug output folders
    (e.g. an -o inside the input) and the excluded folders are not read: they are outputs."""
    images, tars, unreadable = [], [], []
    ignored = 0

    def _unreadable(exc: OSError) -> None:
        unreadable.append((exc.filename or root, exc.strerror or str(exc)))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=_unreadable):
        dirnames.sort()
        for d in list(dirnames):
            sub = os.path.join(dirpath, d)
            if _in_output(sub, exclude) or is_output_folder(sub):
                log.warning("not reading %s: it is a ddaug output folder (name it as an input to read it)",
                            printable(sub))
                dirnames.remove(d)
        for fn in filenames:
            if _is_image_name(fn):
                images.append(os.path.join(dirpath, fn))
            elif fn.lower().endswith(".tar"):
                tars.append(os.path.join(dirpath, fn))
            else:
                ignored += 1
    if ignored:
        log.info("%s: %d file(s) that are neither images (%s) nor .tar were not read", printable(root),
                 ignored, " ".join(IMAGE_EXTENSIONS))
    for folder, reason in unreadable:
        yield _error_item(os.path.basename(folder), os.path.abspath(folder), f"folder not readable: {reason}")
    for path in sorted(images):
        rel = os.path.relpath(path, root)
        yield _file_item(path, name=os.path.splitext(rel)[0])
    for path in sorted(tars):
        yield from read_tar(path)


def _read_bytes(path: str) -> bytes:
    """A whole metadata file (list, dataset); SourceError if it is not a readable regular file."""
    try:
        with open_regular(path, None) as f:
            return f.read()
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({exc.strerror or exc})") from None


def read_path_list(list_file: str) -> Iterator[SourceItem]:
    """A text file of image paths, one per line, relative to the list's folder; # comments.

    A line is the path as written (any bytes: names that are not UTF-8 round-trip); only when no
    such file exists are surrounding spaces dropped."""
    base = os.path.dirname(os.path.abspath(list_file))
    data = _read_bytes(list_file).removeprefix(codecs.BOM_UTF8)
    for raw in data.split(b"\n"):
        line = os.fsdecode(raw.rstrip(b"\r"))
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        path = line if os.path.isabs(line) else os.path.join(base, line)
        if not os.path.lexists(path) and line.strip() != line:
            stripped = line.strip()
            path = stripped if os.path.isabs(stripped) else os.path.join(base, stripped)
        yield _file_item(path)


def _parse_json(data: bytes) -> Any:
    """json.loads of bytes (UTF-8 with or without BOM, UTF-16/32); RecordError with the reason."""
    try:
        return json.loads(data)
    except UnicodeDecodeError as exc:
        raise RecordError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise RecordError(f"json does not parse: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise RecordError("json is nested too deeply to read") from None


def _dataset_records(path: str) -> Iterator[tuple[int, Any]]:
    """(index, record or RecordError) of a .json list/object or a .jsonl file."""
    if path.lower().endswith(".jsonl"):
        try:
            f = open_regular(path, None)
        except OSError as exc:
            raise SourceError(f"{path}: cannot read ({exc.strerror or exc})") from None
        with f:  # line by line: a dataset of millions of records is never held as one string
            for lineno, line in enumerate(f):
                if lineno == 0:
                    line = line.removeprefix(codecs.BOM_UTF8)
                if not line.strip():
                    continue
                try:
                    yield lineno, _parse_json(line)
                except RecordError as exc:
                    yield lineno, RecordError(f"line {lineno + 1}: {exc}")
        return
    data = _read_bytes(path)
    try:
        records = _parse_json(data)
    except RecordError as exc:
        yield 0, exc
        return
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list):
        what = "null" if records is None else type(records).__name__
        yield 0, RecordError(f"the file holds a JSON {what}, expected a list of records or one record")
        return
    yield from enumerate(records)


def read_dataset(path: str, media_dir: str | None) -> Iterator[SourceItem]:
    """A LLaMA-Factory / ShareGPT dataset: a json list or jsonl of {messages|conversations, images}.

    Image paths are relative to --media-dir when given, else to the dataset file's folder. A
    record that cannot be read becomes a ledger line; the others are read.
    """
    abspath = os.path.abspath(path)
    base = os.path.abspath(media_dir) if media_dir else os.path.dirname(abspath)
    stem = os.path.splitext(os.path.basename(path))[0]
    for index, record in _dataset_records(path):
        uri = f"{abspath}#{index}"
        if isinstance(record, RecordError):
            yield _error_item(f"{stem}_{index}", uri, str(record))
            continue
        name = str(record.get("id", f"{stem}_{index}")) if isinstance(record, dict) else f"{stem}_{index}"
        key = make_key(name, uri)
        try:
            rec = read_record(record)
        except RecordError as exc:
            yield SourceItem(key=key, uri=uri, images=[], error=str(exc))
            continue
        refs = []
        for p in rec.images:
            full = os.path.abspath(p if os.path.isabs(p) else os.path.join(base, p))
            refs.append(ImageRef(uri=full, path=full))
        yield SourceItem(key=key, uri=uri, images=refs, messages=rec.messages, tags=rec.tags,
                         extra=rec.extra, error=None if refs or rec.messages else "dataset record has neither images nor messages")


def _split_member_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the basename."""
    dirname, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (os.path.join(dirname, stem) if dirname else stem), ext


def missing_tar_end(tf: tarfile.TarFile, path: str) -> str | None:
    """Python's tarfile takes a tar cut at a header boundary for a complete one; a complete tar
    ends in two zero blocks right after its last member. Call after iterating tf."""
    with open(path, "rb") as f:
        f.seek(tf.offset)
        end = f.read(2 * tarfile.BLOCKSIZE)
    if end != bytes(2 * tarfile.BLOCKSIZE):
        return "tar has no end-of-archive marker (cut short at a member boundary)"
    return None


@dataclass(frozen=True)
class TarMember:
    name: str
    offset: int   # where the member's data starts
    size: int


@dataclass
class TarSample:
    """The members of one webdataset sample: they share a key."""
    key: str
    members: dict[str, TarMember]


def index_tar(path: str) -> tuple[list[TarSample], str | None]:
    """Samples in order of first appearance, from the headers alone, plus a problem (corrupt or
    cut short) or None. A member joins the latest sample of its key (members of a sample need
    not be adjacent); a member whose name that sample already has starts another sample of the
    same key, so a tar holding one key twice loses nothing. Raises tarfile.TarError/OSError if
    it is no tar at all (or not a regular file)."""
    samples: list[TarSample] = []
    latest: dict[str, TarSample] = {}
    problem = None
    with open_regular(path, None) as fh:
        magic = fh.read(6)
        for prefix, kind in _COMPRESSED_MAGIC.items():
            if magic.startswith(prefix):
                raise tarfile.ReadError(f"{kind}-compressed; decompress it to a plain .tar first")
        fh.seek(0)
        with tarfile.open(fileobj=fh, mode="r:") as tf:
            try:
                for m in tf:
                    if not m.isfile():
                        continue
                    key, ext = _split_member_name(m.name)
                    sample = latest.get(key)
                    if sample is None or ext in sample.members:
                        sample = latest[key] = TarSample(key, {})
                        samples.append(sample)
                    sample.members[ext] = TarMember(m.name, m.offset_data, m.size)
                cut = missing_tar_end(tf, path)
                if cut:
                    problem = f"{cut} after {len(samples)} samples"
            except (tarfile.TarError, OSError, EOFError) as exc:
                problem = f"tar is truncated or corrupt after {len(samples)} samples: {exc}"
    return samples, problem


def _read_member(fh, m: TarMember, file_size: int) -> bytes:
    if m.offset + m.size > file_size:
        raise RecordError(f"tar member {printable(m.name)} cut short")
    if m.size > MAX_INPUT_BYTES:
        raise RecordError(f"tar member {printable(m.name)} of {m.size} bytes is over the {MAX_INPUT_BYTES}-byte limit")
    fh.seek(m.offset)
    return fh.read(m.size)


def _tar_meta(fh, members: dict[str, TarMember], file_size: int) -> tuple[list, dict, dict]:
    """messages, tags and extra of a tar sample from its json and txt members; RecordError."""
    messages: list[dict[str, Any]] = []
    tags: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if "json" in members:
        meta = _parse_json(_read_member(fh, members["json"], file_size))
        try:
            rec = read_record(meta, skip=SHARD_PROVENANCE_FIELDS, image_paths=False)
        except RecordError as exc:
            raise RecordError(f"sample json: {exc}") from None
        messages, tags = rec.messages, rec.tags
        # A ddaug shard's own extra is carried on as it was; foreign fields join it.
        extra = {**(meta["extra"] if isinstance(meta.get("extra"), dict) else {}), **rec.extra}
    if "txt" in members:
        try:
            extra["text"] = _read_member(fh, members["txt"], file_size).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise RecordError(f"text member is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    return messages, tags, extra


def read_tar(path: str) -> Iterator[SourceItem]:
    """A webdataset tar (ddaug's own or foreign): members grouped by key; images plus optional
    json (ddaug schema, or any object with messages) and txt. Only member headers are read here;
    image bytes are read later by offset. A file that is no readable tar is one ledger line."""
    abspath = os.path.abspath(path)
    try:
        samples, problem = index_tar(abspath)
    except (tarfile.TarError, OSError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        yield _error_item(os.path.basename(path), abspath, f"not a readable tar ({reason})")
        return
    file_size = os.path.getsize(abspath)
    seen: dict[str, int] = {}
    with open(abspath, "rb") as fh:
        for sample in samples:
            # A key that comes back later in the tar is another sample: it gets its own uri.
            seen[sample.key] = seen.get(sample.key, 0) + 1
            uri = f"{abspath}#{sample.key}" + (f"~{seen[sample.key]}" if seen[sample.key] > 1 else "")
            key = make_key(os.path.basename(sample.key), uri)
            members = sample.members
            refs = [ImageRef(uri=f"{abspath}#{members[ext].name}", path=abspath, offset=members[ext].offset,
                             size=members[ext].size)
                    for ext in sorted(e for e in members if _is_image_name("x." + e))]
            messages, tags, extra, error = [], {}, {}, None
            try:
                for ref in refs:
                    if ref.offset + ref.size > file_size:
                        raise RecordError(f"tar member {ref.uri.rsplit('#', 1)[1]} cut short")
                messages, tags, extra = _tar_meta(fh, members, file_size)
            except RecordError as exc:
                error = str(exc)
            if not refs and not messages and error is None:
                error = "tar sample has no image member and no conversation"
            yield SourceItem(key=key, uri=uri, images=refs, messages=messages, tags=tags,
                             extra=extra, error=error)
    if problem:
        # The tail of the tar is lost; say so once, as its own ledger line.
        yield SourceItem(key=make_key("truncated", abspath + "#truncated"), uri=abspath,
                         images=[], error=problem)


def expand_input(arg: str) -> list[str]:
    if "{" in arg and "}" in arg:
        return list(braceexpand(arg))
    return [arg]


def read_sources(inputs: Iterable[str], media_dir: str | None = None,
                 exclude: Iterable[str] = ()) -> list[SourceItem]:
    """All items of all inputs, in argument order, duplicates (same key) dropped. Nothing in the
    `exclude` folders (the run's own output folder) is read, even when an input names it."""
    items: list[SourceItem] = []
    seen: set[str] = set()
    skip = tuple(os.path.realpath(p) for p in exclude)
    for arg in inputs:
        for path in expand_input(arg):
            if skip and _in_output(path, skip):
                raise SourceError(f"{path} is the output folder or in it: ddaug never reads its "
                                  f"own output; pick another -o")
            for item in _read_one(path, media_dir, skip):
                if item.key in seen:
                    log.warning("skipping duplicate input %s", item.uri)
                    continue
                seen.add(item.key)
                items.append(item)
    return items


def _read_one(path: str, media_dir: str | None, exclude: tuple[str, ...] = ()) -> Iterator[SourceItem]:
    from . import parquet  # parquet/arrow tables and hub datasets

    if path.startswith(parquet.HUB_PREFIX):
        return parquet.read_hub_dataset(path, media_dir)
    if not os.path.lexists(path):
        raise SourceError(f"input not found: {path}")
    low = path.lower()
    if os.path.isdir(path):
        tables = parquet.table_files_in(path)
        return parquet.read_table_files(tables, media_dir) if tables else read_directory(path, exclude)
    if parquet.is_table_file(low):
        return parquet.read_table_file(path, media_dir)
    if low.endswith(".tar"):
        return read_tar(path)
    if low.endswith((".tar.gz", ".tgz", ".tar.zst")):
        raise SourceError(f"{path}: compressed tars are not supported; decompress to .tar first")
    if low.endswith(DATASET_EXTENSIONS):
        return read_dataset(path, media_dir)
    if low.endswith(LIST_EXTENSIONS):
        return read_path_list(path)
    if _is_image_name(low):
        return iter([_file_item(path)])
    raise SourceError(f"{path}: unknown input kind (expected a folder, .tar, .json/.jsonl, .parquet, "
                      f".arrow, .txt list, an image file or hf://org/name)")
