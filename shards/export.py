"""`ddaug export`: shards -> the formats trainers that do not read tars document.

llamafactory  {name}.json|.jsonl (+ images/), or {name}.parquet with embedded image bytes;
              plus the dataset_info.json entry (sharegpt formatting, OpenAI-style role tags)
swift         {name}.jsonl for ms-swift: messages + images + channel (per-source loss)
energon       the shards plus the .nv-meta/ index that Megatron-Energon's loader needs,
              made by Energon's own `energon prepare`, and a dataset.yaml naming ddaug's
              sample type (shards/energon.py)
hf            {name}.parquet with HF datasets features: an `images` list of Image, so
              samples with any number of images (or none) and any mix of formats load

Member names come from tars, which anyone can craft: every path written is checked to stay
inside the output folder; a sample that would escape is skipped and reported.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator

from tqdm import tqdm

from ddaug.sources.items import printable

from .inspect import ShardSample, find_shards, iter_shard
from .schema import count_image_tags, message_problems
from .writer import TMP_SUFFIX, atomic_write_bytes, atomic_write_json, check_plain_name

log = logging.getLogger(__name__)
FORMATS = ("llamafactory", "swift", "energon", "hf")
HF_ROWS_PER_GROUP = 100  # what datasets itself writes for image data: bounded memory on both sides


class ExportError(Exception):
    """Export cannot run as asked; one line for the user."""


class ImageClash(ValueError):
    """An image file name is taken by other bytes; it is never replaced."""


@dataclass
class ExportSummary:
    written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def line(self) -> str:
        skipped = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items())) or "none"
        return f"{self.written} samples written; skipped: {skipped}"


def safe_join(root: str, relpath: str) -> str:
    """root/relpath, or ValueError if relpath is absolute, climbs out (..), or resolves (through
    symlinks) outside root."""
    if not relpath or os.path.isabs(relpath) or relpath.startswith(("/", "\\")) or "\\" in relpath:
        raise ValueError(f"unsafe member path {relpath!r}")
    if any(part in ("..", "") for part in relpath.split("/")):
        raise ValueError(f"unsafe member path {relpath!r}")
    root_real = os.path.realpath(root)
    target = os.path.realpath(os.path.join(root_real, relpath))
    if os.path.commonpath([root_real, target]) != root_real:
        raise ValueError(f"member path {relpath!r} escapes the output folder")
    return target


def _samples(paths: list[str], summary: ExportSummary, show_progress: bool) -> Iterator[ShardSample]:
    shards = find_shards(paths)
    for shard in tqdm(shards, unit="shard", desc="export", disable=not show_progress):
        try:
            yield from iter_shard(shard)
        except Exception as exc:  # a corrupt shard loses its tail, not the export
            log.warning("%s: %s; skipped the rest of this shard", shard, exc)
            summary.skip("corrupt shard tail")


def _conversation(s: ShardSample, summary: ExportSummary) -> tuple[dict, list[tuple[str, bytes]]] | None:
    """(meta, [(image member suffix, bytes)]) of a trainable sample, else None (counted)."""
    try:
        meta = s.meta
    except (UnicodeDecodeError, json.JSONDecodeError):
        summary.skip("json does not parse")
        return None
    if not isinstance(meta, dict) or not meta.get("messages"):
        summary.skip("no conversation")
        return None
    if not isinstance(meta["messages"], list) or message_problems(meta["messages"]):
        summary.skip("messages with unknown roles or non-text content")
        return None
    try:  # text from a crafted tar may hold lone surrogates, which no UTF-8 file can store
        json.dumps([meta["messages"], meta.get("tags")], ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        summary.skip("text that is not valid Unicode")
        return None
    images = []
    for name in meta.get("images") or []:
        suffix = str(name)[len(s.key) + 1:] if str(name).startswith(s.key + ".") else None
        if suffix is None or suffix not in s.members:
            summary.skip("image member missing")
            return None
        images.append((suffix, s.members[suffix]))
    if count_image_tags(meta["messages"]) != len(images):
        summary.skip("<image> tags do not match images")
        return None
    return meta, images


def image_file_name(key: str, suffix: str, data: bytes) -> str:
    """`{key}.{content hash}.{suffix}`: shard sets made from the same inputs share keys (augment
    and caption of one folder, SDXL and SSD-1B runs), so the key alone would let one set's image
    replace another's. With the hash, equal names mean equal bytes."""
    key.encode("utf-8")  # a key that is not valid Unicode (crafted tar) cannot be named in JSON
    return f"{key}.{hashlib.sha256(data).hexdigest()[:16]}.{suffix}"


