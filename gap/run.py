"""`ddaug gap` as a library call: sample the sets, measure every pair, warn about shortcuts."""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any

from .dose import Dose, run_doses
from .features import FeatureExtractor, frequencies
from .separability import separability
from .sets import ImageSet, load_set
from .shortcuts import compare, describe, summary_line

log = logging.getLogger(__name__)


@dataclass
class GapOptions:
    business: tuple[str, ...]
    general: tuple[str, ...]
    augmented: tuple[str, ...] = ()      # each one set: PATH or NAME=PATH
    samples: int = 300
    seed: int = 0
    crop: int = 64
    crops_per_image: int = 16
    folds: int = 5
    media_dir: str | None = None
    workers: int = 4
    plot: str | None = None
    doses: tuple[Dose, ...] = ()
    dose_dir: str | None = None
    device: str | None = None
    dose_dtype: str = "fp32"
    quiet: bool = False            # --dose: no augment progress bars


def set_name(arg: str, taken: set[str]) -> tuple[str, str]:
    """`NAME=PATH` or `PATH` (named after the path) -> (unique name, path)."""
    name, sep, path = arg.partition("=")
    if not sep or not name or os.path.exists(arg):
        path = arg
        name = os.path.basename(os.path.normpath(arg)) or arg
    unique, n = name, 2
    while unique in taken:
        unique, n = f"{name}-{n}", n + 1
    taken.add(unique)
    return unique, path


def _halves(image_set: ImageSet, seed: int) -> tuple[list[int], list[int]]:
    order = list(range(len(image_set.images)))
    random.Random(f"{seed}:control").shuffle(order)
    middle = len(order) // 2
    return order[:middle], order[middle:]


def run_gap(opts: GapOptions) -> tuple[dict[str, Any], list[ImageSet]]:
    """The report (JSON-ready) and the sampled sets."""
    wall, cpu = time.perf_counter(), time.process_time()
    extractor = FeatureExtractor(opts.crop, opts.crops_per_image)
    load = dict(samples=opts.samples, seed=opts.seed, extractor=extractor, media_dir=opts.media_dir,
                workers=opts.workers)
    business = load_set("business", "business", list(opts.business), **load)
    general = load_set("general", "general", list(opts.general), **load)
    taken = {"business", "general"}
    augmented = []
    for arg in opts.augmented:
        name, path = set_name(arg, taken)
        augmented.append(load_set(name, "augmented", [path], **load))
    doses = []
    if opts.doses:
        doses = run_doses(list(opts.doses), general, opts.dose_dir, device=opts.device, dtype=opts.dose_dtype,
                          seed=opts.seed, quiet=opts.quiet)
        for dose in doses:
            name, _ = set_name(f"{dose['label']}={dose['folder']}", taken)
            augmented.append(load_set(name, "augmented", [dose["folder"]], **load))
    sets = [business, general, *augmented]
    features_done = time.perf_counter()

    names = extractor.feature_names()
    measure = dict(feature_names=names, folds=opts.folds, seed=opts.seed)
    shortcut = {s.name: describe(s) for s in sets}
    pairs = []
    for other in (general, *augmented):
        result = separability(business.matrix(), other.matrix(), **measure)
        result.update(a="business", b=other.name, role=other.role,
                      warnings=compare("business", shortcut["business"], other.name, shortcut[other.name]))
        pairs.append(result)
    first, second = _halves(business, opts.seed)
    matrix = business.matrix()
    control = separability(matrix[first], matrix[second], **measure)
    control.update(a="business (random half)", b="business (other half)", role="control", warnings=[])

    plot_labels = {"business": "business"}
    for pair in pairs:
        plot_labels[pair["b"]] = f"{pair['b']} (AUC vs business {pair['auc']:.2f})"
    if opts.plot:
        from .plot import draw_gap

        draw_gap(sets, frequencies(opts.crop), plot_labels, opts.plot)
    report = {
        "settings": {"samples": opts.samples, "seed": opts.seed, "crop": opts.crop,
                     "crops_per_image": opts.crops_per_image, "folds": opts.folds,
                     "classifier": "StandardScaler + LogisticRegression (scikit-learn), class-balanced",
                     "features": f"{len(names)}: log residual power in {opts.crop // 2} radial bins + "
                                 f"{len(names) - opts.crop // 2} residual statistics"},
        "sets": [{"name": s.name, "role": s.role, "inputs": s.inputs, "sampled": len(s.images),
                  "available": s.available, "skipped": dict(s.skipped), "shortcuts": shortcut[s.name],
                  "mean_spectrum": [round(float(v), 4) for v in s.mean_spectrum()]} for s in sets],
        "frequencies": [round(float(f), 5) for f in frequencies(opts.crop)],
        "pairs": pairs,
        "ranking": [p["b"] for p in sorted((p for p in pairs if p["role"] == "augmented"), key=lambda p: p["auc"])],
        "control": control,
        "doses": doses,
        "plot": opts.plot,
        "seconds": {"read_and_features": round(features_done - wall, 2),
                    "total": round(time.perf_counter() - wall, 2),
                    "cpu": round(time.process_time() - cpu, 2)},
    }
    return report, sets


def _pair_row(label: str, result: dict[str, Any]) -> str:
    low, high = result["ci"]
    return (f"  {label:<34} {result['auc']:.3f} [{low:.2f}, {high:.2f}]  "
            f"{result['n'][0]}/{result['n'][1]}  {result['verdict']}")


def format_report(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = ["sets (sampled of available images)"]
    for entry in report["sets"]:
        skipped = sum(entry["skipped"].values())
        note = f", {skipped} skipped" if skipped else ""
        lines.append(f"  {entry['name']:<20} {entry['sampled']:>4}/{entry['available']:<6}{note}  "
                     f"{summary_line(entry['shortcuts'])}")
    lines += ["", f"separability: ROC AUC of {s['folds']}-fold logistic regression on residual spectra at "
                  f"native resolution, 95% CI over folds (0.5 = indistinguishable)",
              f"  {'pair':<34} {'AUC':<5} {'95% CI':<12}  n      verdict"]
    by_name = {p["b"]: p for p in report["pairs"]}
    lines.append(_pair_row("business vs general", by_name["general"]))
    for rank, name in enumerate(report["ranking"], start=1):
        lines.append(_pair_row(f"{rank}. business vs {name}", by_name[name]))
    lines.append(_pair_row("control: business half vs half", report["control"]))
    if report["ranking"]:
        lines.append("  augmented sets are ranked by the gap they leave (smallest first); compare with "
                     "business vs general")
    for dose in report["doses"]:
        lines.append(f"  dose {dose['label']}: augment {dose['augment']} -> {dose['folder']}")
    warnings = [(p["b"], w) for p in report["pairs"] for w in p["warnings"]]
    lines += ["", "shortcuts (what a model can learn besides the traces)"]
    lines += [f"  WARNING business vs {name}: {w}" for name, w in warnings] or ["  none found"]
    top = by_name["general"]["top_features"]
    lines += ["", "business vs general is driven most by: " + ", ".join(t["feature"] for t in top)]
    if report["plot"]:
        lines.append(f"plot: {report['plot']}")
    sec = report["seconds"]
    lines.append(f"time: {sec['total']:.1f}s ({sec['read_and_features']:.1f}s reading + features), "
                 f"CPU {sec['cpu']:.1f}s")
    return "\n".join(lines)
