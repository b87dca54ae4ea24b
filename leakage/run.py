"""`ddaug leakage` as a library call: fingerprint the eval images, stream every training shard
past them, write the report (and with --drop, the training shards without the matches)."""

from __future__ import annotations

import collections
import logging
import os
import tarfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from ddaug.pipeline.command import DEFAULT_WORKERS, UserError
from ddaug.shards.inspect import InspectError, find_shards, iter_shard
from ddaug.shards.reading import index_shard
from ddaug.shards.schema import IMAGE_SUFFIXES
from ddaug.shards.store import Failure
from ddaug.sources import ImageDecodeError, SourceError, read_sources
from ddaug.sources.items import make_key, printable
from ddaug.sources.readers import is_output_folder

from .fingerprints import EMBED_SIDE, EvalImage, EvalIndex, LeakageThresholds, Match, fingerprint, preview

log = logging.getLogger(__name__)

EVAL_STAGE, TRAIN_STAGE = "leakage-eval", "leakage-train"


@dataclass
class LeakageOptions:
    """What `ddaug leakage` checks and writes: training shards against eval images, the report
    folder, and optionally a filtered copy of the training shards (`run_leakage(opts)`)."""

    train: tuple[str, ...]           # training shards or folders of them
    eval: tuple[str, ...]            # eval images: folders, files, tars or datasets
    report_dir: str                  # leakage.json, matches.png, failures.jsonl
    drop: str | None = None          # write the training shards without the matches here
    overwrite: bool = False          # --drop: replace an earlier `leakage --drop` output
    media_dir: str | None = None
    thresholds: LeakageThresholds = field(default_factory=LeakageThresholds)
    embed_model: str | None = None
    device: str | None = None
    batch_size: int = 32
    workers: int = DEFAULT_WORKERS
    sheet_rows: int = 50
    quiet: bool = False


@dataclass
class TrainImage:
    """Where one checked training image lives: shard, the sample's place in it, the member."""
    shard: str
    position: int            # the sample's place in the shard (keys may repeat in a foreign tar)
    key: str
    member: str


@dataclass
class Found:
    train: TrainImage
    match: Match
    preview: Any             # PIL thumbnail of the training image, for the contact sheet


@dataclass
class Scan:
    shards: list[str]
    samples: int = 0
    images: int = 0
    found: list[Found] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)



def _ordered_map(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, window: int) -> Iterator:
    """pool.map in input order with a bounded look-ahead: at most `window` results in memory."""
    pending: collections.deque[Future] = collections.deque()
    it = iter(items)
    for item in it:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            break
    while pending:
        yield pending.popleft().result()
        for item in it:  # one more, if any
            pending.append(pool.submit(fn, item))
            break

def _inside(a: str, b: str) -> bool:
    a, b = os.path.realpath(a), os.path.realpath(b)
    return os.path.commonpath([a, b]) == b


def _check_folders(opts: LeakageOptions, shards: list[str]) -> None:
    """The report and --drop folders may not hold, or sit in, what is read, nor each other."""
    read = shards + [arg for arg in opts.eval if os.path.exists(arg)]
    for flag, out in [("-o", opts.report_dir)] + ([("--drop", opts.drop)] if opts.drop else []):
        for path in read:
            if _inside(path, out) or _inside(out, path):
                raise UserError(f"{flag} {out} and the input {path} hold one another; write to a folder of its own")
    if opts.drop and (_inside(opts.drop, opts.report_dir) or _inside(opts.report_dir, opts.drop)):
        raise UserError(f"-o {opts.report_dir} and --drop {opts.drop} hold one another; give two separate folders")
    if os.path.isdir(opts.report_dir) and is_output_folder(opts.report_dir):
        raise UserError(f"-o {opts.report_dir} holds a ddaug run's shards; the report goes to a folder of its own")


# -- the eval side ----------------------------------------------------------------------------------
def _embedding_copy(rgb):
    small = rgb.copy()
    small.thumbnail((EMBED_SIDE, EMBED_SIDE))
    return small


