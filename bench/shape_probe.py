"""Where the time goes on COCO-like sizes: one GPU command that answers the design questions.

1. Model load: ddaug's path (fp32 on the host, then cast and move) vs loading bf16 straight to
   the device.
2. The fixed cost of the first call at a new (batch, H, W): per part (VAE encode, UNet, VAE
   decode), with PyTorch's default attention backend choice and with cuDNN attention left out,
   plus a profile of one first-of-shape UNet call (top host-side ops).
3. Eager throughput at 480x640 by batch size and memory format.
4. torch.compile of the VAE alone with dynamic H/W: cold compile time, recompiles across shapes,
   speed; against the eager figures of 3.

    python bench/shape_probe.py [--skip compile]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import checkout  # noqa: E402,F401  (ddaug from this checkout, installed or not)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from augment_bench import build_sdxl_folder  # noqa: E402

SHAPES = [(480, 640), (448, 640), (640, 480), (416, 640), (512, 640), (384, 640), (640, 448), (480, 608)]


def ms(fn, reps: int = 3) -> float:
    """Median GPU ms of fn over reps (after the caller's warm-up)."""
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return sorted(times)[len(times) // 2]


def wall(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def part_load(model_dir: str) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ddaug.augment import DiffusionFlavour, RecipeSettings, load_components, resolve_spec

    t0 = time.perf_counter()
    comps = load_components(resolve_spec(model_dir))
    t1 = time.perf_counter()
    fl = DiffusionFlavour(comps, RecipeSettings(dtype="bf16"), "cuda")
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    print(f"LOAD ddaug path: from_pretrained fp32 {t1 - t0:.1f}s + cast/move {t2 - t1:.1f}s = {t2 - t0:.1f}s", flush=True)
    del fl, comps
    torch.cuda.empty_cache()
    t0 = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", torch_dtype=torch.bfloat16,
                                                device_map="cuda", use_safetensors=True)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", torch_dtype=torch.bfloat16,
                                        device_map="cuda", use_safetensors=True)
    torch.cuda.synchronize()
    print(f"LOAD bf16 straight to cuda (device_map): {time.perf_counter() - t0:.1f}s "
          f"(unet on {next(unet.parameters()).device}, {next(unet.parameters()).dtype})", flush=True)
    del unet, vae
    torch.cuda.empty_cache()


def flavour(model_dir: str, channels_last: bool = False):
    from ddaug.augment import DiffusionFlavour, RecipeSettings, load_components, resolve_spec

    fl = DiffusionFlavour(load_components(resolve_spec(model_dir)), RecipeSettings(dtype="bf16"), "cuda")
    if channels_last:  # weights and activations; the recipe keeps this for compiled graphs only
        fl.memory_format = torch.channels_last
        fl.vae.to(memory_format=torch.channels_last)
        fl.unet.to(memory_format=torch.channels_last)
    return fl


def parts_at(fl, batch: int, h: int, w: int):
    x = torch.rand(batch, 3, h, w, device="cuda") * 2 - 1
    gens = fl._generators(list(range(batch)))
    x = x.contiguous(memory_format=fl.memory_format)
    lat = fl.encode(x, gens)
    return {"encode": lambda: fl.encode(x, gens),
            "unet": lambda: fl.denoise_once(lat, gens, [(h, w)] * batch),
            "decode": lambda: fl.decode(lat)}


def part_new_shapes(fl, label: str, batch: int = 4) -> None:
    """First-call and repeat wall seconds per part at shapes this process has not seen."""
    firsts = {"encode": [], "unet": [], "decode": []}
    repeats = {"encode": [], "unet": [], "decode": []}
    for h, w in SHAPES[:4]:
        x = torch.rand(batch, 3, h, w, device="cuda") * 2 - 1
        gens = fl._generators(list(range(batch)))
        t = wall(lambda: fl.encode(x, gens))
        lat = fl.encode(x, gens)
        firsts["encode"].append(t)
        repeats["encode"].append(wall(lambda: fl.encode(x, gens)))
        for name, fn in (("unet", lambda: fl.denoise_once(lat, gens, [(h, w)] * batch)), ("decode", lambda: fl.decode(lat))):
            firsts[name].append(wall(fn))
            repeats[name].append(wall(fn))
    print(f"NEWSHAPE {label}: " + "; ".join(
        f"{k} first {sum(v) / len(v) * 1000:.0f} ms vs repeat {sum(repeats[k]) / len(repeats[k]) * 1000:.0f} ms"
        for k, v in firsts.items()), flush=True)


def part_profile_first(fl, h: int, w: int, batch: int = 4) -> None:
    from torch.profiler import ProfilerActivity, profile

    x = torch.rand(batch, 3, h, w, device="cuda") * 2 - 1
    gens = fl._generators(list(range(batch)))
    lat = fl.encode(x, gens)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fl.denoise_once(lat, gens, [(h, w)] * batch)
        torch.cuda.synchronize()
    print("PROFILE first-of-shape UNet call, top host time:", flush=True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60), flush=True)


