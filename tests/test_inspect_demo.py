"""`ddaug inspect` (summary, verify, show, preview, json) and `ddaug demo`."""

from __future__ import annotations

import glob
import json
import os
import tarfile
import subprocess

from PIL import Image

from conftest import invoke, read_samples

FAST = ["--model", "tiny-random", "--device", "cpu", "-q"]


def _make_shards(tmp_path, photo_dir):
    out = tmp_path / "out"
    invoke("augment", photo_dir, "-o", out, *FAST, "--shard-size", "2", "--stage", "s1")
    return out


def test_summary_json_show_and_preview(tmp_path, photo_dir):
    out = _make_shards(tmp_path, photo_dir)
    r = invoke("inspect", out, "--json")
    rep = json.loads(r.output)
    assert rep["shards"] == 2 and rep["samples"] == 4 and rep["formats"] == {"png": 4}
    assert rep["tags"]["stage"] == {"s1": 4} and rep["problems"] == []
    assert sum(rep["sizes"].values()) == 4

    key = next(iter(read_samples(out)))
    r = invoke("inspect", out, "--show", key, "--save-image", tmp_path / "one.png")
    assert json.loads(r.stdout)["key"] == key
    assert Image.open(tmp_path / "one.png").size[0] > 0

    sheet = tmp_path / "sheet.png"
    r = invoke("inspect", out, "--preview", sheet, "--limit", "3")
    assert "PSNR" not in r.output  # the label is drawn, not printed
    img = Image.open(sheet)
    assert img.width == 2 * 256 + 3 * 8 and img.height > 3 * 256


def test_verify_names_corrupt_shards_and_samples(tmp_path, photo_dir):
    out = _make_shards(tmp_path, photo_dir)
    assert invoke("inspect", out, "--verify").exit_code == 0
    first, second = sorted(glob.glob(str(out / "*.tar")))
    data = open(second, "rb").read()
    with tarfile.open(second) as tf:
        last = tf.getmembers()[-1].offset
    with open(second, "wb") as f:
        # Cut exactly at a member boundary: Python's tarfile alone reads this as a complete tar.
        f.write(data[:last])
    # Corrupt one image member in place (same size, so the tar structure stays valid).
    raw = bytearray(open(first, "rb").read())
    png_at = raw.find(b"\x89PNG")
    raw[png_at + 20: png_at + 400] = b"\x00" * 380
    open(first, "wb").write(bytes(raw))
    r = invoke("inspect", out, "--verify", expect_ok=False)
    assert r.exit_code == 1
    assert os.path.basename(second) in r.output and "unreadable tar" in r.output
    assert "does not decode" in r.output and "sha256 differs" in r.output


def test_inspect_bad_path_is_one_line(tmp_path):
    r = invoke("inspect", tmp_path / "nothing", expect_ok=False)
    assert r.exit_code == 1 and "no such shard" in r.output and "Traceback" not in r.output


def test_demo_runs_offline_as_the_readme_says(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(["ddaug", "demo", "-o", str(tmp_path / "demo")], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "0 problems" in r.stdout and "failures {'decode': 1}" in r.stdout
    assert os.path.exists(tmp_path / "demo" / "preview.png")
    # the contact sheet's line gives each held-out photo's PSNR against its augmented twin
    sheet_line = next(line for line in r.stdout.splitlines() if line.startswith("contact sheet:"))
    assert all(f"{name} " in sheet_line for name in ("astronaut", "coffee", "chelsea", "rocket"))
    assert sheet_line.count(" dB") == 4 and "augment (tiny," in r.stdout
    assert len(read_samples(tmp_path / "demo" / "augmented")) == 4
    # the augmented (now diffusion) images were recaptioned, bytes unchanged
    augmented, captioned = read_samples(tmp_path / "demo" / "augmented"), read_samples(tmp_path / "demo" / "captioned")
    assert len(captioned) == 4 and "4 captioned samples" in r.stdout
    assert sorted(m["png"] for m in captioned.values()) == sorted(m["png"] for m in augmented.values())


def test_preview_survives_a_sample_whose_json_is_broken(tmp_path, photo_dir):
    out = _make_shards(tmp_path, photo_dir)
    first = sorted(glob.glob(str(out / "*.tar")))[0]
    raw = bytearray(open(first, "rb").read())
    at = raw.find(b'{"augment"')
    raw[at:at + 10] = b"#" * 10  # same length: tar intact, json broken
    open(first, "wb").write(bytes(raw))
    sheet = tmp_path / "sheet.png"
    invoke("inspect", out, "--preview", sheet)
    assert Image.open(sheet).height > 4 * 256  # every sample still drawn
    r = invoke("inspect", out, "--verify", expect_ok=False)
    assert r.exit_code == 1 and "json does not parse" in r.output
