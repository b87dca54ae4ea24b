"""Reading shards back for people and scripts: summary, verification, one sample, contact sheet."""

from __future__ import annotations

import collections
import glob
import io
import json
import logging
import math
import os
import statistics
import tarfile
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageDraw

from ddaug.sources.items import MAX_INPUT_BYTES, open_regular, printable
from ddaug.sources.readers import _split_member_name, expand_input, missing_tar_end

from ddaug.scoring.summary import SUMMARY_FIELDS, plot_scores, sample_score, score_quantiles

from .schema import IMAGE_SUFFIXES, validate_sample
from .store import FAILURES, MANIFEST, RUN_FILE, STATS_SUFFIX, shard_stem
from .units import progress as units_progress

log = logging.getLogger(__name__)


class InspectError(Exception):
    pass


@dataclass
class ShardSample:
    shard: str
    key: str
    members: dict[str, bytes]

    @property
    def meta(self) -> Any:
        return json.loads(self.members["json"].decode("utf-8")) if "json" in self.members else None

    def image_members(self) -> list[str]:
        return sorted(s for s in self.members if s.rsplit(".", 1)[-1].lower() in IMAGE_SUFFIXES)


def find_shards(paths: tuple[str, ...] | list[str]) -> list[str]:
    found = []
    for arg in paths:
        for p in expand_input(arg):
            if os.path.isdir(p):
                # Only plain files: opening a FIFO named *.tar would block forever.
                found.extend(sorted(t for t in glob.glob(os.path.join(glob.escape(p), "*.tar")) if os.path.isfile(t)))
            elif os.path.isfile(p):
                found.append(p)
            elif os.path.exists(p):
                raise InspectError(f"{p} is not a plain file")
            else:
                raise InspectError(f"no such shard or folder: {p}")
    if not found:
        raise InspectError(f"no .tar shards in {', '.join(paths)}")
    # A folder named twice (or a folder and one of its tars) would be read, and exported, twice.
    unique, seen = [], set()
    for p in found:
        real = os.path.realpath(p)
        if real in seen:
            log.warning("skipping %s: named twice", p)
            continue
        seen.add(real)
        unique.append(p)
    return unique


def iter_shard(path: str) -> Iterator[ShardSample]:
    """Samples of one tar, members grouped by key. Raises tarfile/OS errors on corruption
    after yielding what was readable."""
    current: ShardSample | None = None
    with tarfile.open(path, mode="r:") as tf:
        for member in tf:
            if not member.isfile():
                continue
            key, suffix = _split_member_name(member.name)
            if member.size > MAX_INPUT_BYTES:  # a crafted header must not make us read gigabytes
                raise tarfile.ReadError(f"member {member.name} of {member.size} bytes is over the limit")
            f = tf.extractfile(member)
            data = f.read() if f else b""
            if len(data) != member.size:
                raise tarfile.ReadError(f"member {member.name} cut short")
            if current is None or current.key != key:
                if current is not None:
                    yield current
                current = ShardSample(path, key, {})
            current.members[suffix] = data
        cut = missing_tar_end(tf, path)
    if current is not None:
        yield current
    if cut:
        raise tarfile.ReadError(cut)


def _size_bucket(w: int, h: int) -> str:
    side = max(w, h)
    for limit in (256, 512, 1024, 2048):
        if side <= limit:
            return f"<={limit}"
    return ">2048"


@dataclass
class Report:
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    formats: collections.Counter = field(default_factory=collections.Counter)
    sizes: collections.Counter = field(default_factory=collections.Counter)
    tags: dict[str, collections.Counter] = field(default_factory=lambda: collections.defaultdict(collections.Counter))
    turns: list[int] = field(default_factory=list)
    answer_chars: list[int] = field(default_factory=list)
    questions: collections.Counter = field(default_factory=collections.Counter)
    pools: collections.Counter = field(default_factory=collections.Counter)
    completion_tokens: list[int] = field(default_factory=list)
    flags: collections.Counter = field(default_factory=collections.Counter)
    failures: collections.Counter = field(default_factory=collections.Counter)
    problems: list[str] = field(default_factory=list)
    scores: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))  # `score` blocks
    progress: dict[str, Any] = field(default_factory=dict)  # folder -> its job's units and workers

    def to_json(self) -> dict[str, Any]:
        def stats(xs):
            return ({"min": min(xs), "mean": round(statistics.fmean(xs), 2), "max": max(xs)} if xs else None)
        return {"shards": self.shards, "samples": self.samples, "bytes": self.bytes,
                "formats": dict(self.formats), "sizes": dict(sorted(self.sizes.items())),
                "tags": {k: dict(v) for k, v in self.tags.items()}, "turns": stats(self.turns),
                "answer_chars": stats(self.answer_chars), "question_ids": dict(self.questions),
                "pools": dict(self.pools), "completion_tokens": stats(self.completion_tokens),
                "flags": dict(self.flags), "failures": dict(self.failures), "problems": self.problems,
                "scores": {k: score_quantiles(v) for k, v in self.scores.items() if v},
                "progress": self.progress}


