"""Augment throughput on a GPU: naive diffusers loop vs `ddaug augment`, same inputs, one run.

Full-size SDXL UNet + VAE are built from the published SDXL base config with random weights
(same FLOPs as the real ones), saved with save_pretrained (safetensors) and loaded back through
ddaug's real `--model FOLDER` path. Writes a markdown block to stdout and to --results.

    python bench/augment_bench.py --images 64 --naive-images 16 --results bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from results import emit  # noqa: E402

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
# SSD-1B: SDXL's UNet with transformer depth cut (segmind's distillation). Its exact config is not
# reachable offline; this keeps SDXL's blocks with fewer transformer layers and a resnet-only mid
# block, and the bench prints its measured TFLOP per call so it can be checked against the
# 4.15 TFLOP of the real one (shared/NOTES.md).
SSD1B_UNET = dict(SDXL_UNET, transformer_layers_per_block=(1, 2, 4), mid_block_type="UNetMidBlock2D",
                  reverse_transformer_layers_per_block=((4, 4, 4), (2, 2, 2), (1, 1, 1)))
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, scaling_factor=0.13025,
    force_upcast=True)
SDXL_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                      beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
                      prediction_type="epsilon", interpolation_type="linear")


def build_sdxl_folder(folder: str, unet_config: dict = SDXL_UNET) -> None:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**unet_config).to(torch.bfloat16)
        vae = AutoencoderKL(**SDXL_VAE).to(torch.bfloat16)
    unet.save_pretrained(os.path.join(folder, "unet"))
    vae.save_pretrained(os.path.join(folder, "vae"))
    EulerDiscreteScheduler(**SDXL_SCHEDULER).save_pretrained(os.path.join(folder, "scheduler"))
    del unet, vae
    torch.cuda.empty_cache()


class BusySampler:
    """GPU busy fraction: nvidia-smi's utilization.gpu (share of time a kernel was running),
    sampled every 100 ms while the block runs."""

    def __enter__(self):
        import subprocess

        idx = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
        self.proc = subprocess.Popen(["nvidia-smi", "-i", idx, "--query-gpu=timestamp,utilization.gpu",
                                      "--format=csv,noheader,nounits", "-lms", "100"],
                                     stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        out = self.proc.communicate()[0]
        self.samples = []  # (seconds since the first sample, utilization %)
        t0 = None
        for line in out.splitlines():
            try:
                stamp, util = [x.strip() for x in line.split(",")]
                t = datetime.datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp()
                t0 = t if t0 is None else t0
                self.samples.append((t - t0, float(util)))
            except ValueError:
                continue
        vals = [u for _, u in self.samples]
        self.busy = sum(vals) / len(vals) / 100 if vals else float("nan")

    def busy_over_last(self, seconds: float) -> float:
        """Busy fraction over the final `seconds` of the run (e.g. after the model loaded)."""
        if not self.samples:
            return float("nan")
        end = self.samples[-1][0]
        vals = [u for t, u in self.samples if t >= end - seconds]
        return sum(vals) / len(vals) / 100 if vals else float("nan")


MIXED_SIZES = [(768, 1344), (1152, 896), (1344, 768), (896, 1152), (1024, 1024), (832, 1216)]


def make_mixed_inputs(folder: str, n: int) -> float:
    """Mixed sizes near 1 MP (SDXL's buckets); returns mean pixels per image."""
    from skimage import data

    os.makedirs(folder, exist_ok=True)
    bases = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    px = []
    for i in range(n):
        h, w = MIXED_SIZES[i % len(MIXED_SIZES)]
        Image.fromarray(bases[i % 4]).resize((w, h), Image.Resampling.BICUBIC).save(
            os.path.join(folder, f"mix{i:04d}.jpg"), quality=95)
        px.append(h * w)
    return sum(px) / len(px)


def unet_tflop(model_dir: str, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from augment import DiffusionFlavour, RecipeSettings, load_components, resolve_spec

    fl = DiffusionFlavour(load_components(resolve_spec(model_dir)), RecipeSettings(dtype="bf16"), "cuda")
    lat = torch.randn(1, 4, size // 8, size // 8, device="cuda")
    with FlopCounterMode(display=False) as fc:
        fl.denoise_once(lat, fl._generators([0]), [(size, size)])
    del fl
    torch.cuda.empty_cache()
    return fc.get_total_flops() / 1e12


def make_inputs(folder: str, n: int, size: int) -> None:
    from skimage import data

    os.makedirs(folder, exist_ok=True)
    bases = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    rng = np.random.default_rng(0)
    for i in range(n):
        img = Image.fromarray(bases[i % 4])
        w, h = img.size
        s = rng.uniform(0.7, 1.0)
        x, y = rng.uniform(0, w * (1 - s)), rng.uniform(0, h * (1 - s))
        img = img.crop((x, y, x + w * s, y + h * s)).resize((size, size), Image.Resampling.BICUBIC)
        img.save(os.path.join(folder, f"img{i:04d}.jpg"), quality=95)


def naive_baseline(model_dir: str, inputs: list[str], out_dir: str) -> float:
    """The obvious loop: the stock img2img pipeline, bf16, batch 1, 40 steps, strength 0.025,
    PIL in/out, PNG save at Pillow's default level."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel, AutoencoderKL, EulerDiscreteScheduler

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", torch_dtype=torch.bfloat16)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", torch_dtype=torch.bfloat16)
    sched = EulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler")
    pipe = StableDiffusionXLImg2ImgPipeline(vae=vae, unet=unet, scheduler=sched, text_encoder=None,
                                            text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                                            requires_aesthetics_score=False, add_watermarker=False).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    pe = torch.zeros(1, 77, 2048, dtype=torch.bfloat16, device="cuda")
    pp = torch.zeros(1, 1280, dtype=torch.bfloat16, device="cuda")
    os.makedirs(out_dir, exist_ok=True)

    def one(path, i):
        img = Image.open(path).convert("RGB")
        out = pipe(image=img, prompt_embeds=pe, pooled_prompt_embeds=pp, strength=0.025,
                   num_inference_steps=40, guidance_scale=0.0).images[0]
        out.save(os.path.join(out_dir, f"{i}.png"))

    one(inputs[0], -1)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i, p in enumerate(inputs):
        one(p, i)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    del pipe, unet, vae
    torch.cuda.empty_cache()
    return len(inputs) / dt


def gpu_stage_times(model_dir: str, batch: int, size: int) -> dict[str, float]:
    """ms per image of each GPU stage of ddaug's recipe at `batch`, CUDA-event timed."""
    from augment import DiffusionFlavour, RecipeSettings, load_components, resolve_spec

    fl = DiffusionFlavour(load_components(resolve_spec(model_dir)), RecipeSettings(dtype="bf16"), "cuda")
    x = torch.rand(batch, 3, size, size, device="cuda") * 2 - 1
    gens = fl._generators(list(range(batch)))
    res = {}
    for _ in range(2):  # warm-up then measure
        for name, fn in (("vae_encode", lambda: fl.encode(x, gens)),):
            lat = fn()
        stages = {
            "vae_encode": lambda: fl.encode(x, gens),
            "unet_step": lambda: fl.denoise_once(lat, gens, [(size, size)] * batch),
            "vae_decode": lambda: fl.decode(lat),
        }
        for name, fn in stages.items():
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            res[name] = s.elapsed_time(e) / batch
    res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    del fl
    torch.cuda.empty_cache()
    return res


def ddaug_run(model_dir: str, in_dir: str, out_dir: str, batch: int, mode: str,
              compile: bool = False) -> tuple[float, int, float]:
    """(seconds, images done, GPU busy fraction) of a whole `ddaug augment` run, model load included."""
    from augment.recipe import RecipeSettings
    from augment.run import AugmentOptions, run_augment
    from pipeline.command import RunOptions

    t0 = time.perf_counter()
    with BusySampler() as busy:
        summary = run_augment(RunOptions(inputs=(in_dir,), output=out_dir, device="cuda", batch_size=batch,
                                         shard_size=10_000, workers=12, overwrite=True, quiet=True),
                              AugmentOptions(model=model_dir, compile=compile,
                                             recipe=RecipeSettings(dtype="bf16", mode=mode)))
    ddaug_run.job_seconds = summary.seconds  # the run after the model is loaded (and compiled)
    ddaug_run.job_busy = busy.busy_over_last(summary.seconds)
    return time.perf_counter() - t0, summary.done, busy.busy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--naive-images", type=int, default=16)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--parts", nargs="+", default=["naive", "stages", "eager", "compile"],
                    choices=["naive", "stages", "eager", "compile", "vae", "ssd1b", "mixed"])
    ap.add_argument("--results", default=None)
    args = ap.parse_args()
    import diffusers
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()  # per-load dtype notices drown the results
    work = tempfile.mkdtemp(prefix="ddaug-bench-")
    model_dir, in_dir = os.path.join(work, "sdxl"), os.path.join(work, "in")
    t = time.perf_counter()
    build_sdxl_folder(model_dir)
    make_inputs(in_dir, args.images, args.size)
    setup_s = time.perf_counter() - t
    inputs = sorted(os.path.join(in_dir, f) for f in os.listdir(in_dir))
    rows, notes = [], []
    naive = None

    def row(label, n, secs, busy=None):
        rate = n / secs
        ratio = f"{rate / naive:.2f}x" if naive else "-"
        busy_s = f"{busy:.0%}" if busy is not None and busy == busy else "-"
        job_busy = getattr(ddaug_run, "job_busy", None)
        if job_busy is not None and job_busy == job_busy:
            busy_s += f" ({job_busy:.0%} after load)"
        ddaug_run.job_busy = None
        job = n / ddaug_run.job_seconds if getattr(ddaug_run, "job_seconds", None) else float("nan")
        rows.append(f"| {label} | {n} | {rate:.2f} | {job:.2f} | {ratio} | {busy_s} |")
        ddaug_run.job_seconds = None
        print(rows[-1], flush=True)
        return rate

    if "naive" in args.parts:
        naive = naive_baseline(model_dir, inputs[: args.naive_images], os.path.join(work, "naive"))
        rows.append(f"| naive `StableDiffusionXLImg2ImgPipeline` loop (bf16, batch 1, 40 steps, strength 0.025, "
                    f"PIL, PNG level 6) | {args.naive_images} | {naive:.2f} | - | 1.00x | - |")
    if "stages" in args.parts:
        st = gpu_stage_times(model_dir, args.batch, args.size)
        gpu_ms = st["vae_encode"] + st["unet_step"] + st["vae_decode"]
        rows.append(f"| ddaug GPU stages only, eager (encode+UNet+decode, batch {args.batch}) | - | {1000 / gpu_ms:.2f} | - | "
                    f"{1000 / gpu_ms / naive:.2f}x | - |" if naive else "")
        notes.append(f"Eager GPU ms/image at batch {args.batch}: VAE encode {st['vae_encode']:.1f}, UNet "
                     f"{st['unet_step']:.1f}, VAE decode {st['vae_decode']:.1f}; peak {st['peak_mem_gib']:.1f} GiB.")
    if "eager" in args.parts:
        secs, n, busy = ddaug_run(model_dir, in_dir, os.path.join(work, "eager"), args.batch, "img2img")
        fixed_rate = row(f"`ddaug augment` img2img, eager, end to end incl. model load (batch {args.batch})", n, secs, busy)
    if "compile" in args.parts:
        warm_dir = os.path.join(work, "warm-in")
        os.makedirs(warm_dir, exist_ok=True)
        for p in inputs[: args.batch]:
            shutil.copy(p, warm_dir)
        t0 = time.perf_counter()
        ddaug_run(model_dir, warm_dir, os.path.join(work, "warm"), args.batch, "img2img", compile=True)
        notes.append(f"`--compile` first run over {args.batch} images (load + compile): {time.perf_counter() - t0:.0f}s; "
                     "the compiled run below reuses the process's compile cache.")
        secs, n, busy = ddaug_run(model_dir, in_dir, os.path.join(work, "compiled"), args.batch, "img2img", compile=True)
        row(f"`ddaug augment --compile` img2img end to end incl. model load, compile cache warm (batch {args.batch})",
            n, secs, busy)
    if "vae" in args.parts:
        secs, n, busy = ddaug_run(model_dir, in_dir, os.path.join(work, "vae"), args.batch, "vae")
        row("`ddaug augment --mode vae`, eager, end to end", n, secs, busy)
    if "ssd1b" in args.parts:
        ssd_dir = os.path.join(work, "ssd1b")
        build_sdxl_folder(ssd_dir, SSD1B_UNET)
        notes.append(f"UNet TFLOP per 1024² image: SDXL {unet_tflop(model_dir, 1024):.2f}, "
                     f"SSD-1B-like {unet_tflop(ssd_dir, 1024):.2f} (real SSD-1B: 4.15).")
        secs, n, busy = ddaug_run(ssd_dir, in_dir, os.path.join(work, "ssd"), args.batch, "img2img")
        row("`ddaug augment`, SSD-1B-like UNet, eager, end to end", n, secs, busy)
    if "mixed" in args.parts:
        mixed_dir = os.path.join(work, "mixed")
        mean_px = make_mixed_inputs(mixed_dir, args.images)
        secs, n, busy = ddaug_run(model_dir, mixed_dir, os.path.join(work, "mixed-out"), args.batch, "img2img")
        rate = row(f"`ddaug augment`, eager, mixed sizes {', '.join(f'{w}x{h}' for h, w in MIXED_SIZES)}", n, secs, busy)
        if "eager" in args.parts:
            per_px = rate * mean_px / (fixed_rate * args.size * args.size)
            notes.append(f"Mixed sizes: {per_px:.0%} of the fixed-size rate per pixel (mean {mean_px / 1e6:.2f} MP).")

    lines = [f"## augment, SDXL architecture (random weights), {args.size}x{args.size}",
             f"- date {datetime.date.today()}, device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"diffusers {diffusers.__version__}, python {platform.python_version()}",
             f"- command: `python bench/augment_bench.py --images {args.images} --naive-images {args.naive_images} "
             f"--size {args.size} --batch {args.batch} --parts {' '.join(args.parts)}` (setup {setup_s:.0f}s)",
             "", "| path | images | img/s end to end | img/s after load | vs naive | GPU busy |",
             "|---|---|---|---|---|---|",
             *[r for r in rows if r], "", *notes, ""]
    emit(lines, args.results)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
