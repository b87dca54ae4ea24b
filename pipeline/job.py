"""The executor shared by `augment` and `caption`.

    sources -> [loader threads: read + decode] -> size buckets -> stage.run (GPU, model threads)
            -> [builder threads: encode members] -> shard writer (in completion order) -> done marker

A Stage says how to load one item into work units, how to batch units, what to run on a batch,
and how to build the output sample. The job owns everything else: taking the plan's units
(blocks of shard_size inputs in input order, shards/units.py) by lease, shard boundaries,
failures, progress. Each plan unit becomes one shard, batched within itself, and its samples are
written in the order their batches complete, which the unit's inputs alone decide. So a rerun
after a crash, or a run with any number of workers, rebuilds the same shards byte for byte.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterator, Protocol

from tqdm import tqdm

from ddaug.shards.store import Failure, OutputFolder
from ddaug.shards.units import Unit, UnitQueue, Work
from ddaug.sources import SourceItem

from .timing import GpuBusySampler, StageTimes

log = logging.getLogger(__name__)

# Batches in flight beyond the oldest (queued for the model threads, or launched on the device and
# not yet collected). A batch at a new (batch, H, W) costs the host a fixed set-up (cuDNN plans)
# before its work reaches the device; a deeper queue gives that set-up more device work to hide
# behind. Outputs do not depend on it: batches are formed before they are queued. On 1,000
# COCO-like images (H100, one process, warm kernels) depths 2 / 4 / 8 ran 45.6 / 48.7 / 46.9
# img/s after load, GPU busy 80 / 85 / 81% (bench/RESULTS.md, "A channels-last VAE, fed better").
LAUNCH_DEPTH = 4

# Model threads for a stage that launches and says how much device memory a batch takes
# (launch_share). A batch at a new (batch, H, W) spends its set-up (cuDNN builds an execution
# plan per convolution, ~0.3 s for SDXL) on the host before its work reaches the device; at a
# block's end, small batches at new shapes come one after another and the GPU waited on their
# set-up. A second thread sets up the next batch while the first is still launching, as long
# as both fit in memory together. Outputs do not depend on it: each batch's work is the same
# on one thread or two. On 1,000 COCO-like images (H100, one process, warm kernels) one thread
# ran 52.8 img/s after load, GPU 90% busy, and two 53.3-54.8, 92-94% (bench/RESULTS.md, "The GPU at a block's end").
MODEL_THREADS = 2


class LaunchBudget:
    """The device memory that batches being launched share: each takes its share (1.0: a batch
    of the full size, for which the batch size was fitted to free memory) before its launch and
    gives it back when the launch returns. From then on its work waits in the device's queue and
    the memory it frees is reused in queue order, as one thread's batches always did. Turns go in
    the order the batches were formed, so the device runs them in that order."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._used = 0.0
        self._holders = 0
        self._turn = 0
        self._open = False

    def take(self, ticket: int, share: float) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self._open or (
                self._turn == ticket and (self._holders == 0 or self._used + share <= 1.0)))
            self._used += share
            self._holders += 1
            self._turn += 1
            self._cv.notify_all()

    def give(self, share: float) -> None:
        with self._cv:
            self._holders -= 1
            # Shares are floats: giving them back can leave a residue past 0, and a full batch
            # (1.0) would wait on it forever. With no launch holding any, none is used.
            self._used = self._used - share if self._holders else 0.0
            self._cv.notify_all()

    def open(self) -> None:
        """The job is stopping and cancelled batches will never take their turns: let every
        waiting batch through, so the model threads end."""
        with self._cv:
            self._open = True
            self._cv.notify_all()


class SampleFailure(Exception):
    """One sample cannot be made; stage ("read", "decode", "augment", ...) and reason go to
    the failure ledger."""

    def __init__(self, stage: str, reason: str):
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


class JobAbort(Exception):
    """Nothing more can be processed (e.g. the caption server is gone): stop the run. Finished
    shards stay; the unfinished one is discarded; a rerun resumes."""


