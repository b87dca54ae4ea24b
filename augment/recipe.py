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

from pipeline.timing import DeviceTimeline, StageTimes

from .models import DiffusionComponents

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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


# --batch-size auto: the GPU batch is fitted to free memory up to this many 1024² images.
# Larger batches do not run faster: compiled SDXL on an H100 did 14.1 img/s at 16, 13.4 at 32
# (bench/RESULTS.md, session 4).
AUTO_BATCH_CAP = 16
CPU_BATCH_SIZE = 8


def batch_from_memory(budget_bytes: float, peak_one: int, peak_two: int, cap: int) -> int:
    """The most images per batch whose peak fits the budget, from the peaks of batches of 1 and
    2 (peak(n) is close to linear in n: activations grow with it, the workspace does not)."""
    per_image = max(peak_two - peak_one, 1)
    fixed = max(peak_one - per_image, 0)
    return max(1, min(cap, int((budget_bytes - fixed) // per_image)))


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
        # Images per model call at 1024² (fewer above, see batch_for). The job forms batches per
        # block of inputs, so a batch's make-up does not depend on the process count.
        self.batch_size = batch_size
        self.static_shapes = False  # compiled: pad every batch to its bucket's full size
        self.reference_pixels = 1024 * 1024  # batch_size is for images up to this size
        self.memory_format = torch.contiguous_format
        self.times: StageTimes | None = None  # set by the stage to get a per-part breakdown

    # -- the fast path ---------------------------------------------------------------------------
    def optimize(self, batch_size: int, compile: bool = True, backend: str = "inductor",
                 unet_cuda_graphs: bool = False) -> None:
        """channels_last weights and activations, and torch.compile of the VAE encoder, decoder
        and UNet with static shapes: one graph per size bucket (partial batches are padded to
        batch_size, so the tail of a bucket does not compile again). Results match the eager path
        to bf16 noise (tests/test_reference.py). unet_cuda_graphs replays the UNet as one CUDA
        graph (its ~1000 kernel launches otherwise queue behind busy CPU threads)."""
        self.memory_format = torch.channels_last
        self.vae.to(memory_format=torch.channels_last)
        if self.unet is not None:
            self.unet.to(memory_format=torch.channels_last)
        if not compile:
            return
        from torch import _dynamo

        # One graph per (bucket shape) and module: allow many buckets before falling back.
        _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
        self.batch_size = batch_size or self.batch_size
        self.static_shapes = True
        self.vae.encoder = torch.compile(self.vae.encoder, backend=backend, dynamic=False)
        self.vae.decoder = torch.compile(self.vae.decoder, backend=backend, dynamic=False)
        if self.unet is not None:
            self.unet = torch.compile(self.unet, backend=backend, dynamic=False,
                                      mode="reduce-overhead" if unet_cuda_graphs else None)

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
                "vae_dtype": {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.vae_dtype]}
        if s.mode == "img2img":
            info.update({"unet": self.comps.names.get("unet"), "scheduler": self.comps.names.get("scheduler"),
                         "strength": s.strength, "timestep": self.timestep, "cond": s.cond, "unet_calls": 1})
            if self.unet.config.time_cond_proj_dim:
                info["lcm_w"] = s.lcm_guidance - 1.0
        return info

    def fit_batch_size(self, cap: int = AUTO_BATCH_CAP, headroom: float = 0.85) -> int:
        """Sets and returns batch_size from the device's free memory. The recipe's peak memory is
        probed at 1024² with batches of 1 and 2 (eager; compiled graphs need less), which splits
        it into a fixed part and a per-image part; the batch is the most images that fit in
        `headroom` of the free memory, at most `cap` (larger batches do not run faster)."""
        if self.device.type != "cuda":
            self.batch_size = CPU_BATCH_SIZE
            return self.batch_size
        try:
            one, two = self._probe_peak_bytes(1), self._probe_peak_bytes(2)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            log.warning("a batch of two 1024² images does not fit in free GPU memory: batch size 1 (large "
                        "images may fail; --max-side limits their size)")
            self.batch_size = 1
            return 1
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info(self.device)[0]
        self.batch_size = batch_from_memory(free * headroom, one, two, cap)
        log.info("batch size %d (auto): %.1f GiB free, about %.2f GiB per 1024² image", self.batch_size,
                 free / 2 ** 30, max(two - one, 0) / 2 ** 30)
        return self.batch_size

    def _probe_peak_bytes(self, n: int) -> int:
        """Peak device memory above what is allocated now, for one batch of n 1024² images."""
        side = math.isqrt(self.reference_pixels)
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

    def batch_for(self, padded: tuple[int, int]) -> int | None:
        """Images per model call for one padded size: batch_size up to 1 MP, fewer for larger
        images so a batch's memory stays what batch_size means at 1024². A function of the size
        alone, so it keeps outputs independent of batch composition."""
        if not self.batch_size:
            return None
        pixels = padded[0] * padded[1]
        return max(1, min(self.batch_size, self.batch_size * self.reference_pixels // pixels))

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        """At least two units of the deepest level, so its group norms see more than one value
        per group even for a 1x1 image."""
        m = self.pad_multiple
        return max(-(-height // m) * m, 2 * m), max(-(-width // m) * m, 2 * m)

    # -- the recipe -----------------------------------------------------------------------------
    def pad_image(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 -> padded_size, on the CPU, so images of different sizes that pad to the same
        size share a batch (each cropped back to its own size afterwards)."""
        h, w = image.shape[:2]
        ph, pw = self.padded_size(h, w)
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
        target = (self.batch_for((ph, pw)) or n) if self.static_shapes else n
        if n < target:  # compiled graphs see one batch size: no recompiles for a bucket's tail
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
        memory with a single synchronisation at the end."""
        with self._current_device():
            return self._run_staged(staged)

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
    n: int                                # real images; the rest pads a compiled batch
    sizes: list[tuple[int, int]]          # each image's H, W before padding (cropped back to it)
    posterior_noise: torch.Tensor | None  # latent="sample" draws
    noise: torch.Tensor | None            # the denoise step's noise
