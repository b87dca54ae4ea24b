"""Where a model part's device time goes, kernel by kernel: torch.profiler over a few calls of
one part of the default recipe (fused norms, phase convs, auto batch) at one canvas.

    python bench/profile_parts.py [--canvas 512x640] [--part "vae decode"] [--top 20]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import checkout  # noqa: F401  (ddaug from this checkout, installed or not)
import torch
from augment_bench import build_sdxl_folder, default_flavour
from mfu import _no_grad_attention, _part_calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--canvas", default="512x640")
    ap.add_argument("--part", default="vae decode", choices=["vae encode", "unet", "vae decode"])
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    h, w = map(int, args.canvas.split("x"))
    model = os.path.join(tempfile.mkdtemp(prefix="ddaug-prof-"), "sdxl")
    build_sdxl_folder(model)
    flavour = default_flavour(model)
    n = flavour.batch_for((h, w))
    with _no_grad_attention():
        call = _part_calls(flavour, n, (h, w))[args.part]
        call()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                call()
            torch.cuda.synchronize()
    print(f"{args.part} at {h}x{w}, batch {n}, 3 calls")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=70))


if __name__ == "__main__":
    main()
