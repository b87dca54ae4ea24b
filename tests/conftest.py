"""Shared fixtures: real photos (scikit-image's bundled samples) and tiny saved models."""

from __future__ import annotations

import glob
import json
import os
import tarfile

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ddaug.cli import cli


@pytest.fixture(scope="session")
def photos():
    """Small crops of real photos, odd sizes included, as HxWx3 uint8 arrays."""
    from skimage import data

    return {
        "astronaut": data.astronaut()[40:104, 100:164],    # 64x64
        "coffee": data.coffee()[100:161, 200:283],         # 61x83: odd, not a multiple of 8
        "chelsea": data.chelsea()[50:114, 150:214],        # 64x64
        "rocket": data.rocket()[100:141, 200:233],         # 41x33
    }


@pytest.fixture
def photo_dir(tmp_path, photos):
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    for i, (name, arr) in enumerate(photos.items()):
        target = d / "sub" if i % 2 else d
        Image.fromarray(arr).save(target / f"{name}.png")
    return d


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from ddaug.augment import save_tiny_random

    return save_tiny_random(str(tmp_path_factory.mktemp("tiny-sdxl")))


@pytest.fixture(scope="session")
def tiny_lcm_dir(tmp_path_factory):
    from ddaug.augment import save_tiny_random

    return save_tiny_random(str(tmp_path_factory.mktemp("tiny-lcm")), lcm=True)


@pytest.fixture(scope="session")
def shard_sets(tmp_path_factory, photos):
    """Two real ddaug shard sets made through the CLI: 'business' (24 captioned images, 8 shards
    of 3, written by `caption` against a localhost chat server) and 'general' (4 augmented
    photos with conversations, 2 shards)."""
    from ddaug.captioning.replies import Reply
    from ddaug.captioning.server import ChatServer
    from ddaug.demo import write_demo_inputs

    root = tmp_path_factory.mktemp("sets")
    imgs = root / "business-images"
    imgs.mkdir()
    arrays = list(photos.values())
    for i in range(24):
        arr = arrays[i % 4]
        img = Image.fromarray(arr).resize((arr.shape[1] + 2 * i, arr.shape[0] + i))
        img.save(imgs / f"biz{i:02d}.{'png' if i % 2 else 'jpg'}")
    answer = lambda image, text, n: Reply(f"A generated picture, {image.width} pixels wide.")  # noqa: E731
    old = {k: os.environ.get(k) for k in ("NO_PROXY", "no_proxy")}
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
    try:
        with ChatServer(answer, model="m") as srv:
            invoke("caption", imgs, "-o", root / "business", "--backend", "openai", "--api-base", srv.url,
                   "--vlm", "m", "--shard-size", 3, "--lang", "mix", "-q")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    dataset = write_demo_inputs(str(root / "general-inputs"))
    invoke("augment", dataset, "-o", root / "general", "--model", "tiny-random", "--device", "cpu",
           "--shard-size", 2, "-q")
    return {"business": str(root / "business"), "general": str(root / "general")}


def invoke(*args, expect_ok: bool = True):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if expect_ok:
        assert result.exit_code == 0, result.output
    return result


def read_samples(folder) -> dict[str, dict[str, bytes]]:
    """key -> {suffix: bytes} over every shard in folder, read with plain tarfile."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(glob.glob(os.path.join(str(folder), "*.tar"))):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                key, _, suffix = os.path.basename(m.name).partition(".")
                assert suffix, m.name
                samples.setdefault(key, {})[suffix] = tf.extractfile(m).read()
    return samples


def sample_meta(members: dict[str, bytes]) -> dict:
    return json.loads(members["json"])


def decode(data: bytes) -> np.ndarray:
    import io

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
