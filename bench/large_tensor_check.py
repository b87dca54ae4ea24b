"""GPU correctness at sizes past 2^31 elements, where CUDA kernels with 32-bit indexing go wrong
without an error: PyTorch's nearest upsampling (both layouts) against ddaug's nearest_2x, and
the SDXL VAE decoder at 1024² (diffusers' eager modules, then ddaug's) with the last image of
a big batch against the same image decoded alone.

    python bench/large_tensor_check.py MODEL_FOLDER [--batch 20] [--channels-last] [--skip-upsample]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

import checkout  # noqa: E402,F401  (ddaug from this checkout, installed or not)


def upsample_checks(device: str) -> None:
    from ddaug.augment.upsample import nearest_2x

    for shape in [(16, 512, 256, 256), (17, 512, 256, 256), (24, 512, 256, 256), (32, 512, 256, 256),
                  (9, 256, 512, 512), (26, 256, 512, 512)]:
        x = torch.randn(shape, device=device, dtype=torch.bfloat16)
        ref = nearest_2x(x)  # a broadcast copy: 64-bit indexing
        for fmt in (torch.contiguous_format, torch.channels_last):
            xf = x.contiguous(memory_format=fmt)
            timings = {}
            for name, fn in (("F.interpolate", lambda: F.interpolate(xf, scale_factor=2.0, mode="nearest")),
                             ("nearest_2x", lambda: nearest_2x(xf))):
                out = fn()
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(3):
                    out = fn()
                torch.cuda.synchronize()
                timings[name] = (time.perf_counter() - t) / 3 * 1000
                bad = [i for i in range(shape[0]) if not torch.equal(out[i], ref[i])]
                print(f"upsample {shape} {'NHWC' if fmt == torch.channels_last else 'NCHW'} {name}: "
                      f"{timings[name]:.1f} ms, output {out.numel() / 2**31:.2f} x 2^31 elements, "
                      f"wrong images {len(bad)}/{shape[0]}" + (f" (first {bad[0]})" if bad else ""), flush=True)
                del out
        del x, ref
        torch.cuda.empty_cache()


def decoder_checks(folder: str, batch: int, device: str, channels_last: bool) -> None:
    from diffusers import AutoencoderKL

    from ddaug.augment.groupnorm import fuse_group_norms
    from ddaug.augment.upsample import guard_upsamplers

    torch.manual_seed(0)
    z = torch.randn(batch, 4, 128, 128, device=device, dtype=torch.bfloat16)
    for label in ("diffusers eager", "eager + guarded upsample", "ddaug fused"):
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.bfloat16).to(device).eval()
        if label != "diffusers eager":
            guard_upsamplers(vae)
        if label == "ddaug fused":
            fuse_group_norms(vae)
            if channels_last:
                vae.to(memory_format=torch.channels_last)
        with torch.no_grad():
            zin = z.contiguous(memory_format=torch.channels_last) if channels_last and label == "ddaug fused" else z
            big = vae.decode(zin, return_dict=False)[0]
            alone = [vae.decode(zin[i:i + 1], return_dict=False)[0][0] for i in (0, batch - 1)]
        for i, one in zip((0, batch - 1), alone):
            diff = (big[i].float() - one.float()).abs()
            print(f"decoder 1024² batch {batch}, {label}: image {i} vs alone max {diff.max().item():.4f} "
                  f"mean {diff.mean().item():.5f}; std in batch {big[i].float().std().item():.4f}, "
                  f"alone {one.float().std().item():.4f}", flush=True)
        del vae, big, alone
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--channels-last", action="store_true", help="the fused VAE in channels-last")
    ap.add_argument("--skip-upsample", action="store_true")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    if not args.skip_upsample:
        upsample_checks("cuda")
    decoder_checks(args.folder, args.batch, "cuda", args.channels_last)


if __name__ == "__main__":
    main()
