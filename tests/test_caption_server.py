"""`caption --backend openai` at server speed and under hostile conditions: requests stay in
flight across shard boundaries with deterministic shards, downsized images go as JPEG, EXIF-rotated
inputs are stored as the model saw them, the key never leaks or crosses origins, and bad flags or a
failed start are one line that leaves the folder usable."""

from __future__ import annotations

import base64
import io
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image, ImageOps

from ddaug.captioning.replies import Reply
from ddaug.captioning.server import ChatServer
from conftest import invoke, read_samples, sample_meta


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def _describe(image: Image.Image) -> str:
    r, g, b = np.asarray(image).reshape(-1, 3).mean(axis=0)
    return f"A picture of {image.width}x{image.height} pixels, mean colour {r:.0f} {g:.0f} {b:.0f}."


@pytest.fixture
def photos_dir(tmp_path, photos):
    d = tmp_path / "photos"
    d.mkdir()
    for i in range(12):
        name, arr = list(photos.items())[i % 4]
        Image.fromarray(np.roll(arr, i, axis=1)).save(d / f"{name}{i:02d}.jpg", quality=90)
    return d


def _caption(inputs, out, url, *extra, expect_ok=True):
    return invoke("caption", inputs, "-o", out, "--backend", "openai", "--api-base", url, "--vlm", "tiny-random",
                  "-q", *extra, expect_ok=expect_ok)


def _shard_records(out) -> list[list[tuple[str, list]]]:
    """Per shard, in tar order: (key, messages)."""
    import glob
    import tarfile

    shards = []
    for path in sorted(glob.glob(str(out / "*.tar"))):
        with tarfile.open(path) as tf:
            shards.append([(json.loads(tf.extractfile(m).read())["key"], json.loads(tf.extractfile(m).read())["messages"])
                           for m in tf.getmembers() if m.name.endswith(".json")])
    return shards


def test_concurrency_requests_stay_in_flight_across_shard_boundaries(tmp_path, photos_dir):
    """Each server answer waits until --concurrency requests are in flight at once (a barrier):
    a client that drains at a batch or shard end (3 images per shard here, 4 allowed in flight)
    would break it. The shards are the same as a one-at-a-time run's."""
    barrier = threading.Barrier(4, timeout=20)

    def respond_together(image, text, max_tokens):
        barrier.wait()  # BrokenBarrierError -> HTTP 500 -> a failure in the ledger
        return Reply(_describe(image))

    with ChatServer(respond_together, model="tiny-random", parallel=True) as srv:
        result = _caption(photos_dir, tmp_path / "c4", srv.url, "--concurrency", 4, "--shard-size", 3,
                          "--max-retries", 0)
    assert "done 12" in result.output and "failed 0" in result.output, result.output
    with ChatServer(lambda image, text, n: Reply(_describe(image)), model="tiny-random") as srv:
        _caption(photos_dir, tmp_path / "c1", srv.url, "--concurrency", 1, "--shard-size", 3)
    together, alone = _shard_records(tmp_path / "c4"), _shard_records(tmp_path / "c1")
    assert len(together) == 4 and together == alone
    invoke("inspect", tmp_path / "c4", "--verify")


def test_downsized_images_go_as_jpeg_and_originals_as_their_bytes(tmp_path, photos_dir):
    seen = []

    def respond(image, text, max_tokens):
        seen.append(image.size)
        return Reply(_describe(image))

    with ChatServer(respond, model="tiny-random") as srv:
        _caption(photos_dir, tmp_path / "capped", srv.url, "--max-pixels", 1000)
        capped = [json.loads(r["body"]) for r in srv.requests]
        srv.requests.clear()
        _caption(photos_dir, tmp_path / "png", srv.url, "--max-pixels", 1000, "--send-lossless")
        lossless = [json.loads(r["body"]) for r in srv.requests]
        srv.requests.clear()
        _caption(photos_dir, tmp_path / "whole", srv.url)  # the openai default: no cap
        whole = [json.loads(r["body"]) for r in srv.requests]

    def urls(bodies):
        return [b["messages"][0]["content"][0]["image_url"]["url"] for b in bodies]

    assert all(u.startswith("data:image/jpeg;base64,") for u in urls(capped))
    assert all(u.startswith("data:image/png;base64,") for u in urls(lossless))
    assert all(w * h <= 1000 for w, h in seen[:12]) and all(w * h <= 1000 for w, h in seen[12:24])
    originals = {base64.b64encode((photos_dir / f).read_bytes()).decode() for f in os.listdir(photos_dir)}
    assert {u.split(",", 1)[1] for u in urls(whole)} == originals
    for key, members in read_samples(tmp_path / "capped").items():
        meta = sample_meta(members)
        assert meta["caption"]["model_image"][0] * meta["caption"]["model_image"][1] <= 1000
        assert members["jpg"] == (photos_dir / meta["source"]["uri"].rsplit("/", 1)[1]).read_bytes()


