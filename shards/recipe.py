"""Training recipes: a small YAML file naming the shard sets, their ratios and the stages.

    seed: 0
    global_batch_size: 64          # needed only for stages given in steps
    sources:
      business: out/cap-s1         # a folder, a tar, a brace pattern, or a list of them
      general: [out/general-sdxl, out/general-ssd1b]
    stages:
      - name: bulk                 # big, lower-quality data first
        samples: 200000            # or steps: 3000
        weights: {business: 10, general: 1}
      - name: polish               # small, high-quality data last
        steps: 500
        weights: {business: 5, general: 1}
        questions: stage2          # rewrite caption questions from the stage2 pool

A source scored by `ddaug score` can keep only its best samples, and a stage a fraction of those:

    sources:
      business: {paths: out/cap-s1-scored, keep: 0.9}      # drop the 10% highest-loss answers
    stages:
      - {name: bulk, samples: 200000, weights: {business: 10, general: 1}}
      - {name: polish, steps: 500, weights: {business: 5, general: 1}, keep: {business: 0.3}}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import yaml

from .loader import LoaderError, MixedShardDataset, ShardSource, TrainingStage


@dataclass
class Recipe:
    """A training recipe: named shard sources, the stages that mix them, and the seed.
    `dataset()` builds the `MixedShardDataset` a trainer reads; `plan(recipe)` previews it."""

    sources: dict[str, ShardSource]
    stages: list[TrainingStage]
    seed: int = 0
    global_batch_size: int | None = None   # turns stages given in steps into samples

    def dataset(self, **kwargs: Any) -> MixedShardDataset:
        return MixedShardDataset(list(self.sources.values()), stages=self.stages, seed=self.seed, **kwargs)


def _stage(i: int, raw: Any, batch: int | None) -> TrainingStage:
    if not isinstance(raw, dict):
        raise LoaderError(f"recipe: stage {i + 1} must be a mapping")
    name = str(raw.get("name") or f"stage{i + 1}")
    unknown = set(raw) - {"name", "samples", "steps", "weights", "questions", "keep"}
    if unknown:
        raise LoaderError(f"recipe: stage {name!r} has unknown keys: {', '.join(sorted(unknown))}")
    if "samples" in raw and "steps" in raw:
        raise LoaderError(f"recipe: stage {name!r}: give samples or steps, not both")
    samples = None if raw.get("samples") is None else _integer(raw["samples"], f"stage {name!r}: samples")
    if "steps" in raw:
        if not batch:
            raise LoaderError(f"recipe: stage {name!r} is given in steps; set global_batch_size")
        samples = _integer(raw["steps"], f"stage {name!r}: steps") * batch
    weights = raw.get("weights")
    if not isinstance(weights, dict):
        raise LoaderError(f"recipe: stage {name!r} needs weights: {{source: weight}}")
    keep = raw.get("keep")
    if keep is not None:
        # A number keeps that fraction of every source of the stage; a mapping names the sources.
        keep = ({str(k): _fraction(v, f"stage {name!r}: keep of {k}") for k, v in keep.items()}
                if isinstance(keep, dict) else {str(k): _fraction(keep, f"stage {name!r}: keep") for k in weights})
    return TrainingStage(name, {str(k): _number(v, f"stage {name!r}: weight of {k}") for k, v in weights.items()},
                         samples, raw.get("questions"), keep)


def _fraction(value: Any, what: str) -> float:
    number = _number(value, what)
    if not 0 < number <= 1:
        raise LoaderError(f"recipe: {what} must be a fraction in (0, 1], not {value!r}")
    return number


def _source(name: str, raw: Any) -> ShardSource:
    """`name: paths` or `name: {paths: ..., keep: 0.9, keep_by: loss}`."""
    if not isinstance(raw, dict):
        return ShardSource(name, raw)
    unknown = set(raw) - {"paths", "keep", "keep_by"}
    if unknown or "paths" not in raw:
        raise LoaderError(f"recipe: source {name!r} takes paths (required), keep and keep_by"
                          + (f"; unknown: {', '.join(sorted(map(str, unknown)))}" if unknown else ""))
    keep = None if raw.get("keep") is None else _fraction(raw["keep"], f"source {name!r}: keep")
    return ShardSource(name, raw["paths"], keep=keep, keep_by=str(raw.get("keep_by", "loss")))


def _number(value: Any, what: str) -> float:
    """A finite number from YAML (bools and strings are typos, not numbers), else one line."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LoaderError(f"recipe: {what} must be a finite number, not {value!r}")
    return float(value)


def _integer(value: Any, what: str) -> int:
    if _number(value, what) != int(value):
        raise LoaderError(f"recipe: {what} must be a whole number, not {value!r}")
    return int(value)


