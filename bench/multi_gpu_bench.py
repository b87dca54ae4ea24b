"""augment on 1 GPU vs 2 GPUs of one host, same inputs, one run; and whether the outputs agree.

    python bench/multi_gpu_bench.py --images 256 --batch 8 --results bench/RESULTS.md

Runs `cli.py augment` once as one process on cuda:0, then under `accelerate launch --multi_gpu
--num_processes 2` (torchrun when accelerate is missing), on full-size SDXL UNet + VAE with
random weights. Both times include model load, as a user's run does. Then compares every
sample's image between the two outputs.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from results import emit  # noqa: E402

from augment_bench import build_sdxl_folder, make_inputs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def images_by_key(folder: str) -> dict[str, np.ndarray]:
    out = {}
    for shard in glob.glob(os.path.join(folder, "*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".png"):
                    out[m.name[:-4]] = np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read())))
    return out


def run(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds incl. start and model load, slowest rank's job seconds after its model loaded)."""
    import re

    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    jobs = [float(x) for x in re.findall(r"new shard\(s\) in ([0-9.]+)s", proc.stderr)]
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
    one, one_job = run([sys.executable, "cli.py", *common, "-o", os.path.join(work, "one"), "--device", "cuda:0"])
    try:
        import accelerate  # noqa: F401
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        name = "accelerate launch --multi_gpu --num_processes 2"
    except ImportError:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        name = "torchrun --nproc_per_node 2"
    two, two_job = run([*launcher, "cli.py", *common, "-o", os.path.join(work, "two")])
    a, b = images_by_key(os.path.join(work, "one")), images_by_key(os.path.join(work, "two"))
    assert a.keys() == b.keys() and len(a) == args.images, (len(a), len(b))
    diffs = [np.abs(a[k].astype(int) - b[k].astype(int)).max() for k in a]
    identical = sum(d == 0 for d in diffs)
    lines = ["## augment on 2 GPUs vs 1, SDXL architecture (random weights), 1024x1024, eager",
             f"- date {datetime.date.today()}, {torch.cuda.device_count()}x {torch.cuda.get_device_name()}, "
             f"torch {torch.__version__}",
             f"- command: `python bench/multi_gpu_bench.py --images {args.images} --batch {args.batch}`",
             "", "| run | images | seconds incl. start + load | img/s | speed-up | img/s after load | speed-up |",
             "|---|---|---|---|---|---|---|",
             f"| one process, cuda:0 | {args.images} | {one:.1f} | {args.images / one:.2f} | 1.00x | "
             f"{args.images / one_job:.2f} | 1.00x |",
             f"| `{name}` | {args.images} | {two:.1f} | {args.images / two:.2f} | {one / two:.2f}x | "
             f"{args.images / two_job:.2f} | {one_job / two_job:.2f}x |",
             "", f"Outputs: {identical} of {len(diffs)} images byte-identical between the two runs; largest pixel "
                 f"difference {max(diffs)} (of 255). Same keys, each once.", ""]
    emit(lines, args.results)


if __name__ == "__main__":
    main()
