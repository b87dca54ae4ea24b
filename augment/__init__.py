"""Diffusion-flavour natural images: SDXL / SSD-1B / LCM img2img at near-zero strength, one step."""

from .models import PRESETS, DiffusionComponents, ModelLoadError, ModelSpec, build_tiny_random, load_components, resolve_spec, save_tiny_random
from .recipe import DTYPES, DiffusionFlavour, RecipeSettings, sample_seed
from .stage import AugmentStage

__all__ = ["PRESETS", "DiffusionComponents", "ModelLoadError", "ModelSpec", "build_tiny_random",
           "load_components", "resolve_spec", "save_tiny_random", "DTYPES", "DiffusionFlavour",
           "RecipeSettings", "sample_seed", "AugmentStage"]
