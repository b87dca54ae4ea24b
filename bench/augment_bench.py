"""Augment throughput on a GPU: naive diffusers loop vs `ddaug augment`, same inputs, one run.

Full-size SDXL UNet + VAE are built from the published SDXL base config with random weights
(same FLOPs as the real ones), saved with save_pretrained (safetensors) and loaded back through
ddaug's real `--model FOLDER` path. Writes a markdown block to stdout and to --results.

The realistic workload is COCO-like photos (~0.3 MP, dozens of sizes) made by the shared
cocolike.py (--cocolike PATH); --size N makes N x N crops of real photos instead.

    python bench/augment_bench.py --cocolike ../shared/bench/cocolike.py --images 1000 --parts naive default
    python bench/augment_bench.py --size 1024 --images 128 --parts naive default always
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import glob
import io
import json
import os
import platform
import re
import shutil
import sys
import tarfile
import tempfile
import time
from unittest import mock
from dataclasses import dataclass, field

import checkout  # noqa: E402,F401  (ddaug from this checkout, installed or not)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from results import emit  # noqa: E402
from mfu import WorkloadFlops, matmul_peak_tflops, part_table  # noqa: E402

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
        t0, self.first_stamp = None, time.time()
        for line in out.splitlines():
            try:
                stamp, util = [x.strip() for x in line.split(",")]
                t = datetime.datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp()
                if t0 is None:
                    t0 = self.first_stamp = t  # epoch seconds of the first sample
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
    time_line: str = ""
    trace: list[str] = field(default_factory=list)  # CallTrace's report, when asked

    @property
    def startup(self) -> float:
        """Model load, memory probe and compile (if any): the run's wall time before the job."""
        return self.wall - self.job_seconds

    @property
    def gpu_busy(self) -> float:
        """GPU parts' device time (CUDA events) over the job's wall time."""
        return sum(self.times.get(p, 0.0) for p in GPU_PARTS) / self.job_seconds


def ddaug_run(model_dir: str, in_dir: str, out_dir: str, batch: int | None, mode: str = "img2img",
              compile: str = "auto", rank: int | None = None, world_size: int | None = None,
              shard_size: int = 1000, workers: int | None = None, compile_cache: str | None = None,
              trace: bool = False) -> RunResult:
    """A whole `ddaug augment` run through the library entry point the CLI uses (batch None:
    --batch-size auto; the defaults are the CLI's)."""
    from ddaug.augment.recipe import RecipeSettings
    from ddaug.augment.run import AugmentOptions, run_augment
    from ddaug.pipeline.command import RunOptions

    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with BusySampler() as busy, (CallTrace() if trace else contextlib.nullcontext()) as calls:
        summary = run_augment(RunOptions(inputs=(in_dir,), output=out_dir, device="cuda", batch_size=batch,
                                         shard_size=shard_size, overwrite=rank is None, quiet=True,
                                         rank=rank, world_size=world_size,
                                         **({"workers": workers} if workers else {})),
                              AugmentOptions(model=model_dir, compile=compile,
                                             compile_cache=compile_cache if compile != "never" else None,
                                             recipe=RecipeSettings(dtype="bf16", mode=mode)))
    wall = time.perf_counter() - t0
    return RunResult(summary.batch_size, wall, summary.done, summary.seconds, busy.busy, busy.busy_over_last(summary.seconds),
                     summary.times, torch.cuda.max_memory_allocated() / 2 ** 30, out_dir, summary.time_line,
                     calls.report(busy.samples, busy.first_stamp) if calls else [])


GPU_PARTS = ("host->device", "vae encode", "unet", "vae decode", "device->host")


def default_flavour(model_dir: str, mode: str = "img2img"):
    """The recipe as `ddaug augment`'s defaults build it on this GPU (fused norms, auto batch)."""
    from ddaug.augment import DiffusionFlavour, RecipeSettings, load_components, resolve_spec

    comps = load_components(resolve_spec(model_dir), dtype=torch.bfloat16, vae_dtype=torch.bfloat16, device="cuda")
    flavour = DiffusionFlavour(comps, RecipeSettings(dtype="bf16", mode=mode), "cuda")
    flavour.fuse_norms()
    flavour.fit_batch_size()
    return flavour