class Stage(Protocol):
    command: str

    def load(self, item: SourceItem) -> list[Any]:
        """Read and decode an item into work units (runs in loader threads)."""

    def bucket(self, unit: Any) -> Hashable:
        """Units with equal bucket keys can share a batch (e.g. same padded size). A stage may
        also define batch_limit(bucket) -> int | None: that bucket's batch size in place of
        batch_size (e.g. by pixels: fewer large images per batch, more small ones)."""

    def run(self, units: list[Any], prepared: Any = None) -> list[Any]:
        """Process a batch; per unit a result or a SampleFailure (runs on the model thread). A
        stage may define prepare(units) for the batch's CPU work (stacking, pinning, noise): the
        job runs it on the main thread, while the model works on earlier batches, and passes its
        result here. A stage may also define launch(units, prepared) -> finish: it enqueues the
        batch on its device and returns at once; finish() waits and returns what run would, and
        finish.ready(), if defined, says whether it would return at once. The model thread then
        launches the next batch while the device still runs this one, so the host's set-up of a
        batch overlaps the device's work. A stage that also defines launch_share(units) -> float
        (the share of the memory its batch size was fitted to that the launch holds) gets
        MODEL_THREADS model threads: its run and launch are then called from two threads at once,
        within those shares (LaunchBudget)."""

    def build(self, item: SourceItem, results: list[Any]) -> dict[str, bytes]:
        """Encode the output members of one sample (runs in builder threads)."""


@dataclass
class JobSummary:
    """What a run did: its counts (done, skipped, failed), the shards it wrote, and where the
    time went."""

    total: int = 0          # inputs of the job
    skipped: int = 0        # already done when this worker started
    done: int = 0
    failed: int = 0
    shards: list[str] = field(default_factory=list)
    seconds: float = 0.0
    failure_reasons: collections.Counter = field(default_factory=collections.Counter)
    counts: collections.Counter = field(default_factory=collections.Counter)  # stage-specific (flags...)
    times: dict[str, float] = field(default_factory=dict)  # seconds per part (pipeline/timing.py)
    time_line: str = ""
    batch_size: int = 0     # images per model call (augment: at 1024²; what --batch-size auto chose)
    plan: Work | None = None  # --plan-only: the plan written, nothing run

    def line(self) -> str:
        if self.plan is not None:
            return (f"plan of {self.plan.unit_count} unit(s) for {self.total} inputs, {len(self.plan.units)} "
                    f"to do ({self.plan.rounds} plan round(s)); start the workers with --join")
        text = (f"done {self.done}, skipped {self.skipped} (already done), failed {self.failed}, "
                f"{len(self.shards)} new shard(s) in {self.seconds:.1f}s")
        if self.counts:
            text += "; " + ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        return text


