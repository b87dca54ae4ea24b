"""Model FLOP utilisation: the share of the device's dense bf16 matrix rate that ddaug's model
work reaches, per model part and for whole jobs.

- The rate: a large bf16 matrix product, measured in the same process (the ceiling the
  convolutions and matrix products are compared with; the vendor's figure is not measured).
- FLOPs: torch's FlopCounterMode (matrix products and convolutions: the work that rate is for;
  norms and elementwise passes count 0) over one image per canvas. Convolutions are linear in
  the batch, so a batch of n costs n times that.
- Times: CUDA events around each part, one stream, at the job's batch size for the canvas.
"""

from __future__ import annotations

import collections
import contextlib
import os
from typing import Callable

import torch

PARTS = ("vae encode", "unet", "vae decode")


def matmul_peak_tflops(device: str = "cuda", n: int = 8192, reps: int = 10) -> float:
    """Dense bf16 n x n x n products per second, in TFLOP/s (mean of reps after 3 warm-ups)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    end.synchronize()
    return 2 * n ** 3 * reps / (start.elapsed_time(end) / 1e3) / 1e12


def _part_calls(flavour, n: int, canvas: tuple[int, int]) -> dict[str, Callable[[], torch.Tensor]]:
    """Each model part of the recipe on a batch of n blank images at canvas, as the job calls it."""
    h, w = canvas
    x = torch.zeros(n, 3, h, w, device=flavour.device).contiguous(memory_format=flavour.memory_format)
    latents = flavour.encode(x)
    calls = {"vae encode": lambda: flavour.encode(x)}
    if flavour.unet is not None:
        noise = torch.zeros_like(latents)
        calls["unet"] = lambda: flavour.denoise_once(latents, None, [canvas] * n, noise=noise)
    calls["vae decode"] = lambda: flavour.decode(latents)
    return calls


def _no_grad_attention():
    from ddaug.augment.recipe import _attention_backends

    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    stack.enter_context(_attention_backends())
    return stack


def flops_per_image(flavour, canvas: tuple[int, int]) -> dict[str, float]:
    """FLOPs of one image at canvas, per part."""
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    with _no_grad_attention():
        for part, call in _part_calls(flavour, 1, canvas).items():
            with FlopCounterMode(display=False) as counter:
                call()
            out[part] = float(counter.get_total_flops())
    return out


def seconds_per_batch(flavour, canvas: tuple[int, int], n: int, reps: int = 3) -> dict[str, float]:
    """Device seconds of each part for one batch of n at canvas (after a warm-up call)."""
    out = {}
    with _no_grad_attention():
        for part, call in _part_calls(flavour, n, canvas).items():
            call()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                call()
            end.record()
            end.synchronize()
            out[part] = start.elapsed_time(end) / 1e3 / reps
    return out


def workload_canvases(flavour, in_dir: str) -> collections.Counter:
    """How many of the folder's images land on each canvas (their sizes read from the headers)."""
    from PIL import Image

    counts: collections.Counter = collections.Counter()
    for name in sorted(os.listdir(in_dir)):
        with Image.open(os.path.join(in_dir, name)) as im:
            w, h = im.size
        counts[flavour.canvas_size(h, w)] += 1
    return counts


class WorkloadFlops:
    """Model FLOPs of a whole job over a folder of inputs, per part (canvas FLOPs: padding
    included, as the GPU computes it)."""

    def __init__(self, flavour, in_dir: str):
        self.canvases = workload_canvases(flavour, in_dir)
        self.per_canvas = {c: flops_per_image(flavour, c) for c in self.canvases}
        self.total = {p: sum(self.per_canvas[c].get(p, 0.0) * k for c, k in self.canvases.items()) for p in PARTS}
        pixels = sum(c[0] * c[1] * k for c, k in self.canvases.items())
        self.images = sum(self.canvases.values())
        self.megapixels_per_image = pixels / self.images / 1e6

    def line(self, images_done: int, seconds: float, peak: float) -> str:
        """Achieved model TFLOP/s of a job that did images_done of these images in seconds."""
        flops = sum(self.total.values()) * images_done / self.images
        rate = flops / seconds / 1e12
        return (f"{flops / images_done / 1e12:.2f} TFLOP per image (canvas {self.megapixels_per_image:.2f} MP), "
                f"{rate:.0f} TFLOP/s after load = {rate / peak:.0%} of the measured bf16 matmul rate ({peak:.0f})")


def part_table(flavour, work: WorkloadFlops, peak: float, top: int = 3) -> list[str]:
    """Per part, on the workload's most common canvases at the job's batch size: device ms per
    image, TFLOP/s and the share of the matmul rate."""
    rows = ["| canvas (images) | batch | part | ms per image | TFLOP per image | TFLOP/s | of matmul rate |",
            "|---|---|---|---|---|---|---|"]
    for canvas, count in work.canvases.most_common(top):
        n = flavour.batch_for(canvas) or 8
        secs = seconds_per_batch(flavour, canvas, n)
        for part, s in secs.items():
            f = work.per_canvas[canvas][part]
            rate = f * n / s / 1e12
            rows.append(f"| {canvas[0]}x{canvas[1]} ({count}) | {n} | {part} | {s / n * 1e3:.2f} | {f / 1e12:.3f} | "
                        f"{rate:.0f} | {rate / peak:.0%} |")
    return rows
