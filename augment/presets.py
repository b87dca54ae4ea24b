"""What `augment` offers before anything loads: the model presets and the default pixel cap.
Importable without torch or diffusers (the command line builds its options from them)."""

from __future__ import annotations

import os
from dataclasses import dataclass

# The memory bound (README "Output folder"): a model call never holds more than what 16 images
# of 1024² need, which is what --batch-size auto takes on an 80 GB GPU.
DEFAULT_MAX_PIXELS = 4096 * 4096

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SSD_1B = "segmind/SSD-1B"
TINY_TRAINED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny", "weights")


@dataclass(frozen=True)
class ModelSpec:
    base: str                      # hub id or folder in pipeline layout (vae/, scheduler/, ...)
    unet: str | None = None        # a separate UNet repo/folder (the LCM UNets ship alone)
    scheduler: str = "auto"        # auto | euler | lcm
    note: str = ""


PRESETS: dict[str, ModelSpec] = {
    "sdxl": ModelSpec(SDXL_BASE, note="SDXL base 1.0"),
    "ssd-1b": ModelSpec(SSD_1B, note="Segmind SSD-1B (distilled SDXL)"),
    "lcm-sdxl": ModelSpec(SDXL_BASE, unet="latent-consistency/lcm-sdxl", scheduler="lcm",
                          note="LCM-distilled SDXL UNet; VAE and config from SDXL base"),
    "lcm-ssd-1b": ModelSpec(SSD_1B, unet="latent-consistency/lcm-ssd-1b", scheduler="lcm",
                            note="LCM-distilled SSD-1B UNet; VAE and config from SSD-1B"),
    "tiny": ModelSpec(TINY_TRAINED, note="tiny SDXL-shaped model trained on offline photos (augment/tiny); "
                                         "keeps the picture, for demos and fidelity tests"),
    "tiny-random": ModelSpec("tiny-random", note="tiny SDXL-shaped random model built in code (offline demos/tests)"),
    "tiny-random-lcm": ModelSpec("tiny-random-lcm", scheduler="lcm",
                                 note="tiny-random with an LCM-style UNet (time_cond_proj_dim)"),
}
