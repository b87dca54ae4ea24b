"""The report folder: leakage.json (every match), matches.png (each eval image beside its copy in
training), failures.jsonl (inputs skipped, with the reason), and the summary paragraph."""

from __future__ import annotations

import collections
import json
import os
from typing import TYPE_CHECKING, Any

from ddaug.shards.inspect import pair_sheet
from ddaug.shards.store import FAILURES, Failure
from ddaug.shards.writer import TMP_SUFFIX, atomic_write_bytes, atomic_write_json
from ddaug.sources import ImageDecodeError, decode_image
from ddaug.sources.items import printable

from .fingerprints import STAGES, EvalImage
from .hashing import CROPS, HASH_BITS
from .run import EVAL_STAGE, TRAIN_STAGE

if TYPE_CHECKING:
    from .run import LeakageOptions, Scan

REPORT = "leakage.json"
SHEET = "matches.png"
SHEET_THUMB = 192


def _match_json(found, images: list[EvalImage]) -> dict[str, Any]:
    image = images[found.match.eval_position]
    entry = {"eval": image.ref.uri, "eval_key": image.key, "train_shard": printable(found.train.shard),
             "train_key": printable(found.train.key), "train_member": printable(found.train.member),
             "train_position": found.train.position, "stage": found.match.stage}
    for name in ("distance", "correlation", "similarity"):
        value = getattr(found.match, name)
        if value is not None:
            entry[name] = value
    return entry


def _label(entry: dict[str, Any]) -> str:
    how = entry["stage"]
    if "distance" in entry:
        how += f" d={entry['distance']} r={entry['correlation']:.2f}"
    if "similarity" in entry:
        how += f" cos={entry['similarity']:.3f}"
    name = os.path.basename(entry["eval"].split("#")[-1])
    return f"{name[:28]} | {os.path.basename(entry['train_shard'])}:{entry['train_key'][:28]}  {how}"


def _eval_picture(image: EvalImage):
    try:
        return decode_image(image.ref.read())[0]
    except (OSError, ImageDecodeError):
        return None  # gone since it was fingerprinted: the sheet shows an empty frame


def _write_sheet(path: str, scan: "Scan", entries: list[dict[str, Any]], images: list[EvalImage],
                 rows: int) -> bool:
    if not entries:
        if os.path.isfile(path):
            os.remove(path)  # an earlier run's sheet would show matches this run did not find
        return False
    sheet_rows = [(_eval_picture(images[found.match.eval_position]), found.preview, _label(entry))
                  for found, entry in zip(scan.found[:rows], entries[:rows])]
    sheet = pair_sheet(sheet_rows, "eval image | training copy", SHEET_THUMB)
    tmp = f"{path}{TMP_SUFFIX}-{os.getpid()}"
    sheet.save(tmp, format="PNG")
    os.replace(tmp, path)
    return True


def write_report(opts: "LeakageOptions", images: list[EvalImage], scan: "Scan", failures: list[Failure],
                 drop: dict[str, Any] | None, seconds: dict[str, float]) -> dict[str, Any]:
    entries = [_match_json(found, images) for found in scan.found]
    by_stage = collections.Counter(e["stage"] for e in entries)
    sheet = _write_sheet(os.path.join(opts.report_dir, SHEET), scan, entries, images, opts.sheet_rows)
    report = {
        "settings": {"phash_distance": opts.thresholds.phash_distance, "hash_bits": HASH_BITS,
                     "min_correlation": opts.thresholds.min_correlation,
                     "eval_crops_hashed": [f"{scale:.0%} at x {ax:g}, y {ay:g}" for scale, ax, ay in CROPS],
                     "embed_model": opts.embed_model,
                     "embed_similarity": opts.thresholds.embed_similarity if opts.embed_model else None},
        "eval": {"inputs": list(opts.eval), "images": len(images),
                 "skipped": sum(f.stage == EVAL_STAGE for f in failures)},
        "train": {"inputs": list(opts.train), "shards": len(scan.shards), "samples": scan.samples,
                  "images": scan.images, "not_checked": sum(f.stage == TRAIN_STAGE for f in failures)},
        "matches": entries,
        "by_stage": {stage: by_stage.get(stage, 0) for stage in STAGES},
        "leaked_eval_images": len({e["eval"] for e in entries}),
        "matched_train_samples": len({(e["train_shard"], e["train_position"]) for e in entries}),
        "contact_sheet": SHEET if sheet else None,
        "failures": FAILURES,
        "drop": drop,
        "seconds": seconds,
    }
    lines = [json.dumps(f.to_json(), ensure_ascii=False) for f in failures]
    atomic_write_bytes(os.path.join(opts.report_dir, FAILURES), "".join(line + "\n" for line in lines).encode())
    atomic_write_json(os.path.join(opts.report_dir, REPORT), report)
    return report


def summary_paragraph(report: dict[str, Any], report_dir: str) -> str:
    ev, tr = report["eval"], report["train"]
    leaked, stages = report["leaked_eval_images"], report["by_stage"]
    share = f" ({100 * leaked / ev['images']:.0f}%)" if ev["images"] else ""
    text = (f"Checked {tr['images']:,} training images in {tr['samples']:,} samples ({tr['shards']} shard(s)) "
            f"against {ev['images']:,} eval images in {report['seconds']['total']:.1f}s. ")
    if leaked:
        how = ", ".join(f"{n} {stage}" for stage, n in stages.items() if n)
        text += (f"{leaked} eval image(s){share} appear in the training data, in "
                 f"{report['matched_train_samples']} training sample(s) ({len(report['matches'])} match(es): "
                 f"{how}). Every match is in {os.path.join(report_dir, REPORT)}")
        text += f", side by side in {os.path.join(report_dir, report['contact_sheet'])}." \
            if report["contact_sheet"] else "."
    else:
        text += (f"No eval image was found in the training data (perceptual hash within "
                 f"{report['settings']['phash_distance']} of {report['settings']['hash_bits']} bits"
                 + (", or embedding cosine >= {}".format(report['settings']['embed_similarity'])
                    if report["settings"]["embed_model"] else "") + f"). Report: {os.path.join(report_dir, REPORT)}.")
    skipped = ev["skipped"] + tr["not_checked"]
    if skipped:
        text += (f" {ev['skipped']} eval input(s) were skipped and {tr['not_checked']} training input(s) not "
                 f"checked; the reasons are in {os.path.join(report_dir, FAILURES)}.")
    drop = report["drop"]
    if drop:
        resumed = f", {drop['resumed']} of them finished before" if drop["resumed"] else ""
        text += (f" --drop: {drop['kept']:,} sample(s) kept and the {drop['dropped']} matched left out, in "
                 f"{len(drop['shards'])} filtered shard(s){resumed} under {drop['folder']}.")
    return text
