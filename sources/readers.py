"""Readers for every input kind: folders, path lists, webdataset tars, LLaMA-Factory json/jsonl.

Each reader turns one input argument into SourceItems in a stable order. Problems that belong to
one sample become an item with `error` set (so they reach the failure ledger); problems with
the argument itself raise SourceError.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from collections.abc import Iterable, Iterator
from typing import Any

from braceexpand import braceexpand

from .decode import IMAGE_EXTENSIONS
from .items import ImageRef, SourceItem, make_key

log = logging.getLogger(__name__)

LIST_EXTENSIONS = (".txt", ".lst")
DATASET_EXTENSIONS = (".json", ".jsonl")
TAR_META_EXTENSIONS = ("json", "txt")
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
              "system": "system", "observation": "observation", "function_call": "function_call"}


class SourceError(Exception):
    """An input argument that cannot be read at all (missing, unsupported kind)."""


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _file_item(path: str, name: str | None = None) -> SourceItem:
    uri = os.path.abspath(path)
    stem = name if name is not None else os.path.splitext(os.path.basename(path))[0]
    return SourceItem(key=make_key(stem, uri), uri=uri, images=[ImageRef(uri=uri, path=uri)])


def read_directory(root: str) -> Iterator[SourceItem]:
    """Every image file under root, recursively, in sorted order, then the samples of every
    webdataset .tar under it (so a ddaug output folder is an input too). Symlinked folders are
    not followed, which also makes symlink loops harmless."""
    images, tars = [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=None):
        dirnames.sort()
        for fn in filenames:
            if _is_image_name(fn):
                images.append(os.path.join(dirpath, fn))
            elif fn.lower().endswith(".tar"):
                tars.append(os.path.join(dirpath, fn))
    for path in sorted(images):
        rel = os.path.relpath(path, root)
        yield _file_item(path, name=os.path.splitext(rel)[0])
    for path in sorted(tars):
        yield from read_tar(path)


def read_path_list(list_file: str) -> Iterator[SourceItem]:
    """A text file of image paths, one per line, relative to the list's folder; # comments."""
    base = os.path.dirname(os.path.abspath(list_file))
    with open(list_file, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            path = line if os.path.isabs(line) else os.path.join(base, line)
            yield _file_item(path)


def _normalise_messages(record: dict[str, Any]) -> list[dict[str, Any]]:
    if isinstance(record.get("messages"), list):
        return record["messages"]
    # Original ShareGPT layout: conversations with from/value.
    convo = record.get("conversations")
    if isinstance(convo, list):
        out = []
        for turn in convo:
            if not isinstance(turn, dict):
                continue
            role = ROLE_NAMES.get(str(turn.get("from", turn.get("role", ""))), turn.get("from"))
            out.append({"role": role, "content": turn.get("value", turn.get("content", ""))})
        return out
    return []


def _record_images(record: dict[str, Any]) -> list[str]:
    images = record.get("images", record.get("image"))
    if images is None:
        return []
    if isinstance(images, str):
        return [images]
    return [str(x) for x in images]


def read_dataset(path: str, media_dir: str | None) -> Iterator[SourceItem]:
    """A LLaMA-Factory / ShareGPT dataset: a json list or jsonl of {messages|conversations, images}.

    Image paths are relative to --media-dir when given, else to the dataset file's folder.
    """
    abspath = os.path.abspath(path)
    base = os.path.abspath(media_dir) if media_dir else os.path.dirname(abspath)
    records: Iterable[Any]
    with open(path, encoding="utf-8") as f:
        if path.lower().endswith(".jsonl"):
            records = []
            for lineno, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    records.append(SourceItem(key=make_key(f"line{lineno}", f"{abspath}#{lineno}"),
                                              uri=f"{abspath}#{lineno}", images=[],
                                              error=f"json line does not parse: {exc.msg}"))
        else:
            try:
                records = json.load(f)
            except json.JSONDecodeError as exc:
                raise SourceError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
            if isinstance(records, dict):
                records = [records]
    for index, record in enumerate(records):
        if isinstance(record, SourceItem):
            yield record
            continue
        uri = f"{abspath}#{index}"
        name = str(record.get("id", f"{os.path.splitext(os.path.basename(path))[0]}_{index}")) \
            if isinstance(record, dict) else str(index)
        key = make_key(name, uri)
        if not isinstance(record, dict):
            yield SourceItem(key=key, uri=uri, images=[], error="dataset record is not an object")
            continue
        image_paths = _record_images(record)
        refs = []
        for p in image_paths:
            full = p if os.path.isabs(p) else os.path.join(base, p)
            refs.append(ImageRef(uri=os.path.abspath(full), path=os.path.abspath(full)))
        extra = {k: v for k, v in record.items()
                 if k not in ("messages", "conversations", "images", "image", "tags")}
        tags = record.get("tags") if isinstance(record.get("tags"), dict) else {}
        messages = _normalise_messages(record)
        yield SourceItem(key=key, uri=uri, images=refs, messages=messages, tags=dict(tags), extra=extra,
                         error=None if refs or messages else "dataset record has neither images nor messages")


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


def index_tar(path: str) -> tuple["OrderedDict[str, dict[str, TarMember]]", str | None]:
    """Members grouped by webdataset key, in tar order, from the headers alone; plus a problem
    (corrupt or cut short) or None. Raises tarfile.TarError/OSError if it is no tar at all."""
    groups: "OrderedDict[str, dict[str, TarMember]]" = OrderedDict()
    problem = None
    with tarfile.open(path, mode="r:") as tf:
        try:
            for m in tf:
                if m.isfile():
                    key, ext = _split_member_name(m.name)
                    groups.setdefault(key, {})[ext] = TarMember(m.name, m.offset_data, m.size)
            cut = missing_tar_end(tf, path)
            if cut:
                problem = f"{cut} after {len(groups)} samples"
        except (tarfile.TarError, OSError, EOFError) as exc:
            problem = f"tar is truncated or corrupt after {len(groups)} samples: {exc}"
    return groups, problem


def read_tar(path: str) -> Iterator[SourceItem]:
    """A webdataset tar (ddaug's own or foreign): members grouped by key; images plus optional
    json (ddaug schema, or any object with messages) and txt. Only member headers are read here;
    image bytes are read later by offset."""
    abspath = os.path.abspath(path)
    try:
        groups, problem = index_tar(abspath)
    except (tarfile.TarError, OSError) as exc:
        raise SourceError(f"{path}: not a readable tar ({exc})") from None
    file_size = os.path.getsize(abspath)

    with open(abspath, "rb") as fh:
        for tar_key, members in groups.items():
            uri = f"{abspath}#{tar_key}"
            key = make_key(os.path.basename(tar_key), uri)
            image_exts = sorted(e for e in members if _is_image_name("x." + e))
            refs = []
            error = None
            for ext in image_exts:
                m = members[ext]
                if m.offset + m.size > file_size:
                    error = f"tar member {m.name} cut short"
                refs.append(ImageRef(uri=f"{abspath}#{m.name}", path=abspath, offset=m.offset, size=m.size))
            messages: list[dict[str, Any]] = []
            tags: dict[str, Any] = {}
            extra: dict[str, Any] = {}
            if "json" in members and error is None:
                m = members["json"]
                fh.seek(m.offset)
                try:
                    meta = json.loads(fh.read(m.size).decode("utf-8"))
                    if isinstance(meta, dict):
                        messages = _normalise_messages(meta)
                        tags = dict(meta.get("tags") or {})
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    error = f"sample json does not parse: {exc}"
            if "txt" in members and error is None:
                m = members["txt"]
                fh.seek(m.offset)
                extra["text"] = fh.read(m.size).decode("utf-8", "replace")
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


def read_sources(inputs: Iterable[str], media_dir: str | None = None) -> list[SourceItem]:
    """All items of all inputs, in argument order, duplicates (same key) dropped."""
    items: list[SourceItem] = []
    seen: set[str] = set()
    for arg in inputs:
        for path in expand_input(arg):
            for item in _read_one(path, media_dir):
                if item.key in seen:
                    log.warning("skipping duplicate input %s", item.uri)
                    continue
                seen.add(item.key)
                items.append(item)
    return items


def _read_one(path: str, media_dir: str | None) -> Iterator[SourceItem]:
    from . import parquet  # parquet/arrow tables and hub datasets

    if path.startswith(parquet.HUB_PREFIX):
        return parquet.read_hub_dataset(path, media_dir)
    if not os.path.lexists(path):
        raise SourceError(f"input not found: {path}")
    low = path.lower()
    if os.path.isdir(path):
        tables = parquet.table_files_in(path)
        return parquet.read_table_files(tables, media_dir) if tables else read_directory(path)
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
