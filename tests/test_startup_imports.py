"""Start-up of fresh processes: `ddaug caption --backend openai` loads no model library (torch,
diffusers, transformers: seconds of start-up for a job that only sends HTTP requests), the
shards it writes without webdataset are the bytes webdataset's own TarWriter would write, and
`ddaug augment` loads only the diffusers model classes it uses. (Outputs equal to what the stock
imports give: tests/test_tiny_model.py and tests/test_reference.py.)"""

from __future__ import annotations

import glob
import io
import os
import socket
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

from ddaug.captioning.replies import Reply
from ddaug.captioning.server import ChatServer

MODEL_LIBRARIES = ("torch", "diffusers", "transformers", "accelerate", "webdataset")


def _modules(stderr: str) -> set[str]:
    """The modules a `python -X importtime` log names."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines()
            if line.startswith("import time:") and line.count("|") == 2}


def _imported(stderr: str) -> set[str]:
    """Top-level packages named in a `python -X importtime` log."""
    return {name.split(".")[0] for name in _modules(stderr)}


def _caption(inputs, out, url: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    env.pop("OPENAI_API_KEY", None)
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "ddaug", "caption", str(inputs), "-o", str(out),
                           "--backend", "openai", "--api-base", url, "--vlm", "m", "-q", *extra],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    from skimage import data

    root = tmp_path_factory.mktemp("startup")
    inputs = root / "in"
    inputs.mkdir()
    for i, arr in enumerate([data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.astronaut()]):
        Image.fromarray(arr[::4, ::4]).save(inputs / f"img{i}.{'png' if i % 2 else 'jpg'}")
    answer = lambda image, text, n: Reply(f"A picture {image.width} pixels wide.")  # noqa: E731
    with ChatServer(answer, model="m") as srv:
        proc = _caption(inputs, root / "out", srv.url, "--shard-size", "2", "--concurrency", "4")
    return proc, root / "out"


def test_caption_against_a_server_loads_no_model_library(captioned):
    proc, out = captioned
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "caption: done 5, skipped 0 (already done), failed 0, 3 new shard(s)" in proc.stderr
    assert len(glob.glob(str(out / "*.tar"))) == 3
    imported = _imported(proc.stderr)
    assert {"ddaug", "PIL", "click"} <= imported  # the log is read right
    assert not (loaded := imported & set(MODEL_LIBRARIES)), sorted(loaded)


def test_an_unreachable_server_is_one_line_and_loads_no_model_library(tmp_path, captioned):
    _, out = captioned
    with socket.socket() as s:  # a port nothing listens on once it is closed
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    proc = _caption(out, tmp_path / "out", url)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert errors == [f"Error: cannot reach the server at {url} ([Errno 111] Connection refused); "
                      "is it running? check --api-base"], errors
    assert not (loaded := _imported(proc.stderr) & set(MODEL_LIBRARIES)), sorted(loaded)


def test_shards_are_the_bytes_webdataset_writes(captioned):
    from webdataset import TarWriter

    _, out = captioned
    for shard in sorted(glob.glob(str(out / "*.tar"))):
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tf:
            for member in tf.getmembers():
                key, _, suffix = member.name.partition(".")
                samples.setdefault(key, {})[suffix] = tf.extractfile(member).read()
        again = io.BytesIO()
        writer = TarWriter(again, encoder=False, mtime=0, user="ddaug", group="ddaug")
        for key, files in samples.items():
            writer.write({"__key__": key, **files})
        writer.close()
        with open(shard, "rb") as f:
            assert f.read() == again.getvalue(), shard


# Model classes of diffusers.models' sub-packages that `augment` never uses; `from diffusers
# import UNet2DConditionModel` would load them all.
UNUSED_DIFFUSERS_MODULES = ("models/unets/unet_1d.py", "models/unets/unet_3d_condition.py",
                            "models/transformers/transformer_flux.py", "models/autoencoders/autoencoder_kl_cogvideox.py")


def test_augment_imports_only_the_diffusers_model_classes_it_uses(tmp_path, photo_dir):
    import diffusers

    unused = [m for m in UNUSED_DIFFUSERS_MODULES if os.path.exists(os.path.join(os.path.dirname(diffusers.__file__), m))]
    assert unused  # this diffusers has them, so their absence below means something
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "ddaug", "augment", str(photo_dir), "-o",
                           str(tmp_path / "out"), "--model", "tiny", "--device", "cpu", "-q"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "augment: done 4, skipped 0 (already done), failed 0, 1 new shard(s)" in proc.stderr
    modules = _modules(proc.stderr)
    assert {"diffusers.models.unets.unet_2d_condition", "diffusers.models.autoencoders.autoencoder_kl"} <= modules
    loaded = [m for m in unused if "diffusers." + m.removesuffix(".py").replace("/", ".") in modules]
    assert not loaded, loaded
