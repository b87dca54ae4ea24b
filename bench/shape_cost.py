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

import checkout  # noqa: E402,F401  (ddaug from this checkout, installed or not)

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


def fused_against_eager(fl, label: str) -> None:
    """Fuses fl's norms, printing how far the fused kernels land from eager: per kernel against
    an fp32 reference, and for the whole recipe (PSNR of the decoded images, same inputs)."""
    import torch.nn.functional as F
    from torch import nn

    from ddaug.augment.groupnorm import group_norm_act

    torch.manual_seed(0)
    for shape, groups, with_bias in [((32, 128, 512, 640), 32, False), ((32, 512, 64, 80), 32, True),
                                     ((3, 320, 61, 47), 32, True), ((1, 512, 4096), 32, False)]:
        norm = nn.GroupNorm(groups, shape[1]).cuda().bfloat16()
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
        x = (torch.randn(shape, device="cuda") * 2 + 0.5).bfloat16()
        bias = torch.randn(shape[:2], device="cuda").bfloat16() if with_bias else None
        expand = (lambda b: b.reshape(*b.shape, *([1] * (x.dim() - 2))))
        ref = F.silu(F.group_norm(x.float() + (expand(bias.float()) if with_bias else 0), groups,
                                  norm.weight.float(), norm.bias.float(), norm.eps))
        eager = lambda: F.silu(F.group_norm(x + (expand(bias) if with_bias else 0), groups, norm.weight, norm.bias, norm.eps))  # noqa: E731
        fused = lambda: group_norm_act(x, norm, act=True, bias=bias)  # noqa: E731
        fused()
        err_e, err_f = (eager().float() - ref).abs().max().item(), (fused().float() - ref).abs().max().item()
        print(f"[{label}] norm+silu {tuple(shape)} bias={with_bias}: eager {gpu_ms(eager):.3f} ms, fused "
              f"{gpu_ms(fused):.3f} ms; max error vs fp32: eager {err_e:.4f}, fused {err_f:.4f}", flush=True)
    images = (torch.rand(8, 480, 640, 3) * 255).to(torch.uint8)
    from ddaug.augment.recipe import StagedBatch

    def run():
        noise = torch.randn(8, 4, 60, 80, generator=torch.Generator().manual_seed(1))
        return torch.stack([torch.from_numpy(o) for o in fl.run_staged(
            StagedBatch(images, 8, [(480, 640)] * 8, None, noise))]).float()
    before = run()
    t0 = time.perf_counter()
    count = fl.fuse_norms()
    after = run()
    mse = ((before - after) ** 2).mean().item()
    print(f"[{label}] fused {count} norms; first fused call {time.perf_counter() - t0:.2f}s (Triton JIT); "
          f"recipe output fused vs eager, 8 images 480x640: PSNR {10 * torch.log10(torch.tensor(255.0 ** 2 / max(mse, 1e-12))).item():.1f} dB, "
          f"max abs {(before - after).abs().max().item():.0f}", flush=True)


def launch_overlap(fl, label: str) -> None:
    """Does launch_staged return before the GPU is done (so the next batch's host set-up
    overlaps it)? Wall ms of each launch and of waiting for its result, 6 calls of ~80 images
    at canvases never seen before and then again, launched two deep as the job does."""
    import numpy as np

    canvases = [(384, 640), (640, 384), (512, 512), (640, 640), (384, 512), (512, 384)]
    pending, lines = [], []
    for h, w in canvases * 2:  # new shapes, then the same again
        n = fl.batch_for((h, w))
        staged = fl.stage([np.zeros((h, w, 3), np.uint8)] * n, list(range(n)), [(h, w)] * n)
        t0 = time.perf_counter()
        pending.append(fl.launch_staged(staged))
        t1 = time.perf_counter()
        if len(pending) > 1:
            pending.pop(0)()
        lines.append(f"{h}x{w} b{n}: launch {1000 * (t1 - t0):.0f} ms, then wait {1000 * (time.perf_counter() - t1):.0f} ms")
    pending.pop(0)()
    print(f"[{label}] launch vs wait: " + "; ".join(lines), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--no-cudnn-sdp", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--regional", action="store_true", help="compile the VAE's resnet blocks, dynamic shapes")
    ap.add_argument("--fused", action="store_true", help="ddaug's fused Triton group norms (checked against eager)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 64], help="steady-rate batch sizes at 512x640")
    args = ap.parse_args()
    from diffusers.utils import logging as dlog

    from ddaug.augment import DiffusionFlavour, RecipeSettings, load_components, resolve_spec

    dlog.set_verbosity_error()
    if args.no_cudnn_sdp:
        torch.backends.cuda.enable_cudnn_sdp(False)
    label = ("v7-heuristics " if os.environ.get("TORCH_CUDNN_V8_API_DISABLED") else "") + \
        ("no-cudnn-sdp " if args.no_cudnn_sdp else "") + ("regional-compile " if args.regional else "") + \
        ("fused-norms " if args.fused else "")
    label = label.strip() or "default"
    fl = DiffusionFlavour(load_components(resolve_spec(args.model_dir)), RecipeSettings(dtype="bf16"), "cuda")
    if args.fused:
        fused_against_eager(fl, label)
    fl.fit_batch_size()
    launch_overlap(fl, label)
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