def _stripes_and_red(width: int, height: int) -> np.ndarray:
    """Left half: one-pixel black and white stripes (all detail, no low frequencies); right half:
    red. An antialiased downsize turns the stripes grey; an aliased one keeps black or white."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2: 2] = 255
    arr[:, width // 2:] = (255, 0, 0)
    return arr


def test_downsized_requests_are_antialiased_upright_and_in_colour(tmp_path):
    """What the server sees of a downsized input is the upright RGB picture shrunk with an
    antialiased filter: within a few levels of Pillow's BICUBIC, whatever the input's format,
    colour mode, EXIF orientation, or size (one over Pillow's 16 MB storage block included)."""
    d = tmp_path / "in"
    d.mkdir()
    small, big = _stripes_and_red(800, 600), _stripes_and_red(2200, 2000)
    Image.fromarray(small).save(d / "stripes.png")
    Image.fromarray(big).save(d / "big.png", compress_level=1)  # 17.6 MB decoded
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° to view: the stripes run across the upright picture
    Image.fromarray(small).save(d / "sideways.jpg", quality=98, subsampling=0, exif=exif)
    Image.fromarray(small).convert("L").save(d / "grey.jpg", quality=98)
    Image.fromarray(small).convert("CMYK").save(d / "cmyk.jpg", quality=98, subsampling=0)
    cap = 100_000  # not a DCT-scale step of the JPEGs: every input goes through a resize
    seen = []

    def respond(image, text, max_tokens):  # the answer names the image the server saw
        seen.append(image)
        return Reply(f"Image number {len(seen) - 1}.")

    with ChatServer(respond, model="tiny-random") as srv:
        _caption(d, tmp_path / "out", srv.url, "--max-pixels", cap, "--concurrency", 1)
    samples = read_samples(tmp_path / "out")
    assert len(seen) == len(samples) == 5
    for members in samples.values():
        meta = sample_meta(members)
        name = meta["source"]["uri"].rsplit("/", 1)[1]
        got = seen[int(meta["messages"][1]["content"].split()[-1].rstrip("."))]
        upright = ImageOps.exif_transpose(Image.open(d / name)).convert("RGB")
        assert got.width * got.height <= cap and got.width * got.height > 0.98 * cap, name
        assert abs(got.width / got.height - upright.width / upright.height) < 0.01, name
        want = np.asarray(upright.resize(got.size, Image.Resampling.BICUBIC), dtype=np.int16)
        diff = np.abs(np.asarray(got, dtype=np.int16) - want)
        assert diff.mean() < 3 and np.percentile(diff, 99) < 24, (name, diff.mean(), np.percentile(diff, 99))


@pytest.mark.parametrize("backend", ["openai", "transformers"])
def test_exif_rotated_inputs_are_stored_as_the_model_saw_them(tmp_path, photos, backend):
    """A JPEG whose EXIF says 'rotate 90°': the model is shown it upright, so the shard stores the
    upright pixels losslessly (a trainer ignoring EXIF gets what the caption describes)."""
    d = tmp_path / "in"
    d.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(photos["coffee"]).save(d / "sideways.jpg", quality=95, exif=exif)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(d / "sideways.jpg")).convert("RGB"))
    seen = []

    def respond(image, text, max_tokens):
        seen.append(image.size)
        return Reply(_describe(image))

    out = tmp_path / "out"
    if backend == "openai":
        with ChatServer(respond, model="tiny-random") as srv:
            _caption(d, out, srv.url)
        assert seen == [(upright.shape[1], upright.shape[0])]
    else:
        from ddaug.captioning import save_tiny_vlm

        invoke("caption", d, "-o", out, "--vlm", save_tiny_vlm(str(tmp_path / "vlm")), "--device", "cpu",
               "--max-new-tokens", 4, "-q")
    (members,) = read_samples(out).values()
    meta = sample_meta(members)
    assert set(members) == {"png", "json"} and meta["images"][0].endswith(".png")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(members["png"])).convert("RGB")), upright)
    src = meta["source"]["images"][0]
    assert src["format"] == "JPEG" and src["exif_orientation"] == 6
    assert (src["width"], src["height"]) == (upright.shape[1], upright.shape[0])
    invoke("inspect", out, "--verify")


