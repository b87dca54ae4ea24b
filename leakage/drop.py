"""--drop OUT: the training shards again, without the samples that matched an eval image.

OUT is an ordinary ddaug output folder (shards/store.py): one filtered shard per training shard,
in the order they were read, written under .tmp and renamed when complete, with done markers,
manifest.json, failures.jsonl and run.json. Every kept sample keeps its members byte for byte.
A rerun of the same check resumes; other matches (other eval images, thresholds) need --overwrite.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from ddaug.pipeline.command import UserError, package_versions
from ddaug.shards.store import Failure, OutputFolder, StoreError
from ddaug.shards.units import unit_name
from ddaug.sources.items import printable

from .run import readable_samples

if TYPE_CHECKING:
    from .run import LeakageOptions, Scan

log = logging.getLogger(__name__)

COMMAND = "leakage --drop"
DROP_STAGE = "leakage-drop"   # the ledger's stage for what a filtered shard lost


def _dropped(scan: "Scan") -> dict[str, set[int]]:
    """shard -> the places (in the shard) of the samples to leave out."""
    out: dict[str, set[int]] = {}
    for found in scan.found:
        out.setdefault(found.train.shard, set()).add(found.train.position)
    return out


def _config(opts: "LeakageOptions", scan: "Scan", dropped: dict[str, set[int]]) -> dict[str, Any]:
    """What makes OUT's content: the shards read and the samples left out (by digest, so a rerun
    whose matches differ is refused instead of mixing two answers in one folder)."""
    shards = [os.path.abspath(shard) for shard in scan.shards]   # the same check from another folder is the same
    listing = "\n".join(f"{shard}\t{pos}" for shard, given in zip(shards, scan.shards)
                        for pos in sorted(dropped.get(given, ())))
    return {"train": [printable(shard) for shard in shards],
            "eval": [os.path.abspath(arg) if os.path.exists(arg) else arg for arg in opts.eval],
            "thresholds": vars(opts.thresholds), "embed_model": opts.embed_model,
            "dropped": sum(len(v) for v in dropped.values()),
            "dropped_sha256": hashlib.sha256(listing.encode("utf-8", "surrogateescape")).hexdigest()}


def write_filtered(opts: "LeakageOptions", scan: "Scan") -> dict[str, Any]:
    dropped = _dropped(scan)
    run_info = {"versions": package_versions(), "argv": sys.argv,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        folder = OutputFolder(opts.drop, prefix="shard", command=COMMAND, config=_config(opts, scan, dropped),
                              run_info=run_info, overwrite=opts.overwrite)
    except StoreError as exc:
        raise UserError(f"--drop: {exc}") from None
    summary = {"folder": opts.drop, "shards": [], "kept": 0, "dropped": 0, "resumed": 0}
    try:
        done = {stats["index"]: stats for stats in folder.finished()}
        for index, shard in enumerate(tqdm(scan.shards, unit="shard", desc="leakage drop", disable=opts.quiet)):
            if index in done:
                stats = done[index]
                summary["resumed"] += 1
            else:
                stats = _filter_shard(folder, index, shard, dropped.get(shard, set()))
            kept, gone = stats["samples"], len(dropped.get(shard, ()))
            summary["shards"].append({"train": printable(shard), "filtered": stats["shard"], "kept": kept,
                                      "dropped": gone})
            summary["kept"] += kept
            summary["dropped"] += gone
        folder.refresh_summary()
    except OSError as exc:
        raise UserError(f"--drop: writing to {opts.drop} failed ({exc.strerror or exc}); finished shards are "
                        f"intact, rerun the same command to resume") from None
    finally:
        folder.close()
    return summary


def _filter_shard(folder: OutputFolder, index: int, shard: str, leave_out: set[int]) -> dict[str, Any]:
    started = time.perf_counter()
    unit = unit_name(0, index)  # one unit per training shard, written by this one process
    writer = folder.new_shard(unit)
    covered: list[str] = []
    failures: list[Failure] = []
    try:
        for position, sample in readable_samples(shard, failures, DROP_STAGE,
                                                 "the rest is not in the filtered shard"):
            covered.append(sample.key)
            if position not in leave_out:
                writer.write(sample.key, sample.members)   # the members' bytes as they were
    except BaseException:
        writer.abort()
        raise
    stats = folder.commit_shard(unit, writer, covered_keys=covered, failures=failures,
                                seconds=time.perf_counter() - started)
    if stats is None:  # another run into this folder committed it first: its copy is the one kept
        stats = next(s for s in folder.finished() if s["round"] == 0 and s["index"] == index)
    return stats
