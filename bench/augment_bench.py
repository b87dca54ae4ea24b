"""Augment throughput on a GPU: naive diffusers loop vs `ddaug augment`, same inputs, one run.

Full-size SDXL UNet + VAE are built from the published SDXL base config with random weights
(same FLOPs as the real ones), saved with save_pretrained (safetensors) and loaded back through
ddaug's real `--model FOLDER` path. Writes a markdown block to stdout and to --results.

    python bench/augment_bench.py --images 64 --naive-images 16 --results bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import glob
import io
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass

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
# SSD-1B: SDXL's UNet with the mid block removed and fewer transformer layers (segmind's
# distillation). Depths as ComfyUI's model detection records them: down 2,2 / 4,4; up (lowest
# resolution first) 4,4,10 / 2,1,1. This gives 1.300B parameters and 4.15 TFLOP per 1024² call,
# the real SSD-1B's figures (shared/NOTES.md).
SSD1B_UNET = dict(SDXL_UNET, transformer_layers_per_block=(1, 2, 4), mid_block_type=None,
                  reverse_transformer_layers_per_block=((4, 4, 10), (2, 1, 1), (1, 1, 1)))
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


def recipe_tflop(model_dir: str, size: int) -> dict[str, float]:
    """TFLOP per image of each GPU part of ddaug's recipe at size x size (torch's flop counter:
    convolutions, matmuls, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    from augment import DiffusionFlavour, RecipeSettings, load_components, resolve_spec

    fl = DiffusionFlavour(load_components(resolve_spec(model_dir)), RecipeSettings(dtype="bf16"), "cuda")
    x = torch.rand(1, 3, size, size, device="cuda") * 2 - 1
    gens = fl._generators([0])
    out = {}
    with FlopCounterMode(display=False) as fc:
        lat = fl.encode(x, gens)
    out["vae encode"] = fc.get_total_flops() / 1e12
    with FlopCounterMode(display=False) as fc:
        lat = fl.denoise_once(lat, gens, [(size, size)])
    out["unet"] = fc.get_total_flops() / 1e12
    with FlopCounterMode(display=False) as fc:
        fl.decode(lat)
    out["vae decode"] = fc.get_total_flops() / 1e12
    del fl
    torch.cuda.empty_cache()
    return out


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


def gpu_stage_times(model_dir: str, batch: int, size: int, cudnn_benchmark: bool = False) -> dict[str, float]:
    """ms per image of each GPU part of ddaug's recipe at `batch`, CUDA-event timed, median of 3
    after a warm-up."""
    from augment import DiffusionFlavour, RecipeSettings, load_components, resolve_spec

    torch.backends.cudnn.benchmark = cudnn_benchmark
    fl = DiffusionFlavour(load_components(resolve_spec(model_dir)), RecipeSettings(dtype="bf16"), "cuda")
    x = torch.rand(batch, 3, size, size, device="cuda") * 2 - 1
    gens = fl._generators(list(range(batch)))
    torch.cuda.reset_peak_memory_stats()
    lat = fl.encode(x, gens)
    parts = {"vae encode": lambda: fl.encode(x, gens),
             "unet": lambda: fl.denoise_once(lat, gens, [(size, size)] * batch),
             "vae decode": lambda: fl.decode(lat)}
    res = {}
    for name, fn in parts.items():
        fn()  # warm-up (and cudnn's autotuning when on)
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / batch)
        res[name] = sorted(times)[1]
    res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    torch.backends.cudnn.benchmark = False
    del fl
    torch.cuda.empty_cache()
    return res


@dataclass
class RunResult:
    batch: int                  # images per model call (what auto chose, when asked)
    wall: float                 # whole run: model load (and compile) included
    done: int
    job_seconds: float          # after the model is loaded
    busy: float                 # nvidia-smi utilization over the whole run
    busy_after_load: float
    times: dict[str, float]     # the job's own breakdown (pipeline/timing.py)
    peak_gib: float
    out_dir: str