def _check_image(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.size


def job_progress(paths) -> dict[str, Any]:
    """For each named folder that holds a plan: its units (committed, leased by whom, expired,
    pending) and its workers (host, pid, units committed, current unit, last heartbeat)."""
    out = {}
    for arg in paths:
        if not os.path.isdir(arg):
            continue
        try:
            config = json.loads(open(os.path.join(arg, RUN_FILE), "rb").read()).get("config") or {}
        except (OSError, ValueError, AttributeError):
            config = {}
        prefix = config.get("prefix", "shard") if isinstance(config, dict) else "shard"
        got = units_progress(arg, lambda unit: shard_stem(prefix, unit) + STATS_SUFFIX)
        if got is not None:
            out[arg] = got
    return out


def inspect_shards(paths, verify: bool = False) -> Report:
    """`ddaug inspect`: count the shards, samples, formats, sizes, tags and failures under
    `paths`; with `verify`, decode every sample and check it and the manifest (`problems`)."""
    rep = Report()
    rep.progress = job_progress(paths)
    try:
        shard_paths = find_shards(paths)
    except InspectError:
        if not rep.progress:  # a job that has committed no shard yet still has progress to show
            raise
        shard_paths = []
    folders = {os.path.dirname(os.path.abspath(p)) for p in shard_paths}
    for shard in shard_paths:
        rep.shards += 1
        rep.bytes += os.path.getsize(shard)
        seen: set[str] = set()
        try:
            for s in iter_shard(shard):
                _summarise(rep, s, verify, seen)
        except (tarfile.TarError, OSError, EOFError) as exc:
            rep.problems.append(f"{shard}: unreadable tar ({exc})")
    for folder in sorted(folders):
        _read_failures(rep, folder)
        if verify:
            _check_manifest(rep, folder, shard_paths)
    return rep


def _summarise(rep: Report, s: ShardSample, verify: bool, seen: set[str]) -> None:
    where = printable(f"{s.shard}:{s.key}")  # names of any bytes; printed and written as UTF-8
    if s.key in seen:
        rep.problems.append(f"{where}: duplicate key in shard")
    seen.add(s.key)
    rep.samples += 1
    try:
        meta = s.meta
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        rep.problems.append(f"{where}: json does not parse ({exc})")
        return
    if meta is None:
        rep.problems.append(f"{where}: no json member")
        return
    for name in s.image_members():
        rep.formats[name.rsplit(".", 1)[-1]] += 1
    for src in (meta.get("source") or {}).get("images", []) if isinstance(meta, dict) else []:
        if isinstance(src, dict) and "width" in src:
            w, h = src.get("resized_to") or (src["width"], src["height"])
            rep.sizes[_size_bucket(w, h)] += 1
    if isinstance(meta, dict):
        for k, v in (meta.get("tags") or {}).items():
            rep.tags[k][str(v)] += 1
        msgs = meta.get("messages") or []
        rep.turns.append(len(msgs))
        answers = [m.get("content", "") for m in msgs if isinstance(m, dict) and m.get("role") == "assistant"]
        if answers:
            rep.answer_chars.append(sum(len(a) for a in answers))
        cap = meta.get("caption")
        if isinstance(cap, dict):
            if cap.get("question_id"):
                rep.questions[cap["question_id"]] += 1
            if cap.get("pool"):
                rep.pools[cap["pool"]] += 1
            if isinstance(cap.get("completion_tokens"), int):
                rep.completion_tokens.append(cap["completion_tokens"])
            for flag in cap.get("flags", []):
                rep.flags[flag] += 1
        for name in SUMMARY_FIELDS:
            value = sample_score(meta, name)
            if value is not None:
                rep.scores[name].append(value)
    if verify:
        for problem in validate_sample(s.key, meta, set(s.members)):
            rep.problems.append(f"{where}: {problem}")
        for name in s.image_members():
            try:
                _check_image(s.members[name])
            except Exception as exc:
                rep.problems.append(f"{where}: image {name} does not decode ({exc})")


def _read_failures(rep: Report, folder: str) -> None:
    path = os.path.join(folder, FAILURES)
    if not os.path.exists(path):
        return
    try:
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (ValueError, UnicodeDecodeError):
                    record = None
                if not isinstance(record, dict):
                    rep.problems.append(f"{path}: line {n} is not a failure record")
                    continue
                rep.failures[str(record.get("stage", "?"))] += 1
    except OSError as exc:
        rep.problems.append(f"{path}: unreadable ({exc.strerror or exc})")


def _read_manifest(rep: Report, path: str) -> dict[str, dict] | None:
    """The manifest's shards by name, or None (and a problem) when it is not ddaug's manifest."""
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read())
        entries = manifest["shards"]
        return {e["name"]: e for e in entries if e["name"]}
    except OSError as exc:
        rep.problems.append(f"{path}: unreadable ({exc.strerror or exc})")
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as exc:
        rep.problems.append(f"{path}: not a ddaug manifest ({type(exc).__name__}: {exc})")
    return None


