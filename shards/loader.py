"""The trainer's side: a torch IterableDataset that mixes named shard sets by weight, follows a
stage schedule, splits work by rank and DataLoader worker, and can resume mid-epoch.

    from ddaug.shards import MixedShardDataset, CheckpointableLoader
    ds = MixedShardDataset({"business": "out/cap", "general": "out/general"},
                           weights={"business": 10, "general": 1}, seed=0)
    loader = CheckpointableLoader(ds, batch_size=8, num_workers=2, collate_fn=ChatCollator(proc))

Determinism. Every draw is a pure function of (seed, slot, draw number), where a slot is one
(rank, worker) pair; every source is read in epochs whose shard order and in-shard sample order
are pure functions of (seed, source, epoch). So the state of a slot is a handful of counters,
and resuming from them continues exactly where the run stopped (see `state_dict`).

Splitting. In an epoch, shard i of a source (after the epoch's shuffle) belongs to slot
i mod slots, so no sample is seen twice in an epoch. A source with fewer shards than slots is
split by sample instead (every slot indexes every shard and keeps every slots-th sample).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .reading import SampleIndex, index_shard, read_members
from .schema import IMAGE_SUFFIXES, IMAGE_TAG

log = logging.getLogger(__name__)


def _hash_int(*parts: Any) -> int:
    h = hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "big")


def _uniform(*parts: Any) -> float:
    return _hash_int(*parts) / 2.0 ** 64


def _permutation(n: int, *parts: Any) -> list[int]:
    import random

    order = list(range(n))
    random.Random(_hash_int(*parts)).shuffle(order)
    return order


class LoaderError(Exception):
    """The loader cannot go on (too many consecutive bad samples, a mismatched state)."""


# -- configuration ---------------------------------------------------------------------------------
@dataclass
class ShardSource:
    """A named shard set: folders (their *.tar), tar paths or brace patterns.

    keep: only the best fraction of its scored samples (`ddaug score`), ranked by keep_by
    ("loss": lowest first; "image_gain": highest first); stages may keep a fraction of that."""

    name: str
    paths: list[str]
    shards: list[str] = field(default_factory=list)
    keep: float | None = None
    keep_by: str = "loss"

    def __post_init__(self):
        from ddaug.scoring.summary import RANK_FIELDS

        from .inspect import InspectError, find_shards

        if isinstance(self.paths, str):
            self.paths = [self.paths]
        if self.keep is not None and not 0 < self.keep <= 1:
            raise LoaderError(f"source {self.name!r}: keep must be a fraction in (0, 1], not {self.keep}")
        if self.keep_by not in RANK_FIELDS:
            raise LoaderError(f"source {self.name!r}: keep_by must be one of {', '.join(RANK_FIELDS)}, "
                              f"not {self.keep_by!r}")
        try:
            self.shards = find_shards([str(p) for p in self.paths])
        except InspectError as exc:
            raise LoaderError(f"source {self.name!r}: {exc}") from None
        self._scores: list[tuple[tuple[str, str], float]] | None = None
        self._kept: dict[float, set] = {}

    def scores(self) -> list[tuple[tuple[str, str], float]]:
        """((shard, key), score) of every sample with a keep_by score, read from the sample jsons
        once (one small read per sample). Samples without one are never kept."""
        from ddaug.scoring.summary import sample_score

        if self._scores is None:
            found, unscored = [], 0
            for shard in self.shards:
                samples, _ = index_shard(shard)
                with open(shard, "rb") as f:
                    for sample in samples:
                        json_only = SampleIndex(sample.key, tuple(m for m in sample.members if m[0] == "json"))
                        try:
                            value = sample_score(json.loads(read_members(f, json_only).get("json", b"null")),
                                                 self.keep_by)
                        except (OSError, ValueError):
                            value = None
                        if value is None:
                            unscored += 1
                        else:
                            found.append(((shard, sample.key), value))
            if not found:
                raise LoaderError(f"source {self.name!r} has no samples with a score.{self.keep_by}, so `keep` "
                                  f"cannot choose; score it first (`ddaug score`{' --image-gain' if self.keep_by == 'image_gain' else ''})")
            if unscored:
                log.warning("source %r: %d sample(s) without a score.%s are left out by keep", self.name,
                            unscored, self.keep_by)
            self._scores = found
        return self._scores

    def kept(self, stage_keep: float | None = None) -> set | None:
        """(shard, key) of the samples kept by this source's keep times the stage's, or None
        when neither filters (every sample)."""
        if self.keep is None and stage_keep is None:
            return None
        from ddaug.scoring.summary import kept_keys

        fraction = (self.keep or 1.0) * (stage_keep or 1.0)
        if fraction not in self._kept:
            self._kept[fraction] = kept_keys(self.scores(), fraction, self.keep_by)
        return self._kept[fraction]

    def sample_count(self) -> int:
        """From manifest.json where the folder has one (cheap), else by reading tar headers."""
        total = 0
        by_folder: dict[str, dict[str, int]] = {}
        for shard in self.shards:
            folder, name = os.path.split(shard)
            if folder not in by_folder:
                try:
                    with open(os.path.join(folder, "manifest.json"), encoding="utf-8") as f:
                        by_folder[folder] = {s["name"]: s["samples"] for s in json.load(f)["shards"]}
                except (OSError, ValueError, KeyError, TypeError):
                    by_folder[folder] = {}
            n = by_folder[folder].get(name)
            total += n if n is not None else len(index_shard(shard)[0])
        return total


@dataclass
class TrainingStage:
    """One stage of the schedule: which sources, in what ratio, for how long.

    samples: total over all ranks and workers (None: until a source runs out, last stage only).
    questions: rewrite caption questions from this built-in pool stage ("stage2", "zh/stage2").
    """

    name: str
    weights: dict[str, float]
    samples: int | None = None
    questions: str | None = None
    keep: dict[str, float] | None = None  # per source: the fraction of its kept samples this stage draws from

    def __post_init__(self):
        for source, fraction in (self.keep or {}).items():
            if not 0 < fraction <= 1:
                raise LoaderError(f"stage {self.name!r}: keep of {source} must be a fraction in (0, 1], not {fraction}")
        if not self.weights or not all(0 <= w < math.inf for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise LoaderError(f"stage {self.name!r}: weights must be finite numbers >= 0 with a positive sum")
        if self.samples is not None and self.samples < 1:
            raise LoaderError(f"stage {self.name!r}: samples must be >= 1")


# -- reading one source in epochs ------------------------------------------------------------------------
class _SourceStream:
    """One source as seen by one slot: an endless sequence of epochs (or of random shards when
    resampled). Position = [epoch, shard position, sample position], all plain ints."""

    def __init__(self, source: ShardSource, seed: int, slot: int, slots: int, resampled: bool):
        self.source = source
        self.seed = seed
        self.slot = slot
        self.slots = slots
        self.resampled = resampled
        self.by_sample = not resampled and len(source.shards) < slots
        self.pos = [0, 0, 0]
        self._warned_small = False
        self._epoch_cache: tuple[int | None, list[str]] = (None, [])
        self._splittable_cache: dict[int, bool] = {}
        self._order_for: tuple | None = None
        self._order: list[int] = []
        self._files: dict[str, Any] = {}
        self._index: dict[str, tuple[list[SampleIndex], str | None]] = {}

    def _shard_index(self, shard: str) -> list[SampleIndex]:
        if shard not in self._index:
            if len(self._index) > 64:
                self._index.clear()
            samples, problem = index_shard(shard)
            if problem:
                log.warning("%s: %s; using the %d samples before it", shard, problem, len(samples))
            self._index[shard] = (samples, problem)
        return self._index[shard][0]

    def _epoch_shards(self, epoch: int) -> list[str]:
        """This slot's shards in `epoch`, in order (cached: called for every sample)."""
        if self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        shards = self.source.shards
        if self.resampled:  # "epoch" counts shards drawn with replacement
            mine = [shards[_hash_int(self.seed, self.source.name, self.slot, "pick", epoch) % len(shards)]]
        else:
            order = [shards[i] for i in _permutation(len(shards), self.seed, self.source.name, "epoch", epoch)]
            mine = order if self.by_sample else order[self.slot::self.slots]
        self._epoch_cache = (epoch, mine)
        return mine

    def read(self, shard: str, sample: SampleIndex) -> dict[str, bytes]:
        """Member bytes, through a file handle kept open while the stream is in that shard."""
        f = self._files.get(shard)
        if f is None:
            for old in self._files.values():
                old.close()
            self._files = {shard: open(shard, "rb")}
            f = self._files[shard]
        return read_members(f, sample)

    def _offset(self, epoch: int, si: int) -> int:
        """Samples before shard si in this epoch's order (for splitting by sample)."""
        shards = self._epoch_shards(epoch)
        return sum(len(self._shard_index(sh)) for sh in shards[:si])

    def _splittable(self, epoch: int) -> bool:
        if epoch in self._splittable_cache:
            return self._splittable_cache[epoch]
        total = self._offset(epoch, len(self._epoch_shards(epoch)))
        self._splittable_cache = {epoch: total >= self.slots}
        if total < self.slots and not self._warned_small:
            self._warned_small = True
            log.warning("source %r has %d samples for %d loader slots (ranks x workers): every slot reads "
                        "all of them, so they repeat within an epoch", self.source.name, total, self.slots)
        return total >= self.slots

    def next(self, stop_on_wrap: bool = False, keep: set | None = None) -> tuple[str, SampleIndex, bool] | None:
        """(shard, sample, whether an epoch ended before it). With stop_on_wrap, None at the end
        of the epoch instead. keep: only samples whose (shard, key) it holds (the others are
        passed over where they fall, so positions stay those of the whole source). Raises
        LoaderError if this slot gets nothing, epoch after epoch."""
        wrapped = False
        empty_epochs = 0
        offset = None
        while True:
            epoch, si, ki = self.pos
            shards = self._epoch_shards(epoch)
            if si >= len(shards):
                self.pos = [epoch + 1, 0, 0]
                if stop_on_wrap:
                    return None
                wrapped = True
                empty_epochs += 1
                if empty_epochs > 2:
                    raise LoaderError(f"source {self.source.name!r} has no readable samples for loader slot "
                                      f"{self.slot} of {self.slots} (fewer samples than ranks x workers?)")
                continue
            shard = shards[si]
            samples = self._shard_index(shard)
            if ki >= len(samples):
                self.pos = [epoch, si + 1, 0]
                offset = None
                continue
            if self._order_for != (epoch, shard):
                self._order_for = (epoch, shard)
                self._order = _permutation(len(samples), self.seed, self.source.name, "shard", epoch, shard)
            order = self._order
            self.pos = [epoch, si, ki + 1]
            if self.by_sample and self._splittable(epoch):
                if offset is None:
                    offset = self._offset(epoch, si)
                if (offset + ki) % self.slots != self.slot:
                    continue  # another slot's share
            if keep is not None and (shard, samples[order[ki]].key) not in keep:
                continue  # outside the score quantile the source or stage keeps
            return shard, samples[order[ki]], wrapped


