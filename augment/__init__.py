"""Diffusion-flavour natural images: SDXL / SSD-1B / LCM img2img at near-zero strength, one step.
Names load their modules (and torch, diffusers) on first use."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ddaug.lazy import lazy_exports

_PUBLIC = {
    **dict.fromkeys(["PRESETS", "DiffusionComponents", "ModelLoadError", "ModelSpec", "build_tiny_random",
                     "load_components", "resolve_spec", "save_tiny_random"], ".models"),
    **dict.fromkeys(["DTYPES", "DiffusionFlavour", "RecipeSettings", "sample_seed"], ".recipe"),
    "AugmentStage": ".stage",
}
__all__ = list(_PUBLIC)
__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC)

if TYPE_CHECKING:  # for type checkers and IDEs
    from .models import (PRESETS, DiffusionComponents, ModelLoadError, ModelSpec, build_tiny_random, load_components,
                         resolve_spec, save_tiny_random)
    from .recipe import DTYPES, DiffusionFlavour, RecipeSettings, sample_seed
    from .stage import AugmentStage
