"""What every shard-writing command does around its stage: read sources, place this process,
open the output folder, build the stage (models load last, after the cheap checks), run."""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable

from ddaug.shards.store import OutputFolder
from ddaug.sources import SourceItem, read_sources

from .job import Job, JobAbort, JobSummary, Stage
from .passthrough import drop_text_only
from .placement import DeviceError, Placement, resolve_placement

log = logging.getLogger(__name__)


DEFAULT_BATCH_SIZE = 8  # --batch-size auto, for stages that do not choose one


class UserError(Exception):
    """A problem the user can fix; shown as one line, never a traceback."""


# Threads for reading/decoding and, as many again, for encoding outputs. Four kept up with one
# GPU at 30 img/s; at 40 img/s on COCO-sized images the PNG encoding of the last batches held
# the GPU idle at the end of each shard, and 8 threads ran 42.2 img/s against 41.3 (bench/RESULTS.md,
# session 6). More than the machine's cores would only contend.
DEFAULT_WORKERS = max(4, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                             else os.cpu_count() or 4))  # the CPUs this process may use (taskset, SLURM)


@dataclass
class RunOptions:
    """What every shard-writing command shares: its inputs, the output folder, and how the work
    is placed, batched, seeded and resumed. run_augment, run_caption, run_translate and
    run_score take it with their own options."""

    inputs: tuple[str, ...]
    output: str
    media_dir: str | None = None
    device: str | None = None
    batch_size: int | None = None  # None: the stage's own choice (augment fits it to GPU memory)
    shard_size: int = 1000
    seed: int = 0
    prefix: str = "shard"
    workers: int = DEFAULT_WORKERS
    rank: int | None = None
    world_size: int | None = None
    overwrite: bool = False
    quiet: bool = False
    retry_failures: bool = False
    drop_text_only: bool = False   # leave out records without images instead of passing them through


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("ddaug", "torch", "diffusers", "transformers", "webdataset", "pillow", "accelerate"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def execute(command: str, opts: RunOptions, config: dict[str, Any],
            make_stage: Callable[[Placement], Stage],
            derive_items: Callable[[list[SourceItem]], list[SourceItem]] | None = None) -> JobSummary:
    """Run a stage over the inputs into opts.output. derive_items maps the inputs read to the
    samples the job makes, for a command whose samples are not one per input (translate keys
    its translations apart, and with --mix-original makes two samples of each input)."""
    if opts.retry_failures and opts.overwrite:
        raise UserError("--retry-failures and --overwrite contradict each other: pick one")
    try:
        placement = resolve_placement(opts.rank, opts.world_size, opts.device)
    except DeviceError as exc:
        raise UserError(f"--device {exc}") from None
    except ValueError as exc:
        raise UserError(f"--rank/--world-size: {exc}") from None
    items = read_sources(opts.inputs, opts.media_dir, exclude=[opts.output])  # never our own output
    dropped = 0
    if opts.drop_text_only:
        items, dropped = drop_text_only(items)
        config = {**config, "drop_text_only": True}  # absent otherwise: older folders still resume
        log.info("left out %d text-only record(s) (--drop-text-only)", dropped)
    if not items:
        raise UserError(f"no input images found in {', '.join(opts.inputs)}")
    if derive_items is not None:
        items = derive_items(items)
    run_info = {"versions": package_versions(), "argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    folder = OutputFolder(opts.output, prefix=opts.prefix, command=command, config=config,
                          run_info=run_info, rank=placement.rank, overwrite=opts.overwrite)
    if dropped:
        folder.run_counts["text_only_dropped"] = dropped
    try:
        stage = make_stage(placement)
        batch_size = opts.batch_size or getattr(stage, "batch_size", None) or DEFAULT_BATCH_SIZE
        job = Job(stage, folder, shard_size=opts.shard_size, batch_size=batch_size,
                  rank=placement.rank, world_size=placement.world_size, workers=opts.workers,
                  show_progress=not opts.quiet)
        retry = folder.failed_keys() if opts.retry_failures else None
        if retry is not None:
            log.info("retrying %d failed input(s) from %s/failures.jsonl", len(retry), opts.output)
        summary = job.run(items, retry_keys=retry)
        if dropped:
            summary.counts["text-only dropped"] = dropped
        folder.refresh_summary()
    except JobAbort as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        # Disk full, folder removed, permissions changed mid-run: finished shards are complete
        # (atomic renames), the unfinished one was discarded, and a rerun resumes.
        raise UserError(f"writing to {opts.output} failed ({exc.strerror or exc}); finished shards "
                        f"are intact, rerun the same command to resume") from None
    finally:
        folder.close()
    if summary.total and summary.done == 0 and summary.skipped == 0 and not opts.retry_failures:
        raise UserError(f"nothing could be processed: all {summary.failed} inputs failed "
                        f"(see {opts.output}/failures.jsonl)")
    return summary
