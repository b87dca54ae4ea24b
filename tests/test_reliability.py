"""Reliability: kill -9 and resume, hostile inputs, corrupt shards as input, model output faults,
a misbehaving chat server, security, and --retry-failures.

Other reliability properties are proven beside the feature they guard: a second plain process
on a running folder (test_augment_cli::test_second_plain_process_on_a_running_folder_is_told_to_join),
workers killed, frozen and joining (test_elastic), disk full
(test_augment_cli::test_disk_full_mid_run_stops_cleanly_and_rerun_completes), crafted export
paths (test_export::test_crafted_keys_never_escape_the_output_folder), API keys kept out of
logs and files (test_caption::test_openai_backend_end_to_end_with_a_429), corrupt shards in the
loader (test_loader::test_corrupt_shards_and_samples_are_skipped_then_capped).
"""

from __future__ import annotations

import glob
import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from ddaug.captioning.replies import Reply
from ddaug.captioning.server import ChatServer
from conftest import invoke, read_samples, sample_meta



def _cli(*args, env_extra=None, wait=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1,localhost",
           **(env_extra or {})}
    cmd = [sys.executable, "-m", "ddaug", *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _members_per_key(folder) -> dict[str, int]:
    """How many json members each key has over all tars: 1 everywhere means no duplicates."""
    counts: dict[str, int] = {}
    for shard in glob.glob(os.path.join(str(folder), "*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    key = m.name[:-5]
                    counts[key] = counts.get(key, 0) + 1
    return counts


def _assert_complete(out, expected_keys: set[str], expected_failures: int):
    counts = _members_per_key(out)
    assert set(counts) == expected_keys and set(counts.values()) == {1}, counts
    failures = [json.loads(x) for x in open(os.path.join(out, "failures.jsonl"))]
    assert len(failures) == expected_failures
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert sorted(s["name"] for s in manifest["shards"]) == sorted(
        os.path.basename(p) for p in glob.glob(os.path.join(str(out), "*.tar")))
    assert manifest["samples"] == len(expected_keys) and manifest["failed"] == expected_failures
    assert not glob.glob(os.path.join(str(out), "*.tmp*"))
    verify = invoke("inspect", out, "--verify")  # also checks every sha256 against the manifest
    assert "PROBLEM" not in verify.output


@pytest.fixture(scope="module")
def crash_inputs(tmp_path_factory, photos):
    d = tmp_path_factory.mktemp("crash") / "in"
    d.mkdir()
    arrays = list(photos.values())
    for i in range(7):
        Image.fromarray(arrays[i % 4]).save(d / f"p{i}.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return d


@pytest.fixture(scope="module")
def expected_augment_keys(crash_inputs, tmp_path_factory):
    ref = tmp_path_factory.mktemp("reference")
    invoke("augment", crash_inputs, "-o", ref, "--model", "tiny-random", "--device", "cpu", "--shard-size", 2, "-q")
    return set(read_samples(ref))


# Named points hit the rename of a finished tar, the window between it and its done marker,
# the done marker itself and the shared manifest/ledger; "random" kills at an arbitrary moment.
CRASHES = ["tar-write:3", "tar-renamed:1", "stats-replace:2", "manifest-replace:2", "random:1"]


@pytest.mark.parametrize("crash", CRASHES)
def test_augment_survives_kill_9_anywhere(tmp_path, crash_inputs, expected_augment_keys, crash):
    expected = expected_augment_keys
    out = tmp_path / "out"
    args = ["augment", crash_inputs, "-o", out, "--model", "tiny-random", "--device", "cpu", "--shard-size", 2,
            "--batch-size", 2, "-q"]
    if crash.startswith("random"):
        proc = _cli(*args, wait=False)
        time.sleep(random.Random(crash).uniform(3.0, 8.0))  # imports take ~3 s; the run a few more
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    else:
        killed = _cli(*args, env_extra={"DDAUG_CRASH_AT": crash})
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    done = _cli(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_complete(out, expected, expected_failures=1)


@pytest.mark.parametrize("crash", ["tar-rename:2", "failures-replace:3"])
def test_caption_survives_kill_9(tmp_path, crash_inputs, crash):
    with ChatServer(lambda image, text, n: Reply(f"A picture {image.width} wide."), model="m") as srv:
        args = ["caption", crash_inputs, "-o", tmp_path / "out", "--backend", "openai", "--api-base", srv.url,
                "--vlm", "m", "--shard-size", 2, "-q"]
        killed = _cli(*args, env_extra={"DDAUG_CRASH_AT": crash})
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        done = _cli(*args)
        assert done.returncode == 0, done.stderr[-2000:]
        ref = _cli(*args[:3], tmp_path / "ref", *args[4:])
        assert ref.returncode == 0
    _assert_complete(tmp_path / "out", set(read_samples(tmp_path / "ref")), expected_failures=1)


# -- hostile inputs ------------------------------------------------------------------------------------
def _png_header_bomb(width: int, height: int) -> bytes:
    """A tiny PNG that declares a huge canvas (the classic decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _jpeg_with_orientation(arr, orientation: int) -> bytes:
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, exif=exif)
    return buf.getvalue()


@pytest.fixture
def hostile_corpus(tmp_path, photos):
    """Every kind of broken or odd file; returns (folder, {relative name: expected (w, h) or a
    failure-reason fragment})."""
    d = tmp_path / "hostile"
    (d / "sub dir ü").mkdir(parents=True)
    astro, coffee = photos["astronaut"], photos["coffee"]  # 64x64, 83x61
    expect: dict[str, object] = {}

    def put(name, data, outcome):
        (d / name).write_bytes(data)
        expect[name] = outcome

    def encode(img, fmt, **kw):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        return buf.getvalue()

    ok = encode(Image.fromarray(coffee), "PNG")
    put("truncated.png", ok[: len(ok) // 2], "broken image")
    put("zero.jpg", b"", "empty file")
    put("text.webp", b"hello, I am not a picture", "not an image")
    put("really_a_png.jpg", ok, (83, 61))                                    # wrong extension: fine
    put("bomb.png", _png_header_bomb(60000, 60000), "decompression bomb")
    put("cmyk.jpg", encode(Image.fromarray(coffee).convert("CMYK"), "JPEG"), (83, 61))
    put("gray16.png", encode(Image.fromarray((np.arange(40 * 30, dtype=np.uint16) * 50).reshape(30, 40)), "PNG"),
        (40, 30))
    pal = Image.fromarray(astro).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    put("palette_transparent.png", encode(pal, "PNG", transparency=0), (64, 64))
    put("exif_rot90.jpg", _jpeg_with_orientation(coffee, 6), (61, 83))       # displayed rotated
    put("exif_mirror.jpg", _jpeg_with_orientation(coffee, 2), (83, 61))
    put("one_pixel.png", encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), (1, 1))
    put("thin_tall.png", encode(Image.fromarray(np.tile(astro[:, :1], (40, 1, 1))), "PNG"), (1, 2560))
    put("thin_wide.png", encode(Image.fromarray(np.tile(astro[:2], (1, 40, 1))), "PNG"), (2560, 2))
    put("big.jpg", encode(Image.fromarray(coffee).resize((1400, 1000)), "JPEG", quality=80), (1400, 1000))
    put("sub dir ü/ünïcødé name 名前.png", ok, (83, 61))
    put("  spaces  .png", ok, (83, 61))
    os.mkdir(d / "folder_named.jpg")                                          # a directory, not a file
    os.symlink(d / "missing-target.png", d / "dangling.png")
    expect["dangling.png"] = "No such file"
    os.symlink(d, d / "sub dir ü" / "loop")                                   # a symlink loop: not followed
    locked = d / "locked.png"
    locked.write_bytes(ok)
    locked.chmod(0)
    expect["locked.png"] = (83, 61) if os.geteuid() == 0 else "Permission denied"  # root reads anything
    return d, expect


def test_hostile_corpus_never_crashes_and_keeps_native_sizes(tmp_path, hostile_corpus):
    folder, expect = hostile_corpus
    out = tmp_path / "out"
    result = invoke("augment", folder, "-o", out, "--model", "tiny-random", "--device", "cpu", "-q")
    assert "failed" in result.output
    by_name = {}
    for members in read_samples(out).values():
        meta = sample_meta(members)
        uri = meta["source"]["uri"]
        by_name[os.path.relpath(uri, folder)] = Image.open(io.BytesIO(members["png"])).size
    failures = {os.path.relpath(f["source"], folder): f["reason"]
                for f in map(json.loads, open(out / "failures.jsonl"))}
    for name, outcome in expect.items():
        if isinstance(outcome, tuple):
            assert by_name.get(name) == outcome, (name, by_name.get(name), failures.get(name))
        else:
            assert outcome in failures.get(name, ""), (name, failures.get(name))
    assert not any("loop" in name for name in by_name)  # the loop was not walked into
    invoke("inspect", out, "--verify")


# -- corrupt shards as input ----------------------------------------------------------------------------
def test_corrupt_shards_are_named_by_verify_and_skipped_by_caption(tmp_path, shard_sets):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(shard_sets["general"], broken)  # 4 samples in 2 shards of 2
    extra = broken / "shard-000-000009.tar"          # a third shard with a json and no image
    with tarfile.open(extra, "w") as tf:
        for name, data in [("lonely.json", b'{"messages": []}'), ("ok.png", open(glob.glob(str(broken / "*.tar"))[0],
                                                                                   "rb").read()[:0])]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    first, second = sorted(glob.glob(str(broken / "shard-000-00000[01].tar")))
    raw = bytearray(open(first, "rb").read())
    at = raw.find(b'{"augment"')
    raw[at:at + 4] = b"####"                          # a json that does not parse
    open(first, "wb").write(bytes(raw))
    with tarfile.open(second) as tf:
        last = tf.getmembers()[-1]
    data = open(second, "rb").read()
    open(second, "wb").write(data[: last.offset_data + last.size // 2])  # a member cut short
    verify = invoke("inspect", broken, "--verify", expect_ok=False)
    assert verify.exit_code == 1
    assert "json does not parse" in verify.output and os.path.basename(second) in verify.output
    with ChatServer(lambda image, text, n: Reply("A picture."), model="m") as srv:
        out = tmp_path / "cap"
        result = _cli("caption", broken, "-o", out, "--backend", "openai", "--api-base", srv.url, "--vlm", "m", "-q")
    assert result.returncode == 0, result.stderr[-2000:]
    reasons = " | ".join(json.loads(x)["reason"] for x in open(out / "failures.jsonl"))
    assert "json does not parse" in reasons and "no image member" in reasons and "cut short" in reasons
    assert len(read_samples(out)) >= 1
    invoke("inspect", out, "--verify")


# -- model output faults ---------------------------------------------------------------------------------
def test_nan_model_output_goes_to_the_ledger_never_to_a_shard(tmp_path, photo_dir, monkeypatch):
    import torch

    import ddaug.augment.run as augment_run

    real = augment_run.load_components

    def poisoned(*args, **kwargs):
        comps = real(*args, **kwargs)
        with torch.no_grad():
            next(comps.vae.decoder.conv_out.parameters()).fill_(float("nan"))
        return comps

    monkeypatch.setattr(augment_run, "load_components", poisoned)
    out = tmp_path / "out"
    result = invoke("augment", photo_dir, "-o", out, "--model", "tiny-random", "--device", "cpu", "-q",
                    expect_ok=False)
    assert result.exit_code == 1 and "nothing could be processed" in result.output
    assert not glob.glob(str(out / "*.tar"))
    reasons = [json.loads(x)["reason"] for x in open(out / "failures.jsonl")]
    assert len(reasons) == 4 and all("non-finite" in r for r in reasons)


# -- a misbehaving chat server ----------------------------------------------------------------------------
def test_openai_faults_are_retried_then_recorded_and_the_run_finishes(tmp_path, photo_dir):
    with ChatServer(lambda image, text, n: Reply("A clear picture."), model="m", timeout_sleep=3.0) as srv:
        # one request at a time, so each fault meets a known request
        srv.inject("timeout", "500", "malformed", "reset", "ok",  # sample 1: four faults, then served
                   "429", "429", "429", "429", "429")          # sample 2: a 429 storm beyond the retries
        out = tmp_path / "out"
        result = invoke("caption", photo_dir, "-o", out, "--backend", "openai", "--api-base", srv.url, "--vlm", "m",
                        "--concurrency", 1, "--batch-size", 1, "--timeout", 1, "--max-retries", 4,
                        "--retry-backoff", 0.01, "-q")
        assert "done 3" in result.output and "failed 1" in result.output
        faults = [r["fault"] for r in srv.requests]
    assert faults[:5] == ["timeout", "500", "malformed", "reset", None]
    failures = [json.loads(x) for x in open(out / "failures.jsonl")]
    assert len(failures) == 1 and "HTTP 429 after 5 attempts" in failures[0]["reason"]
    invoke("inspect", out, "--verify")


def test_openai_server_dying_mid_run_stops_with_one_line_and_resumes(tmp_path, photo_dir):
    out = tmp_path / "out"
    srv = ChatServer(lambda image, text, n: Reply("A picture."), model="m").__enter__()
    url = srv.url
    calls = {"n": 0}

    def respond_then_die(image, text, n):
        calls["n"] += 1
        if calls["n"] == 3:
            srv.close()
        return Reply("A picture.")

    srv.respond = respond_then_die
    result = invoke("caption", photo_dir, "-o", out, "--backend", "openai", "--api-base", url, "--vlm", "m",
                    "--concurrency", 1, "--batch-size", 1, "--shard-size", 1, "--max-retries", 1,
                    "--retry-backoff", 0.01, "-q", expect_ok=False)
    assert result.exit_code == 1 and "rerun to resume" in result.output and "Traceback" not in result.output
    done_before = len(read_samples(out))
    assert 1 <= done_before < 4
    with ChatServer(lambda image, text, n: Reply("A picture."), model="m") as srv2:
        invoke("caption", photo_dir, "-o", out, "--backend", "openai", "--api-base", srv2.url, "--vlm", "m",
               "--shard-size", 1, "-q")
    assert len(_members_per_key(out)) == 4 and set(_members_per_key(out).values()) == {1}


# -- security --------------------------------------------------------------------------------------------
def test_pickle_weights_are_refused(tmp_path, tiny_model_dir, photo_dir):
    import shutil

    from diffusers import UNet2DConditionModel

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet", safe_serialization=False)  # .bin only
    assert glob.glob(str(folder / "unet" / "*.bin"))
    result = invoke("augment", photo_dir, "-o", tmp_path / "out", "--model", folder, "--device", "cpu",
                    expect_ok=False)
    assert result.exit_code == 1 and "safetensors" in result.output and "Traceback" not in result.output


def test_vlm_remote_code_needs_the_flag_and_pickles_are_refused(tmp_path, photo_dir):
    from ddaug.captioning import save_tiny_vlm

    folder = tmp_path / "vlm"
    save_tiny_vlm(str(folder))
    marker = tmp_path / "remote-code-ran"
    (folder / "evil_model.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                          "from transformers import Qwen2VLForConditionalGeneration as EvilModel\n")
    cfg = json.load(open(folder / "config.json"))
    # A known architecture with an auto_map: transformers uses its own class, the repo's code stays cold.
    cfg["auto_map"] = {"AutoModelForImageTextToText": "evil_model.EvilModel"}
    json.dump(cfg, open(folder / "config.json", "w"))
    invoke("caption", photo_dir, "-o", tmp_path / "out0", "--vlm", folder, "--device", "cpu", "--max-new-tokens", 2)
    assert not marker.exists()
    # An architecture only the repo's code knows: refused without the flag, code never imported.
    cfg["model_type"] = "ddaug_evil_vlm"
    cfg["auto_map"] = {"AutoConfig": "evil_model.EvilConfig", "AutoModelForImageTextToText": "evil_model.EvilModel"}
    json.dump(cfg, open(folder / "config.json", "w"))
    result = invoke("caption", photo_dir, "-o", tmp_path / "out", "--vlm", folder, "--device", "cpu",
                    expect_ok=False)
    assert not marker.exists()  # the repo's code never ran
    assert result.exit_code == 1 and "--trust-remote-code" in result.output and "Traceback" not in result.output

    from transformers import AutoModelForImageTextToText

    plain = tmp_path / "vlm-bin"
    save_tiny_vlm(str(plain))
    import torch

    model = AutoModelForImageTextToText.from_pretrained(plain)
    os.remove(plain / "model.safetensors")
    torch.save(model.state_dict(), plain / "pytorch_model.bin")  # a pickle: loading it could run code
    result = invoke("caption", photo_dir, "-o", tmp_path / "out2", "--vlm", plain, "--device", "cpu",
                    expect_ok=False)
    assert result.exit_code == 1 and "safetensors" in result.output and "Traceback" not in result.output


# -- feeding failures back ----------------------------------------------------------------------------------
def test_retry_failures_redoes_only_the_failed_inputs(tmp_path, photos):
    d = tmp_path / "in"
    d.mkdir()
    for name, arr in photos.items():
        Image.fromarray(arr).save(d / f"{name}.png")
    good = (d / "coffee.png").read_bytes()
    (d / "coffee.png").write_bytes(good[:100])  # broken on the first run
    out = tmp_path / "out"
    common = ["--model", "tiny-random", "--device", "cpu", "--shard-size", 2, "-q"]
    invoke("augment", d, "-o", out, *common)
    assert len(read_samples(out)) == 3 and len(open(out / "failures.jsonl").read().splitlines()) == 1
    before = {p: os.path.getmtime(p) for p in glob.glob(str(out / "*.tar"))}
    (d / "coffee.png").write_bytes(good)        # the user fixes the file
    result = invoke("augment", d, "-o", out, *common, "--retry-failures")
    assert "done 1, skipped 3" in result.output
    assert all(os.path.getmtime(p) == t for p, t in before.items())  # finished shards untouched
    assert open(out / "failures.jsonl").read() == ""
    _assert_complete(out, {k for k in read_samples(out)}, expected_failures=0)
    assert len(read_samples(out)) == 4
    again = invoke("augment", d, "-o", out, *common, "--retry-failures")
    assert "done 0" in again.output
    bad = invoke("augment", d, "-o", out, *common, "--retry-failures", "--overwrite", expect_ok=False)
    assert bad.exit_code == 1 and "--retry-failures" in bad.output


def test_shards_synced_while_they_grow_are_byte_identical(tmp_path, photo_dir, monkeypatch):
    """The background write-back (shards/writer.py, SYNC_EVERY) changes when bytes reach the
    disk, never which bytes: a run syncing after every sample writes the same shard."""
    import threading

    import ddaug.shards.writer as writer

    syncs = []
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(writer.os, "fdatasync", lambda fd: (syncs.append(threading.current_thread().name),
                                                            real_fdatasync(fd)))
    outs = {}
    for every in (writer.SYNC_EVERY, 1):
        monkeypatch.setattr(writer, "SYNC_EVERY", every)
        outs[every] = tmp_path / f"out{every}"
        invoke("augment", photo_dir, "-o", outs[every], "--model", "tiny-random", "--device", "cpu", "-q")
    assert syncs and set(syncs) == {"shard-sync"}  # only the small run synced early, off the main thread
    (a,), (b,) = (sorted(glob.glob(str(o / "*.tar"))) for o in outs.values())
    assert open(a, "rb").read() == open(b, "rb").read()


def test_a_failed_background_sync_fails_the_shards_commit(tmp_path, photo_dir, monkeypatch):
    """Linux reports a write-back error (EIO, ENOSPC on thin or network storage) to one fsync
    per open file, then forgets it: when the background sync got it, the commit's own fsync
    succeeds on lost bytes. The error must stop the run (one line, no shard under its final
    name, nothing left behind) instead of a thread's traceback and a shard claimed durable."""
    import errno

    import ddaug.shards.writer as writer

    real_fdatasync = os.fdatasync
    calls = []

    def fdatasync_fails_once(fd):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        return real_fdatasync(fd)

    monkeypatch.setattr(writer.os, "fdatasync", fdatasync_fails_once)
    monkeypatch.setattr(writer, "SYNC_EVERY", 1)
    out = tmp_path / "out"
    r = invoke("augment", photo_dir, "-o", out, "--model", "tiny-random", "--device", "cpu", "-q",
               "--shard-size", "2", expect_ok=False)
    assert calls
    assert r.exit_code == 1 and "Input/output error" in r.output and "rerun" in r.output, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert not glob.glob(str(out / "*.tar")) and not glob.glob(str(out / "*.tmp*"))
    r = invoke("augment", photo_dir, "-o", out, "--model", "tiny-random", "--device", "cpu", "-q",
               "--shard-size", "2")  # the disk recovered: a rerun makes every shard
    assert len(read_samples(out)) == len(list(photo_dir.rglob("*.png")))
