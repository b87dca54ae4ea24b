"""A job's workers as Ray tasks, on an existing Ray cluster (`pip install 'ddaug[ray]'`).

Each task runs the ordinary command line with --join in a fresh process (`python -m ddaug ...`),
so it is a worker like any other: it takes the plan's units by lease from the shared output
folder (shards/units.py) until all are committed. A task Ray retries after a lost node simply
joins again; workers started any other way (Slurm, torchrun, by hand) may help at the same time.

    import ray
    from ddaug.pipeline.ray_workers import run_workers

    ray.init(address="auto")
    results = run_workers(["augment", "/shared/photos", "-o", "/shared/out", "--model", "sdxl"],
                          workers=16, num_gpus=1)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Sequence

from .command import UserError


@dataclass
class WorkerResult:
    host: str
    returncode: int
    summary: str  # the worker's last line: its summary, or its one-line error


def _run_worker(args: list[str], env: dict[str, str]) -> WorkerResult:
    proc = subprocess.run([sys.executable, "-m", "ddaug", *args, "--join"], env={**os.environ, **env},
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return WorkerResult(socket.gethostname(), proc.returncode, lines[-1] if lines else "")


def run_workers(args: Sequence[str], workers: int, *, num_gpus: float = 0, num_cpus: float = 1,
                env: dict[str, str] | None = None) -> list[WorkerResult]:
    """Run `workers` Ray tasks of `ddaug ARGS --join` (ARGS: a command and its options, e.g.
    ["caption", "in/", "-o", "out/", ...]) and wait for them. Connects with ray.init() when no
    Ray session is open (RAY_ADDRESS picks the cluster). env: variables for the workers."""
    try:
        import ray
    except ImportError:
        raise UserError("Ray is not installed: pip install 'ddaug[ray]'") from None
    if workers < 1:
        raise UserError(f"workers must be at least 1, not {workers}")
    if "--overwrite" in args:
        raise UserError("--overwrite cannot be given to joining workers: run the command once with "
                        "--overwrite --plan-only first")
    if not ray.is_initialized():
        ray.init()
    task = ray.remote(num_gpus=num_gpus, num_cpus=num_cpus)(_run_worker)
    return ray.get([task.remote(list(map(str, args)), dict(env or {})) for _ in range(workers)])