def ddaug_run(model_dir: str, in_dir: str, out_dir: str, batch: int | None, mode: str = "img2img",
              compile: bool = False, rank: int | None = None, world_size: int | None = None,
              shard_size: int = 10_000, workers: int = 6, unet_cuda_graphs: bool = False,
              compile_cache: str | None = None) -> RunResult:
    """A whole `ddaug augment` run through the library entry point the CLI uses (batch None:
    --batch-size auto)."""
    from augment.recipe import RecipeSettings
    from augment.run import AugmentOptions, run_augment
    from pipeline.command import RunOptions

    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with BusySampler() as busy:
        summary = run_augment(RunOptions(inputs=(in_dir,), output=out_dir, device="cuda", batch_size=batch,
                                         shard_size=shard_size, workers=workers, overwrite=rank is None, quiet=True,
                                         rank=rank, world_size=world_size),
                              AugmentOptions(model=model_dir, compile=compile, unet_cuda_graphs=unet_cuda_graphs,
                                             compile_cache=compile_cache if compile else None,
                                             recipe=RecipeSettings(dtype="bf16", mode=mode)))
    wall = time.perf_counter() - t0
    return RunResult(summary.batch_size, wall, summary.done, summary.seconds, busy.busy, busy.busy_over_last(summary.seconds),
                     summary.times, torch.cuda.max_memory_allocated() / 2 ** 30, out_dir)


GPU_PARTS = ("host->device", "vae encode", "unet", "vae decode", "device->host")


def breakdown(label: str, run: RunResult, tflop: dict[str, float] | None) -> list[str]:
    """Per-part table of one run: where its time went, GPU parts with achieved TFLOP/s."""
    from pipeline.timing import JOB_PARTS

    lines = [f"Time breakdown, {label} ({run.done} images, {run.job_seconds:.1f}s after load; thread-seconds "
             "for the loader and builder pools, GPU time from CUDA events for the model's parts):", "",
             "| part | seconds | % of run | ms/image | TFLOP/s |", "|---|---|---|---|---|"]
    order = [p for p in JOB_PARTS if p != "model"] + ["model", *GPU_PARTS]
    for part in order:
        if part not in run.times:
            continue
        secs = run.times[part]
        rate = "-"
        if tflop and part in tflop:
            rate = f"{tflop[part] * run.done / secs:.0f}"
        name = f"  GPU: {part}" if part in GPU_PARTS else part
        lines.append(f"| {name} | {secs:.2f} | {secs / run.job_seconds:.0%} | {1000 * secs / run.done:.1f} | {rate} |")
    gpu = sum(run.times.get(p, 0.0) for p in GPU_PARTS)
    lines += ["", f"GPU busy from events (GPU parts / run after load): {gpu / run.job_seconds:.0%}; nvidia-smi: "
              f"{run.busy_after_load:.0%} after load, {run.busy:.0%} over the whole run. Peak GPU memory "
              f"{run.peak_gib:.1f} GiB."]
    if tflop:
        total = sum(tflop.values()) * run.done / run.job_seconds
        lines.append(f"Achieved over the run after load: {total:.0f} TFLOP/s of model work "
                     f"({sum(tflop.values()):.2f} TFLOP per image).")
    return lines + [""]


def images_by_key(folder: str) -> dict[str, bytes]:
    out = {}
    for shard in glob.glob(os.path.join(folder, "*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".png"):
                    out[m.name[:-4]] = np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read())))
    return out


def compare(a_dir: str, b_dir: str) -> str:
    a, b = images_by_key(a_dir), images_by_key(b_dir)
    if a.keys() != b.keys():
        return f"different keys ({len(a)} vs {len(b)})"
    diffs = [int(np.abs(a[k].astype(int) - b[k].astype(int)).max()) for k in sorted(a)]
    same = sum(d == 0 for d in diffs)
    return f"{same}/{len(diffs)} byte-identical, largest difference {max(diffs)}/255"


def determinism(model_dir: str, in_dir: str, work: str, batch: int) -> list[str]:
    """Do outputs depend on the process count? One process, the same again, then the inputs
    split as 2 and as 3 ranks (run one after another on this GPU), blocks of 2 batches."""
    n = len(os.listdir(in_dir))
    block = 2 * batch
    out = [f"Determinism, eager, batch {batch}, {n} images in blocks of --shard-size {block}:", ""]
    a = ddaug_run(model_dir, in_dir, os.path.join(work, "det-a"), batch, shard_size=block)
    b = ddaug_run(model_dir, in_dir, os.path.join(work, "det-b"), batch, shard_size=block)
    out.append(f"- the same run twice: {compare(a.out_dir, b.out_dir)}")
    for world in (2, 3):
        split = os.path.join(work, f"det-split{world}")
        for r in range(world):
            ddaug_run(model_dir, in_dir, split, batch, rank=r, world_size=world, shard_size=block)
        out.append(f"- one process vs {world} ranks: {compare(a.out_dir, split)}")
    return out + [""]


