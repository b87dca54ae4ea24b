"""The diffusion-flavour recipe, done the way the user means it.

Run literally through diffusers' SDXL img2img pipeline, "strength 0.025" takes 0 steps (a crash)
below 40 inference steps and otherwise noises at t=1, not t~25 (shared/NOTES.md). Here:

  latents = VAE.encode(x)            (posterior mean, or a seeded sample)
  t       = round(strength * num_train_timesteps)        -> 25 for 0.025
  noisy   = scheduler.add_noise(latents, noise, t)       (noise seeded per sample)
  eps     = UNet(scale_model_input(noisy, t), t, zero or encoded-"" conditioning)   ONE call
  out     = VAE.decode(scheduler.step(eps, t, noisy))

which equals `StableDiffusionXLImg2ImgPipeline(strength=1.0, timesteps=[t])` fed the same latents,
noise and embeddings (tests/test_reference.py). No classifier-free guidance. `mode="vae"` is
the encode/decode round trip alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.timing import DeviceTimeline, StageTimes

from .models import DiffusionComponents

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass(frozen=True)
class RecipeSettings:
    mode: str = "img2img"          # img2img | vae
    strength: float = 0.025
    cond: str = "zeros"            # zeros | empty
    latent: str = "mean"           # mean | sample (of the VAE posterior)
    seed: int = 0
    dtype: str = "bf16"
    lcm_guidance: float = 0.0      # what an LCM UNet's w-embedding is given (w = guidance - 1)


def sample_seed(seed: int, key: str, image_index: int) -> int:
    """Per-image noise seed from the run seed and the sample key: independent of batch size,
    order and process count."""
    digest = hashlib.sha256(f"{seed}:{key}:{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The sinusoidal w-embedding LCM UNets take as timestep_cond (w scaled by 1000, as the
    LCM distillation used)."""
    w = w.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


# --batch-size N means N images per model call at 1024² (REFERENCE_PIXELS); a call holds the
# same number of pixels at other sizes, so small images go in larger batches, up to
# MAX_IMAGES_PER_CALL. auto fits N to free memory, at most AUTO_BATCH_CAP. On 1,000 COCO-like
# images (0.3 MP) on an H100, 32 MP and up to 128 images per call ran 31.9 img/s after load
# against 28.2 at 16 MP and 64 (the VAE decoder's kernels run better on big batches; peak 57 vs
# 33 GiB), in the same run (bench/RESULTS.md, session 5).
REFERENCE_PIXELS = 1024 * 1024
AUTO_BATCH_CAP = 32
MAX_IMAGES_PER_CALL = 128
CPU_BATCH_SIZE = 8
# Canvas sides are multiples of this (or of the nets' own multiple, if larger). Every new
# (batch, H, W) costs a fixed host-side set-up in cuDNN (~2 ms per convolution) while the GPU
# waits; coarser canvases mean fewer shapes and fuller batches. 1,000 COCO-like images make 69
# shapes padded to 32; padded to 128, 14 shapes (tails included) in 27 calls of 37 images, for
# 12.5% more pixels (bench/RESULTS.md, session 5).
CANVAS_STEP = 128