def _fingerprint_ref(item_key: str, ref, for_embedding: bool):
    """(the eval image, its picture for the embedding model or None)."""
    try:
        data = ref.read()
    except OSError as exc:
        raise ImageDecodeError(f"unreadable: {exc.strerror or exc}") from None
    fp, rgb = fingerprint(data, crops=True)
    return EvalImage(item_key, ref, fp), _embedding_copy(rgb) if for_embedding else None


def load_eval(opts: LeakageOptions, failures: list[Failure], embedder=None) -> tuple[list[EvalImage], np.ndarray | None]:
    """The usable eval images (the others go to failures), and with an embedder their embeddings."""
    try:
        items = read_sources(opts.eval, opts.media_dir)
    except SourceError as exc:
        raise UserError(f"--eval: {exc}") from None
    jobs = []
    for item in items:
        if item.error:
            failures.append(Failure(item.key, item.uri, EVAL_STAGE, item.error))
        else:
            jobs.extend((item.key, ref) for ref in item.images)
    images: list[EvalImage] = []
    pictures, embeddings = [], []   # pictures wait for the model one batch at a time
    with ThreadPoolExecutor(opts.workers, thread_name_prefix="eval") as pool:
        fingerprinted = _ordered_map(pool, lambda job: _attempt(_fingerprint_ref, *job, embedder is not None),
                                          jobs, 4 * opts.workers)
        for (key, ref), (result, problem) in tqdm(zip(jobs, fingerprinted), total=len(jobs), unit="img",
                                                  desc="leakage eval", disable=opts.quiet, dynamic_ncols=True):
            if problem:
                log.warning("eval image %s skipped: %s", ref.uri, problem)
                failures.append(Failure(key, ref.uri, EVAL_STAGE, problem))
                continue
            image, picture = result
            images.append(image)
            if picture is not None:
                pictures.append(picture)
                if len(pictures) == opts.batch_size:
                    embeddings.append(embedder.embed(pictures))
                    pictures = []
    if pictures:
        embeddings.append(embedder.embed(pictures))
    if not images:
        reasons = "; ".join(sorted({f.reason for f in failures})[:3]) or "no images"
        raise UserError(f"--eval {' '.join(opts.eval)}: no usable eval image ({reasons})")
    return images, np.concatenate(embeddings) if embeddings else None


def _attempt(fn, *args):
    """(fn's result, None), or (None, the reason) when the picture cannot be used."""
    try:
        return fn(*args), None
    except ImageDecodeError as exc:
        return None, str(exc)


# -- the training side ------------------------------------------------------------------------------
def _image_members(sample) -> list[str]:
    return sorted(s for s in sample.members if s.rsplit(".", 1)[-1].lower() in IMAGE_SUFFIXES)


def _count_images(shards: list[str]) -> int:
    """Image members in the shards, from their headers alone: the progress bar's total."""
    total = 0
    for shard in shards:
        samples, _ = index_shard(shard)
        total += sum(1 for s in samples for suffix, _, _ in s.members
                     if suffix.rsplit(".", 1)[-1].lower() in IMAGE_SUFFIXES)
    return total


def readable_samples(shard: str, failures: list[Failure], stage: str, lost: str) -> Iterator[tuple[int, Any]]:
    """(place, sample) of a shard in order; an unreadable tail ends it as one failure, saying
    what happens to the `lost` samples. Errors of whoever consumes the samples pass through."""
    position = -1
    try:
        for position, sample in enumerate(iter_shard(shard)):
            yield position, sample
    except (tarfile.TarError, OSError, EOFError) as exc:
        reason = f"shard unreadable after {position + 1} samples ({exc}); {lost}"
        log.warning("%s: %s", shard, reason)
        failures.append(Failure(make_key("truncated", shard + "#truncated"), printable(shard), stage, reason))


def _train_images(scan: Scan) -> Iterator[tuple[TrainImage, bytes]]:
    """Every image member of every shard, in order."""
    for shard in scan.shards:
        for position, sample in readable_samples(shard, scan.failures, TRAIN_STAGE, "the rest was not checked"):
            scan.samples += 1
            for suffix in _image_members(sample):
                yield TrainImage(shard, position, sample.key, f"{sample.key}.{suffix}"), sample.members[suffix]


