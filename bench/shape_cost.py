"""The fixed cost of a new (batch, H, W) in eager mode, and what removes it (one process per
setting, since cuDNN's API choice is read at start-up).

The first call at a shape builds a cuDNN execution plan per convolution (~2 ms each) and a
cuDNN attention graph per attention call (~2 ms each, 140 in the SDXL UNet), host-side, while
the GPU waits (bench/shape_probe.py's profile). This script measures, for one setting, the
first-call and repeat cost per part at new shapes, the steady rate at 480x640, and optionally a
kernel-level profile and the VAE's resnet blocks compiled with dynamic shapes.

    python bench/shape_cost.py MODEL_DIR [--no-cudnn-sdp] [--profile] [--regional]
    TORCH_CUDNN_V8_API_DISABLED=1 python bench/shape_cost.py MODEL_DIR     # cuDNN's v7 heuristics
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shape_probe import ms as gpu_ms, wall  # noqa: E402

NEW_SHAPES = [(480, 640), (448, 640), (640, 480), (416, 640), (512, 640)]


def parts(fl, batch: int, h: int, w: int):
    x = (torch.rand(batch, 3, h, w, device="cuda") * 2 - 1).contiguous(memory_format=fl.memory_format)
    gens = fl._generators(list(range(batch)))
    holder = {}

    def enc():
        holder["lat"] = fl.encode(x, gens)

    def unet():
        holder["den"] = fl.denoise_once(holder["lat"], gens, [(h, w)] * batch)

    def dec():
        fl.decode(holder["den"])
    return {"encode": enc, "unet": unet, "decode": dec}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--no-cudnn-sdp", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--regional", action="store_true", help="compile the VAE's resnet blocks, dynamic shapes")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 64], help="steady-rate batch sizes at 512x640")
    args = ap.parse_args()
    from diffusers.utils import logging as dlog

    from augment import DiffusionFlavour, RecipeSettings, load_components, resolve_spec

    dlog.set_verbosity_error()
    if args.no_cudnn_sdp:
        torch.backends.cuda.enable_cudnn_sdp(False)
    label = ("v7-heuristics " if os.environ.get("TORCH_CUDNN_V8_API_DISABLED") else "") + \
        ("no-cudnn-sdp " if args.no_cudnn_sdp else "") + ("regional-compile " if args.regional else "")
    label = label.strip() or "default"
    fl = DiffusionFlavour(load_components(resolve_spec(args.model_dir)), RecipeSettings(dtype="bf16"), "cuda")
    if args.regional:
        from diffusers.models.resnet import ResnetBlock2D

        t0 = time.perf_counter()
        for m in fl.vae.modules():
            if isinstance(m, ResnetBlock2D):
                m.compile(dynamic=True)
    for p in parts(fl, 2, 256, 256).values():  # the first call ever (context, handles)
        p()
    t_first = time.perf_counter()
    first = {"encode": [], "unet": [], "decode": []}
    repeat = {"encode": [], "unet": [], "decode": []}
    for h, w in NEW_SHAPES[:4]:
        for name, fn in parts(fl, args.batch, h, w).items():
            first[name].append(wall(fn))
            repeat[name].append(wall(fn))
    if args.regional:
        print(f"[{label}] compile + first calls at 4 shapes: {time.perf_counter() - t0:.1f}s", flush=True)
    print(f"[{label}] batch {args.batch}, 4 new shapes: " + "; ".join(
        f"{k} first {1000 * sum(v) / 4:.0f} ms, repeat {1000 * sum(repeat[k]) / 4:.0f} ms" for k, v in first.items())
        + f" (all first calls {time.perf_counter() - t_first:.1f}s)", flush=True)
    for batch in args.batches:
        res = {}
        for name, fn in parts(fl, batch, 512, 640).items():
            fn()
            res[name] = gpu_ms(fn) / batch
        print(f"[{label}] steady 512x640 batch {batch}: " + ", ".join(f"{k} {v:.2f}" for k, v in res.items())
              + f" ms/img -> {1000 / sum(res.values()):.1f} img/s of GPU work", flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        ps = parts(fl, 32, 480, 640)
        ps["encode"]()
        ps["unet"]()
        for name in ("encode", "decode"):
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                ps[name]()
                torch.cuda.synchronize()
            print(f"[{label}] kernels of eager {name}, batch 32, 480x640:")
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=70))


if __name__ == "__main__":
    main()