def tail_order(sizes: dict[Hashable, int]) -> list[Hashable]:
    """The order a block's last, partial batches are flushed in: the largest, the smallest, the
    next largest, the next smallest... Each is a new shape, whose host set-up (~0.3 s for SDXL)
    then overlaps a large batch's device work on the other model thread; largest first left the
    small ones to the end, set up one after another with little device work to hide behind
    (1,000 COCO-like images, one process: 53.6-54.5 img/s against 52.8; bench/RESULTS.md)."""
    by_size = sorted(sizes, key=lambda k: -sizes[k])  # stable: ties keep the buckets' first-seen order
    return [by_size[i // 2] if i % 2 == 0 else by_size[-(i // 2) - 1] for i in range(len(by_size))]


class _Prefetch:
    """pool.map over the items of the units added so far, in order, with a bounded look-ahead:
    memory holds at most `window` loaded items, and the next unit's first items load while the
    current unit's last batches run."""

    def __init__(self, pool: ThreadPoolExecutor, fn: Callable, window: int):
        self._pool, self._fn, self._window = pool, fn, window
        self._queue: collections.deque[Future] = collections.deque()
        self._sources: collections.deque[Iterator] = collections.deque()

    def add(self, items: list) -> None:
        self._sources.append(iter(items))
        self._fill()

    def _fill(self) -> None:
        while len(self._queue) < self._window and self._sources:
            item = next(self._sources[0], None)
            if item is None:
                self._sources.popleft()
            else:
                self._queue.append(self._pool.submit(self._fn, item))

    def __next__(self):
        future = self._queue.popleft()
        self._fill()
        return future.result()

    def cancel(self) -> None:
        for future in self._queue:
            future.cancel()


class _ItemState:
    __slots__ = ("item", "results", "remaining", "failure", "future")

    def __init__(self, item: SourceItem, n_units: int):
        self.item = item
        self.results: list[Any] = [None] * n_units
        self.remaining = n_units
        self.failure: SampleFailure | None = None
        self.future: Future | None = None


class Job:
    def __init__(self, stage: Stage, folder: OutputFolder, *, batch_size: int, workers: int = 4,
                 show_progress: bool = True):
        self.stage = stage
        self.folder = folder
        self.batch_size = batch_size
        self.workers = max(1, workers)
        self.show_progress = show_progress
        self.depth = LAUNCH_DEPTH
        # Launches overlap only where the stage can say what a batch holds in device memory.
        self.model_threads = MODEL_THREADS if callable(getattr(stage, "launch_share", None)) else 1
        # A stage may time its own parts (GPU stages) into the same accumulator.
        self.times: StageTimes = getattr(stage, "times", None) or StageTimes()

    def _load(self, item: SourceItem):
        with self.times.measure("read+decode"):
            return self._load_untimed(item)

    def _load_untimed(self, item: SourceItem):
        if item.error:
            return item, SampleFailure("read", item.error)
        try:
            return item, self.stage.load(item)
        except SampleFailure as exc:
            return item, exc
        except Exception as exc:  # a reader/decoder bug must not stop a million-image run
            log.exception("unexpected error loading %s", item.uri)
            return item, SampleFailure("read", f"{type(exc).__name__}: {exc}")

    def _build(self, state: _ItemState) -> dict[str, bytes]:
        try:
            with self.times.measure("build members"):
                return self.stage.build(state.item, state.results)
        except SampleFailure:
            raise
        except Exception as exc:  # one sample's encoding bug must not stop the run
            log.exception("unexpected error building %s", state.item.uri)
            raise SampleFailure(self.stage.command, f"{type(exc).__name__}: {exc}") from None

    def _batch_limit(self, bkey: Hashable) -> int:
        limit = getattr(self.stage, "batch_limit", None)
        return (limit(bkey) if limit else None) or self.batch_size

    def _prepare(self, units: list[Any]) -> Any:
        prepare = getattr(self.stage, "prepare", None)
        if prepare is None:
            return None
        with self.times.measure("prepare batch"):
            try:
                return prepare(units)
            except Exception as exc:  # the model thread retries unit by unit and names the culprit
                log.warning("preparing a batch of %d failed (%s)", len(units), exc)
                return None

    def _run_batch(self, units: list[Any], prepared: Any, ticket: int, share: float) -> list[Any] | Callable[[], list[Any]]:
        """On a model thread, once the batch's share of device memory is free: the batch's
        results, or, for a stage that launches, what waits for them (collected on the main
        thread, in order)."""
        self._budget.take(ticket, share)
        try:
            with self.times.measure("model"):
                launch = getattr(self.stage, "launch", None)
                if launch is not None and prepared is not None:
                    try:
                        return launch(units, prepared)
                    except JobAbort:
                        raise
                    except Exception as exc:  # e.g. out of memory: the synchronous path retries and names the culprit
                        log.debug("launching a batch of %d failed (%s); running it synchronously", len(units), exc)
                return self._run_batch_untimed(units, prepared)
        finally:
            self._budget.give(share)

    def _submit(self, units: list[Any], prepared: Any, share: float = 1.0) -> Future:
        """Queue a batch for the model threads, with its turn for the launch budget."""
        ticket, self._tickets = self._tickets, self._tickets + 1
        return self._model_thread.submit(self._run_batch, units, prepared, ticket, share)

    def _finish_batch(self, units: list[Any], finish: Callable[[], list[Any]]) -> list[Any]:
        try:
            return finish()
        except JobAbort:
            raise
        except Exception as exc:
            log.warning("batch of %d failed when collected (%s); running it again", len(units), exc)
            return self._submit(units, None).result()

    def _run_batch_untimed(self, units: list[Any], prepared: Any = None) -> list[Any]:
        try:
            return self.stage.run(units, prepared) if prepared is not None else self.stage.run(units)
        except JobAbort:
            raise
        except Exception as exc:
            if len(units) == 1:
                log.warning("batch failed: %s", exc)
                return [SampleFailure(self.stage.command, f"{type(exc).__name__}: {exc}")]
            # One bad unit should not sink its batch mates: retry them one by one.
            log.warning("batch of %d failed (%s); retrying one by one", len(units), exc)
            return [r for u in units for r in self._run_batch_untimed([u])]

    def run(self, queue: UnitQueue, work: Work) -> JobSummary:
        """Take the plan's units from the queue (by lease) until every one is committed, by this
        worker or others, and process the ones this worker holds."""
        t0 = time.monotonic()
        summary = JobSummary(batch_size=self.batch_size, total=work.total, skipped=work.skipped)
        self._budget = LaunchBudget()
        self._tickets = 0  # batches formed so far: their turns for the budget
        todo = sum(u.count for u in work.units)
        bar = tqdm(total=todo, unit="img", desc=self.stage.command, dynamic_ncols=True,
                   disable=not self.show_progress, smoothing=0.1)
        window = max(2 * self.batch_size, 4 * self.workers)
        mine = 0  # inputs of the units this worker committed
        with ThreadPoolExecutor(self.workers, thread_name_prefix="load") as loaders, \
                ThreadPoolExecutor(self.workers, thread_name_prefix="build") as builders, \
                ThreadPoolExecutor(self.model_threads, thread_name_prefix="model") as self._model_thread, \
                GpuBusySampler(getattr(self.stage, "device", None), self.times):
            prefetch = _Prefetch(loaders, self._load, window)
            unit = queue.take(wait=True)
            if unit is not None:
                prefetch.add(unit.items)
            while unit is not None:
                ahead: list[Unit] = []

                def look_ahead() -> None:
                    # The unit's inputs are all read: lease the next one now, so its inputs load
                    # while this unit's last batches run (at most one unit ahead: others stay free).
                    nxt = queue.take(wait=False)
                    if nxt is not None:
                        prefetch.add(nxt.items)
                        ahead.append(nxt)

                if self._run_chunk(unit, prefetch, builders, bar, summary, look_ahead, queue):
                    mine += unit.count
                unit = ahead[0] if ahead else queue.take(wait=True)
                if unit is not None and not ahead:
                    prefetch.add(unit.items)
        bar.close()
        others = todo - mine
        if others:
            summary.counts["done by other workers"] = others
        if queue.waited >= 0.05:
            log.info("waited %.1fs for units leased by other workers", queue.waited)
        summary.counts.update(getattr(self.stage, "counts", {}))
        summary.seconds = time.monotonic() - t0
        summary.times = self.times.as_dict()
        summary.time_line = self.times.summary(summary.seconds, self.workers)
        if todo:
            log.info("where the time went: %s", summary.time_line)
        return summary

    def _run_chunk(self, planned: Unit, loaded: _Prefetch, builders: ThreadPoolExecutor, bar: tqdm,
                   job_summary: JobSummary, look_ahead: Callable[[], None], queue: UnitQueue) -> bool:
        """Process one leased unit into its shard and commit it; False when another worker
        committed it first (this worker's copy is discarded, its counts too)."""
        t0 = time.monotonic()
        chunk = planned.items
        summary = JobSummary()  # this unit's outcome, added to the job's once committed
        writer = self.folder.new_shard(planned.name)
        failures: list[Failure] = []
        states: list[_ItemState] = []
        buckets: dict[Hashable, list[tuple[_ItemState, int, Any]]] = {}
        # Samples go into the shard in the order they complete: an item completes when the last
        # batch holding one of its units is collected (batches are collected in the order they
        # were formed); items that need no batch (failed reads, text-only records) follow the
        # batch formed last before they were read. That order is fixed by the block's inputs
        # alone, so shards stay byte for byte the same across reruns and process counts, and a
        # sample is written as soon as it is done: in input order, the whole block would wait
        # behind its rarest size, batched last (and sit in memory until then).
        ready_to_write: collections.deque[_ItemState] = collections.deque()
        after_batch: dict[int, list[_ItemState]] = {}  # batch index -> unbatched items that follow it
        formed = collected = written = 0  # batches formed (flushed) and collected, samples written, so far

        def completed_without_batch(st: _ItemState) -> None:
            last = formed - 1
            if last < collected:  # that batch is already collected (or none was formed yet)
                ready_to_write.append(st)
            else:
                after_batch.setdefault(last, []).append(st)

        def finish_ready(block: bool) -> None:
            nonlocal written
            while ready_to_write:
                st = ready_to_write[0]
                if st.failure is None:
                    if not (block or st.future.done()):
                        return
                    try:
                        with self.times.measure("wait for build"):
                            files = st.future.result()
                        with self.times.measure("write tar"):
                            writer.write(st.item.key, files)
                    except SampleFailure as exc:
                        st.failure = exc
                if st.failure is not None:
                    failures.append(Failure(st.item.key, st.item.uri, st.failure.stage, st.failure.reason))
                    summary.failed += 1
                    summary.failure_reasons[st.failure.stage] += 1
                    log.info("failed %s (%s): %s", st.item.uri, st.failure.stage, st.failure.reason)
                else:
                    summary.done += 1
                st.results, st.future = [], None  # free pixels and members once the sample is written
                ready_to_write.popleft()
                written += 1
                bar.update(1)
                bar.set_postfix(failed=summary.failed, refresh=False)

        # Batches run on the model threads (one, or MODEL_THREADS for a stage with launch_share),
        # at most `depth` ahead, so reading, bucketing, writing and the next batch's upload
        # overlap the model instead of waiting for it.
        inflight: collections.deque[tuple[list, Future]] = collections.deque()

        def ready(future: Future) -> bool:
            """Done without waiting: run and, for a launched batch, finished on its device too
            (otherwise the main thread would sit in finish() while it could read and stage the
            next batches, and the device would run dry between batches)."""
            if not future.done():
                return False
            if future.exception() is not None:
                return True  # collect raises it
            outs = future.result()
            return not callable(outs) or getattr(outs, "ready", lambda: True)()

        def collect(block: bool) -> None:
            nonlocal collected
            while inflight and (block or ready(inflight[0][1])):
                batch, future = inflight.popleft()
                with self.times.measure("wait for model"):
                    outs = future.result()
                    if callable(outs):
                        outs = self._finish_batch([u for _, _, u in batch], outs)
                for (st, ui, _), out in zip(batch, outs):
                    if isinstance(out, SampleFailure):
                        st.failure = st.failure or out
                    else:
                        st.results[ui] = out
                    st.remaining -= 1
                    if st.remaining == 0:
                        if st.failure is None:
                            st.future = builders.submit(self._build, st)
                        ready_to_write.append(st)
                ready_to_write.extend(after_batch.pop(collected, []))
                collected += 1
                block = False
            finish_ready(block=False)

        def flush(bkey: Hashable) -> None:
            nonlocal formed
            batch = buckets.pop(bkey)
            units = [u for _, _, u in batch]
            # The run's first launch goes alone: it is where kernels get compiled and loaded
            # (Triton's JIT on a cold cache, lazy CUDA modules), which two threads must not race on.
            alone = self.model_threads == 1 or self._tickets == 0
            share = 1.0 if alone else min(self.stage.launch_share(units), 1.0)
            inflight.append((batch, self._submit(units, self._prepare(units), share)))
            formed += 1
            collect(block=len(inflight) > self.depth)

        try:
            for _ in chunk:
                with self.times.measure("wait for input"):
                    item, units = next(loaded)
                if isinstance(units, SampleFailure):
                    st = _ItemState(item, 0)
                    st.failure = units
                    states.append(st)
                    completed_without_batch(st)
                    continue
                st = _ItemState(item, len(units))
                states.append(st)
                if not units:  # nothing for the model (a text-only record): build it now
                    st.future = builders.submit(self._build, st)
                    completed_without_batch(st)
                for ui, unit in enumerate(units):
                    bkey = self.stage.bucket(unit)
                    buckets.setdefault(bkey, []).append((st, ui, unit))
                    if len(buckets[bkey]) >= self._batch_limit(bkey):
                        flush(bkey)
            look_ahead()
            for bkey in tail_order({k: len(v) for k, v in buckets.items()}):
                flush(bkey)
            while inflight:
                collect(block=True)
            finish_ready(block=True)
            if after_batch or written != len(states):  # a bug, not bad input: never commit a short shard
                raise RuntimeError(f"{len(states) - written} sample(s) of unit {planned.name} were never written")
        except BaseException:
            for _, future in inflight:
                future.cancel()
            self._budget.open()
            writer.abort()
            raise
        with self.times.measure("commit shard"):
            stats = self.folder.commit_shard(planned.name, writer, covered_keys=[it.key for it in chunk],
                                             failures=failures, seconds=time.monotonic() - t0,
                                             still_mine=lambda: queue.worker.still_mine(planned.name))
        queue.worker.release(planned.name)
        if stats is None:
            log.warning("unit %s was committed by another worker (this worker's lease had expired); "
                        "its copy here is discarded", planned.name)
            job_summary.counts["units discarded (another worker committed them)"] += 1
            queue.giveup(planned)  # wait for its commit, or take it again if that worker dies too
            return False
        queue.worker.committed += 1
        job_summary.done += summary.done
        job_summary.failed += summary.failed
        job_summary.failure_reasons.update(summary.failure_reasons)
        if stats["shard"]:
            job_summary.shards.append(stats["shard"])
        return True
