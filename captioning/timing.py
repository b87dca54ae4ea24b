"""Where a caption run against a server spends its time, and what bounds it.

The job's generic breakdown would count every second spent waiting for a batch's answers as
"model", even when the client itself was too slow to keep the server busy. Here the parts are
grouped as the user can act on them: the client's CPU (read, decode, resize, encode in the
loader threads; request and reply JSON in the request threads; sample json in the builders),
waiting on the server (request seconds, summed over the --concurrency request threads), and
tar writing (main thread).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Iterator

from ddaug.pipeline.timing import StageTimes

# Measured in thread CPU time (with 4 loaders and C request threads sharing the GIL, wall time
# inside a thread would count the others' work too).
CLIENT_CPU = ("decode+resize+encode", "request JSON", "reply JSON", "build members")
TAR_WRITING = ("write tar", "commit shard")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


CAPTION_CPU_ADVICE = "give it more cores, or --max-pixels 0 so images go as their original bytes"


class CaptionTimes(StageTimes):
    """Also the breakdown of any job that sends requests to a server (translate); cpu_advice is
    what its user can do when the client's CPU is the bound."""

    def __init__(self, concurrency: int, cpu_advice: str = CAPTION_CPU_ADVICE) -> None:
        super().__init__()
        self.concurrency = concurrency
        self.cpu_advice = cpu_advice

    @contextmanager
    def measure_cpu(self, part: str) -> Iterator[None]:
        t0 = time.thread_time()
        try:
            yield
        finally:
            self.add(part, time.thread_time() - t0)

    def shares(self, wall: float) -> dict[str, float]:
        """client_cpu: share of the cores' time; in_flight: mean requests waiting on the server
        over --concurrency; tar: share of wall time."""
        with self._lock:
            s = dict(self.seconds)
        return {"client_cpu": sum(s.get(p, 0.0) for p in CLIENT_CPU) / (wall * usable_cores()),
                "in_flight": s.get("waiting on the server", 0.0) / (wall * self.concurrency),
                "tar": sum(s.get(p, 0.0) for p in TAR_WRITING) / wall}

    def summary(self, wall: float, workers: int) -> str:
        if wall <= 0 or not self.seconds:
            return "no timings"
        with self._lock:
            s = dict(self.seconds)
        cpu = " + ".join(f"{p} {s[p]:.1f}s" for p in CLIENT_CPU if s.get(p))
        sh = self.shares(wall)
        server = s.get("waiting on the server", 0.0)
        tar = sum(s.get(p, 0.0) for p in TAR_WRITING)
        return (f"client CPU {cpu or 'none'} ({sh['client_cpu']:.0%} of {usable_cores()} cores); "
                f"waiting on the server {server:.1f}s over {self.concurrency} request threads "
                f"({sh['in_flight'] * self.concurrency:.1f} in flight on average, {sh['in_flight']:.0%} of "
                f"--concurrency); tar writing {tar:.1f}s ({sh['tar']:.0%}). {self.bottleneck(wall)}")

    def bottleneck(self, wall: float) -> str:
        sh = self.shares(wall)
        if sh["in_flight"] >= 0.9:
            return ("Bound by the server (as it should be): raise --concurrency if the server has "
                    "headroom.")
        if sh["client_cpu"] >= 0.7:
            return f"Bound by the client's CPU: {self.cpu_advice}."
        if sh["tar"] >= 0.2:
            return "Bound by tar writing: use a faster output disk."
        return ("No single bound: fewer requests were in flight than --concurrency (few inputs, or "
                "--workers too low to read ahead).")
