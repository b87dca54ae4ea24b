"""`ddaug augment` as a library call: options in, shards out."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass

import torch

from ddaug.pipeline.command import RunOptions, UserError, execute
from ddaug.pipeline.job import JobSummary

from .models import ModelLoadError, load_components, resolve_spec
from .presets import DEFAULT_MAX_PIXELS
from .recipe import DTYPES, DiffusionFlavour, RecipeSettings
from .stage import AugmentStage

log = logging.getLogger(__name__)

# --compile auto never torch.compiles: compiling the VAE (dynamic shapes, one graph for all
# sizes) took 131 s cold on an H100, and a compiled 1,000-image COCO-like run was no faster than
# eager once compiled (bench/RESULTS.md, "COCO-like photos: per-shape costs and canvases of 64
# and 128"). It runs the fused Triton norms instead (augment/groupnorm.py): a few seconds of JIT,
# faster from the first batch (bench/RESULTS.md, "Fused VAE norms and a host that does not wait").


@dataclass
class AugmentOptions:
    """What `ddaug augment` runs beyond the shared `RunOptions`: the models, the output encoding
    and tags, and the recipe. `run_augment(run, opts)` takes both."""

    model: str = "sdxl"            # a preset (sdxl, ssd-1b, lcm-sdxl, tiny...), a hub id or a diffusers folder
    unet: str | None = None        # a separate UNet (e.g. an LCM UNet); None: the model's own
    vae: str | None = None         # a replacement VAE; None: the model's own
    scheduler: str = "auto"        # auto | euler | lcm
    image_format: str = "png"      # png | webp | jpeg (png and webp are lossless)
    quality: int = 95              # jpeg only
    max_side: int | None = None    # downsize images whose longer side is larger (recorded)
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # larger images are downsized first (recorded)
    domain: str = "general"        # tags.domain of the output samples
    stage: str | None = None       # tags.stage of the output samples
    recipe: RecipeSettings = RecipeSettings()
    compile: str = "auto"          # auto | always | never; speed only: not part of the folder's config
    compile_cache: str | None = None  # where torch.compile keeps its artifacts across processes


def use_compile_cache(folder: str) -> None:
    """Point torch.compile's on-disk cache (inductor graphs, Triton kernels) at a folder that
    outlives the process: the next job on this node, or a rerun, skips most of the warm-up.
    Read lazily by torch, so setting it before the first compile is enough."""
    path = os.path.abspath(os.path.expanduser(folder))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--compile-cache {folder}: {exc.strerror or exc}") from None
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    os.environ["TRITON_CACHE_DIR"] = os.path.join(path, "triton")  # the fused norms' kernels too


def choose_compile(setting: str, device: str) -> tuple[bool, str]:
    """Whether this process compiles the VAE, and why (logged)."""
    if setting == "never":
        return False, "--compile never"
    if not str(device).startswith("cuda"):
        return False, f"not compiling on {device}: torch.compile pays on GPUs only"
    if setting == "always":
        return True, "--compile always: compiling the VAE (about 2 minutes cold)"
    return False, ("--compile auto: fused Triton norms, no torch.compile (a compiled VAE did not pay on any "
                   "measured job, bench/RESULTS.md; --compile always forces it)")


def run_augment(run: RunOptions, opts: AugmentOptions) -> JobSummary:
    """`ddaug augment` as a call: read `run.inputs`, write shards into `run.output` (resuming
    what is there), and return the counts. Raises `UserError` for what the user can fix."""
    if opts.compile not in ("auto", "always", "never"):
        raise UserError(f"--compile {opts.compile}: choose auto, always or never")
    if opts.compile_cache:
        if opts.compile == "never":
            raise UserError("--compile-cache does not apply with --compile never")
        use_compile_cache(opts.compile_cache)
    spec = resolve_spec(opts.model, opts.unet, opts.scheduler)
    # Everything that changes output bytes; a rerun into the folder must match it.
    config = {"model": opts.model, "unet": opts.unet, "vae": opts.vae, "scheduler": opts.scheduler,
              "image_format": opts.image_format, "quality": opts.quality if opts.image_format == "jpeg" else None,
              "max_side": opts.max_side, "max_pixels": opts.max_pixels, "domain": opts.domain, "stage": opts.stage,
              "shard_size": run.shard_size, "prefix": run.prefix, **asdict(opts.recipe)}

    def make_stage(placement):
        compile_vae, why = choose_compile(opts.compile, placement.device)
        log.info("%s", why)
        dtype = DTYPES[opts.recipe.dtype]
        try:
            comps = load_components(spec, vae=opts.vae, text_encoders=opts.recipe.cond == "empty", dtype=dtype,
                                    vae_dtype=torch.float32 if dtype == torch.float16 else dtype,
                                    device=placement.device)
            flavour = DiffusionFlavour(comps, opts.recipe, placement.device, batch_size=run.batch_size)
            if not compile_vae and opts.compile != "never" and flavour.fuse_norms():
                log.info("the VAE's group norms run as fused Triton kernels (--compile never runs PyTorch's own)")
            if run.batch_size is None:  # --batch-size auto
                flavour.fit_batch_size()
            if compile_vae:
                flavour.compile_vae()
        except ModelLoadError as exc:
            raise UserError(str(exc)) from None
        return AugmentStage(flavour, image_format=opts.image_format, quality=opts.quality,
                            max_side=opts.max_side, max_pixels=opts.max_pixels, tags={"domain": opts.domain, "stage": opts.stage})

    return execute("augment", run, config, make_stage)