class CallTrace:
    """Per model call: host launch start/end, the GPU's start/end (CUDA events on the call's
    stream), shape and whether the shape was new; and nvidia-smi's samples in 0.5 s bins. Shows
    where a job's GPU idles: before the first call, between calls (the host set-up of a new
    shape), or at the end."""

    def __init__(self):
        self.calls = []

    def __enter__(self):
        from ddaug.augment.recipe import DiffusionFlavour

        original = DiffusionFlavour.launch_staged
        trace = self

        def launch_staged(flavour, staged):
            if not trace.calls:
                torch.cuda.synchronize()
                trace.ref_host, trace.ref_wall = time.perf_counter(), time.time()
                trace.ref = torch.cuda.Event(enable_timing=True)
                trace.ref.record()
            shape = tuple(int(x) for x in staged.pixels.shape[:3])
            new = shape not in flavour._seen_shapes
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            h0 = time.perf_counter()
            start.record()
            finish = original(flavour, staged)
            end.record()
            trace.calls.append((shape, staged.n, new, h0, time.perf_counter(), start, end))
            return finish

        self.patch = mock.patch.object(DiffusionFlavour, "launch_staged", launch_staged)
        self.patch.__enter__()
        return self

    def __exit__(self, *exc):
        self.patch.__exit__(*exc)
        torch.cuda.synchronize()

    def report(self, samples: list[tuple[float, float]], first_stamp: float) -> list[str]:
        if not self.calls:
            return []
        ref_ms = lambda e: self.ref.elapsed_time(e) / 1000  # noqa: E731
        t0 = self.ref_host
        out = ["Call trace (seconds from the first launch; gpu = CUDA events on the stream):", "",
               "| call | batch x H x W | new | host launch | gpu start-end | gpu idle before |", "|---|---|---|---|---|---|"]
        prev_end, idle = 0.0, 0.0
        for i, (shape, n, new, h0, h1, start, end) in enumerate(self.calls):
            gs, ge = ref_ms(start), ref_ms(end)
            gap = max(gs - prev_end, 0.0) if i else 0.0
            idle += gap
            out.append(f"| {i} | {n}/{shape[0]} x {shape[1]} x {shape[2]} | {'new' if new else ''} | "
                       f"{h0 - t0:.2f}-{h1 - t0:.2f} | {gs:.2f}-{ge:.2f} | {gap:.2f} |")
            prev_end = ge
        out += ["", f"GPU idle between calls {idle:.2f}s; last call done at {prev_end:.2f}s."]
        bins = collections.defaultdict(list)
        for t, u in samples:
            bins[int((first_stamp + t - self.ref_wall) // 0.5)].append(u)
        out.append("nvidia-smi, 0.5 s bins from the first launch: " + " ".join(
            f"{k * 0.5:g}:{sum(v) / len(v):.0f}" for k, v in sorted(bins.items()) if k >= -4))
        return out + [""]


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
    from ddaug.shards.inspect import psnr

    db = [psnr(a[k], b[k]) for k in sorted(a) if not np.array_equal(a[k], b[k])]
    worst = f", lowest PSNR of the others {min(db):.1f} dB (median {float(np.median(db)):.1f})" if db else ""
    return f"{same}/{len(diffs)} byte-identical, largest difference {max(diffs)}/255{worst}"


def determinism(model_dir: str, in_dir: str, work: str, batch: int) -> list[str]:
    """Do outputs depend on how many workers share the job? One process, the same again, then 2
    and 3 worker processes started together on this GPU (`--join`: they take the job's units by
    lease), units of 2 batches."""
    import subprocess

    n = len(os.listdir(in_dir))
    block = 2 * batch
    out = [f"Determinism, batch {batch}, {n} images in units of --shard-size {block}:", ""]
    a = ddaug_run(model_dir, in_dir, os.path.join(work, "det-a"), batch, shard_size=block)
    b = ddaug_run(model_dir, in_dir, os.path.join(work, "det-b"), batch, shard_size=block)
    out.append(f"- the same run twice: {compare(a.out_dir, b.out_dir)}")
    for workers in (2, 3):
        shared = os.path.join(work, f"det-workers{workers}")
        cmd = [sys.executable, "-m", "ddaug", "augment", in_dir, "-o", shared, "--model", model_dir, "--device", "cuda",
               "--batch-size", str(batch), "--shard-size", str(block), "--join", "-q"]
        procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for _ in range(workers)]
        errors = [p.communicate()[1][-500:] for p in procs if p.wait() != 0]
        # Which process committed each unit: the pid in the name of the attempt it linked.
        took = collections.Counter(re.search(r"tmp-(\d+)", json.load(open(m)).get("attempt") or "-0").group(1)
                                   for m in glob.glob(os.path.join(shared, "*.stats.json")))
        out.append(f"- one process vs {workers} workers together (units per worker {sorted(took.values())}): "
                   f"{compare(a.out_dir, shared)}" + (f"; FAILED: {errors}" if errors else ""))
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
        proc = subprocess.run([sys.executable, "-m", "ddaug", "augment", warm_in, "-o",
                               os.path.join(work, f"startup-{len(res)}"), "--model", model_dir, "--compile", "always",
                               "--compile-cache", cache, "--batch-size", str(batch), "--device", "cuda", "-q",
                               "--overwrite"], capture_output=True, text=True)
        if proc.returncode:
            return [f"compile start-up run failed: {proc.stderr[-500:]}"]
        res.append(f"{label} {time.perf_counter() - t0:.0f}s")
    return [f"`ddaug augment --compile` over {batch} images in a fresh process (start, load, compile, run): "
            + ", ".join(res) + ".", ""]


def make_cocolike(script: str, folder: str, n: int) -> str:
    """COCO-like JPEGs from the shared generator (seed 0); returns its shape statistics."""
    import importlib

    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # its pool workers import it by name
    mod = importlib.import_module(os.path.splitext(os.path.basename(script))[0])
    mod.write(folder, n, seed=0, procs=16)
    return mod.count(n, seed=0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--naive-images", type=int, default=32)
    ap.add_argument("--cocolike", default=None, help="path of cocolike.py: the realistic workload")
    ap.add_argument("--size", type=int, default=1024, help="without --cocolike: N x N crops of real photos")
    ap.add_argument("--batch", type=int, default=None, help="--batch-size (default: auto)")
    ap.add_argument("--parts", nargs="+", default=["naive", "default"],
                    help="naive default mfu no-phase-conv mfu-no-phase-conv large trace tails-largest never always vae ssd1b determinism startup bigger-calls, or calls-N: "
                         "the defaults with at most N images per model call; depth-N: with N batches in flight; threads-N: with N model threads; step-N: canvases in steps of N; switch-N: Python's thread switch interval at N µs")
    ap.add_argument("--det-images", type=int, default=64, help="inputs for the determinism part")
    ap.add_argument("--compile-cache", default=None, help="torch.compile cache folder (default: a new one)")
    ap.add_argument("--results", default=None)
    args = ap.parse_args()
    import logging

    import diffusers
    from diffusers.utils import logging as dlog

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("ddaug.augment").setLevel(logging.INFO)  # the batch-size probe and kernel choices

    dlog.set_verbosity_error()  # per-load dtype notices drown the results
    work = tempfile.mkdtemp(prefix="ddaug-bench-")
    model_dir, in_dir = os.path.join(work, "sdxl"), os.path.join(work, "in")
    cache = args.compile_cache or os.path.join(work, "inductor-cache")  # every compiled run's --compile-cache
    t = time.perf_counter()
    build_sdxl_folder(model_dir)
    if args.cocolike:
        workload = f"COCO-like ({args.images} images from cocolike.py, seed 0)"
        notes = [make_cocolike(args.cocolike, in_dir, args.images), ""]
    else:
        workload = f"{args.size}x{args.size}"
        make_inputs(in_dir, args.images, args.size)
        notes = []
    setup_s = time.perf_counter() - t
    inputs = sorted(os.path.join(in_dir, f) for f in os.listdir(in_dir))
    rows: list[str] = []
    naive = None
    # The device's dense bf16 matmul rate and the workload's model FLOPs, for every row's MFU.
    peak = matmul_peak_tflops()
    flavour = default_flavour(model_dir)
    work_flops = WorkloadFlops(flavour, in_dir)
    mfu_rows = part_table(flavour, work_flops, peak) if "mfu" in args.parts else []
    del flavour
    torch.cuda.empty_cache()
    notes += [f"- bf16 matmul rate measured in this run (8192³): {peak:.0f} TFLOP/s; model FLOPs per image by "
              f"canvas: FlopCounterMode (matrix products and convolutions)", ""]

    def row(label: str, run: RunResult) -> None:
        rate = run.done / run.wall
        ratio = f"{rate / naive:.1f}x" if naive else "-"
        rows.append(f"| {label} | {run.done} | {rate:.1f} | {run.done / run.job_seconds:.1f} | {run.startup:.1f} | "
                    f"{ratio} | {run.gpu_busy:.0%} / {run.busy_after_load:.0%} | {run.batch} | {run.peak_gib:.1f} |")
        notes.append(f"- {label}: {run.time_line}")
        if mode_of.get(label, "img2img") == "img2img" and model_of.get(label, model_dir) == model_dir:
            notes.append(f"  model work: {work_flops.line(run.done, run.job_seconds, peak)}")
        if run.trace:
            notes.extend(["", *run.trace])
            print("\n".join(run.trace), flush=True)
        failed = os.path.join(run.out_dir, "failures.jsonl")
        if os.path.exists(failed):  # a benchmark that lost images says why, not only a lower count
            with open(failed) as f:
                reasons = collections.Counter(json.loads(line).get("reason", "?")[:300] for line in f if line.strip())
            notes.extend(f"  FAILED {k} image(s): {r}" for r, k in reasons.most_common(3))
        print(rows[-1], flush=True)

    def part_naive():
        nonlocal naive
        naive = naive_baseline(model_dir, inputs[: args.naive_images], os.path.join(work, "naive"))
        rows.append(f"| naive `StableDiffusionXLImg2ImgPipeline` loop (bf16, batch 1, 40 steps, strength 0.025, "
                    f"PIL, PNG level 6), after load | {args.naive_images} | {naive:.2f} | - | - | 1.0x | - | 1 | - |")
        print(rows[-1], flush=True)

    mode_of: dict[str, str] = {}   # rows whose model work is not the default SDXL img2img's
    model_of: dict[str, str] = {}

    def run_part(label: str, out: str, model: str = model_dir, **kw) -> None:
        mode_of[label], model_of[label] = kw.get("mode", "img2img"), model
        row(label, ddaug_run(model, in_dir, os.path.join(work, out), args.batch, compile_cache=cache, **kw))

    def part_bigger_calls():
        """Twice the pixels per call and up to 128 images (is batch 64 at 0.3 MP the knee?)."""
        import ddaug.augment.recipe as recipe

        saved, recipe.MAX_IMAGES_PER_CALL = recipe.MAX_IMAGES_PER_CALL, 128
        try:
            row("`--batch-size 32`, up to 128 images per call",
                ddaug_run(model_dir, in_dir, os.path.join(work, "bigger"), 32, compile_cache=cache))
        finally:
            recipe.MAX_IMAGES_PER_CALL = saved

    def part_no_phase_conv():
        """Defaults with the decoder's upsample convs at the upsampled resolution (PyTorch's
        3x3 after the nearest copy), for the phase conv's gain in the same process."""
        import ddaug.augment.recipe as recipe

        with mock.patch.object(recipe, "use_phase_convs", lambda model: 0):
            run_part("defaults, upsample convs at 2x resolution (no phase conv)", "nophase")
        if os.path.isdir(os.path.join(work, "default")):
            notes.append(f"- phase conv (defaults) against upsample-then-conv: "
                         f"{compare(os.path.join(work, 'default'), os.path.join(work, 'nophase'))}")

    def part_mfu_no_phase_conv():
        import ddaug.augment.recipe as recipe

        with mock.patch.object(recipe, "use_phase_convs", lambda model: 0):
            fl = default_flavour(model_dir)
            table = part_table(fl, work_flops, peak)
        del fl
        torch.cuda.empty_cache()
        notes.extend(["", "Per model part as above, upsample convs at 2x resolution (no phase conv):", "", *table, ""])

    def part_step(step: int):
        """Defaults with canvases padded to multiples of `step` (128 by default): fewer pixels
        per image against more distinct shapes."""
        import functools

        import ddaug.augment.recipe as recipe

        with mock.patch.object(recipe, "canvas_for", functools.partial(recipe.canvas_for, step=step)):
            run_part(f"defaults, canvases in steps of {step}", f"step{step}")

    def part_large():
        """Large and extreme inputs: document scans (~3.7 MP), 1920x1080 screenshots, 3000x400
        strips, each kind its own job: no OOM, and a rate in megapixels per second."""
        from skimage import data

        photo = Image.fromarray(data.astronaut())
        for name, (w, h), count in [("scan 2350x1570", (2350, 1570), 24), ("screenshot 1920x1080", (1920, 1080), 32),
                                    ("strip 3000x400", (3000, 400), 48)]:
            folder = os.path.join(work, "large-" + name.split()[0])
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                photo.rotate(i * 7, expand=False).resize((w, h)).save(os.path.join(folder, f"{i:03d}.jpg"), quality=90)
            run = ddaug_run(model_dir, folder, folder + "-out", args.batch)
            rate = run.done / run.job_seconds
            notes.append(f"- {name}: {run.done}/{count} images, {rate:.2f} img/s after load = "
                         f"{rate * w * h / 1e6:.1f} MP/s, peak {run.peak_gib:.1f} GiB, batch {run.batch}")

    parts = {
        "naive": part_naive,
        "default": lambda: run_part("`ddaug augment` defaults (img2img, --compile auto, --batch-size auto)", "default"),
        "never": lambda: run_part("`--compile never` (PyTorch kernels only)", "never", compile="never"),
        "always": lambda: run_part("`--compile always` (VAE compiled, dynamic shapes; cache cold unless a run "
                                   "above compiled)", "always", compile="always"),
        "vae": lambda: run_part("`--mode vae` defaults", "vae", mode="vae"),
        "trace": lambda: run_part("`ddaug augment` defaults, traced call by call", "trace", trace=True),
        "bigger-calls": part_bigger_calls,
        "tails-largest": lambda: part_tails_largest(),
        "ssd1b": lambda: (build_sdxl_folder(os.path.join(work, "ssd1b"), SSD1B_UNET),
                          run_part("SSD-1B UNet, defaults", "ssd", model=os.path.join(work, "ssd1b"))),
        "determinism": lambda: notes.extend(determinism(model_dir, _subset(inputs, work, args.det_images), work,
                                                        args.batch or 8)),
        "startup": lambda: notes.extend(compile_startup(model_dir, in_dir, cache, work, 16)),
        "mfu": lambda: None,  # the per-part table is measured before the runs
        "no-phase-conv": part_no_phase_conv,
        "mfu-no-phase-conv": part_mfu_no_phase_conv,
        "large": part_large,
    }
    def part_calls(cap: int):
        """Default, with at most `cap` images per model call (recipe.MAX_IMAGES_PER_CALL)."""
        import ddaug.augment.recipe as recipe

        with mock.patch.object(recipe, "MAX_IMAGES_PER_CALL", cap):
            run_part(f"defaults, at most {cap} images per call", f"calls{cap}")

    def part_depth(depth: int):
        """Default, with `depth` batches in flight beyond the oldest (pipeline.job.LAUNCH_DEPTH)."""
        import ddaug.pipeline.job as job

        with mock.patch.object(job, "LAUNCH_DEPTH", depth):
            run_part(f"defaults, {depth} batches in flight beyond the oldest", f"depth{depth}")

    def part_threads(threads: int):
        """Default, with `threads` model threads (pipeline.job.MODEL_THREADS)."""
        import ddaug.pipeline.job as job

        with mock.patch.object(job, "MODEL_THREADS", threads):
            run_part(f"defaults, {threads} model thread(s)", f"threads{threads}")

    def part_tails_largest():
        """Default, with a block's partial batches flushed largest first (the order before
        the alternating one) instead of pipeline.job.tail_order's largest, smallest, next largest..."""
        import ddaug.pipeline.job as job

        with mock.patch.object(job, "tail_order", lambda sizes: sorted(sizes, key=lambda k: -sizes[k])):
            run_part("defaults, partial batches largest first", "tails-largest")

    def part_switch(micros: int):
        """Default, with Python's thread switch interval at `micros` µs (5000 by default): how
        long the model thread may wait for the GIL between kernel launches."""
        saved = sys.getswitchinterval()
        sys.setswitchinterval(micros / 1e6)
        try:
            run_part(f"defaults, thread switch interval {micros} µs", f"switch{micros}")
        finally:
            sys.setswitchinterval(saved)

    unknown = [n for n in args.parts if n not in parts and not re.fullmatch(r"(calls|depth|switch|threads|step)-\d+", n)]
    if unknown:
        ap.error(f"unknown --parts {' '.join(unknown)}")
    for name in args.parts:
        if re.fullmatch(r"(calls|depth|switch|threads|step)-\d+", name):
            fn = {"calls": part_calls, "depth": part_depth, "switch": part_switch,
                  "threads": part_threads, "step": part_step}[name.split("-")[0]]
            parts[name] = lambda fn=fn, n=int(name.split("-")[1]): fn(n)
        try:
            parts[name]()
        except Exception as exc:  # keep the other parts' numbers: GPU time is scarce
            import traceback

            traceback.print_exc()
            notes.append(f"Part {name} failed: {type(exc).__name__}: {exc}")

    lines = [f"## augment, SDXL architecture (random weights), {workload}",
             f"- date {datetime.date.today()}, device {torch.cuda.get_device_name()}, driver {driver_version()}, "
             f"torch {torch.__version__}, diffusers {diffusers.__version__}, python {platform.python_version()}",
             f"- command: `python bench/augment_bench.py {' '.join(sys.argv[1:])}` (setup {setup_s:.0f}s)",
             "", "| path | images | img/s end to end | img/s after load | start-up s | vs naive (end to end) | "
             "GPU busy after load (events / nvidia-smi) | batch at 1024² | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|", *rows, "",
             *([f"Per model part on the most common canvases, one stream, at the job's batch size "
                f"(bf16 matmul rate {peak:.0f} TFLOP/s):", "", *mfu_rows, ""] if mfu_rows else []),
             "Start-up is model load + memory probe (+ compile when chosen), in a process that has imported torch.",
             "Where the time went (-v's line) per run:", *notes, ""]
    emit(lines, args.results)
    shutil.rmtree(work, ignore_errors=True)


def _subset(inputs: list[str], work: str, n: int) -> str:
    folder = os.path.join(work, "subset")
    os.makedirs(folder, exist_ok=True)
    for p in inputs[:n]:
        shutil.copy(p, folder)
    return folder


def driver_version() -> str:
    import subprocess

    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True).stdout.split()[0]
    except (OSError, IndexError):
        return "?"


if __name__ == "__main__":
    main()