def compile_startup(model_dir: str, in_dir: str, cache: str, work: str, batch: int) -> list[str]:
    """Start-up of `ddaug augment --compile` in a fresh process: empty compile cache, then the
    same cache again (what `--compile-cache DIR` gives a rerun or the next job on a node)."""
    import subprocess

    warm_in = os.path.join(work, "startup-in")
    os.makedirs(warm_in, exist_ok=True)
    for p in sorted(os.listdir(in_dir))[:batch]:
        shutil.copy(os.path.join(in_dir, p), warm_in)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = []
    for label in ("empty cache", "warm cache"):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, os.path.join(root, "cli.py"), "augment", warm_in, "-o",
                               os.path.join(work, f"startup-{len(res)}"), "--model", model_dir, "--compile",
                               "--compile-cache", cache, "--batch-size", str(batch), "--device", "cuda", "-q",
                               "--overwrite"], capture_output=True, text=True)
        if proc.returncode:
            return [f"compile start-up run failed: {proc.stderr[-500:]}"]
        res.append(f"{label} {time.perf_counter() - t0:.0f}s")
    return [f"`ddaug augment --compile` over {batch} images in a fresh process (start, load, compile, run): "
            + ", ".join(res) + ".", ""]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--naive-images", type=int, default=16)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--parts", nargs="+", default=["naive", "stages", "eager", "compile"],
                    choices=["naive", "stages", "eager", "compile", "compile-cudnn", "compile-workers12",
                             "compile-graphs", "compile-workers4", "compile-b32", "compile-auto", "inductor-flags", "vae", "ssd1b",
                             "mixed", "determinism", "startup"])
    ap.add_argument("--det-images", type=int, default=64, help="inputs for the determinism part")
    ap.add_argument("--results", default=None)
    args = ap.parse_args()
    import diffusers
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()  # per-load dtype notices drown the results
    work = tempfile.mkdtemp(prefix="ddaug-bench-")
    model_dir, in_dir = os.path.join(work, "sdxl"), os.path.join(work, "in")
    cache = os.path.join(work, "inductor-cache")  # --compile-cache of every compiled run here
    t = time.perf_counter()
    build_sdxl_folder(model_dir)
    make_inputs(in_dir, args.images, args.size)
    setup_s = time.perf_counter() - t
    inputs = sorted(os.path.join(in_dir, f) for f in os.listdir(in_dir))
    tflop = recipe_tflop(model_dir, args.size)
    rows, notes = [], [f"TFLOP per {args.size}² image: " + ", ".join(f"{k} {v:.2f}" for k, v in tflop.items()) + ".", ""]
    naive = None

    def row(label: str, run: RunResult) -> float:
        rate = run.done / run.wall
        ratio = f"{rate / naive:.2f}x" if naive else "-"
        rows.append(f"| {label} | {run.done} | {rate:.2f} | {run.done / run.job_seconds:.2f} | {ratio} | "
                    f"{run.busy:.0%} ({run.busy_after_load:.0%} after load) | {run.peak_gib:.1f} |")
        print(rows[-1], flush=True)
        return rate

    def part_naive():
        nonlocal naive
        naive = naive_baseline(model_dir, inputs[: args.naive_images], os.path.join(work, "naive"))
        rows.append(f"| naive `StableDiffusionXLImg2ImgPipeline` loop (bf16, batch 1, 40 steps, strength 0.025, "
                    f"PIL, PNG level 6) | {args.naive_images} | {naive:.2f} | - | 1.00x | - | - |")

    def part_stages():
        for bench_on in (False, True):
            st = gpu_stage_times(model_dir, args.batch, args.size, cudnn_benchmark=bench_on)
            gpu_ms = st["vae encode"] + st["unet"] + st["vae decode"]
            notes.append(f"Eager GPU ms/image at batch {args.batch}{' with cudnn.benchmark' if bench_on else ''}: "
                         + ", ".join(f"{k} {st[k]:.1f}" for k in ("vae encode", "unet", "vae decode"))
                         + f" ({1000 / gpu_ms:.2f} img/s of GPU work); peak {st['peak_mem_gib']:.1f} GiB.")
        notes.append("")

    def part_eager():
        run = ddaug_run(model_dir, in_dir, os.path.join(work, "eager"), args.batch)
        row(f"`ddaug augment` img2img, eager, end to end incl. model load (batch {args.batch})", run)
        fixed["eager"] = run.done / run.job_seconds
        notes.extend(breakdown(f"eager, batch {args.batch}", run, tflop))

    def warm_up(batch: int | None, graphs: bool = False) -> float:
        """Compile (or load from the cache) outside the measured run; returns its seconds."""
        warm_dir = os.path.join(work, "warm-in")
        if not os.path.isdir(warm_dir):
            os.makedirs(warm_dir)
            for p in inputs[: max(args.batch, 32)]:
                shutil.copy(p, warm_dir)
        t0 = time.perf_counter()
        ddaug_run(model_dir, warm_dir, os.path.join(work, f"warm-{batch}-{graphs}"), batch, compile=True,
                  unet_cuda_graphs=graphs, compile_cache=cache)
        return time.perf_counter() - t0

    def part_compile_warmup():
        secs = warm_up(args.batch)
        earlier = args.parts[:args.parts.index("warm-up")]
        state = "warm from the parts before" if {"startup", "inductor-flags"} & set(earlier) else "empty"
        notes.extend([f"`--compile` first in-process run over {max(args.batch, 32)} images (load + compile, "
                      f"compile cache {state}): {secs:.0f}s; the compiled runs below reuse it.", ""])

    def part_compile(cudnn_benchmark: bool = False, workers: int = 6, graphs: bool = False,
                     batch: int | None = -1):
        batch = args.batch if batch == -1 else batch
        torch.backends.cudnn.benchmark = cudnn_benchmark
        try:
            if graphs or batch != args.batch:  # another shape or mode: its own compile, kept out of the run
                notes.append(f"(warm-up for batch {batch or 'auto'}{', UNet CUDA graph' if graphs else ''}: "
                             f"{warm_up(batch, graphs):.0f}s)")
            run = ddaug_run(model_dir, in_dir, os.path.join(work, f"compiled-{cudnn_benchmark}-{workers}-{graphs}-{batch}"),
                            batch, compile=True, workers=workers, unet_cuda_graphs=graphs, compile_cache=cache)
        finally:
            torch.backends.cudnn.benchmark = False
        extra = (", cudnn.benchmark on" if cudnn_benchmark else "") + f", {workers} workers" + \
            (", UNet as a CUDA graph" if graphs else "")
        size = f"batch {run.batch}" + (" chosen by --batch-size auto" if batch is None else "")
        row(f"`ddaug augment --compile` img2img end to end incl. model load, compile cache warm ({size}{extra})", run)
        notes.extend(breakdown(f"--compile, {size}{extra}", run, tflop))

    def part_inductor_flags():
        """Inductor settings from diffusers' SDXL speed-up guide, on top of --compile. Its
        coordinate_descent_tuning is left out: with it, compiling UNet + VAE at batch 16 did not
        finish within 10 minutes on an H100 (bench/RESULTS.md)."""
        import torch._inductor.config as inductor

        flags = {"conv_1x1_as_mm": True, "epilogue_fusion": False}
        saved = {k: getattr(inductor, k) for k in flags}
        for k, v in flags.items():
            setattr(inductor, k, v)
        try:
            notes.append(f"(compile with inductor {', '.join(f'{k}={v}' for k, v in flags.items())}: "
                         f"{warm_up(args.batch):.0f}s)")
            run = ddaug_run(model_dir, in_dir, os.path.join(work, "compiled-flags"), args.batch, compile=True,
                            compile_cache=cache)
        finally:
            for k, v in saved.items():
                setattr(inductor, k, v)
        row(f"`ddaug augment --compile` with diffusers' inductor flags (batch {args.batch}, 6 workers)", run)
        notes.extend(breakdown(f"--compile + inductor flags, batch {args.batch}", run, tflop))

    def part_vae():
        row("`ddaug augment --mode vae`, eager, end to end",
            ddaug_run(model_dir, in_dir, os.path.join(work, "vae"), args.batch, mode="vae"))

    def part_ssd1b():
        ssd_dir = os.path.join(work, "ssd1b")
        build_sdxl_folder(ssd_dir, SSD1B_UNET)
        notes.append(f"UNet TFLOP per 1024² image: SDXL {tflop['unet']:.2f}, "
                     f"SSD-1B {recipe_tflop(ssd_dir, 1024)['unet']:.2f}.")
        row("`ddaug augment`, SSD-1B UNet, eager, end to end",
            ddaug_run(ssd_dir, in_dir, os.path.join(work, "ssd"), args.batch))

    def part_mixed():
        mixed_dir = os.path.join(work, "mixed")
        mean_px = make_mixed_inputs(mixed_dir, args.images)
        run = ddaug_run(model_dir, mixed_dir, os.path.join(work, "mixed-out"), args.batch)
        row(f"`ddaug augment`, eager, mixed sizes {', '.join(f'{w}x{h}' for h, w in MIXED_SIZES)}", run)
        if "eager" in fixed:
            per_px = (run.done / run.job_seconds) * mean_px / (fixed["eager"] * args.size * args.size)
            notes.append(f"Mixed sizes: {per_px:.0%} of the fixed-size rate per pixel after load "
                         f"(mean {mean_px / 1e6:.2f} MP).")

    def part_determinism():
        det_dir = os.path.join(work, "det-in")
        os.makedirs(det_dir, exist_ok=True)
        for p in inputs[: args.det_images]:
            shutil.copy(p, det_dir)
        notes.extend(determinism(model_dir, det_dir, work, args.batch))

    parts = {"naive": part_naive, "stages": part_stages, "eager": part_eager,
             "compile": part_compile, "compile-cudnn": lambda: part_compile(cudnn_benchmark=True),
             "compile-workers12": lambda: part_compile(workers=12),
             "compile-graphs": lambda: part_compile(workers=6, graphs=True),
             "compile-workers4": lambda: part_compile(workers=4),
             "compile-b32": lambda: part_compile(batch=32),
             "compile-auto": lambda: part_compile(batch=None),
             "inductor-flags": part_inductor_flags,
             "vae": part_vae, "ssd1b": part_ssd1b, "mixed": part_mixed, "determinism": part_determinism,
             "startup": lambda: notes.extend(compile_startup(model_dir, in_dir, cache, work, args.batch))}
    fixed: dict[str, float] = {}
    compiled_parts = [p for p in args.parts if p.startswith("compile")]
    if compiled_parts:
        args.parts.insert(args.parts.index(compiled_parts[0]), "warm-up")
        parts["warm-up"] = part_compile_warmup
    for name in args.parts:
        try:
            parts[name]()
        except Exception as exc:  # keep the other parts' numbers: GPU time is scarce
            import traceback

            traceback.print_exc()
            notes.append(f"Part {name} failed: {type(exc).__name__}: {exc}")

    lines = [f"## augment, SDXL architecture (random weights), {args.size}x{args.size}",
             f"- date {datetime.date.today()}, device {torch.cuda.get_device_name()}, driver {driver_version()}, "
             f"torch {torch.__version__}, diffusers {diffusers.__version__}, python {platform.python_version()}",
             f"- command: `python bench/augment_bench.py --images {args.images} --naive-images {args.naive_images} "
             f"--size {args.size} --batch {args.batch} --parts {' '.join(p for p in args.parts if p != 'warm-up')}"
             + (f" --det-images {args.det_images}" if "determinism" in args.parts else "") + f"` (setup {setup_s:.0f}s)",
             "", "| path | images | img/s end to end | img/s after load | vs naive | GPU busy (nvidia-smi) | peak GiB |",
             "|---|---|---|---|---|---|---|",
             *[r for r in rows if r], "", *notes, ""]
    emit(lines, args.results)
    shutil.rmtree(work, ignore_errors=True)


def driver_version() -> str:
    import subprocess

    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True).stdout.split()[0]
    except (OSError, IndexError):
        return "?"


if __name__ == "__main__":
    main()
