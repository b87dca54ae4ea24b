"""What every shard-writing command does around its stage: read sources, place this process,
open the output folder, read or write the plan, build the stage (models load last, after the
cheap checks), then take the plan's units by lease until all are committed (shards/units.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable

from ddaug.shards.store import OutputFolder
from ddaug.shards.units import DEFAULT_LEASE_TIMEOUT, PlanError, UnitQueue, Worker, plan_work
from ddaug.sources import SourceItem, read_sources

from .job import Job, JobAbort, JobSummary, Stage
from .passthrough import drop_text_only
from .placement import DeviceError, Placement, launcher_joins, resolve_placement

log = logging.getLogger(__name__)


DEFAULT_BATCH_SIZE = 8  # --batch-size auto, for stages that do not choose one


class UserError(Exception):
    """A problem the user can fix; shown as one line, never a traceback."""


# Threads for reading/decoding and, as many again, for encoding outputs. Four kept up with one
# GPU at 30 img/s; at 40 img/s on COCO-sized images the PNG encoding of the last batches held
# the GPU idle at the end of each shard, and 8 threads ran 42.2 img/s against 41.3 (bench/RESULTS.md,
# "Fused VAE norms and a host that does not wait"). More than the machine's cores would only contend.
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
    join: bool = False             # help workers already on the folder (a launcher's WORLD_SIZE > 1 implies it)
    plan_only: bool = False        # write the plan and exit (a submit step before the workers start)
    lease_timeout: float = DEFAULT_LEASE_TIMEOUT  # seconds without a heartbeat before a unit is taken over


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("ddaug", "torch", "diffusers", "transformers", "webdataset", "pillow", "accelerate"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _config_digest(command: str, config: dict[str, Any]) -> str:
    """What the plan records of the config: workers that start together must agree on it."""
    text = json.dumps({"command": command, "config": config}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
    join = opts.join or launcher_joins(placement)
    if opts.overwrite and join and not opts.plan_only:
        raise UserError("--overwrite cannot be given to workers that join each other (--join, or a launcher's "
                        "WORLD_SIZE > 1, or a Slurm array): start fresh once with --overwrite --plan-only, "
                        "then start the workers")
    if not (opts.lease_timeout > 0):
        raise UserError(f"--lease-timeout must be a positive number of seconds, not {opts.lease_timeout}")
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
                          run_info=run_info, overwrite=opts.overwrite, join=join)
    if dropped:
        folder.run_counts["text_only_dropped"] = dropped
    digest = _config_digest(command, config)
    worker = None
    try:
        work = plan_work(folder, items, opts.shard_size, digest, retry=opts.retry_failures)
        if opts.plan_only:
            summary = JobSummary(total=work.total, skipped=work.skipped, plan=work)
            return summary
        worker = Worker(opts.output, timeout=opts.lease_timeout,
                        label=f"rank {placement.rank}" if opts.rank is not None or placement.world_size > 1 else None)
        worker.start()
        if len(work.units) and placement.world_size > len(work.units):
            log.warning("%d unit(s) left for %d processes: some will have nothing to do; a smaller "
                        "--shard-size spreads the work", len(work.units), placement.world_size)
        if opts.retry_failures:
            log.info("retrying %d failed input(s) from %s/failures.jsonl", sum(u.count for u in work.units),
                     opts.output)
        if work.units:  # models load only when there is something to do
            stage = make_stage(placement)
            batch_size = opts.batch_size or getattr(stage, "batch_size", None) or DEFAULT_BATCH_SIZE
            job = Job(stage, folder, batch_size=batch_size, workers=opts.workers, show_progress=not opts.quiet)
            summary = job.run(UnitQueue(worker, work.units, folder.marker_name), work)
        else:
            summary = JobSummary(total=work.total, skipped=work.skipped)
        if work.pending:
            log.warning("%d input(s) were never processed; --retry-failures retries only failures: "
                        "rerun without it to process them", work.pending)
            summary.counts["new inputs left for a plain rerun"] = work.pending
        if dropped:
            summary.counts["text-only dropped"] = dropped
        folder.sweep()
        folder.refresh_summary()  # after seeing every unit committed: the complete summary
        worker.stop()  # last: an exited worker's temporary files are anyone's to remove
    except PlanError as exc:
        raise UserError(str(exc)) from None
    except JobAbort as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        # Disk full, folder removed, permissions changed mid-run: finished shards are complete
        # (atomic links), the unfinished one was discarded, and a rerun resumes.
        where = f": {exc.filename}" if exc.filename else ""
        raise UserError(f"writing to {opts.output} failed ({exc.strerror or exc}{where}); finished shards "
                        f"are intact, rerun the same command to resume") from None
    finally:
        if worker is not None:
            worker.stop()
        folder.close()
    manifest = folder.manifest_counts()
    if (summary.total and manifest["samples"] == 0 and manifest["failed"] and summary.skipped == 0
            and not opts.retry_failures):
        raise UserError(f"nothing could be processed: all {manifest['failed']} inputs failed "
                        f"(see {opts.output}/failures.jsonl)")
    return summary