def _write_images(out: str, key: str, images: list[tuple[str, bytes]]) -> list[str]:
    rels = []
    for suffix, data in images:
        rel = f"images/{image_file_name(key, suffix, data)}"
        path = safe_join(out, rel)  # keys come from tars: never trust them
        if os.path.lexists(path):
            # Written before (this export or an earlier one into DIR): the same bytes by name;
            # anything else there is not ours to replace.
            if not os.path.isfile(path) or os.path.getsize(path) != len(data) or _file_sha256(path) != \
                    hashlib.sha256(data).hexdigest():
                raise ImageClash(f"{rel} exists with other content; not replaced")
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}{TMP_SUFFIX}-{os.getpid()}"  # a killed export leaves no half image under the name
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        rels.append(rel)
    return rels


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def llamafactory_turn_problem(messages: list[dict]) -> str | None:
    """Why LLaMA-Factory's sharegpt converter would drop this conversation ("Skipping this
    abnormal example"), else None: after an optional system turn, turns must alternate
    user|observation and assistant|function_call, in pairs."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    accepted = (("user", "observation"), ("assistant", "function_call"))
    if any(m["role"] not in accepted[i % 2] for i, m in enumerate(turns)) or len(turns) % 2:
        return "turns LLaMA-Factory drops (not user/assistant pairs)"
    return None


def _exportable(paths, out: str, summary: ExportSummary, show_progress: bool, embed: bool = False,
                turn_problem=None):
    """(sample, meta, images field) for every trainable sample. Images are written under
    out/images/ (paths in the field), or with embed kept as {"bytes", "path"} records.
    turn_problem(messages) names what the target trainer refuses; such samples are counted."""
    for s in _samples(paths, summary, show_progress):
        conv = _conversation(s, summary)
        if conv is None:
            continue
        meta, images = conv
        problem = turn_problem(meta["messages"]) if turn_problem else None
        if problem:  # skipped here, counted, rather than written and dropped by the trainer unseen
            summary.skip(problem)
            continue
        try:
            if embed:
                safe_join(out, f"images/{s.key}")  # the same key check, though nothing is written
                field = [{"bytes": data, "path": image_file_name(s.key, suffix, data)} for suffix, data in images]
            else:
                field = _write_images(out, s.key, images)
        except ValueError as exc:  # UnicodeEncodeError included
            log.warning("skipping %s: %s", printable(s.key), exc)
            summary.skip("image name clash" if isinstance(exc, ImageClash) else "unsafe key")
            continue
        except OSError as exc:
            if exc.errno != errno.ENAMETOOLONG:
                raise
            summary.skip("key too long for a file name")
            continue
        yield s, meta, field


def _messages(meta: dict) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in meta["messages"]]


def export_llamafactory(paths, out: str, *, name: str = "ddaug", jsonl: bool = False, embed: bool = False,
                        show_progress: bool = True) -> ExportSummary:
    summary = ExportSummary()
    info_path = os.path.join(out, "dataset_info.json")
    info = _read_dataset_info(info_path)  # before anything is written: a broken one stops the export
    records = []
    for s, meta, image_field in _exportable(paths, out, summary, show_progress, embed,
                                            turn_problem=llamafactory_turn_problem):
        rec = {"messages": _messages(meta), "images": image_field}
        if meta.get("tags"):
            rec["tags"] = json.dumps(meta["tags"], sort_keys=True) if embed else meta["tags"]
        records.append(rec)
        summary.written += 1
    if embed:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ExportError("--embed writes parquet and needs pyarrow: pip install pyarrow") from None
        file_name = f"{name}.parquet"
        table = pa.Table.from_pylist(records)
        tmp = os.path.join(out, file_name + ".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, os.path.join(out, file_name))
    elif jsonl:
        file_name = f"{name}.jsonl"
        atomic_write_bytes(os.path.join(out, file_name),
                           "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))
    else:
        file_name = f"{name}.json"
        atomic_write_bytes(os.path.join(out, file_name),
                           json.dumps(records, ensure_ascii=False, indent=1).encode("utf-8"))
    info[name] = {"file_name": file_name, "formatting": "sharegpt",
                  "columns": {"messages": "messages", "images": "images"},
                  "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                           "assistant_tag": "assistant", "system_tag": "system"}}
    atomic_write_json(info_path, info)
    summary.files = [file_name, "dataset_info.json"]
    return summary


def _read_dataset_info(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    try:
        with open(path, "rb") as f:
            info = json.loads(f.read())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path} is not valid JSON ({exc}); fix or remove it") from None
    if not isinstance(info, dict):
        raise ExportError(f"{path} is not a JSON object of datasets; fix or remove it")
    return info


def export_swift(paths, out: str, *, name: str = "ddaug", channel_tag: str = "domain",
                 show_progress: bool = True) -> ExportSummary:
    summary = ExportSummary()
    lines = []
    for s, meta, rels in _exportable(paths, out, summary, show_progress):
        rec: dict[str, Any] = {"messages": _messages(meta), "images": [os.path.join(os.path.abspath(out), r) for r in rels]}
        channel = (meta.get("tags") or {}).get(channel_tag)
        if channel is not None:
            rec["channel"] = str(channel)
        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
        summary.written += 1
    atomic_write_bytes(os.path.join(out, f"{name}.jsonl"), "".join(lines).encode("utf-8"))
    summary.files = [f"{name}.jsonl"]
    return summary


def export_energon(paths, out: str, *, show_progress: bool = True) -> ExportSummary:
    """Link (or copy) the shards into out/ and let Energon index them: its own `prepare` writes
    .nv-meta/ (index, split, dataset.yaml for a CrudeWebdataset a TaskEncoder cooks)."""
    try:
        import megatron.energon  # noqa: F401
    except ImportError:
        raise ExportError("--format energon needs Megatron-Energon: pip install megatron-energon") from None
    summary = ExportSummary()
    out_real = os.path.realpath(out)
    for arg in paths:  # prepare indexes every tar under out: an input there would be indexed twice
        arg_real = os.path.realpath(arg)
        if os.path.commonpath([out_real, arg_real]) in (out_real, arg_real):
            raise ExportError(f"-o {out} and the input {arg} hold one another; export to a folder of its own")
    # First read every shard: a corrupt one, or keys that repeat, stop the export before
    # anything is linked into out.
    plan: list[tuple[str, str]] = []  # (shard, its path under out)
    used: set[str] = set()
    linked: set[str] = set()
    keys: dict[str, str] = {}  # sample key -> the input that has it
    for arg in paths:
        # One subfolder per input: shard sets from different runs share file names.
        folder = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(os.path.normpath(arg))) or "shards"
        folder = folder.removesuffix(".tar")
        n = 1
        while folder in used:
            n += 1
            folder = f"{folder.rsplit('~', 1)[0]}~{n}"
        used.add(folder)
        for shard in find_shards([arg]):
            if os.path.realpath(shard) in linked:
                log.warning("skipping %s: named twice", shard)
                continue
            linked.add(os.path.realpath(shard))
            try:
                shard_keys = [s.key for s in iter_shard(shard)]
            except Exception as exc:
                raise ExportError(f"{shard} is corrupt ({exc}); Energon would refuse it: fix or drop it first") from None
            for key in shard_keys:
                # Energon refuses a dataset whose keys repeat, and its advice (--fix-duplicates)
                # would rewrite the linked tars in place: the user's own shards.
                if key in keys:
                    raise ExportError(f"{arg} and {keys[key]} share sample keys (e.g. {printable(key)}), which "
                                      f"Energon refuses in one dataset: export each to its own folder and "
                                      f"blend them with an Energon metadataset")
                keys[key] = arg
            summary.written += len(shard_keys)
            plan.append((shard, f"{folder}/{os.path.basename(shard)}"))
    for shard, rel in plan:
        target = safe_join(out, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.exists(target):
            os.remove(target)
        try:
            os.link(shard, target)
        except OSError:
            shutil.copy2(shard, target)
    names = [rel for _, rel in plan]
    cmd = [sys.executable, "-m", "megatron.energon.cli.main", "prepare", os.path.abspath(out),
           "--non-interactive", "--split-ratio", "1,0,0", "--sample-type", "CrudeWebdataset",
           "--force-overwrite", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ExportError(f"energon prepare failed: {tail[0]}")
    # prepare wrote a CrudeWebdataset config; name ddaug's sample type instead, so Energon's
    # loaders and `energon info/lint/preview` read the samples without a user cooker.
    from .energon import DATASET_YAML, SAMPLE_LOADER_FILE, SAMPLE_LOADER_SOURCE

    meta_dir = os.path.join(out, ".nv-meta")
    atomic_write_bytes(os.path.join(meta_dir, SAMPLE_LOADER_FILE), SAMPLE_LOADER_SOURCE.encode("utf-8"))
    atomic_write_bytes(os.path.join(meta_dir, "dataset.yaml"),
                       DATASET_YAML.format(loader=SAMPLE_LOADER_FILE).encode("utf-8"))
    summary.files = [f"{len(names)} shard(s)", ".nv-meta/ (sample type ddaug.shards.energon.DdaugChatSample)"]
    return summary


def hf_features():
    """The columns of `--format hf`: the sample's messages, its images in <image> order (any
    count, any format), its tags, and the whole sample json (source, provenance, extra)."""
    try:
        import datasets
    except ImportError:
        raise ExportError("--format hf needs HF datasets: pip install datasets") from None
    text = datasets.Value("string")
    return datasets.Features({"key": text, "messages": [{"role": text, "content": text}],
                              "images": [datasets.Image()],
                              "tags": {"domain": text, "task": text, "stage": text}, "json": text})


def export_hf(paths, out: str, *, name: str = "ddaug", show_progress: bool = True) -> ExportSummary:
    """Stream the samples into {name}.parquet, HF_ROWS_PER_GROUP per row group, with the
    features in the schema so `datasets.load_dataset("parquet", ...)` decodes the images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = hf_features()
    schema = features.arrow_schema
    summary = ExportSummary()
    file_name = f"{name}.parquet"
    tmp = safe_join(out, file_name + ".tmp")
    rows: list[dict] = []
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for s, meta, images in _exportable(paths, out, summary, show_progress, embed=True):
                tags = meta.get("tags") or {}
                rows.append({"key": s.key, "messages": _messages(meta), "images": images,
                             "tags": {k: None if tags.get(k) is None else str(tags[k]) for k in ("domain", "task", "stage")},
                             "json": json.dumps(meta, ensure_ascii=False, sort_keys=True)})
                summary.written += 1
                if len(rows) == HF_ROWS_PER_GROUP:
                    writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                    rows = []
            if rows:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
        os.replace(tmp, os.path.join(out, file_name))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    summary.files = [file_name]
    return summary


def export(paths, fmt: str, out: str, **kwargs) -> ExportSummary:
    """`ddaug export`: write the samples of the shard folders or tars in `paths` into `out` in a
    trainer's format (llamafactory, swift, energon, hf); kwargs are that format's options."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if "name" in kwargs:
        try:
            check_plain_name(kwargs["name"], "--name")
        except ValueError as exc:
            raise ExportError(str(exc)) from None
    fn = {"llamafactory": export_llamafactory, "swift": export_swift, "energon": export_energon,
          "hf": export_hf}[fmt]
    try:
        os.makedirs(out, exist_ok=True)
        return fn(list(paths), out, **kwargs)
    except OSError as exc:  # disk full, permissions: one line, not a traceback
        raise ExportError(f"writing to {out} failed: {exc.strerror or exc}") from None
