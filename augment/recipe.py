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
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ddaug.pipeline.timing import DeviceTimeline, StageTimes

from .models import DiffusionComponents, ModelLoadError
from .upsample import guard_upsamplers, use_phase_convs

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class _SharedAttentionBackends:
    """sdpa_kernel(_ATTENTION_BACKENDS) for calls that may overlap on several model threads.
    sdpa_kernel sets process-wide flags and restores the old ones on exit, so one call leaving
    would switch cuDNN attention back on under another still launching (other kernels, other
    bits): the first call in enters it, the last one out leaves it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._entered = None

    @contextlib.contextmanager
    def __call__(self):
        with self._lock:
            if self._users == 0:
                self._entered = sdpa_kernel(_ATTENTION_BACKENDS)
                self._entered.__enter__()
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._entered.__exit__(None, None, None)
                    self._entered = None


_attention_backends = _SharedAttentionBackends()


@dataclass(frozen=True)
class RecipeSettings:
    """The diffusion-flavour recipe, everything that decides an output's pixels: mode, dose,
    conditioning, latent, seed and dtype. `DiffusionFlavour` runs it; each sample records it."""

    mode: str = "img2img"          # img2img | vae
    strength: float = 0.025        # noise to t = round(strength * 1000), then one UNet call there
    cond: str = "zeros"            # zeros | empty
    latent: str = "mean"           # mean | sample (of the VAE posterior)
    seed: int = 0                  # run seed; each image's noise seed derives from it and the key
    dtype: str = "bf16"            # bf16 | fp16 | fp32
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
# MAX_IMAGES_PER_CALL. auto fits N to free memory, at most AUTO_BATCH_CAP. With the fused
# channels-last VAE the kernels run as well at 64 images of 0.3 MP as at 100, and smaller calls
# start sooner in each block and keep the GPU fed at its end: on 1,000 COCO-like images on an
# H100, at most 64 per call ran 49.0 img/s after load (GPU 85% busy) against 44.2 (76%) at
# most 128, peak 33 GiB against 49 (bench/RESULTS.md, "A channels-last VAE, fed better").
REFERENCE_PIXELS = 1024 * 1024
AUTO_BATCH_CAP = 32
MAX_IMAGES_PER_CALL = 64
CPU_BATCH_SIZE = 8
# Canvas sides are multiples of this (or of the nets' own multiple, if larger). Every new
# (batch, H, W) costs a fixed host-side set-up in cuDNN (~2 ms per convolution) while the GPU
# waits; coarser canvases mean fewer shapes and fuller batches. 1,000 COCO-like images make 69
# shapes padded to 32; padded to 128, 14 shapes (tails included) in 27 calls of 37 images, for
# 12.5% more pixels (bench/RESULTS.md, "COCO-like photos: per-shape costs and canvases of 64 and 128").
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


class PinnedPool:
    """Reusable page-locked host buffers for batch uploads and downloads. Allocating pinned
    memory (cudaHostAlloc) waits for the whole GPU to go idle, so a fresh buffer per batch
    stalled every launch until the previous batch had finished (bench/shape_cost.py's
    launch-vs-wait line); a handful of buffers, reused once their batch is collected, does
    not. A buffer is at least `granule` bytes and grows in steps of it, so mixed canvas sizes
    reuse the same few buffers. `keep` covers an upload and a download for each batch the job
    can hold at once (pipeline/job.py's LAUNCH_DEPTH + 2). Pre-allocating them all before the
    job measured the same (bench/RESULTS.md, "A channels-last VAE, fed better"): torch's own pinned-memory cache takes
    back what the pool lets go."""

    def __init__(self, pin: bool, granule: int = 64 << 20, keep: int = 12):
        self.pin, self.granule, self.keep = pin, granule, keep
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:  # by index: list.remove would compare tensors elementwise
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            if fits:
                return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        return torch.empty(-(-max(nbytes, 1) // self.granule) * self.granule, dtype=torch.uint8, pin_memory=self.pin)

    def give(self, *buffers: torch.Tensor | None) -> None:
        with self._lock:
            self._free.extend(b for b in buffers if b is not None)
            self._free.sort(key=torch.Tensor.numel, reverse=True)
            del self._free[self.keep:]  # keeps the largest


def _view(buf: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, offset: int = 0) -> torch.Tensor:
    """A tensor of shape/dtype over buf's bytes from offset (a multiple of 8)."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return buf[offset:offset + nbytes].view(dtype).view(shape)


class DiffusionFlavour:
    """The recipe on loaded models: calling it with same-size uint8 images and their seeds
    returns the images with the VAE round trip and, for img2img, one UNet step at the
    settings' strength, each at its own size. `run_augment` drives it over whole datasets."""

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
        guard_upsamplers(self.vae)  # PyTorch's channels-last upsample is wrong past 2^31 outputs
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
        self._one_step: OneStep | None = None
        self._scheduler_lock = threading.Lock()
        if self.unet is not None:
            self._prepare_unet_step()
        # Images per model call at 1024² (other sizes: same pixels per call, see batch_for). The
        # job forms batches per block of inputs, so a batch's make-up does not depend on the
        # process count.
        self.batch_size = batch_size
        self.compiled = False  # the VAE runs through torch.compile (dynamic shapes)
        self.fused_norms = False  # group norms run as ddaug's Triton kernels (augment/groupnorm.py)
        self.memory_format = torch.contiguous_format
        self.times: StageTimes | None = None  # set by the stage to get a per-part breakdown
        self._seen_shapes: set[tuple[int, int, int]] = set()
        self._shapes_lock = threading.Lock()
        # On the CPU the same buffers are plain memory (and small), so tests run this path.
        cuda = self.device.type == "cuda"
        self._pinned = PinnedPool(pin=cuda, granule=(64 << 20) if cuda else (1 << 20))

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

    def fuse_norms(self) -> int:
        """Runs the VAE's group norms (with their SiLU, the convolutions' biases and the residual
        adds) as ddaug's Triton kernels instead of PyTorch's elementwise passes: the eager path
        without a compile step (augment/groupnorm.py). The VAE only: there the norms work on
        full-resolution activations and took half of the GPU time; the UNet's run at 1/8 of
        the resolution, fusing them saved 3% of its time, and the whole-job rate was the same
        with or without them (bench/RESULTS.md, "Fused VAE norms and a host that does not wait"). The fused VAE runs
        channels-last: cuDNN's convolutions take that layout natively, and in NCHW bf16 they spent
        28% of the decoder's time transposing to it and back (1024² went from 11.3 to 14.1 img/s
        after load: bench/RESULTS.md, "A channels-last VAE, fed better"). CUDA only; returns how many norms were fused."""
        from .groupnorm import fuse_group_norms, kernels_available

        if not kernels_available(self.device):
            return 0
        fused = fuse_group_norms(self.vae)
        self.fused_norms = fused > 0
        if self.fused_norms:
            self.memory_format = torch.channels_last
            self.vae.to(memory_format=torch.channels_last)
            # The decoder's upsample convs at the input's resolution: 4/9 of their multiply-adds
            # (augment/upsample.py), the same function to bf16 rounding.
            use_phase_convs(self.vae)
        return fused

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
                "vae_compiled": self.compiled, "fused_norms": self.fused_norms}
        if s.mode == "img2img":
            info.update({"unet": self.comps.names.get("unet"), "scheduler": self.comps.names.get("scheduler"),
                         "strength": s.strength, "timestep": self.timestep, "cond": s.cond, "unet_calls": 1})
            if self.unet.config.time_cond_proj_dim:
                info["lcm_w"] = s.lcm_guidance - 1.0
        return info

    def fit_batch_size(self, cap: int = AUTO_BATCH_CAP, headroom: float = 0.85, probe_side: int = 512) -> int:
        """Sets and returns batch_size (images per call at 1024²) from the device's free memory.
        The recipe's peak memory is probed with batches of 1 and 3 at probe_side² (small, so the
        probe takes a fraction of a second), after one unmeasured call that takes the one-time
        allocations (library workspaces, kernel JIT), which splits it into a fixed part and a
        per-pixel part; the batch is the most 1024² images that fit in `headroom` of the free
        memory, at most `cap`. Other sizes get the same pixels per call (batch_for)."""
        if self.device.type != "cuda":
            self.batch_size = CPU_BATCH_SIZE
            return self.batch_size
        try:
            self._probe_peak_bytes(1, probe_side)
            one, three = self._probe_peak_bytes(1, probe_side), self._probe_peak_bytes(3, probe_side)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            log.warning("three %d² images do not fit in free GPU memory: batch size 1 (large images may fail; "
                        "--max-side limits their size)", probe_side)
            self.batch_size = 1
            return 1
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info(self.device)[0]
        scale = REFERENCE_PIXELS / probe_side ** 2
        per_image = max((three - one) // 2, 1)
        self.batch_size = batch_from_memory(free * headroom, one, one + per_image, cap, scale=scale)
        log.info("batch size %d at 1024² (auto; %d images of 640x480): %.1f GiB free, about %.2f GiB per 1024² image"
                 " (+%.2f GiB fixed)", self.batch_size, self.batch_for(self.canvas_size(480, 640)), free / 2 ** 30,
                 per_image * scale / 2 ** 30, max(one - per_image, 0) / 2 ** 30)
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

    def memory_share(self, n: int, canvas: tuple[int, int]) -> float:
        """The share of the memory batch_size was fitted to that a call of n images on canvas
        takes: memory grows with pixels (batch_from_memory). 1.0 while no batch size is set."""
        if not self.batch_size:
            return 1.0
        return n * canvas[0] * canvas[1] / (self.batch_size * REFERENCE_PIXELS)

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
                     original_sizes: list[tuple[int, int]], *, noise: torch.Tensor | None = None,
                     time_ids: torch.Tensor | None = None) -> torch.Tensor:
        # A scheduler's own calls keep state (its step index): batches launched on two model
        # threads take turns through them.
        with self._scheduler_lock if self._one_step is None else contextlib.nullcontext():
            return self._denoise_once(latents, generators, original_sizes, noise, time_ids)

    def _denoise_once(self, latents: torch.Tensor, generators: list[torch.Generator] | None,
                      original_sizes: list[tuple[int, int]], noise: torch.Tensor | None,
                      time_ids: torch.Tensor | None) -> torch.Tensor:
        batch = latents.shape[0]
        noise = noise.to(self.device, non_blocking=True) if noise is not None else self._randn(latents.shape, generators)
        step = self._one_step
        if step is None:  # a scheduler whose step is not affine: its own calls (they wait on the GPU)
            sched = self.scheduler
            sched.set_timesteps(timesteps=[self.timestep], device=self.device)
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(0)
            t = sched.timesteps[0]
            noisy = sched.add_noise(latents, noise, sched.timesteps[:1].repeat(batch))
            model_in = sched.scale_model_input(noisy, t).to(self.dtype).contiguous()
        else:
            t = self._unet_timestep
            noisy = latents * step.latents + noise * step.noise
            model_in = (noisy * step.model_in).to(self.dtype).contiguous()  # the UNet stays NCHW
        prompt_embeds, pooled = self._cond
        h, w = latents.shape[-2] * self.vae_scale, latents.shape[-1] * self.vae_scale
        if time_ids is None:
            time_ids = torch.tensor([[oh, ow, 0, 0, h, w] for oh, ow in original_sizes], dtype=self.dtype)
        time_ids = time_ids.to(self.device, non_blocking=True)  # pinned when staged; else a small wait
        timestep_cond = self._lcm_cond.expand(batch, -1) if self._lcm_cond is not None else None
        eps = self.unet(model_in, t, encoder_hidden_states=prompt_embeds.expand(batch, -1, -1),
                        timestep_cond=timestep_cond,
                        added_cond_kwargs={"text_embeds": pooled.expand(batch, -1), "time_ids": time_ids},
                        return_dict=False)[0]
        if step is None:
            return self.scheduler.step(eps.float(), t, noisy, return_dict=False)[0]
        return noisy * step.sample + eps.float() * step.eps

    def _prepare_unet_step(self) -> None:
        """What every UNet call reuses, on the device once: the timestep, the LCM w-embedding,
        and the scheduler's arithmetic at this timestep (OneStep)."""
        sched = self.scheduler
        try:
            sched.set_timesteps(timesteps=[self.timestep], device=self.device)
        except Exception as exc:  # no custom timesteps (EulerAncestral, DDIM, UniPC...): no image could run
            raise ModelLoadError(f"{type(sched).__name__} cannot be set to the single timestep {self.timestep} "
                                 f"({exc}): use --scheduler euler (or lcm for an LCM UNet)") from None
        self._unet_timestep = sched.timesteps[0]
        self._lcm_cond = None
        if self.unet.config.time_cond_proj_dim:
            w = torch.full((1,), self.settings.lcm_guidance - 1.0)
            self._lcm_cond = guidance_embedding(w, self.unet.config.time_cond_proj_dim).to(self.device, self.dtype)
        self._one_step = OneStep.read_off(sched, self.timestep)
        if self._one_step is None:
            log.info("%s's step is not affine at t=%d: calling it per batch", type(sched).__name__, self.timestep)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.scaling + self.shift
        z = z.to(self.vae_dtype).contiguous(memory_format=self.memory_format)
        return self.vae.decode(z, return_dict=False)[0].float()

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
        sizes = [tuple(s) for s in sizes]
        shape = (target, self.comps.vae.config.latent_channels, ph // self.vae_scale, pw // self.vae_scale)
        sample, img2img = self.settings.latent == "sample", self.settings.mode == "img2img"
        # One host buffer holds the batch's upload: pixels, noise draws, SDXL's time ids.
        layout = [("pixels", (target, ph, pw, 3), torch.uint8), ("posterior", shape if sample else None, torch.float32),
                  ("noise", shape if img2img else None, torch.float32),
                  ("time_ids", (target, 6) if img2img else None, self.dtype)]
        offsets, total = {}, 0
        for name, shp, dtype in layout:
            if shp is not None:
                offsets[name] = total
                total += -(-math.prod(shp) * torch.empty((), dtype=dtype).element_size() // 64) * 64
        buf = self._pinned.take(total)
        parts = {name: _view(buf, shp, dtype, offsets[name]) for name, shp, dtype in layout if shp is not None}
        np.stack(images, out=parts["pixels"].numpy())
        generators = self._generators(seeds)
        # Same draw order per generator as the step-by-step path: posterior sample, then noise.
        for name in ("posterior", "noise"):
            if name in parts:
                torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generators],
                          out=parts[name])
        if "time_ids" in parts:
            parts["time_ids"].copy_(torch.tensor([[oh, ow, 0, 0, ph, pw] for oh, ow in sizes]))
        return StagedBatch(parts["pixels"], n, sizes, parts.get("posterior"), parts.get("noise"),
                           parts.get("time_ids"), buf)

    def run_staged(self, staged: StagedBatch) -> list[np.ndarray | None]:
        """The GPU half of a batch, waited for: launch_staged, then its result."""
        return self.launch_staged(staged)()

    def launch_staged(self, staged: StagedBatch) -> Callable[[], list[np.ndarray | None]]:
        """The GPU half, enqueued: upload, encode, one UNet step, decode and one download into
        pinned memory, without waiting. Returns what waits for the batch and crops it (its
        ready() says whether that would wait). The job
        launches the next batch while the GPU runs this one, so the host's set-up of a new shape
        (cuDNN builds an execution plan per convolution, ~2 ms each, ~250 ms per shape for SDXL)
        overlaps GPU work instead of idling it.

        cuDNN's attention is left out: it builds a graph per attention call at every new
        (batch, H, W), ~2 ms each on the host, 140 calls in SDXL's UNet, so with mixed sizes the
        GPU waited on it (a first call at a new shape took 419 ms instead of 162); flash and
        memory-efficient attention cost 3% more per call and nothing per shape."""
        shape = (int(staged.pixels.shape[0]), int(staged.pixels.shape[1]), int(staged.pixels.shape[2]))
        with self._shapes_lock:  # two model threads may meet a shape at once: count it once
            new_shape = shape not in self._seen_shapes
            self._seen_shapes.add(shape)
        with self._current_device(), _attention_backends():
            finish = self._launch(staged)
        if self.times is not None:
            # Counts for -v's bound report (pipeline/timing.py): how many calls met a new shape,
            # and how full the batches were. The set-up's seconds cannot be timed apart here:
            # CUDA events around a call include the host gaps inside it.
            self.times.count("new shapes", int(new_shape))
            self.times.count("model calls")
            self.times.count("images", staged.n)
            self.times.count("batch slots", max(self.batch_for(shape[1:]) or staged.n, staged.n))
        return finish

    @torch.no_grad()
    def _launch(self, staged: StagedBatch) -> Callable[[], list[np.ndarray | None]]:
        n = staged.n
        timeline = DeviceTimeline(self.device, self.times)
        batch = staged.pixels.to(self.device, non_blocking=True)
        x = batch.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous(memory_format=self.memory_format)
        timeline.mark("host->device")
        latents = self.encode(x, noise=staged.posterior_noise)
        timeline.mark("vae encode")
        if self.settings.mode == "img2img":
            latents = self.denoise_once(latents, None, staged.sizes, noise=staged.noise, time_ids=staged.time_ids)
            timeline.mark("unet")
        out = self.decode(latents)[:n]
        timeline.mark("vae decode")
        finite = torch.isfinite(out).flatten(1).all(dim=1)
        pixels = ((out / 2 + 0.5).clamp_(0, 1) * 255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        flags_at = -(-pixels.numel() // 64) * 64
        out_buf = self._pinned.take(flags_at + n)
        host = _view(out_buf, tuple(pixels.shape), torch.uint8).copy_(pixels, non_blocking=True)
        finite_host = _view(out_buf, (n,), torch.bool, flags_at).copy_(finite, non_blocking=True)
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        timeline.mark("device->host")

        def finish() -> list[np.ndarray | None]:
            if done is not None:
                done.synchronize()
            timeline.finish()
            # Crops are copied out, so both pinned buffers can serve the next batches.
            images = [np.array(p[:h, :w]) if ok else None
                      for p, ok, (h, w) in zip(host.numpy(), finite_host.tolist(), staged.sizes)]
            self._pinned.give(out_buf, staged.buffer)
            return images
        finish.ready = (lambda: done is None or done.query())  # done without waiting?
        return finish

    def __call__(self, images: list[np.ndarray], seeds: list[int]) -> list[np.ndarray | None]:
        """Same-size HxWx3 uint8 images in; same-size uint8 images out (None where the output
        was not finite, e.g. an fp16 overflow)."""
        return self.run_staged(self.stage(images, seeds))


@dataclass(frozen=True)
class OneStep:
    """The scheduler's arithmetic for the recipe's single step, as constants:

        noisy    = latents * latents_coef + noise * noise_coef       (add_noise at t)
        model_in = noisy * model_in_coef                             (scale_model_input)
        out      = noisy * sample_coef + eps * eps_coef              (step to the end)

    Euler, LCM, DDIM, DDPM and the like are affine in these at a fixed timestep. Done this way
    the batch never waits on the host: the schedulers' own calls copy index and sigma tensors
    from pageable host memory, and each such copy waits for the GPU's queue to drain."""
    latents: float
    noise: float
    model_in: float
    sample: float
    eps: float

    @classmethod
    def read_off(cls, scheduler, timestep: int) -> "OneStep | None":
        """Reads the constants off a copy of the scheduler on the CPU, then checks them on random
        tensors; None if the step is not affine (thresholding, clipping, added noise)."""
        import copy

        sched = copy.deepcopy(scheduler)
        shape = (2, 4, 3, 3)
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        one, zero = torch.ones(shape), torch.zeros(shape)

        def at_t():
            sched.set_timesteps(timesteps=[timestep], device="cpu")
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(0)
            t = sched.timesteps[0]
            sched.scale_model_input(zero, t)  # marks the input scaled, as a pipeline would
            return t, sched.timesteps[:1].repeat(shape[0])

        def step(eps, sample):
            t, _ = at_t()
            return sched.step(eps, t, sample, return_dict=False)[0]

        try:
            t, ts = at_t()
            parts = [sched.add_noise(one, zero, ts), sched.add_noise(zero, one, ts), sched.scale_model_input(one, t),
                     step(zero, one), step(one, zero)]
            if not all(torch.all(p == p.flatten()[0]) for p in parts):
                return None
            coef = cls(*(float(p.flatten()[0]) for p in parts))
            t, ts = at_t()
            checks = [(sched.add_noise(x, y, ts), x * coef.latents + y * coef.noise),
                      (sched.scale_model_input(x, t), x * coef.model_in),
                      (step(y, x), x * coef.sample + y * coef.eps)]
        except Exception:  # a scheduler that wants more than this: use its own calls
            return None
        ok = all(torch.allclose(got, want, rtol=1e-5, atol=1e-6) for got, want in checks)
        return coef if ok else None


@dataclass
class StagedBatch:
    pixels: torch.Tensor                  # (batch, H, W, 3) uint8 on the host, pinned on CUDA
    n: int                                # real images; a compiled lone image is run in a pair
    sizes: list[tuple[int, int]]          # each image's H, W before padding (cropped back to it)
    posterior_noise: torch.Tensor | None  # latent="sample" draws
    noise: torch.Tensor | None            # the denoise step's noise
    time_ids: torch.Tensor | None = None  # SDXL's size conditioning per image (img2img)
    buffer: torch.Tensor | None = None    # the pinned host buffer the fields above live in
