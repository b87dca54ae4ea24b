"""Model loading for the diffusion-flavour recipe (the presets are in presets.py).

`--model` takes a preset name, a hub id, or a local folder in diffusers' pipeline layout
(unet/, vae/, scheduler/, optionally text_encoder*/ tokenizer*/). Weights load from safetensors
only. Text encoders are loaded only for `--cond empty`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import threading
import types
from dataclasses import dataclass, field
from typing import Any

import torch

from .presets import PRESETS, TINY_TRAINED, ModelSpec

log = logging.getLogger(__name__)

# SDXL's scheduler config (its scheduler/scheduler_config.json, Euler), shared by the tiny families.
SDXL_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")


class ModelLoadError(Exception):
    """A model that cannot be loaded; the message is one line for the user."""


@dataclass
class DiffusionComponents:
    unet: Any
    vae: Any
    scheduler: Any
    text_encoder: Any = None
    text_encoder_2: Any = None
    tokenizer: Any = None
    tokenizer_2: Any = None
    names: dict[str, str] = field(default_factory=dict)  # provenance: model, unet, vae, scheduler


# -- diffusers' model classes ---------------------------------------------------------------------
# diffusers.models' sub-packages import every class they hold as soon as one is asked for: all
# ~100 transformer models (unet_2d_blocks needs two of them), every UNet, every VAE. ddaug needs
# UNet2DConditionModel and AutoencoderKL, so they are imported from their defining modules under
# these packages, whose own __init__ then runs only when something asks a package for a name.
DEFERRED_PACKAGES = ("diffusers.models.autoencoders", "diffusers.models.transformers", "diffusers.models.unets")


class _DeferredPackage(types.ModuleType):
    """A package whose __init__ runs the first time it is asked for a name it does not hold yet
    (e.g. a diffusers pipeline importing another model class): then it is the package diffusers
    made, with the submodules already loaded reused."""

    _lock = threading.RLock()  # one package's __init__ may ask another deferred one for a name

    def __getattr__(self, name: str) -> Any:
        with self._lock:
            spec = self.__dict__.pop("_deferred_spec", None)
            if spec is not None:
                spec.loader.exec_module(self)
        try:
            return self.__dict__[name]
        except KeyError:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}") from None


def _defer_package_init(name: str) -> None:
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        return  # another diffusers layout: import as usual
    module = _DeferredPackage(name)
    module.__spec__, module.__loader__, module.__file__ = spec, spec.loader, spec.origin
    module.__path__, module.__package__ = list(spec.submodule_search_locations), name
    module.__dict__["_deferred_spec"] = spec
    sys.modules[name] = module


def diffusers_model_classes() -> tuple[type, type]:
    """UNet2DConditionModel and AutoencoderKL, the very classes diffusers' own imports give."""
    for name in DEFERRED_PACKAGES:
        _defer_package_init(name)
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    return UNet2DConditionModel, AutoencoderKL


# -- tiny random models ---------------------------------------------------------------------------
def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE (GPT-2, CLIP) uses for raw bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def _tiny_clip_tokenizer(folder: str):
    """A CLIP BPE tokenizer with only byte-level tokens (no merges): enough to tokenize "" and
    any text, built offline."""
    from transformers import CLIPTokenizer

    chars = _byte_level_alphabet()
    vocab = {}
    for tok in chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(tok, len(vocab))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                         model_max_length=77)


def build_tiny_random(lcm: bool = False, text_encoders: bool = False, workdir: str | None = None) -> DiffusionComponents:
    """SDXL-shaped UNet (text_time added conditioning, cross-attention), an 8x-downsampling
    AutoencoderKL and SDXL's scheduler config, with seeded random weights."""
    from diffusers import EulerDiscreteScheduler, LCMScheduler

    UNet2DConditionModel, AutoencoderKL = diffusers_model_classes()

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=32,
        time_cond_proj_dim=32 if lcm else None,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=128, scaling_factor=0.13025,
        force_upcast=True,
    )
    scheduler = (LCMScheduler(**SDXL_SCHEDULE, original_inference_steps=50) if lcm
                 else EulerDiscreteScheduler(**SDXL_SCHEDULE, interpolation_type="linear"))
    comps = DiffusionComponents(unet=unet, vae=vae, scheduler=scheduler)
    if text_encoders:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        cfg = dict(vocab_size=514, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                   num_hidden_layers=2, max_position_embeddings=77, projection_dim=32,
                   bos_token_id=512, eos_token_id=513, pad_token_id=513)
        comps.text_encoder = CLIPTextModel(CLIPTextConfig(**cfg))
        comps.text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
        tok_dir = os.path.join(workdir or _tiny_cache_dir(), "tokenizer")
        comps.tokenizer = _tiny_clip_tokenizer(tok_dir)
        comps.tokenizer_2 = _tiny_clip_tokenizer(tok_dir)
    name = "tiny-random-lcm" if lcm else "tiny-random"
    comps.names = {"model": name, "unet": name, "vae": name, "scheduler": type(scheduler).__name__}
    return comps


def _tiny_cache_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="ddaug-tiny-")