def batch_from_memory(budget_bytes: float, peak_one: int, peak_two: int, cap: int, scale: float = 1.0) -> int:
    """The most images per batch whose peak fits the budget, from the peaks of batches of 1 and
    2 (peak(n) is close to linear in n: activations grow with it, the workspace does not).
    scale converts the probe's per-image memory to the size the batch is counted at (memory
    grows with pixels: convolutions and memory-efficient attention are linear in them)."""
    per_image = max(peak_two - peak_one, 1) * scale
    fixed = max(peak_one - max(peak_two - peak_one, 1), 0)
    return max(1, min(cap, int((budget_bytes - fixed) // per_image)))


def images_per_call(canvas: tuple[int, int], batch_size: int, cap: int | None = None) -> int:
    """Images per model call on one canvas: batch_size images' worth of 1024² pixels, at least
    one image and at most max(cap, batch_size). A function of the canvas alone, so an image's
    batch never depends on which other images came along."""
    pixels = canvas[0] * canvas[1]
    cap = MAX_IMAGES_PER_CALL if cap is None else cap
    return max(1, min(max(cap, batch_size), batch_size * REFERENCE_PIXELS // pixels))


def canvas_for(height: int, width: int, multiple: int, step: int = CANVAS_STEP) -> tuple[int, int]:
    """The padded size an image is computed at: each side rounded up to max(step, multiple),
    and at least two of the nets' deepest units, so its group norms see more than one value per
    group even for a 1x1 image."""
    m = max(step, multiple)
    return max(-(-height // m) * m, 2 * multiple), max(-(-width // m) * m, 2 * multiple)


class DiffusionFlavour:
    def __init__(self, comps: DiffusionComponents, settings: RecipeSettings, device: str,
                 batch_size: int | None = None):
        if not 0.0 < settings.strength <= 1.0:
            raise ValueError("strength must be in (0, 1]")
        self.comps = comps
        self.settings = settings
        self.device = torch.device(device)
        self.dtype = DTYPES[settings.dtype]
        vae_cfg = comps.vae.config
        # The stock SDXL VAE overflows in fp16 (black/NaN images): upcast it. bf16 has fp32's
        # range and needs no upcast.
        self.vae_dtype = torch.float32 if (self.dtype == torch.float16 and vae_cfg.force_upcast) else self.dtype
        self.vae = comps.vae.to(self.device, self.vae_dtype).eval()
        self.unet = comps.unet.to(self.device, self.dtype).eval() if settings.mode == "img2img" else None
        self.scheduler = comps.scheduler
        self.vae_scale = 2 ** (len(vae_cfg.block_out_channels) - 1)
        unet_down = len(comps.unet.config.down_block_types) - 1 if self.unet is not None else 0
        # Pad to what both nets divide evenly, so the UNet never interpolates feature maps.
        self.pad_multiple = self.vae_scale * 2 ** unet_down
        self.scaling = vae_cfg.scaling_factor
        self.shift = getattr(vae_cfg, "shift_factor", None) or 0.0
        T = self.scheduler.config.num_train_timesteps
        self.timestep = min(max(int(round(settings.strength * T)), 0), T - 1)
        self._cond = self._conditioning() if self.unet is not None else None
        # Images per model call at 1024² (other sizes: same pixels per call, see batch_for). The
        # job forms batches per block of inputs, so a batch's make-up does not depend on the
        # process count.
        self.batch_size = batch_size
        self.compiled = False  # the VAE runs through torch.compile (dynamic shapes)
        self.memory_format = torch.contiguous_format
        self.times: StageTimes | None = None  # set by the stage to get a per-part breakdown
        self._seen_shapes: set[tuple[int, int, int]] = set()

    # -- the fast path ---------------------------------------------------------------------------
    def compile_vae(self, backend: str = "inductor") -> None:
        """torch.compile the VAE encoder and decoder with dynamic shapes: one graph for every
        canvas and batch size, so mixed sizes never recompile. The VAE is where eager mode loses
        (its group norms and elementwise ops at full resolution: compiled, 480x640 decodes in
        8.8 ms instead of 13.4); the UNet gains little from compiling and costs most of the
        compile time, so it stays eager. Results match the eager path to bf16 noise
        (tests/test_reference.py)."""
        self.memory_format = torch.channels_last
        self.vae.to(memory_format=torch.channels_last)
        self.vae.encoder = torch.compile(self.vae.encoder, backend=backend, dynamic=True)
        self.vae.decoder = torch.compile(self.vae.decoder, backend=backend, dynamic=True)
        self.compiled = True

    # -- conditioning, computed once ----------------------------------------------------------
    def _conditioning(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.unet.config
        text_dim = cfg.cross_attention_dim
        pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        if self.settings.cond == "zeros":
            return (torch.zeros(1, 77, text_dim, device=self.device, dtype=self.dtype),
                    torch.zeros(1, pooled_dim, device=self.device, dtype=self.dtype))
        from diffusers import StableDiffusionXLImg2ImgPipeline

        c = self.comps
        if c.text_encoder_2 is None:
            raise ValueError("--cond empty needs the model's text encoders")
        pipe = StableDiffusionXLImg2ImgPipeline(
            vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2,
            tokenizer=c.tokenizer, tokenizer_2=c.tokenizer_2, unet=c.unet, scheduler=c.scheduler,
            requires_aesthetics_score=False, add_watermarker=False)
        for te in (c.text_encoder, c.text_encoder_2):
            if te is not None:
                te.to(self.device)
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt("", device=self.device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
        for te in (c.text_encoder, c.text_encoder_2):
            if te is not None:
                te.to("cpu")  # only needed once
        return embeds.to(self.dtype), pooled.to(self.dtype)

    # -- provenance -----------------------------------------------------------------------------
    def provenance(self) -> dict[str, Any]:
        s = self.settings
        info = {"mode": s.mode, "model": self.comps.names.get("model"), "vae": self.comps.names.get("vae"),
                "latent": s.latent, "dtype": s.dtype,
                "vae_dtype": {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.vae_dtype],
                "vae_compiled": self.compiled}
        if s.mode == "img2img":
            info.update({"unet": self.comps.names.get("unet"), "scheduler": self.comps.names.get("scheduler"),
                         "strength": s.strength, "timestep": self.timestep, "cond": s.cond, "unet_calls": 1})
            if self.unet.config.time_cond_proj_dim:
                info["lcm_w"] = s.lcm_guidance - 1.0
        return info

    def fit_batch_size(self, cap: int = AUTO_BATCH_CAP, headroom: float = 0.85, probe_side: int = 512) -> int:
        """Sets and returns batch_size (images per call at 1024²) from the device's free memory.
        The recipe's peak memory is probed with batches of 1 and 2 at probe_side² (small, so the
        probe takes a fraction of a second), which splits it into a fixed part and a per-pixel
        part; the batch is the most 1024² images that fit in `headroom` of the free memory, at
        most `cap`. Other sizes get the same pixels per call (batch_for)."""
        if self.device.type != "cuda":
            self.batch_size = CPU_BATCH_SIZE
            return self.batch_size
        try:
            one, two = self._probe_peak_bytes(1, probe_side), self._probe_peak_bytes(2, probe_side)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            log.warning("two %d² images do not fit in free GPU memory: batch size 1 (large images may fail; "
                        "--max-side limits their size)", probe_side)
            self.batch_size = 1
            return 1
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info(self.device)[0]
        scale = REFERENCE_PIXELS / probe_side ** 2
        self.batch_size = batch_from_memory(free * headroom, one, two, cap, scale=scale)
        log.info("batch size %d at 1024² (auto; %d images of 640x480): %.1f GiB free, about %.2f GiB per 1024² image",
                 self.batch_size, self.batch_for(self.canvas_size(480, 640)), free / 2 ** 30,
                 max(two - one, 0) * scale / 2 ** 30)
        return self.batch_size

    def _probe_peak_bytes(self, n: int, side: int) -> int:
        """Peak device memory above what is allocated now, for one batch of n side² images."""
        image = np.zeros((side, side, 3), dtype=np.uint8)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        times, self.times = self.times, None  # not part of the run's breakdown
        try:
            self.run_staged(self.stage([image] * n, list(range(n))))
        finally:
            self.times = times
        return torch.cuda.max_memory_allocated(self.device) - base

    def batch_for(self, canvas: tuple[int, int]) -> int | None:
        """Images per model call on one canvas (images_per_call)."""
        return images_per_call(canvas, self.batch_size) if self.batch_size else None

    def canvas_size(self, height: int, width: int) -> tuple[int, int]:
        return canvas_for(height, width, self.pad_multiple)

    # -- the recipe -----------------------------------------------------------------------------
    def pad_image(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 -> its canvas, on the CPU, so images of different sizes that pad to the same
        canvas share a batch (each cropped back to its own size afterwards). Reflection means
        the nets see natural content up to the edge of the image and beyond it; what lies past
        the crop changes the kept pixels only through the nets' receptive fields near the
        right and bottom edges."""
        h, w = image.shape[:2]
        ph, pw = self.canvas_size(h, w)
        if (ph, pw) == (h, w):
            return image
        # Reflection keeps edge statistics natural; tiny images can't reflect further than
        # their own size, so they repeat the border instead.
        mode = "reflect" if (ph - h) < h and (pw - w) < w else "edge"
        return np.pad(image, ((0, ph - h), (0, pw - w), (0, 0)), mode=mode)

    def _generators(self, seeds: list[int]) -> list[torch.Generator]:
        return [torch.Generator("cpu").manual_seed(s) for s in seeds]

    def _randn(self, shape, generators: list[torch.Generator]) -> torch.Tensor:
        # Drawn on the CPU per sample, so values do not depend on device or batch composition.
        draws = [torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generators]
        return torch.cat(draws).to(self.device)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, generators: list[torch.Generator] | None = None, *,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        posterior = self.vae.encode(pixels.to(self.vae_dtype)).latent_dist
        if self.settings.latent == "sample":
            eps = noise.to(self.device, non_blocking=True) if noise is not None else \
                self._randn(posterior.mean.shape, generators)
            z = posterior.mean + posterior.std * eps.to(posterior.mean.dtype)
        else:
            z = posterior.mean
        return (z.float() - self.shift) * self.scaling

    @torch.no_grad()
    def denoise_once(self, latents: torch.Tensor, generators: list[torch.Generator] | None,
                     original_sizes: list[tuple[int, int]], *, noise: torch.Tensor | None = None) -> torch.Tensor:
        batch = latents.shape[0]
        sched = self.scheduler
        sched.set_timesteps(timesteps=[self.timestep], device=self.device)
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(0)
        t = sched.timesteps[0]
        noise = noise.to(self.device, non_blocking=True) if noise is not None else self._randn(latents.shape, generators)
        noisy = sched.add_noise(latents, noise, sched.timesteps[:1].repeat(batch))
        model_in = sched.scale_model_input(noisy, t).to(self.dtype)
        prompt_embeds, pooled = self._cond
        h, w = latents.shape[-2] * self.vae_scale, latents.shape[-1] * self.vae_scale
        time_ids = torch.tensor([[oh, ow, 0, 0, h, w] for oh, ow in original_sizes],
                                device=self.device, dtype=self.dtype)
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim:
            w_vec = torch.full((batch,), self.settings.lcm_guidance - 1.0)
            timestep_cond = guidance_embedding(w_vec, self.unet.config.time_cond_proj_dim).to(self.device, self.dtype)
        eps = self.unet(model_in, t, encoder_hidden_states=prompt_embeds.expand(batch, -1, -1),
                        timestep_cond=timestep_cond,
                        added_cond_kwargs={"text_embeds": pooled.expand(batch, -1), "time_ids": time_ids},
                        return_dict=False)[0]
        return sched.step(eps.float(), t, noisy, return_dict=False)[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.scaling + self.shift
        return self.vae.decode(z.to(self.vae_dtype), return_dict=False)[0].float()

    # -- one batch ------------------------------------------------------------------------------
    def _current_device(self):
        """Make self.device the thread's current CUDA device. Pinned buffers, their events and
        timing events belong to the current device, which is cuda:0 in every thread unless set:
        on rank 1 (cuda:1) they would tie cuda:1's work to cuda:0."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def stage(self, images: list[np.ndarray], seeds: list[int],
              sizes: list[tuple[int, int]] | None = None) -> StagedBatch:
        """The CPU half of a batch: stack the images (into pinned memory on CUDA, so the upload
        is a real async DMA) and draw each image's noise from its own seed. Runs on the job's
        main thread while the GPU works on earlier batches. Without sizes, images are at their
        own size and are padded here; with sizes, they are already padded (pad_image)."""
        with self._current_device():
            return self._stage(images, seeds, sizes)

    def _stage(self, images: list[np.ndarray], seeds: list[int],
               sizes: list[tuple[int, int]] | None) -> StagedBatch:
        if sizes is None:
            sizes = [im.shape[:2] for im in images]
            images = [self.pad_image(im) for im in images]
        ph, pw = images[0].shape[:2]
        n = len(images)
        # A compiled graph specialises a batch of one (dynamic shapes treat size 1 apart): a
        # lone image is run beside a copy of itself instead of compiling again.
        target = 2 if self.compiled and n == 1 else n
        if n < target:
            images = list(images) + [images[-1]] * (target - n)
            seeds = list(seeds) + [seeds[-1]] * (target - n)
            sizes = list(sizes) + [sizes[-1]] * (target - n)
        pin = self.device.type == "cuda"
        pixels = torch.empty((target, ph, pw, 3), dtype=torch.uint8, pin_memory=pin)
        np.stack(images, out=pixels.numpy())
        shape = (target, self.comps.vae.config.latent_channels, ph // self.vae_scale, pw // self.vae_scale)
        generators = self._generators(seeds)
        # Same draw order per generator as the step-by-step path: posterior sample, then noise.
        posterior = self._draw(shape, generators, pin) if self.settings.latent == "sample" else None
        noise = self._draw(shape, generators, pin) if self.settings.mode == "img2img" else None
        return StagedBatch(pixels, n, [tuple(s) for s in sizes], posterior, noise)

    @staticmethod
    def _draw(shape, generators: list[torch.Generator], pin: bool) -> torch.Tensor:
        draws = torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generators])
        return draws.pin_memory() if pin else draws

    def run_staged(self, staged: StagedBatch) -> list[np.ndarray | None]:
        """The GPU half: upload, encode, one UNet step, decode, and one download into pinned
        memory with a single synchronisation at the end.

        cuDNN's attention is left out: it builds a graph per attention call at every new
        (batch, H, W), ~2 ms each on the host, 140 calls in SDXL's UNet, so with mixed sizes the
        GPU waited on it (a first call at a new shape took 419 ms instead of 162); flash and
        memory-efficient attention cost 3% more per call and nothing per shape."""
        shape = (int(staged.pixels.shape[0]), int(staged.pixels.shape[1]), int(staged.pixels.shape[2]))
        new_shape = shape not in self._seen_shapes
        self._seen_shapes.add(shape)
        with self._current_device(), sdpa_kernel(_ATTENTION_BACKENDS):
            out = self._run_staged(staged)
        if self.times is not None:
            # Counts for -v's bound report (pipeline/timing.py): how many calls met a new shape,
            # and how full the batches were. The set-up's seconds cannot be timed apart here:
            # CUDA events around a call include the host gaps inside it.
            self.times.count("new shapes", int(new_shape))
            self.times.count("model calls")
            self.times.count("images", staged.n)
            self.times.count("batch slots", max(self.batch_for(shape[1:]) or staged.n, staged.n))
        return out

    @torch.no_grad()
    def _run_staged(self, staged: StagedBatch) -> list[np.ndarray | None]:
        n = staged.n
        timeline = DeviceTimeline(self.device, self.times)
        batch = staged.pixels.to(self.device, non_blocking=True)
        x = batch.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous(memory_format=self.memory_format)
        timeline.mark("host->device")
        latents = self.encode(x, noise=staged.posterior_noise)
        timeline.mark("vae encode")
        if self.settings.mode == "img2img":
            latents = self.denoise_once(latents, None, staged.sizes, noise=staged.noise)
            timeline.mark("unet")
        out = self.decode(latents)[:n]
        timeline.mark("vae decode")
        finite = torch.isfinite(out).flatten(1).all(dim=1)
        pixels = ((out / 2 + 0.5).clamp_(0, 1) * 255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        if self.device.type == "cuda":
            host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True).copy_(pixels, non_blocking=True)
            finite_host = torch.empty(n, dtype=torch.bool, pin_memory=True).copy_(finite, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
        else:
            host, finite_host = pixels, finite
        timeline.mark("device->host")
        timeline.finish()
        return [p[:h, :w] if ok else None
                for p, ok, (h, w) in zip(host.numpy(), finite_host.tolist(), staged.sizes)]

    def __call__(self, images: list[np.ndarray], seeds: list[int]) -> list[np.ndarray | None]:
        """Same-size HxWx3 uint8 images in; same-size uint8 images out (None where the output
        was not finite, e.g. an fp16 overflow)."""
        return self.run_staged(self.stage(images, seeds))


@dataclass
class StagedBatch:
    pixels: torch.Tensor                  # (batch, H, W, 3) uint8 on the host, pinned on CUDA
    n: int                                # real images; a compiled lone image is run in a pair
    sizes: list[tuple[int, int]]          # each image's H, W before padding (cropped back to it)
    posterior_noise: torch.Tensor | None  # latent="sample" draws
    noise: torch.Tensor | None            # the denoise step's noise
