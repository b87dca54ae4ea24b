"""Crops for the premise run (docs/gap.md, "The premise end to end"): two folders of natural photo
crops with disjoint content, from photos that pip packages ship (so it runs offline).

    python examples/premise_photos.py premise/ [--per-set 128] [--side 256] [--quality 90]

premise/business-photos/  PNG crops of astronaut, chelsea, coffee, motorcycle (scikit-image);
                          docs/gap.md passes them through the tiny VAE to make "business"
premise/general/          JPEG crops of china, flower (scikit-learn), rocket, hubble_deep_field,
                          retina (scikit-image), grace_hopper (matplotlib): "general", JPEG as real
                          general data is

Crop positions are drawn from a fixed seed, so the folders come out the same on every run.
"""

import argparse
import os

import numpy as np
from PIL import Image

from ddaug.augment.tiny.photos import Photo

_SK = "skimage"
BUSINESS = (
    Photo("astronaut", _SK, "data/astronaut.png", "public domain (NASA)"),
    Photo("chelsea", _SK, "data/chelsea.png", "CC0 (Stefan van der Walt)"),
    Photo("coffee", _SK, "data/coffee.png", "CC0 (Rachel Michetti)"),
    Photo("motorcycle_left", _SK, "data/motorcycle_left.png", "Middlebury 2014 stereo benchmark (via scikit-image)"),
    Photo("motorcycle_right", _SK, "data/motorcycle_right.png", "Middlebury 2014 stereo benchmark (via scikit-image)"),
)
GENERAL = (
    Photo("china", "sklearn", "datasets/images/china.jpg", "CC BY 2.0 (danielbuechele, Flickr)"),
    Photo("flower", "sklearn", "datasets/images/flower.jpg", "CC BY 2.0 (vultilion, Flickr)"),
    Photo("rocket", _SK, "data/rocket.jpg", "public domain (SpaceX)"),
    Photo("hubble_deep_field", _SK, "data/hubble_deep_field.jpg", "public domain (NASA)"),
    Photo("retina", _SK, "data/retina.jpg", "CC0"),
    Photo("grace_hopper", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg",
          "public domain (U.S. Navy photograph)"),
)


def write_crops(photos, folder: str, count: int, side: int, rng: np.random.Generator, **save) -> None:
    """`count` side² crops at random positions, spread evenly over the photos."""
    os.makedirs(folder, exist_ok=True)
    ext = "jpg" if save.get("format") == "JPEG" else "png"
    for i in range(count):
        photo = photos[i % len(photos)]
        pixels = photo.load()
        h, w = pixels.shape[:2]
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(pixels[y:y + side, x:x + side])
        crop.save(os.path.join(folder, f"{photo.name}-{i:04d}.{ext}"), **save)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--per-set", type=int, default=128, help="crops per set")
    parser.add_argument("--side", type=int, default=256, help="crop side in pixels")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the general crops")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    write_crops(BUSINESS, os.path.join(args.folder, "business-photos"), args.per_set, args.side, rng,
                format="PNG")
    write_crops(GENERAL, os.path.join(args.folder, "general"), args.per_set, args.side, rng,
                format="JPEG", quality=args.quality)


if __name__ == "__main__":
    main()
