"""How faithful a model folder is on the held-out photos, through ddaug's own recipe.

    python -m ddaug.augment.tiny.evaluate [FOLDER] [--device cpu] [--dtype fp32 --dtype bf16] [--max-side N] [--card]

prints one JSON line: mean and per-photo PSNR for `--mode vae` and img2img at strength 0.025,
the share of the added noise one UNet step leaves, each output's best alignment and the score
against colour-swapped sources (FOLDER defaults to the committed `tiny` weights).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

from ddaug.augment.models import TINY_TRAINED, load_components, resolve_spec
from ddaug.augment.recipe import DiffusionFlavour, RecipeSettings, sample_seed
from ddaug.shards.inspect import psnr

from .photos import HELD_OUT

STRENGTH = 0.025


def centre_crop(image: np.ndarray, max_side: int) -> np.ndarray:
    if not max_side:
        return image
    h, w = image.shape[:2]
    y, x = max(h - max_side, 0) // 2, max(w - max_side, 0) // 2
    return image[y:y + max_side, x:x + max_side]


def shifted_psnr(output: np.ndarray, source: np.ndarray, dy: int, dx: int) -> float:
    """PSNR of output[y, x] against source[y + dy, x + dx] over the overlap."""
    h, w = source.shape[:2]
    out = output[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    src = source[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)]
    return psnr(out, src)


def best_shift(output: np.ndarray, source: np.ndarray, reach: int = 2) -> tuple[int, int]:
    shifts = [(dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)]
    return max(shifts, key=lambda s: shifted_psnr(output, source, *s))


def _flavour(folder: str, mode: str, dtype: str, device: str) -> DiffusionFlavour:
    comps = load_components(resolve_spec(folder))  # fresh: the recipe casts the modules in place
    return DiffusionFlavour(comps, RecipeSettings(mode=mode, strength=STRENGTH, dtype=dtype), device)


@torch.no_grad()
def noise_left(flavour: DiffusionFlavour, image: np.ndarray, seed: int) -> float:
    """Mean squared latent error after one step at t over the added noise's (0 = all removed)."""
    pixels = torch.from_numpy(flavour.pad_image(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    z0 = flavour.encode(pixels.to(flavour.device))
    noise = torch.randn(z0.shape, generator=torch.Generator("cpu").manual_seed(seed))
    denoised = flavour.denoise_once(z0, None, [image.shape[:2]], noise=noise)
    sigma = float(flavour.scheduler.sigmas[0])
    return float(((denoised - z0) ** 2).mean() / ((sigma * noise) ** 2).mean())


def held_out_figures(folder: str = TINY_TRAINED, device: str = "cpu", dtypes=("fp32",), max_side: int = 0) -> dict:
    photos = {p.name: centre_crop(p.load(), max_side) for p in HELD_OUT}
    seeds = {name: sample_seed(0, name, 0) for name in photos}
    fig: dict = {"device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
                 "dtypes": list(dtypes), "per_photo": {},
                 "note": f", centre crops of at most {max_side}²" if max_side else ""}
    for dtype in dtypes:
        for mode in ("vae", "img2img"):
            flavour = _flavour(folder, mode, dtype, device)
            outputs = {name: flavour([img], [seeds[name]])[0] for name, img in photos.items()}
            per = {name: round(psnr(photos[name], out), 2) if out is not None else float("nan")
                   for name, out in outputs.items()}
            fig["per_photo"][f"{mode}_{dtype}"] = per
            fig[f"{mode}_{dtype}"] = round(float(np.mean(list(per.values()))), 2)
            if (mode, dtype) == ("img2img", dtypes[0]):
                finite = {n: o for n, o in outputs.items() if o is not None}
                fig["best_shift"] = {n: list(best_shift(o, photos[n])) for n, o in finite.items()}
                fig["swapped_channels"] = round(float(np.mean(
                    [psnr(photos[n][..., ::-1], o) for n, o in finite.items()] or [float("nan")])), 2)
                fig["noise_left_t25"] = float(np.mean(
                    [noise_left(flavour, img, seeds[n]) for n, img in photos.items()]))
    return fig


def figures_markdown(f: dict) -> str:
    """The figures as a model card section."""
    rows = []
    for dtype in f["dtypes"]:
        for mode in ("vae", "img2img"):
            per = ", ".join(f"{k} {v:.2f}" for k, v in f["per_photo"][f"{mode}_{dtype}"].items())
            rows.append(f"| {mode} | {dtype} | **{f[f'{mode}_{dtype}']:.2f}** | {per} |")
    shifts = ", ".join(f"{n} {tuple(s)}" for n, s in f["best_shift"].items())
    return f"""## Held-out PSNR on {f['device']} (dB, against the source photo{f['note']})

ddaug's own recipe (`ddaug.augment.recipe.DiffusionFlavour`, as `ddaug augment` runs it); img2img is
strength {STRENGTH} (t = 25, one UNet step), posterior mean.

| mode | dtype | mean | per photo |
|---|---|---|---|
{chr(10).join(rows)}

One step at t = 25 leaves {f['noise_left_t25']:.1%} of the noise it added (mean squared latent error
over the added noise's, {f['dtypes'][0]}). Alignment: the best integer shift of each img2img output
against its source is {shifts} ((0, 0) = aligned); the same outputs against the source with its
red and blue channels swapped score {f['swapped_channels']:.2f} dB.
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ddaug.augment.tiny.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", default=TINY_TRAINED)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", action="append", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--max-side", type=int, default=0, help="centre-crop the photos to this size (0 = whole)")
    ap.add_argument("--card", action="store_true", help="also append the figures to FOLDER/README.md")
    args = ap.parse_args(argv)
    figures = held_out_figures(args.folder, args.device, tuple(args.dtype or ["fp32"]), args.max_side)
    if args.card:
        with open(os.path.join(args.folder, "README.md"), "a", encoding="utf-8") as f:
            f.write("\n" + figures_markdown(figures))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