def save_tiny_random(folder: str, lcm: bool = False) -> str:
    """Write tiny-random in diffusers' pipeline layout (model_index.json, unet/, vae/, ...),
    loadable by `--model FOLDER` and by StableDiffusionXLImg2ImgPipeline.from_pretrained."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    c = build_tiny_random(lcm=lcm, text_encoders=True, workdir=folder)
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2,
        tokenizer=c.tokenizer, tokenizer_2=c.tokenizer_2, unet=c.unet, scheduler=c.scheduler,
        requires_aesthetics_score=False, force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


# -- loading ---------------------------------------------------------------------------------------
def resolve_spec(model: str, unet: str | None = None, scheduler: str = "auto") -> ModelSpec:
    spec = PRESETS.get(model)
    if spec is None:
        if model.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(model)):
            raise ModelLoadError(f"--model {model}: no such folder")
        spec = ModelSpec(os.path.expanduser(model))
    return ModelSpec(spec.base, unet or spec.unet,
                     scheduler if scheduler != "auto" else spec.scheduler, spec.note)


def _from_pretrained(cls, repo: str, subfolder: str | None, **kwargs):
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        return cls.from_pretrained(repo, subfolder=subfolder, use_safetensors=True, **kwargs)
    except Exception as exc:  # hub/network/format errors all mean the same to the user
        where = f"{repo}/{subfolder}" if subfolder else repo
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load {cls.__name__} from {where} (safetensors only): {first_line}") from None


def _scheduler_for(kind: str, base_scheduler, unet) -> Any:
    from diffusers import EulerDiscreteScheduler, LCMScheduler

    if kind == "auto":
        kind = "lcm" if getattr(unet.config, "time_cond_proj_dim", None) else "keep"
    if kind == "lcm" and not isinstance(base_scheduler, LCMScheduler):
        return LCMScheduler.from_config(base_scheduler.config)
    if kind == "euler" and not isinstance(base_scheduler, EulerDiscreteScheduler):
        return EulerDiscreteScheduler.from_config(base_scheduler.config)
    return base_scheduler


def load_components(spec: ModelSpec, *, vae: str | None = None, text_encoders: bool = False,
                    trust_remote_code: bool = False, dtype: torch.dtype | None = None,
                    vae_dtype: torch.dtype | None = None, device: str | None = None) -> DiffusionComponents:
    """Load the UNet and VAE in `dtype` / `vae_dtype` straight onto `device` (default: fp32 on
    the host; the recipe casts and moves what it gets). Loading bf16 weights straight to the
    GPU took 1.4 s for SDXL's UNet and VAE, against 3.6 s through fp32 on the host
    (bench/RESULTS.md, "COCO-like photos: per-shape costs and canvases of 64 and 128").
    Tiny presets are built, not loaded."""
    if spec.base in ("tiny-random", "tiny-random-lcm") and spec.unet is None and vae is None:
        comps = build_tiny_random(lcm=spec.base == "tiny-random-lcm", text_encoders=text_encoders)
        comps.scheduler = _scheduler_for(spec.scheduler, comps.scheduler, comps.unet)
        comps.names["scheduler"] = type(comps.scheduler).__name__
        return comps
    from diffusers.schedulers import SchedulerMixin

    UNet2DConditionModel, AutoencoderKL = diffusers_model_classes()

    device_map = device if device and device != "cpu" else None
    unet_kw = {"torch_dtype": dtype, "device_map": device_map}
    vae_kw = {"torch_dtype": vae_dtype or dtype, "device_map": device_map}
    unet = (_from_pretrained(UNet2DConditionModel, spec.unet, None, **unet_kw) if spec.unet
            else _from_pretrained(UNet2DConditionModel, spec.base, "unet", **unet_kw))
    vae_model = (_from_pretrained(AutoencoderKL, vae, None if _is_model_root(vae) else "vae", **vae_kw) if vae
                 else _from_pretrained(AutoencoderKL, spec.base, "vae", **vae_kw))
    try:
        from diffusers import EulerDiscreteScheduler

        config = EulerDiscreteScheduler.load_config(spec.base, subfolder="scheduler")
        base_scheduler = _scheduler_class(config).from_config(config)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the scheduler config from {spec.base}/scheduler: {exc}") from None
    assert isinstance(base_scheduler, SchedulerMixin)
    comps = DiffusionComponents(unet=unet, vae=vae_model,
                                scheduler=_scheduler_for(spec.scheduler, base_scheduler, unet))
    if text_encoders:
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        try:
            comps.text_encoder = CLIPTextModel.from_pretrained(spec.base, subfolder="text_encoder", use_safetensors=True)
            comps.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                spec.base, subfolder="text_encoder_2", use_safetensors=True)
            comps.tokenizer = AutoTokenizer.from_pretrained(spec.base, subfolder="tokenizer",
                                                            trust_remote_code=trust_remote_code)
            comps.tokenizer_2 = AutoTokenizer.from_pretrained(spec.base, subfolder="tokenizer_2",
                                                              trust_remote_code=trust_remote_code)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"--cond empty needs the text encoders of {spec.base}: {first}") from None
    # The committed tiny folder is named as its preset: its path differs from machine to machine.
    base = "tiny" if spec.base == TINY_TRAINED else spec.base
    comps.names = {"model": base, "unet": spec.unet or f"{base}/unet",
                   "vae": vae or f"{base}/vae", "scheduler": type(comps.scheduler).__name__}
    return comps


def _is_model_root(path: str) -> bool:
    """A VAE given as its own repo/folder (config.json at the root) rather than a pipeline."""
    if os.path.isdir(path):
        return os.path.exists(os.path.join(path, "config.json"))
    return True  # hub ids for --vae (e.g. madebyollin/sdxl-vae-fp16-fix) are VAE repos


def _scheduler_class(config: dict[str, Any]):
    import diffusers

    name = config.get("_class_name", "EulerDiscreteScheduler")
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ModelLoadError(f"unknown scheduler class {name}")
    return cls
