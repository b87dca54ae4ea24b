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

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, scaling_factor=0.13025,
    force_upcast=True)
SDXL_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                      beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
                      prediction_type="epsilon", interpolation_type="linear")


def build_sdxl_folder(folder: str) -> None:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**SDXL_UNET).to(torch.bfloat16)
        vae = AutoencoderKL(**SDXL_VAE).to(torch.bfloat16)
    unet.save_pretrained(os.path.join(folder, "unet"))
    vae.save_pretrained(os.path.join(folder, "vae"))
    EulerDiscreteScheduler(**SDXL_SCHEDULER).save_pretrained(os.path.join(folder, "scheduler"))
    del unet, vae
    torch.cuda.empty_cache()


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


def ddaug_run(model_dir: str, in_dir: str, out_dir: str, batch: int, mode: str) -> tuple[float, int]:
    from augment.recipe import RecipeSettings
    from augment.run import AugmentOptions, run_augment
    from pipeline.command import RunOptions

    t0 = time.perf_counter()
    summary = run_augment(RunOptions(inputs=(in_dir,), output=out_dir, device="cuda", batch_size=batch,
                                     shard_size=10_000, workers=8, overwrite=True, quiet=True),
                          AugmentOptions(model=model_dir, recipe=RecipeSettings(dtype="bf16", mode=mode)))
    return time.perf_counter() - t0, summary.done


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--naive-images", type=int, default=16)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
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

    naive = naive_baseline(model_dir, inputs[: args.naive_images], os.path.join(work, "naive"))
    stages = gpu_stage_times(model_dir, args.batch, args.size)
    # Model load is part of a real run; measure it by a small run first, then the full one.
    warm_s, _ = ddaug_run(model_dir, in_dir, os.path.join(work, "warm"), args.batch, "img2img")
    full_s, done = ddaug_run(model_dir, in_dir, os.path.join(work, "full"), args.batch, "img2img")
    vae_s, vae_done = ddaug_run(model_dir, in_dir, os.path.join(work, "vae"), args.batch, "vae")

    gpu_ms = stages["vae_encode"] + stages["unet_step"] + stages["vae_decode"]
    lines = [
        f"## augment, SDXL architecture (random weights), {args.size}x{args.size}",
        f"- date {datetime.date.today()}, device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"diffusers {diffusers.__version__}, python {platform.python_version()}",
        f"- command: `python bench/augment_bench.py --images {args.images} --naive-images {args.naive_images} "
        f"--size {args.size} --batch {args.batch}` (setup {setup_s:.0f}s)",
        "",
        "| path | images | img/s | vs naive |",
        "|---|---|---|---|",
        f"| naive `StableDiffusionXLImg2ImgPipeline` loop (bf16, batch 1, 40 steps, strength 0.025, PIL, PNG level 6) "
        f"| {args.naive_images} | {naive:.2f} | 1.00x |",
        f"| `ddaug augment` img2img end to end, files -> shards, incl. model load (batch {args.batch}) "
        f"| {done} | {done / full_s:.2f} | {done / full_s / naive:.2f}x |",
        f"| `ddaug augment --mode vae` end to end, incl. model load | {vae_done} | {vae_done / vae_s:.2f} | "
        f"{vae_done / vae_s / naive:.2f}x |",
        f"| ddaug GPU stages only (encode+UNet+decode, batch {args.batch}) | - | {1000 / gpu_ms:.2f} | "
        f"{1000 / gpu_ms / naive:.2f}x |",
        "",
        f"GPU ms/image at batch {args.batch}: VAE encode {stages['vae_encode']:.1f}, UNet step "
        f"{stages['unet_step']:.1f}, VAE decode {stages['vae_decode']:.1f}; peak GPU memory "
        f"{stages['peak_mem_gib']:.1f} GiB. Small warm-up run (model load + first batches) took {warm_s:.1f}s.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.results:
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(text + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