def test_an_image_tag_in_the_answer_is_never_written(tmp_path, photos_dir):
    with ChatServer(lambda image, text, n: Reply("Here is the <image> you sent:\na small photo <image>"),
                    model="tiny-random") as srv:
        result = _caption(photos_dir, tmp_path / "out", srv.url)
    assert "image tag removed from answer 12" in result.output
    for members in read_samples(tmp_path / "out").values():
        messages = sample_meta(members)["messages"]
        assert messages[1]["content"] == "Here is the you sent:\na small photo"
        assert "".join(m["content"] for m in messages).count("<image>") == 1
    invoke("inspect", tmp_path / "out", "--verify")


def test_a_key_with_a_trailing_newline_works_and_is_never_printed(tmp_path, photos_dir, monkeypatch):
    with ChatServer(lambda image, text, n: Reply("A photo."), model="tiny-random", api_key="sk-secret-77") as srv:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-77\n")
        result = _caption(photos_dir, tmp_path / "ok", srv.url)
        assert "done 12" in result.output
        monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-77\nX-Injected: 1")
        result = _caption(photos_dir, tmp_path / "bad", srv.url, expect_ok=False)
    assert result.exit_code == 1 and "OPENAI_API_KEY" in result.output
    assert "sk-secret" not in result.output and "Traceback" not in result.output


class _Recorder(BaseHTTPRequestHandler):
    """Another origin: records what reaches it."""
    seen: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.seen.append(dict(self.headers))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")


def test_credentials_never_follow_a_redirect_to_another_origin(tmp_path, photos_dir, monkeypatch):
    other = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    target = f"http://127.0.0.1:{other.server_address[1]}/v1/models"

    class Redirect(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()

    redirector = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=redirector.serve_forever, daemon=True).start()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-77")
    try:
        result = _caption(photos_dir, tmp_path / "out", f"http://127.0.0.1:{redirector.server_address[1]}/v1",
                          expect_ok=False)
    finally:
        redirector.shutdown()
        other.shutdown()
    assert result.exit_code == 1 and "another origin" in result.output and "Traceback" not in result.output
    assert all("Authorization" not in h for h in _Recorder.seen)
    assert "sk-secret" not in result.output


@pytest.mark.parametrize("flags, names", [
    (["--temperature", "nan"], "--temperature"),
    (["--top-p", "nan", "--temperature", "0.7"], "--top-p"),
    (["--api-base", "notaurl"], "--api-base"),
    (["--questions", "BINARY"], "--questions"),
    (["--questions", "FIFO"], "--questions"),
    (["--timeout", "nan"], "--timeout"),
])
def test_bad_caption_flags_are_one_line(tmp_path, photos_dir, flags, names):
    binary = tmp_path / "q.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    fifo = tmp_path / "q.json"
    os.mkfifo(fifo)  # would block a plain open() forever
    flags = [{"BINARY": str(binary), "FIFO": str(fifo)}.get(f, f) for f in flags]
    args = ["caption", photos_dir, "-o", tmp_path / "out", "--backend", "openai", "--vlm", "m", *flags]
    if "--api-base" not in flags:
        args += ["--api-base", "http://127.0.0.1:9/v1"]
    result = invoke(*args, expect_ok=False)
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error")]
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert len(errors) == 1 and names in errors[0], result.output  # click may add its usage lines
    assert not (tmp_path / "out" / "run.json").exists()


def test_a_server_that_fails_before_any_work_leaves_the_folder_usable(tmp_path, photos_dir):
    with ChatServer(lambda image, text, n: Reply("A photo."), model="served-model") as srv:
        result = _caption(photos_dir, tmp_path / "out", srv.url, expect_ok=False)  # --vlm tiny-random: not served
        assert result.exit_code == 1 and "does not serve model" in result.output
        assert not (tmp_path / "out" / "run.json").exists()
        result = invoke("caption", photos_dir, "-o", tmp_path / "out", "--backend", "openai", "--api-base", srv.url,
                        "--vlm", "served-model", "-q")  # the corrected command
    assert "done 12" in result.output


def test_verbose_bound_report_separates_client_server_and_tar(tmp_path, photos_dir):
    with ChatServer(lambda image, text, n: Reply("A photo."), model="tiny-random") as srv:
        result = invoke("-v", "caption", photos_dir, "-o", tmp_path / "out", "--backend", "openai", "--api-base",
                        srv.url, "--vlm", "tiny-random", "--concurrency", 2)
    (line,) = [ln for ln in result.output.splitlines() if "where the time went" in ln]
    assert "client CPU" in line and "waiting on the server" in line and "tar writing" in line
    assert "Bound by" in line or "No single bound" in line
    assert "model" not in line.split("where the time went")[1]