def load_recipe(path: str) -> Recipe:
    """Read a recipe YAML (`seed`, `global_batch_size`, `sources`, `stages`); a malformed one
    raises `LoaderError` naming the file and what is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as exc:
        raise LoaderError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise LoaderError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise LoaderError(f"recipe {path} is not UTF-8 text") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("sources"), dict) or not isinstance(raw.get("stages"), list) \
            or not raw["stages"]:
        raise LoaderError(f"recipe {path} needs `sources:` (name: paths) and `stages:` (a list)")
    batch = raw.get("global_batch_size")
    if batch is not None and _integer(batch, "global_batch_size") < 1:
        raise LoaderError("recipe: global_batch_size must be >= 1")
    seed = _integer(raw.get("seed", 0), "seed")
    sources = {str(name): _source(str(name), paths) for name, paths in raw["sources"].items()}
    stages = [_stage(i, s, batch) for i, s in enumerate(raw["stages"])]
    for st in stages:
        unknown = (set(st.weights) | set(st.keep or {})) - set(sources)
        if unknown:
            raise LoaderError(f"recipe: stage {st.name!r} names unknown sources: {', '.join(sorted(unknown))}")
        if st.questions:
            from .questions import QuestionError, builtin_pool

            lang, _, pool_stage = st.questions.rpartition("/")
            try:
                builtin_pool(lang or "en", pool_stage)
            except QuestionError as exc:
                raise LoaderError(f"recipe: stage {st.name!r}: {exc}") from None
    for st in stages[:-1]:
        if st.samples is None:
            raise LoaderError(f"recipe: stage {st.name!r} needs samples or steps (only the last may be open)")
    return Recipe(sources, stages, seed, batch)


def plan(recipe: Recipe) -> dict[str, Any]:
    """What a run will draw: expected samples per source and stage, and how many epochs of each
    source that consumes (cumulative). Expected counts; the draw is random with these weights."""
    sizes = {name: src.sample_count() for name, src in recipe.sources.items()}
    used = {name: 0.0 for name in sizes}
    rows = []
    for st in recipe.stages:
        # What each source offers in this stage: all its samples, or those its and the stage's keep leave.
        pools = {}
        for n in st.weights:
            kept = recipe.sources[n].kept((st.keep or {}).get(n))
            pools[n] = sizes[n] if kept is None else len(kept)
        total_w = sum(st.weights.values())
        length = st.samples
        if length is None:  # open-ended: ends when the first source runs out of its epoch
            length = min(pools[n] * total_w / w for n, w in st.weights.items() if w > 0)
        per = {n: length * w / total_w for n, w in st.weights.items() if w > 0}
        for n, c in per.items():
            used[n] += c
        rows.append({"stage": st.name, "samples": round(length), "open_ended": st.samples is None,
                     "questions": st.questions,
                     "sources": {n: {"samples": round(c), "share": round(c / length, 4),
                                     "epochs_after": round(used[n] / sizes[n], 3) if sizes[n] else None,
                                     **_keep_row(recipe.sources[n], (st.keep or {}).get(n), pools[n])}
                                 for n, c in per.items()}})
    return {"seed": recipe.seed, "source_sizes": sizes, "stages": rows}


def _keep_row(source: ShardSource, stage_keep: float | None, pool: int) -> dict[str, Any]:
    """For a stage that draws a score quantile of a source: the fraction, the samples in it and
    the score bound it ends at (the highest loss kept, or the lowest image gain)."""
    kept = source.kept(stage_keep)
    if kept is None:
        return {}
    values = [v for k, v in source.scores() if k in kept]
    bound = max(values) if source.keep_by == "loss" else min(values)
    return {"keep": round((source.keep or 1.0) * (stage_keep or 1.0), 4), "keep_by": source.keep_by,
            "pool": pool, "bound": round(bound, 4) if values else None}


def format_plan(p: dict[str, Any]) -> str:
    lines = ["sources: " + ", ".join(f"{n} {c:,} samples" for n, c in p["source_sizes"].items())]
    for row in p["stages"]:
        head = f"stage {row['stage']}: {row['samples']:,} samples"
        if row["open_ended"]:
            head += " (open-ended: one pass, until a source runs out)"
        if row["questions"]:
            head += f", caption questions from pool {row['questions']}"
        lines.append(head)
        for n, s in row["sources"].items():
            line = (f"  {n:<16} {s['samples']:>10,}  {s['share'] * 100:5.1f}%   "
                    f"epochs of {n} used so far: {s['epochs_after']}")
            if "keep" in s:
                relation = "<=" if s["keep_by"] == "loss" else ">="
                line += (f"   keep {s['keep']:g}: {s['pool']:,} samples with {s['keep_by']} "
                         f"{relation} {s['bound']}")
            lines.append(line)
    return "\n".join(lines)