def part_eager_rates(model_dir: str) -> None:
    for cl in (False, True):
        fl = flavour(model_dir, channels_last=cl)
        for batch in (16, 32, 64):
            p = parts_at(fl, batch, 480, 640)
            res = {}
            for name, fn in p.items():
                fn()
                res[name] = ms(fn) / batch
            tot = sum(res.values())
            print(f"EAGER 480x640 batch {batch} {'channels_last' if cl else 'contiguous'}: " +
                  ", ".join(f"{k} {v:.2f}" for k, v in res.items()) + f" ms/img -> {1000 / tot:.1f} img/s GPU; "
                  f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
            torch.cuda.reset_peak_memory_stats()
        del fl
        torch.cuda.empty_cache()


def part_compile_vae(model_dir: str, dynamic: bool) -> None:
    fl = flavour(model_dir, channels_last=True)
    fl.vae.encoder = torch.compile(fl.vae.encoder, dynamic=dynamic)
    fl.vae.decoder = torch.compile(fl.vae.decoder, dynamic=dynamic)
    label = "dynamic" if dynamic else "static"
    for i, (h, w) in enumerate(SHAPES[:3]):
        batch = 32
        x = (torch.rand(batch, 3, h, w, device="cuda") * 2 - 1).contiguous(memory_format=torch.channels_last)
        gens = fl._generators(list(range(batch)))
        t_enc = wall(lambda: fl.encode(x, gens))
        lat = fl.encode(x, gens)
        t_dec = wall(lambda: fl.decode(lat))
        e, d = ms(lambda: fl.encode(x, gens)) / batch, ms(lambda: fl.decode(lat)) / batch
        print(f"COMPILE VAE {label} shape {h}x{w} b{batch}: first encode {t_enc:.1f}s, first decode {t_dec:.1f}s; "
              f"steady encode {e:.2f} decode {d:.2f} ms/img", flush=True)
    # Another batch size at a seen shape
    x = (torch.rand(8, 3, 480, 640, device="cuda") * 2 - 1).contiguous(memory_format=torch.channels_last)
    gens = fl._generators(list(range(8)))
    t = wall(lambda: fl.decode(fl.encode(x, gens)))
    print(f"COMPILE VAE {label}: batch 8 at a seen shape, first call {t:.1f}s", flush=True)
    del fl
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip", nargs="*", default=[])
    args = ap.parse_args()
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    print("torch", torch.__version__, torch.cuda.get_device_name(), "cudnn", torch.backends.cudnn.version(),
          "sdp flash/mem/math/cudnn:", torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
          torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled(), flush=True)
    work = tempfile.mkdtemp(prefix="probe-")
    model_dir = os.path.join(work, "sdxl")
    t = time.perf_counter()
    build_sdxl_folder(model_dir)
    print(f"built model folder in {time.perf_counter() - t:.0f}s", flush=True)
    if "load" not in args.skip:
        part_load(model_dir)
    if "shapes" not in args.skip:
        fl = flavour(model_dir)
        wall(lambda: fl.decode(fl.denoise_once(fl.encode(torch.rand(4, 3, 256, 256, device="cuda"), fl._generators(range(4))),
                                               fl._generators(range(4)), [(256, 256)] * 4)))  # first-ever call
        part_new_shapes(fl, "default sdpa")
        torch.backends.cuda.enable_cudnn_sdp(False)
        SHAPES[:4] = SHAPES[4:8]
        part_new_shapes(fl, "cudnn sdpa off")
        torch.backends.cuda.enable_cudnn_sdp(True)
        part_profile_first(fl, 352, 640)
        del fl
        torch.cuda.empty_cache()
    if "eager" not in args.skip:
        part_eager_rates(model_dir)
    if "compile" not in args.skip:
        part_compile_vae(model_dir, dynamic=True)
    print("PROBE DONE", flush=True)


if __name__ == "__main__":
    main()
