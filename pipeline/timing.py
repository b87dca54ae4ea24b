"""Where a run's time goes: seconds per named part, summed over the threads that did it.

The job times its own parts (reading, waiting, building members, writing tars); a stage adds
finer ones (augment: host-to-device copy, VAE encode, UNet, VAE decode, device-to-host copy,
timed with CUDA events so they measure the GPU, not the launch). The breakdown is logged at the
end of a run and tells the user what to change: an input-bound run wants more --workers, a
model-bound one a bigger batch or --compile.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from contextlib import contextmanager
from typing import Iterator

# Parts in pipeline order; each says which thread pays for it.
JOB_PARTS = {
    "read+decode": "loader threads",
    "wait for input": "main thread, idle until a loader delivers",
    "prepare batch": "main thread (a stage's CPU share of a batch: stacking, pinning, noise)",
    # A stage that launches (pipeline/job.py) spends "model" enqueueing; the device's time is
    # then part of "wait for model".
    "model": "model threads (two for a stage that launches: the next batch's set-up overlaps the last's launch)",
    "wait for model": "main thread, idle until a batch returns",
    "build members": "builder threads (image encode, json)",
    "wait for build": "main thread, idle until a sample's members are encoded",
    "write tar": "main thread",
    "commit shard": "main thread (fsync, rename, done marker)",
}


class StageTimes:
    """Thread-safe accumulator of seconds and counts per part. Parts timed on the device
    (DeviceTimeline on CUDA) are remembered as GPU parts: their sum over the wall time is how
    busy the GPU was."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()
        self.counts: collections.Counter = collections.Counter()  # model calls, images, batch slots
        self.gpu_parts: set[str] = set()

    def add(self, part: str, seconds: float, calls: int = 1, gpu: bool = False) -> None:
        with self._lock:
            self.seconds[part] += seconds
            self.calls[part] += calls
            if gpu:
                self.gpu_parts.add(part)

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    @contextmanager
    def measure(self, part: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(part, time.perf_counter() - t0)

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            return {k: round(v, 4) for k, v in self.seconds.items()}

    def summary(self, wall: float, workers: int) -> str:
        """One line: each part's seconds and share of wall time in pipeline order, the stage's
        own parts in brackets after "model", then what bounds the run."""
        if wall <= 0 or not self.seconds:
            return "no timings"
        with self._lock:
            seconds = dict(self.seconds)

        def fmt(part: str) -> str:
            threads = f" over {workers} threads" if part in ("read+decode", "build members") else ""
            return f"{part} {seconds[part]:.1f}s ({seconds[part] / wall:.0%}{threads})"

        inner = [fmt(p) for p in seconds if p not in JOB_PARTS]
        parts = []
        for part in JOB_PARTS:
            if part in seconds:
                parts.append(fmt(part) + (f" [{', '.join(inner)}]" if part == "model" and inner else ""))
        return "; ".join(parts) + f". {self.bottleneck(wall)}"

    def bottleneck(self, wall: float) -> str:
        """What to change. With GPU parts, from the GPU's idle time: each reason below is a
        share of the seconds the GPU waited; otherwise from the threads' waits."""
        sec = self.seconds
        if not self.gpu_parts:
            if sec.get("wait for input", 0.0) / wall > 0.2:
                return "Bound by reading/decoding inputs: raise --workers."
            if sec.get("wait for build", 0.0) / wall > 0.2:
                return "Bound by encoding outputs: raise --workers or use --image-format webp."
            if sec.get("model", 0.0) / wall > 0.8:
                return "Bound by the model (as it should be)."
            return "No single bound."
        samples = self.counts.get("gpu samples", 0)
        if samples:  # NVML: the share of time a kernel was running
            busy, source = self.counts["gpu busy %"] / samples / 100, "nvidia-smi"
        else:  # CUDA events also count the gaps between kernels inside a model call
            busy, source = min(sum(sec[p] for p in self.gpu_parts) / wall, 1.0), "CUDA events, an upper bound"
        if busy >= 0.85:
            return f"Bound by the GPU (busy {busy:.0%}, {source}), as it should be."
        calls, images, slots = (self.counts.get(k, 0) for k in ("model calls", "images", "batch slots"))
        shapes = self.counts.get("new shapes", 0)
        waits = {"reading/decoding inputs: raise --workers": sec.get("wait for input", 0.0),
                 "encoding outputs: raise --workers or use --image-format webp": sec.get("wait for build", 0.0)}
        cause, waited = max(waits.items(), key=lambda kv: kv[1])
        text = f"GPU busy {busy:.0%} ({source})"
        if waited / wall > 0.1:
            text += f"; the model waited on {cause} ({waited:.1f}s)"
        elif calls and shapes / calls > 0.25:
            text += (f"; shape changes: {shapes} of {calls} model calls were at a new (batch, H, W), which cuDNN "
                     "sets up on the host while the GPU waits (fewer distinct sizes, or a larger --shard-size, help)")
        else:
            text += "; kernel launches on the model thread leave gaps (larger batches help)"
        if calls and slots and images / slots < 0.6:
            text += (f"; batches were small: {images / calls:.1f} images per call, {images / slots:.0%} of what "
                     "fits (few images per canvas in each --shard-size block)")
        return text + "."


class GpuBusySampler:
    """The GPU's utilization (the share of time a kernel was running, as nvidia-smi shows it),
    sampled through NVML every `period` seconds into times.counts while a job runs. CUDA events
    cannot give this: an interval between two events also holds the gaps in which the host was
    still setting up the next kernel. Without NVML (nvidia-ml-py) or a CUDA device it does
    nothing."""

    def __init__(self, device, times: StageTimes, period: float = 0.2) -> None:
        self.times, self.period = times, period
        self.handle = None
        self._stop = threading.Event()
        if getattr(device, "type", None) != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = device.index or 0
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            ids = [v for v in visible.split(",") if v.strip()]
            if ids and ids[index].strip().isdigit():
                index = int(ids[index])
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml = pynvml
        except Exception:  # no NVML here: the report falls back to CUDA events
            self.handle = None

    def __enter__(self) -> "GpuBusySampler":
        if self.handle is not None:
            self._thread = threading.Thread(target=self._sample, name="gpu-busy", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.period):
            try:
                util = self._nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu
            except Exception:
                return
            self.times.count("gpu busy %", util)
            self.times.count("gpu samples")

    def __exit__(self, *exc) -> None:
        self._stop.set()


class DeviceTimeline:
    """Marks along one batch's work on a device. On CUDA the marks are events, so the intervals
    are GPU time, read after the batch has synchronised; elsewhere work is synchronous and a
    host clock does. Two batches launched at once on the job's two model threads share one
    stream, so each one's intervals also hold the other's kernels queued in between: the parts'
    sum may then pass the wall time (the GPU-busy figure comes from NVML where it can)."""

    def __init__(self, device, times: StageTimes | None) -> None:
        self.times = times
        self.cuda = times is not None and getattr(device, "type", str(device)) == "cuda"
        self.marks: list[tuple[str, object]] = []
        self.mark("start")

    def mark(self, part_ending: str) -> None:
        if self.times is None:
            return
        if self.cuda:
            import torch

            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((part_ending, ev))
        else:
            self.marks.append((part_ending, time.perf_counter()))

    def finish(self) -> None:
        """Add each interval to times (call after the device has finished the batch)."""
        if self.times is None:
            return
        # torch refuses an interval whose end the GPU has not reached, and a caller may have
        # waited on an event recorded before the last mark (DiffusionFlavour._launch does).
        if self.cuda:
            self.marks[-1][1].synchronize()
        for (_, a), (part, b) in zip(self.marks, self.marks[1:]):
            secs = a.elapsed_time(b) / 1000 if self.cuda else b - a
            self.times.add(part, secs, gpu=self.cuda)
