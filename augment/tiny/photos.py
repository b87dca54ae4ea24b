"""The photos the tiny family is trained and judged on: files that pip packages ship, so they
exist offline. Each entry names its package, its file and its licence (as the package states
it). The held-out photos are never trained on; they are the ones `ddaug demo` and the tests use.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Photo:
    name: str
    package: str
    path: str       # inside the package's folder
    licence: str

    def file(self) -> str:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"photo {self.name} needs the package {self.package}, which is not installed")
        path = os.path.join(list(spec.submodule_search_locations)[0], self.path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"photo {self.name}: {path} is missing from {self.package}")
        return path

    def load(self) -> np.ndarray:
        """HxWx3 uint8 RGB (grayscale photos repeat their one channel)."""
        with Image.open(self.file()) as im:
            return np.asarray(im.convert("RGB"))

    def sha256(self) -> str:
        with open(self.file(), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()


def _sk(name: str, file: str, licence: str) -> Photo:
    return Photo(name, "skimage", f"data/{file}", licence)


TRAIN = (
    _sk("brick", "brick.png", "CC0 (CC0Textures)"),
    _sk("camera", "camera.png", "CC0 (Lav Varshney)"),
    _sk("cell", "cell.png", "CC0"),
    _sk("clock", "clock_motion.png", "public domain (Stefan van der Walt)"),
    _sk("coins", "coins.png", "no known copyright restrictions"),
    _sk("grass", "grass.png", "CC0 (CC0Textures)"),
    _sk("gravel", "gravel.png", "CC0 (CC0Textures)"),
    _sk("hubble_deep_field", "hubble_deep_field.jpg", "public domain (NASA)"),
    _sk("immunohistochemistry", "ihc.png", "no known copyright restrictions"),
    _sk("retina", "retina.jpg", "CC0"),
    _sk("text", "text.png", "public domain"),
    Photo("china", "sklearn", "datasets/images/china.jpg", "CC BY 2.0 (danielbuechele, Flickr)"),
    Photo("flower", "sklearn", "datasets/images/flower.jpg", "CC BY 2.0 (vultilion, Flickr)"),
    Photo("grace_hopper", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg",
          "public domain (U.S. Navy photograph)"),
)

# Natural colour photos the model never sees in training; `ddaug demo` and the tests use them.
HELD_OUT = (
    _sk("astronaut", "astronaut.png", "public domain (NASA)"),
    _sk("coffee", "coffee.png", "CC0 (Rachel Michetti)"),
    _sk("chelsea", "chelsea.png", "CC0 (Stefan van der Walt)"),
    _sk("rocket", "rocket.jpg", "public domain (SpaceX)"),
)


def held_out(name: str) -> np.ndarray:
    for photo in HELD_OUT:
        if photo.name == name:
            return photo.load()
    raise KeyError(f"{name} is not a held-out photo ({', '.join(p.name for p in HELD_OUT)})")
