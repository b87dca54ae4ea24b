"""The trained `tiny` preset keeps the picture: held-out photos through `ddaug augment --model tiny`.

Random weights turn any input into noise, so only a trained model lets a test see fidelity:
swapped colour channels, a wrong pixel range or a VAE scaling-factor slip drop the PSNR below
the floors, and a pixel shift in the pad/crop-back moves the best alignment off zero.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from ddaug.augment.tiny.evaluate import best_shift
from ddaug.augment.tiny.photos import HELD_OUT, held_out
from conftest import decode, invoke, read_samples
from ddaug.shards.inspect import psnr

# Held-out PSNR floors (dB) of the committed weights on the crops below, per photo, CPU fp32:
# 2 dB under what they measure (`pytest tests/test_tiny_model.py -s` prints it; measured
# vae 18.67 / 24.80 / 20.70 / 21.54 and img2img 18.44 / 24.12 / 20.43 / 21.37 for astronaut /
# chelsea / coffee / rocket). Per photo, because a swapped-channel bug costs a grey photo
# (rocket) far less than a colourful one. Update them with the weights
# (augment/tiny/weights/README.md has the whole-photo figures).
PSNR_FLOORS = {"vae": {"astronaut": 16.6, "chelsea": 22.8, "coffee": 18.7, "rocket": 19.5},
               "img2img": {"astronaut": 16.4, "chelsea": 22.1, "coffee": 18.4, "rocket": 19.3}}

# Crops of the held-out photos with detail in them, at sizes that need padding (not multiples of 32).
CROPS = {
    "astronaut": (slice(352, 449), slice(144, 257)),  # 97x113: mission patch, lettering
    "coffee": (slice(192, 333), slice(0, 131)),       # 141x131: wood grain, saucer rim
    "chelsea": (slice(0, 121), slice(144, 273)),      # 121x129: fur, eye
    "rocket": (slice(256, 369), slice(0, 127)),       # 113x127: launch tower lattice
}


@pytest.fixture(scope="module")
def held_out_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("held-out")
    for name, (rows, cols) in CROPS.items():
        Image.fromarray(held_out(name)[rows, cols]).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def outputs(held_out_dir, tmp_path_factory):
    """mode -> {photo: (source, output)} from the CLI, CPU fp32 (the default there)."""
    result = {}
    for mode in ("vae", "img2img"):
        out = tmp_path_factory.mktemp(f"tiny-{mode}")
        invoke("augment", held_out_dir, "-o", out, "--model", "tiny", "--mode", mode, "--device", "cpu", "-q")
        pairs = {}
        for members in read_samples(out).values():
            meta = json.loads(members["json"])
            uri = meta["source"]["images"][0]["uri"]
            name = os.path.splitext(os.path.basename(uri))[0]
            pairs[name] = (np.asarray(Image.open(uri).convert("RGB")), decode(members["png"]))
            assert meta["augment"]["model"] == "tiny"
        result[mode] = pairs
    return result


def test_held_out_photos_are_never_trained_on():
    from ddaug.augment.tiny.photos import TRAIN

    assert not {p.name for p in HELD_OUT} & {p.name for p in TRAIN}
    assert not {p.path for p in HELD_OUT} & {p.path for p in TRAIN}
    assert set(CROPS) == {p.name for p in HELD_OUT}


@pytest.mark.parametrize("mode", ["vae", "img2img"])
def test_held_out_psnr_floor(outputs, mode):
    scores = {}
    for name, (source, output) in outputs[mode].items():
        assert output.shape == source.shape, name           # size: cropped back exactly
        scores[name] = round(psnr(source, output), 2)
    print(f"held-out crop PSNR, {mode}: {scores}")
    assert set(scores) == set(CROPS)
    assert all(scores[n] >= PSNR_FLOORS[mode][n] for n in scores), scores


@pytest.mark.parametrize("mode", ["vae", "img2img"])
def test_alignment_and_colour_order_and_what_they_catch(outputs, mode):
    """Each output matches its source best unshifted, and the test's own comparison, done as a
    buggy pipeline would leave it, is caught: against the crop taken one pixel lower the best
    match moves by that pixel, and against red and blue swapped the PSNR falls below the floor.
    (A one-pixel shift costs about as much PSNR as the model's own blur does, so the alignment
    check, not the floor, is what catches it.)"""
    pairs = outputs[mode]
    assert {n: best_shift(o, s) for n, (s, o) in pairs.items()} == {n: (0, 0) for n in pairs}
    for name, (source, output) in pairs.items():
        rows, cols = CROPS[name]
        one_lower = held_out(name)[rows.start + 1:rows.stop + 1, cols]
        assert best_shift(output, one_lower) == (-1, 0), name
    swapped = {n: round(psnr(s[..., ::-1], o), 2) for n, (s, o) in pairs.items()}  # RGB <-> BGR
    print(f"{mode}: channels swapped {swapped}")
    assert all(swapped[n] < PSNR_FLOORS[mode][n] for n in swapped), swapped
