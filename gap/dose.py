"""Dose finding: augment the general sample at several models / strengths / formats, so that
`ddaug gap` can rank them by the gap each leaves to business.

A dose is written `MODEL[@STRENGTH|@vae][:FORMAT]`, e.g. `sdxl@0.025`, `ssd-1b@0.05:webp`,
`sdxl@vae` (the VAE round trip alone). Everything goes under --dose-dir: the sample itself
(`general-sample/`, the images' bytes unchanged) and one augment output folder per dose, so a
rerun of the same command resumes instead of redoing work.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from ddaug.pipeline.command import RunOptions, UserError
from ddaug.pipeline.images import FORMAT_MEMBER_EXT

from .sets import ImageSet

log = logging.getLogger(__name__)

DOSE_FORMATS = ("png", "webp", "jpeg")
DEFAULT_STRENGTH = 0.025
SAMPLE_FOLDER = "general-sample"


@dataclass(frozen=True)
class Dose:
    model: str
    mode: str = "img2img"     # img2img | vae
    strength: float = DEFAULT_STRENGTH
    image_format: str = "png"

    @property
    def label(self) -> str:
        text = f"{self.model}@{'vae' if self.mode == 'vae' else f'{self.strength:g}'}"
        return text if self.image_format == "png" else f"{text}:{self.image_format}"

    @property
    def folder_name(self) -> str:
        return re.sub(r"[^A-Za-z0-9.-]+", "_", self.label).strip("_.")


def parse_dose(text: str) -> Dose:
    """`MODEL[@STRENGTH|@vae][:FORMAT]` -> Dose; ValueError with the reason otherwise."""
    spec, image_format = text, "png"
    head, sep, tail = spec.rpartition(":")
    if sep and tail in DOSE_FORMATS:
        spec, image_format = head, tail
    model, sep, amount = spec.rpartition("@")
    if not sep:
        model, amount = spec, ""
    if not model:
        raise ValueError(f"{text!r}: no model (expected MODEL[@STRENGTH|@vae][:png|webp|jpeg])")
    if amount == "vae":
        return Dose(model, "vae", DEFAULT_STRENGTH, image_format)
    if not amount:
        return Dose(model, "img2img", DEFAULT_STRENGTH, image_format)
    try:
        strength = float(amount)
    except ValueError:
        raise ValueError(f"{text!r}: {amount!r} is not a strength or 'vae'") from None
    if not 0 < strength <= 1:
        raise ValueError(f"{text!r}: strength must be in (0, 1]")
    return Dose(model, "img2img", strength, image_format)


def check_folders(doses: list[Dose]) -> None:
    """Each dose needs its own output folder; ValueError names a clash."""
    folders = [dose.folder_name for dose in doses]
    clash = next((name for name in folders if folders.count(name) > 1), None)
    if clash:
        raise ValueError(f"two doses would share the folder {clash}; give each dose once")


def write_sample(general: ImageSet, dose_dir: str) -> str:
    """The sampled general images, bytes unchanged, as the augment input. A folder left by an
    earlier run is reused only if it holds exactly this sample."""
    from ddaug.shards.writer import TMP_SUFFIX, atomic_write_bytes

    folder = os.path.join(dose_dir, SAMPLE_FOLDER)
    os.makedirs(folder, exist_ok=True)
    names = [f"{i:05d}.{FORMAT_MEMBER_EXT.get(image.format, 'png')}" for i, image in enumerate(general.images)]
    present = {name for name in os.listdir(folder) if TMP_SUFFIX not in name}  # a crash's leftovers are ignored
    stray = sorted(present - set(names))
    if stray:
        raise UserError(f"--dose-dir {dose_dir}: {folder} holds other files ({stray[0]}, ...), "
                        f"from a different sample; give a new --dose-dir")
    for name, image in zip(names, general.images):
        path = os.path.join(folder, name)
        data = image.ref.read()
        if name in present:
            with open(path, "rb") as f:
                if f.read() == data:
                    continue
            raise UserError(f"--dose-dir {dose_dir}: {path} differs from this sample (other --general, "
                            f"--samples or --seed); give a new --dose-dir")
        atomic_write_bytes(path, data)
    return folder


def run_doses(doses: list[Dose], general: ImageSet, dose_dir: str, *, device: str | None, dtype: str,
              seed: int, quiet: bool = False) -> list[dict[str, str]]:
    """Augment the general sample once per dose: {label, folder, augment (its summary line)} each."""
    from ddaug.augment.recipe import RecipeSettings
    from ddaug.augment.run import AugmentOptions, run_augment

    try:
        check_folders(doses)
    except ValueError as exc:
        raise UserError(f"--dose: {exc}") from None
    sample = write_sample(general, dose_dir)
    outputs = []
    for dose in doses:
        output = os.path.join(dose_dir, dose.folder_name)
        recipe = RecipeSettings(mode=dose.mode, strength=dose.strength, seed=seed, dtype=dtype)
        summary = run_augment(RunOptions(inputs=(sample,), output=output, device=device, seed=seed, quiet=quiet),
                              AugmentOptions(model=dose.model, image_format=dose.image_format, recipe=recipe))
        log.info("dose %s: %s -> %s", dose.label, summary.line(), output)
        outputs.append({"label": dose.label, "folder": output, "augment": summary.line()})
    return outputs
