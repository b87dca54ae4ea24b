"""`ddaug demo`: the whole flow offline on CPU, on real photos bundled with scikit-image.

The photos are the `tiny` model's held-out ones (augment/tiny/photos.py): it never trained on
them, so the contact sheet shows what it does to a photo it has not seen.
"""

from __future__ import annotations

import io
import json
import os
from typing import Iterator

import numpy as np
from PIL import Image

DEMO_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
DEMO_MODEL = "tiny"


def write_demo_inputs(folder: str) -> str:
    """A LLaMA-Factory dataset over real photos, plus one broken file to show the ledger."""
    from ddaug.augment.tiny.photos import held_out

    img_dir = os.path.join(folder, "images")
    os.makedirs(img_dir, exist_ok=True)
    records = []
    for name in DEMO_PHOTOS:
        Image.fromarray(held_out(name)).save(os.path.join(img_dir, f"{name}.jpg"), quality=95)
        records.append({"messages": [{"role": "user", "content": "<image>What is in this photo?"},
                                     {"role": "assistant", "content": f"A photo ({name})."}],
                        "images": [f"images/{name}.jpg"]})
    with open(os.path.join(img_dir, "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    records.append({"messages": [{"role": "user", "content": "<image>Describe it."},
                                 {"role": "assistant", "content": "Nothing."}],
                    "images": ["images/broken.jpg"]})
    path = os.path.join(folder, "general.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1)
    return path


def psnr_by_source(shards: str) -> dict[str, float]:
    """PSNR (dB) of each augmented image against the input file it came from, by file name."""
    from ddaug.shards.inspect import find_shards, iter_shard, psnr

    scores = {}
    for shard in find_shards([shards]):
        for sample in iter_shard(shard):
            sources = (sample.meta or {}).get("source", {}).get("images", [])
            for member, source in zip(sample.image_members(), sources):
                with Image.open(source["uri"]) as src:
                    ref = np.asarray(src.convert("RGB"))
                out = np.asarray(Image.open(io.BytesIO(sample.members[member])).convert("RGB"))
                scores[os.path.splitext(os.path.basename(source["uri"]))[0]] = round(psnr(ref, out), 1)
    return dict(sorted(scores.items()))


def run_demo(output: str) -> Iterator[str]:
    from ddaug.augment.recipe import RecipeSettings
    from ddaug.augment.run import AugmentOptions, run_augment
    from ddaug.captioning import GenerationSettings
    from ddaug.captioning.run import CaptionOptions, run_caption
    from ddaug.pipeline.command import RunOptions
    from ddaug.shards.inspect import contact_sheet, inspect_shards

    inputs = os.path.join(output, "inputs")
    dataset = write_demo_inputs(inputs)
    yield f"inputs: {len(DEMO_PHOTOS)} scikit-image photos + 1 broken file -> {dataset}"
    shards = os.path.join(output, "augmented")
    summary = run_augment(
        RunOptions(inputs=(dataset,), output=shards, device="cpu", batch_size=2, shard_size=3,
                   overwrite=True, quiet=True),
        AugmentOptions(model=DEMO_MODEL, recipe=RecipeSettings(dtype="fp32")))
    yield f"augment ({DEMO_MODEL}, strength 0.025, one UNet step): {summary.line()}"
    report = inspect_shards([shards], verify=True)
    yield (f"inspect --verify: {report.samples} samples in {report.shards} shards, "
           f"{len(report.problems)} problems, failures {dict(report.failures)}")
    sheet = os.path.join(output, "preview.png")
    contact_sheet([shards], sheet, limit=len(DEMO_PHOTOS))
    scores = ", ".join(f"{name} {db} dB" for name, db in psnr_by_source(shards).items())
    yield (f"contact sheet: {sheet}, each photo beside its augmented twin; PSNR {scores} "
           f"(photos the {DEMO_MODEL} model never trained on)")

    # The augmented images are diffusion images now: recaption them as business data would be.
    captions = os.path.join(output, "captioned")
    summary = run_caption(
        RunOptions(inputs=(shards,), output=captions, device="cpu", batch_size=4, shard_size=10,
                   overwrite=True, quiet=True),
        CaptionOptions(vlm="tiny-random", lang="mix", max_pixels=256 * 256, dtype="fp32",
                       generation=GenerationSettings(max_new_tokens=16)))
    yield f"caption (tiny-random Qwen2-VL, zh/en stage1 questions): {summary.line()}"
    report = inspect_shards([captions], verify=True)
    yield (f"inspect --verify: {report.samples} captioned samples, questions {dict(report.questions)}, "
           f"flags {dict(report.flags)}, {len(report.problems)} problems (tiny-random answers are gibberish)")
    yield f"next: ddaug inspect {captions} --show <key> | see {shards}/failures.jsonl"