def _check_manifest(rep: Report, folder: str, shard_paths: list[str]) -> None:
    path = os.path.join(folder, MANIFEST)
    if os.path.exists(os.path.join(folder, RUN_FILE)):
        # A ddaug output folder: a tar without its done marker is an unfinished shard (a run
        # died between the rename and the marker); its samples are not counted as done.
        for p in shard_paths:
            if (os.path.dirname(os.path.abspath(p)) == folder and p.endswith(".tar")
                    and not os.path.exists(p[:-4] + STATS_SUFFIX)):
                rep.problems.append(f"{p}: no done marker ({os.path.basename(p)[:-4]}{STATS_SUFFIX}); "
                                    f"rerun the command that made it to finish it")
        if not os.path.exists(path):
            rep.problems.append(f"{folder}: no {MANIFEST}")
    if not os.path.exists(path):
        return
    import hashlib

    listed = _read_manifest(rep, path)
    if listed is None:
        return
    on_disk = {os.path.basename(p) for p in shard_paths if os.path.dirname(os.path.abspath(p)) == folder}
    for name in sorted(on_disk - set(listed)):
        rep.problems.append(f"{folder}/{name}: not in manifest.json")
    for name, entry in sorted(listed.items()):
        p = os.path.join(folder, name)
        if not os.path.exists(p):
            rep.problems.append(f"{p}: listed in manifest.json but missing")
            continue
        with open(p, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != entry.get("sha256"):
            rep.problems.append(f"{p}: sha256 differs from manifest.json")


def find_sample(paths, key: str) -> ShardSample:
    for shard in find_shards(paths):
        try:
            for s in iter_shard(shard):
                if s.key == key:
                    return s
        except (tarfile.TarError, OSError):
            continue
    raise InspectError(f"no sample with key {key!r}")


def sample_json(sample: ShardSample) -> Any:
    try:
        return sample.meta
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InspectError(f"{sample.shard}:{sample.key}: json does not parse ({exc})") from None


def _write_output(path: str, write) -> None:
    """A file the user named (--save-image, --preview): one line when it cannot be written."""
    try:
        write(path)
    except OSError as exc:
        raise InspectError(f"cannot write {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # Pillow: an extension it cannot encode
        raise InspectError(f"cannot write {path}: {exc}") from None


def save_first_image(sample: ShardSample, path: str) -> None:
    names = sample.image_members()
    if not names:
        raise InspectError(f"sample {sample.key!r} has no image member (a text-only sample)")

    def write(p: str) -> None:
        with open(p, "wb") as f:
            f.write(sample.members[names[0]])
    _write_output(path, write)


def scores_plot(report: Report, path: str) -> int:
    """Histograms of the report's scores as a PNG; the number of scored samples."""
    if not report.scores.get("loss"):
        raise InspectError("no scored samples to plot (make them with `ddaug score`)")
    _write_output(path, lambda p: plot_scores(report.scores, p))
    return len(report.scores["loss"])


# -- contact sheet ---------------------------------------------------------------------------------
def _read_source(uri: str) -> Image.Image | None:
    """The original image when it is still readable: a file path, `tar#member`, or a parquet/arrow
    `file#row/column/index` (paths in the cell relative to the file)."""
    from ddaug.sources.parquet import TableImageRef, is_table_file

    try:
        # The uri comes from a sample's json: read only plain files, of bounded size.
        if "#" in uri and uri.split("#", 1)[0].endswith(".tar"):
            tar_path, member = uri.split("#", 1)
            with open_regular(tar_path, None) as fh, tarfile.open(fileobj=fh, mode="r:") as tf:
                info = tf.getmember(member)
                if info.size > MAX_INPUT_BYTES:
                    return None
                data = tf.extractfile(info).read()
        elif "#" in uri and is_table_file(uri.split("#", 1)[0]):  # file.parquet#row/column/index
            path, place = uri.split("#", 1)
            row, column, index = place.split("/")
            data = TableImageRef(uri=uri, path=path, column=column, row=int(row), index=int(index),
                                 base=os.path.dirname(path)).read()
        else:
            with open_regular(uri) as f:
                data = f.read()
        from ddaug.sources import decode_image

        return decode_image(data)[0]
    except Exception:
        return None


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def contact_sheet(paths, out_path: str, limit: int = 12, thumb: int = 256) -> int:
    """Rows of [source | output] thumbnails with PSNR, for a person to look at."""
    rows = []
    for shard in find_shards(paths):
        try:
            for s in iter_shard(shard):
                try:
                    meta = s.meta
                except ValueError:  # json that does not parse: show the output alone
                    meta = None
                if not isinstance(meta, dict):
                    meta = {}
                for i, name in enumerate(s.image_members()):
                    try:
                        out_img = Image.open(io.BytesIO(s.members[name])).convert("RGB")
                    except OSError:
                        continue  # --verify names undecodable images; the sheet shows the rest
                    src_info = (meta.get("source") or {}).get("images", [])
                    entry = src_info[i] if i < len(src_info) and isinstance(src_info[i], dict) else {}
                    src = _read_source(entry["uri"]) if "uri" in entry else None
                    label = s.key
                    if src is not None:
                        if src.size != out_img.size:
                            src = src.resize(out_img.size, Image.Resampling.LANCZOS)
                        label += f"  PSNR {psnr(np.asarray(src), np.asarray(out_img)):.1f} dB"
                    rows.append((src, out_img, label))
                    if len(rows) >= limit:
                        break
                if len(rows) >= limit:
                    break
        except (tarfile.TarError, OSError):
            continue
        if len(rows) >= limit:
            break
    if not rows:
        raise InspectError("no samples to preview")
    _write_output(out_path, pair_sheet(rows, "source | ddaug output", thumb).save)
    return len(rows)


def pair_sheet(rows: list[tuple[Image.Image | None, Image.Image, str]], title: str, thumb: int = 256) -> Image.Image:
    """A contact sheet: one row per (left, right, label), the two pictures side by side as
    thumbnails under the label; a missing left picture is drawn as an empty frame."""
    pad, label_h = 8, 18
    sheet = Image.new("RGB", (2 * thumb + 3 * pad, len(rows) * (thumb + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 0), title, fill="black")
    for r, (left, right, label) in enumerate(rows):
        y = pad + r * (thumb + label_h + pad) + label_h // 2
        for c, img in enumerate((left, right)):
            x = pad + c * (thumb + pad)
            if img is None:
                draw.rectangle([x, y + label_h, x + thumb, y + label_h + thumb], outline="gray")
                draw.text((x + 8, y + label_h + thumb // 2), "source not readable", fill="gray")
                continue
            t = img.copy()
            t.thumbnail((thumb, thumb))
            sheet.paste(t, (x, y + label_h))
        draw.text((pad, y + 2), label, fill="black")
    return sheet