def _check_train(index: EvalIndex, for_embedding: bool, data: bytes):
    """(matches, preview when matched, picture for the embedding model when not)."""
    fp, rgb = fingerprint(data, crops=False)
    matches = index.match(fp)
    if matches:
        return matches, preview(rgb), None
    return matches, None, _embedding_copy(rgb) if for_embedding else None


def scan_train(shards: list[str], index: EvalIndex, embedder, opts: LeakageOptions) -> Scan:
    scan = Scan(shards)
    pending: list[tuple[TrainImage, Any]] = []   # waiting for the embedding model, one batch at most

    def embed_pending() -> None:
        pictures = [p for _, p in pending]
        for (train, picture), matches in zip(pending, index.match_embeddings(embedder.embed(pictures))):
            add(train, matches, preview(picture) if matches else None)
        pending.clear()

    def add(train: TrainImage, matches: list[Match], small_preview) -> None:
        for m in matches:  # pictures only for the rows the contact sheet draws: memory stays flat
            scan.found.append(Found(train, m, small_preview if len(scan.found) < opts.sheet_rows else None))

    bar = tqdm(total=_count_images(shards), unit="img", desc="leakage train", disable=opts.quiet,
               dynamic_ncols=True, smoothing=0.1)

    def check(job: tuple[TrainImage, bytes]):
        return job[0], _attempt(_check_train, index, embedder is not None, job[1])

    with bar, ThreadPoolExecutor(opts.workers, thread_name_prefix="train") as pool:
        for train, (result, problem) in _ordered_map(pool, check, _train_images(scan), 4 * opts.workers):
            bar.update()
            scan.images += 1
            if problem:
                log.info("%s:%s not checked: %s", train.shard, train.member, problem)
                scan.failures.append(Failure(train.key, printable(f"{train.shard}#{train.member}"), TRAIN_STAGE,
                                             f"not checked: {problem}"))
                continue
            matches, small_preview, picture = result
            add(train, matches, small_preview)
            if picture is not None:
                pending.append((train, picture))
                if len(pending) >= opts.batch_size:
                    embed_pending()
        if pending:
            embed_pending()
    return scan


def _load_embedder(opts: LeakageOptions):
    if not opts.embed_model:
        return None
    from ddaug.pipeline.placement import DeviceError, resolve_placement

    from .embed import ImageEmbedder

    try:
        device = resolve_placement(0, 1, opts.device).device
    except DeviceError as exc:
        raise UserError(f"--device {exc}") from None
    return ImageEmbedder(opts.embed_model, device, opts.batch_size)


def run_leakage(opts: LeakageOptions) -> dict[str, Any]:
    """Check, write the report (and --drop's shards); returns the report as written."""
    from .drop import write_filtered
    from .report import write_report

    start = time.perf_counter()
    try:
        shards = find_shards(opts.train)
    except InspectError as exc:
        raise UserError(f"--train: {exc}") from None
    _check_folders(opts, shards)
    try:
        os.makedirs(opts.report_dir, exist_ok=True)
    except OSError as exc:
        raise UserError(f"-o {opts.report_dir}: cannot create it ({exc.strerror or exc})") from None
    embedder = _load_embedder(opts)  # a model that does not load stops the run before any work
    failures: list[Failure] = []
    images, embeddings = load_eval(opts, failures, embedder)
    index = EvalIndex(images, opts.thresholds)
    index.embeddings = embeddings
    eval_done = time.perf_counter()
    scan = scan_train(shards, index, embedder, opts)
    scan_done = time.perf_counter()
    drop = write_filtered(opts, scan) if opts.drop else None
    seconds = {"eval": round(eval_done - start, 2), "train": round(scan_done - eval_done, 2),
               "total": round(time.perf_counter() - start, 2)}
    try:
        return write_report(opts, images, scan, failures + scan.failures, drop, seconds)
    except OSError as exc:
        raise UserError(f"-o {opts.report_dir}: writing the report failed ({exc.strerror or exc})") from None

