"""augment on 1 GPU vs 2 GPUs of one host, same inputs, one run; and whether the outputs agree.

    python bench/multi_gpu_bench.py --images 256 --batch 8 --results bench/RESULTS.md

Runs `ddaug augment` once as one process on cuda:0, then under `accelerate launch --multi_gpu
--num_processes 2` (torchrun when accelerate is missing), on full-size SDXL UNet + VAE with
random weights. Both times include model load, as a user's run does. Then compares every
sample's image between the two outputs.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time

import checkout  # noqa: E402,F401  (ddaug from this checkout, installed or not)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from results import emit  # noqa: E402

from augment_bench import build_sdxl_folder, compare, make_inputs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def job_seconds(stderr: str) -> list[float]:
    import re

    return [float(x) for x in re.findall(r"new shard\(s\) in ([0-9.]+)s", stderr)]


def run(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds incl. start and model load, slowest rank's job seconds after its model loaded)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    jobs = job_seconds(proc.stderr)
    return time.perf_counter() - t0, max(jobs) if jobs else float("nan")


def run_ranks(cmd: list[str], world: int) -> tuple[float, float]:
    """The shell-job way: one plain process per GPU (--rank/--world-size/--device), started
    together; (wall seconds of the slowest, slowest rank's job seconds)."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen([*cmd, "--rank", str(r), "--world-size", str(world), "--device", f"cuda:{r}"],
                              cwd=ROOT, stderr=subprocess.PIPE, text=True) for r in range(world)]
    jobs = []
    for p in procs:
        err = p.communicate()[1]
        if p.returncode != 0:
            raise SystemExit(f"failed: {' '.join(cmd)}\n{err[-3000:]}")
        jobs += job_seconds(err)
    return time.perf_counter() - t0, max(jobs) if jobs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--results", default=None)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="ddaug-mgpu-")
    model, inputs = os.path.join(work, "sdxl"), os.path.join(work, "in")
    build_sdxl_folder(model)
    make_inputs(inputs, args.images, 1024)
    common = ["augment", inputs, "--model", model, "--batch-size", str(args.batch), "--shard-size", "64", "-q",
              "--workers", "8"]
    runs = [("one process, cuda:0", os.path.join(work, "one"),
             run([sys.executable, "-m", "ddaug", *common, "-o", os.path.join(work, "one"), "--device", "cuda:0"]))]
    try:
        import accelerate  # noqa: F401
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        name = "accelerate launch --multi_gpu --num_processes 2"
    except ImportError:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        name = "torchrun --nproc_per_node 2"
    out = os.path.join(work, "two")
    runs.append((f"`{name}`", out, run([*launcher, "-m", "ddaug", *common, "-o", out])))
    out = os.path.join(work, "plain")
    runs.append(("two plain processes, `--rank r --world-size 2 --device cuda:r`", out,
                 run_ranks([sys.executable, "-m", "ddaug", *common, "-o", out], 2)))
    (_, one_dir, (one, one_job)) = runs[0]
    lines = ["## augment on 2 GPUs vs 1, SDXL architecture (random weights), 1024x1024, eager",
             f"- date {datetime.date.today()}, {torch.cuda.device_count()}x {torch.cuda.get_device_name()}, "
             f"torch {torch.__version__}",
             f"- command: `python bench/multi_gpu_bench.py --images {args.images} --batch {args.batch}`",
             "", "| run | images | seconds incl. start + load | start + load | img/s | speed-up | img/s after load "
             "| speed-up | output vs one process |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, folder, (wall, job) in runs:
        agreement = "-" if folder == one_dir else compare(one_dir, folder)
        ledger = os.path.join(folder, "failures.jsonl")
        if os.path.exists(ledger) and os.path.getsize(ledger):
            with open(ledger) as f:
                failures = f.read().splitlines()
            agreement += f"; {len(failures)} failed, e.g. {failures[0][:300]}"
            print(f"{label}: {len(failures)} failures, first: {failures[0][:1000]}", file=sys.stderr)
        lines.append(f"| {label} | {args.images} | {wall:.1f} | {wall - job:.1f} | {args.images / wall:.2f} | "
                     f"{one / wall:.2f}x | {args.images / job:.2f} | {one_job / job:.2f}x | {agreement} |")
    emit(lines + [""], args.results)


if __name__ == "__main__":
    main()