# -- the dataset -------------------------------------------------------------------------------------------
def _placement(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class MixedShardDataset(IterableDataset):
    """Yields {"key", "images", "messages", "tags", "source", "stage", "meta"} per sample.

    sources: {name: path(s)} or ShardSource list. Either `weights` (one open-ended stage) or
    `stages` (a schedule). decode=False yields image bytes instead of PIL images.
    resampled=True draws shards with replacement: an infinite stream (no epochs).
    """

    def __init__(self, sources: dict[str, Any] | list[ShardSource], weights: dict[str, float] | None = None, *,
                 stages: list[TrainingStage] | None = None, seed: int = 0, decode: bool = True,
                 resampled: bool = False, max_consecutive_failures: int = 16,
                 rank: int | None = None, world_size: int | None = None):
        super().__init__()
        if isinstance(sources, dict):
            sources = [ShardSource(name, paths) for name, paths in sources.items()]
        self.sources = {s.name: s for s in sources}
        if stages is None:
            stages = [TrainingStage("main", weights or {name: 1.0 for name in self.sources})]
        elif weights is not None:
            raise LoaderError("give weights or stages, not both")
        for i, st in enumerate(stages):
            unknown = set(st.weights) - set(self.sources)
            if unknown:
                raise LoaderError(f"stage {st.name!r} names unknown sources: {', '.join(sorted(unknown))}")
            if st.samples is None and i != len(stages) - 1:
                raise LoaderError(f"stage {st.name!r}: only the last stage may be open-ended")
        self.stages = stages
        for st in stages:
            for name in st.weights:
                # Now, in the trainer's process: DataLoader workers get the kept sets with the
                # dataset instead of each reading every score again.
                self.sources[name].kept((st.keep or {}).get(name))
        self.seed = seed
        self.decode = decode
        self.resampled = resampled
        self.max_consecutive_failures = max_consecutive_failures
        self.rank, self.world_size = _placement(rank, world_size)
        self.epoch = 0
        self._resume: dict[str, dict] = {}
        self._attach_state = False            # set by CheckpointableLoader
        self._worker_offset = 0               # which slot DataLoader worker 0 plays after a resume
        self._yielded: dict[str, dict] = {}   # state after the last sample yielded in this process

    def set_epoch(self, epoch: int) -> None:
        """For open-ended (weights-only) datasets iterated once per trainer epoch: epoch e reads
        every source's epoch e, with its own shuffle. Call before iterating, like a sampler's."""
        self.epoch = epoch

    # -- schedule ----------------------------------------------------------------------------------
    def stage_at(self, samples_seen: int) -> TrainingStage:
        """The stage the schedule is in after `samples_seen` samples in total (all ranks)."""
        for st in self.stages:
            if st.samples is None or samples_seen < st.samples:
                return st
            samples_seen -= st.samples
        return self.stages[-1]

    @staticmethod
    def _share(total: int, slot: int, slots: int) -> int:
        return total // slots + (1 if slot < total % slots else 0)

    # -- checkpointing -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Resume state of the samples this process yielded (num_workers=0). With DataLoader
        workers, use CheckpointableLoader.state_dict(), which sees what the trainer consumed."""
        return {"version": 1, "seed": self.seed, "world_size": self.world_size, "slots": dict(self._yielded)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != 1:
            raise LoaderError("unknown loader state version")
        if state.get("seed") != self.seed:
            raise LoaderError(f"loader state was saved with seed {state.get('seed')}, this loader has {self.seed}")
        if state.get("world_size") != self.world_size:
            raise LoaderError(f"loader state was saved with world size {state.get('world_size')}, "
                              f"now {self.world_size}; resume with the same number of processes")
        self._resume = dict(state["slots"])
        self._yielded = dict(state["slots"])

    # -- iteration -----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, (info.id + self._worker_offset) % info.num_workers) if info else (1, 0)
        slots = self.world_size * workers
        slot = self.rank * workers + worker
        slot_id = f"{slot}/{slots}"
        resumed_slots = {k.split("/")[1] for k in self._resume}
        if resumed_slots and resumed_slots != {str(slots)}:
            raise LoaderError(f"loader state was saved with {resumed_slots.pop()} slots (ranks x workers), "
                              f"now {slots}; resume with the same num_workers")
        state = self._resume.get(slot_id) or {"epoch": self.epoch, "draws": 0, "stage": 0, "in_stage": 0,
                                              "streams": {}}
        epoch = state["epoch"]
        streams = {name: _SourceStream(src, self.seed, slot, slots, self.resampled)
                   for name, src in self.sources.items()}
        for name, stream in streams.items():
            stream.pos = list(state["streams"].get(name, [epoch, 0, 0]))
        draws, stage_i, in_stage = state["draws"], state["stage"], state["in_stage"]
        failures = 0
        while stage_i < len(self.stages):
            stage = self.stages[stage_i]
            limit = None if stage.samples is None else self._share(stage.samples, slot, slots)
            if limit is not None and in_stage >= limit:
                stage_i, in_stage = stage_i + 1, 0
                continue
            name = self._choose(stage, slot, epoch, draws)
            draws += 1
            # An open-ended stage is one pass: it ends when a drawn source runs out.
            keep = self.sources[name].kept((stage.keep or {}).get(name))
            got = streams[name].next(stop_on_wrap=limit is None and not self.resampled, keep=keep)
            if got is None:
                return
            shard, index, _ = got
            try:
                sample = self._sample(streams[name].read(shard, index), index, name, stage)
            except Exception as exc:  # a bad sample is skipped and logged, not fatal
                failures += 1
                log.warning("skipping %s in %s: %s", index.key, shard, exc)
                if failures > self.max_consecutive_failures:
                    raise LoaderError(f"{failures} consecutive unreadable samples (last: {index.key} in {shard}: "
                                      f"{exc}); check the shards with `ddaug inspect --verify`") from None
                continue
            failures = 0
            in_stage += 1
            new_state = {"epoch": epoch, "draws": draws, "stage": stage_i, "in_stage": in_stage,
                         "streams": {n: list(s.pos) for n, s in streams.items()}}
            self._yielded[slot_id] = new_state
            if self._attach_state:
                sample["__state__"] = (slot_id, new_state)
            yield sample

    def _choose(self, stage: TrainingStage, slot: int, epoch: int, draw: int) -> str:
        names = [n for n in stage.weights if stage.weights[n] > 0]
        total = sum(stage.weights[n] for n in names)
        u = _uniform(self.seed, "mix", slot, epoch, draw) * total
        for n in names:
            u -= stage.weights[n]
            if u < 0:
                return n
        return names[-1]

    def _sample(self, members: dict[str, bytes], index: SampleIndex, source: str, stage: TrainingStage) -> dict[str, Any]:
        if "json" not in members:
            raise ValueError("no json member")
        meta = json.loads(members["json"].decode("utf-8"))
        names = meta.get("images") or sorted(s for s in members if s.rsplit(".", 1)[-1] in IMAGE_SUFFIXES)
        images = []
        for name in names:
            suffix = str(name)[len(index.key) + 1:] if str(name).startswith(index.key + ".") else str(name)
            if suffix not in members:
                raise ValueError(f"image member {name} missing")
            images.append(_decode(members[suffix]) if self.decode else members[suffix])
        messages = meta.get("messages") or []
        if stage.questions:
            messages = rewrite_caption_question(messages, meta, stage.questions, self.seed, index.key)
        return {"key": index.key, "images": images, "messages": messages, "tags": meta.get("tags") or {},
                "source": source, "stage": stage.name, "meta": meta}


def _decode(data: bytes):
    from ddaug.sources import decode_image

    return decode_image(data)[0]


def rewrite_caption_question(messages: list[dict], meta: dict, pool: str, seed: int, key: str) -> list[dict]:
    """Replace the question of a caption sample with one from a built-in pool stage, in the
    sample's language (pool "stage2"), or a fixed language ("zh/stage2"). Other samples pass."""
    from .questions import QuestionPicker, detect_lang

    cap = meta.get("caption") or {}
    if cap.get("task") != "caption" or len(messages) < 2 or messages[0].get("role") != "user":
        return messages
    lang, _, stage = pool.rpartition("/")
    question = messages[0]["content"].replace(IMAGE_TAG, "")
    lang = lang or cap.get("lang") or detect_lang(question)
    new = QuestionPicker(lang=lang, stage=stage).caption_question(seed, key)
    tags = IMAGE_TAG * messages[0]["content"].count(IMAGE_TAG)
    return [{**messages[0], "content": tags + new.text}] + list(messages[1:])


# -- a DataLoader that knows what the trainer consumed ------------------------------------------------------
class _StateCollate:
    def __init__(self, collate_fn):
        self.collate_fn = collate_fn

    def __call__(self, samples: list[dict]):
        states = [s.pop("__state__") for s in samples]
        return (self.collate_fn(samples) if self.collate_fn else samples), states


class CheckpointableLoader:
    """torch DataLoader over a MixedShardDataset whose state_dict() is exactly what the trainer
    has consumed (prefetched batches are not counted), at sample granularity.

    Save `loader.state_dict()` with the model checkpoint; on resume build the same loader (same
    seed, world size and num_workers), call `load_state_dict`, and iterate: the following
    samples are the ones an uninterrupted run would have produced.
    """

    def __init__(self, dataset: MixedShardDataset, *, batch_size: int, num_workers: int = 0,
                 collate_fn=None, **kwargs):
        self.dataset = dataset
        dataset._attach_state = True
        self.loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                 collate_fn=_StateCollate(collate_fn), **kwargs)
        self.num_workers = num_workers
        self._consumed: dict[str, dict] = {}
        self._batches = 0

    def __iter__(self):
        for batch, states in self.loader:
            for slot_id, st in states:
                self._consumed[slot_id] = st
            self._batches += 1
            yield batch

    def __len__(self):
        raise TypeError("a streaming loader has no length; see `ddaug plan` for stage sizes")

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "seed": self.dataset.seed, "world_size": self.dataset.world_size,
                "batches": self._batches, "slots": dict(self._consumed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)
        self._consumed = dict(state["slots"])
        self._batches = int(state.get("batches", 0))
        # DataLoader hands out batches round-robin from worker 0: let the worker whose turn it
        # was play worker 0's part, so batches keep their uninterrupted order.
        self.dataset._worker_offset = self._batches % self.num_workers if self.num_workers else 0
