"""`ddaug leakage` on a known answer: eval photos from scikit-image, training shards holding
copies of some of them (ddaug-augmented with the tiny model, resized, JPEG q70, cropped ~5%,
re-wrapped, byte-identical) among 14 other photos (and an augmented copy of one of those). Every copy must be found, at the expected
stage; no other photo may be."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from conftest import invoke, read_samples

EVAL = ("astronaut", "coffee", "chelsea", "rocket", "camera")
OTHERS = ("coins", "moon", "retina", "brick", "page", "clock", "immunohistochemistry", "hubble_deep_field",
          "grass", "gravel", "text", "colorwheel", "logo", "cell")
SIDE = 160


def _photo(name: str) -> Image.Image:
    from skimage import data

    arr = getattr(data, name)()
    arr = np.stack([arr] * 3, -1) if arr.ndim == 2 else arr[..., :3]
    img = Image.fromarray(np.ascontiguousarray(arr))
    img.thumbnail((SIDE, SIDE))
    return img


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _crop(img: Image.Image, share: float, ax: float, ay: float) -> Image.Image:
    w, h = img.size
    cw, ch = round(w * (1 - share)), round(h * (1 - share))
    x, y = round((w - cw) * ax), round((h - ch) * ay)
    return img.crop((x, y, x + cw, y + ch))


def _write_tar(path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """A plain webdataset tar, as another tool would write it."""
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for suffix, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))


def _meta(n_images: int = 1) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "<image>" * n_images + "What is this?"},
                                    {"role": "assistant", "content": "A photo."}]}).encode()


@pytest.fixture(scope="module")
def leak_set(tmp_path_factory):
    """eval/: the five photos as PNG, plus an unreadable and a truncated file. train/web: a foreign
    webdataset tar of copies and other photos; train/augmented: `ddaug augment --model tiny` of
    three eval photos. expected: training key -> (eval photo, stage)."""
    root = tmp_path_factory.mktemp("leak")
    (root / "eval").mkdir()
    photos = {name: _photo(name) for name in EVAL}
    for name, img in photos.items():
        img.save(root / "eval" / f"{name}.png")
    (root / "eval" / "broken.jpg").write_bytes(b"plain text, not a picture")
    (root / "eval" / "cut.png").write_bytes(_encode(_photo("coins"))[:200])

    w, h = photos["astronaut"].size
    copies = {
        "astro_resized": ("astronaut", "phash", photos["astronaut"].resize((w * 3 // 5, h * 3 // 5),
                                                                           Image.Resampling.LANCZOS), "png"),
        "coffee_q70": ("coffee", "phash", photos["coffee"], ("jpg", 70)),
        "chelsea_q70": ("chelsea", "phash", photos["chelsea"], ("jpg", 70)),
        "rocket_crop_centre": ("rocket", "phash", _crop(photos["rocket"], 0.05, 0.5, 0.5), "png"),
        "camera_crop_corner": ("camera", "phash", _crop(photos["camera"], 0.05, 1, 0), "png"),
        "coffee_crop_q70": ("coffee", "phash", _crop(photos["coffee"], 0.06, 0.3, 0.8), ("jpg", 70)),
        "chelsea_rewrapped": ("chelsea", "exact-pixels", photos["chelsea"], ("png", 1)),
    }
    samples = []
    expected = {}
    for key, (source, stage, img, how) in copies.items():
        if how == "png":
            data, ext = _encode(img), "png"
        elif how[0] == "jpg":
            data, ext = _encode(img, "JPEG", quality=how[1]), "jpg"
        else:  # the same pixels in another PNG encoding: other bytes
            data, ext = _encode(img, compress_level=how[1]), "png"
        samples.append((key, {ext: data, "json": _meta()}))
        expected[key] = (source, stage)
    samples.append(("camera_bytes", {"png": (root / "eval" / "camera.png").read_bytes(), "json": _meta()}))
    expected["camera_bytes"] = ("camera", "exact-bytes")
    for name in OTHERS:
        samples.append((f"other_{name}", {"png": _encode(_photo(name)), "json": _meta()}))
    # Two images, one of them a copy: the whole sample counts as leaked.
    samples.append(("pair", {"0.png": _encode(_photo("moon")), "1.jpg": _encode(photos["rocket"], "JPEG", quality=70),
                             "json": _meta(2)}))
    expected["pair"] = ("rocket", "phash")
    samples.append(("text_only", {"json": json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()}))
    samples.append(("undecodable", {"png": b"\x89PNG\r\n\x1a\n broken", "json": _meta()}))
    (root / "train" / "web").mkdir(parents=True)
    _write_tar(root / "train" / "web" / "web-000.tar", samples[:9])
    _write_tar(root / "train" / "web" / "web-001.tar", samples[9:])

    (root / "to-augment").mkdir()
    for name in ("astronaut", "coffee", "rocket", "brick"):
        (photos[name] if name in photos else _photo(name)).save(root / "to-augment" / f"{name}.png")
    invoke("augment", root / "to-augment", "-o", root / "train" / "augmented", "--model", "tiny", "--device", "cpu",
           "-q")
    for key in read_samples(root / "train" / "augmented"):
        if not key.startswith("brick"):
            expected[key] = (key.split("-")[0], "phash")
    return root, expected, len(samples) + 4


def _matches(report: dict) -> dict[str, set[tuple[str, str]]]:
    out: dict[str, set[tuple[str, str]]] = {}
    for m in report["matches"]:
        eval_name = os.path.splitext(os.path.basename(m["eval"].split("#")[-1]))[0]  # a file, or tar#member
        out.setdefault(m["train_key"], set()).add((eval_name, m["stage"]))
    return out


def test_known_answer_every_copy_found_no_false_positive_and_drop(leak_set, tmp_path):
    root, expected, n_samples = leak_set
    before = sorted(p for p in root.rglob("*"))
    report_dir, clean = tmp_path / "report", tmp_path / "clean"
    result = invoke("leakage", "--train", root / "train" / "web", "--train", root / "train" / "augmented",
                    "--eval", root / "eval", "-o", report_dir, "--drop", clean, "-q")
    assert "Traceback" not in result.output
    report = json.loads((report_dir / "leakage.json").read_text())

    found = _matches(report)
    assert found == {key: {want} for key, want in expected.items()}, found   # all copies, nothing else
    for m in report["matches"]:
        if m["stage"] == "phash":
            assert m["distance"] <= 10 and m["correlation"] >= 0.5
    assert report["leaked_eval_images"] == len(EVAL)
    assert report["eval"] == {"inputs": [str(root / "eval")], "images": len(EVAL), "skipped": 2}
    assert report["train"]["not_checked"] == 1
    assert report["train"]["samples"] == n_samples

    failures = [json.loads(line) for line in (report_dir / "failures.jsonl").read_text().splitlines()]
    reasons = {os.path.basename(f["source"]): f["reason"] for f in failures}
    assert reasons["broken.jpg"] == "not an image (unrecognised format)"
    assert reasons["cut.png"].startswith("broken image")
    assert "not checked" in reasons["web-001.tar#undecodable.png"]

    with Image.open(report_dir / "matches.png") as sheet:   # one row per match, eval beside train
        assert sheet.format == "PNG" and sheet.height > len(report["matches"]) * 192
    assert f"{len(EVAL)} eval image(s) (100%) appear in the training data" in result.stdout
    assert "2 eval input(s) were skipped" in result.stdout

    # --drop: the same shards less the matched samples; what is kept, byte for byte.
    kept, original = read_samples(clean), {}
    for folder in ("web", "augmented"):
        original.update(read_samples(root / "train" / folder))
    assert set(kept) == set(original) - set(expected)
    assert all(kept[key] == original[key] for key in kept)
    assert report["drop"]["dropped"] == len(expected) and report["drop"]["kept"] == len(kept)
    invoke("inspect", clean / "shard-000-000002.tar", "--verify")  # the augmented shard, less its copies;
    # the verify checks every shard of the folder against manifest.json
    assert sorted(p for p in root.rglob("*")) == before          # nothing written beside the inputs

    # The same check again resumes the finished filtered shards instead of writing them twice.
    again = invoke("leakage", "--train", root / "train" / "web", "--train", root / "train" / "augmented",
                   "--eval", root / "eval", "-o", report_dir, "--drop", clean, "-q")
    assert json.loads((report_dir / "leakage.json").read_text())["drop"]["resumed"] == 3, again.output


def test_thresholds_and_folder_mistakes_are_one_line(leak_set, tmp_path):
    root, _, _ = leak_set
    base = ["leakage", "--train", root / "train" / "web", "--eval", root / "eval"]
    strict = invoke(*base, "-o", tmp_path / "strict", "--phash-distance", 0, "--min-correlation", 0.99, "-q")
    stages = {m["stage"] for m in json.loads((tmp_path / "strict" / "leakage.json").read_text())["matches"]}
    assert "exact-bytes" in stages and "exact-pixels" in stages, strict.output

    # Eval images from a shard instead of a folder: the same copies are found.
    _write_tar(tmp_path / "eval.tar", [(name, {"png": (root / "eval" / f"{name}.png").read_bytes()}) for name in EVAL])
    invoke(*base[:3], "--eval", tmp_path / "eval.tar", "-o", tmp_path / "from-tar", "-q")
    from_tar = json.loads((tmp_path / "from-tar" / "leakage.json").read_text())
    from_folder = invoke(*base, "-o", tmp_path / "from-folder", "-q")
    assert _matches(from_tar) == _matches(json.loads((tmp_path / "from-folder" / "leakage.json").read_text())), \
        from_folder.output
    assert from_tar["eval"]["images"] == len(EVAL) and from_tar["leaked_eval_images"] == len(EVAL)

    # --drop into a folder made by another check is refused, naming what changed; --overwrite redoes it.
    invoke(*base, "-o", tmp_path / "r1", "--drop", tmp_path / "clean", "-q")
    changed = invoke(*base, "-o", tmp_path / "r2", "--drop", tmp_path / "clean", "--phash-distance", 4,
                     expect_ok=False)
    assert changed.exit_code == 1 and "different config" in changed.output and "phash_distance" in changed.output
    invoke(*base, "-o", tmp_path / "r2", "--drop", tmp_path / "clean", "--phash-distance", 4, "--overwrite", "-q")

    for args, text in (
            (["-o", tmp_path / "r", "--drop", root / "train" / "web"], "hold one another"),
            (["-o", root / "eval" / "report"], "hold one another"),
            (["-o", tmp_path / "r", "--drop", tmp_path / "r" / "clean"], "hold one another"),
            (["-o", root / "train" / "augmented"], "holds a ddaug run's shards")):
        bad = invoke(*base, *args, expect_ok=False)
        assert bad.exit_code == 1 and text in bad.output and "Traceback" not in bad.output, bad.output
    missing = invoke("leakage", "--train", tmp_path / "nope", "--eval", root / "eval", "-o", tmp_path / "r",
                     expect_ok=False)
    assert missing.exit_code == 1 and "--train: no such shard or folder" in missing.output
    nothing = invoke("leakage", "--train", root / "train" / "web", "--eval", root / "eval" / "broken.jpg",
                     "-o", tmp_path / "r", expect_ok=False)
    assert nothing.exit_code == 1 and "no usable eval image (not an image" in nothing.output
    assert not (root / "eval" / "report").exists()
    usage = invoke(*base, "-o", tmp_path / "r", "--phash-distance", 99, expect_ok=False)
    assert usage.exit_code == 2 and "--phash-distance" in usage.output
    help_text = invoke("leakage", "--help").output
    assert "Examples:" in help_text and "--drop" in help_text


def test_embedding_stage_runs_with_a_tiny_random_clip(leak_set, tmp_path):
    """A tiny random CLIP proves the stage is wired (loaded from safetensors, eval and training
    images embedded, cosine compared, reported); it says nothing about how well a real model
    finds copies. A mirrored copy, which the hashes miss, is left to it."""
    from ddaug.leakage.embed import save_tiny_clip

    root, _, _ = leak_set
    model = save_tiny_clip(str(tmp_path / "tiny-clip"))
    mirrored = _photo("astronaut").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    _write_tar(tmp_path / "mirror.tar", [("astro_mirrored", {"png": _encode(mirrored), "json": _meta()})])
    invoke("leakage", "--train", tmp_path / "mirror.tar", "--eval", root / "eval" / "astronaut.png",
           "-o", tmp_path / "plain", "-q")
    assert json.loads((tmp_path / "plain" / "leakage.json").read_text())["matches"] == []
    invoke("leakage", "--train", tmp_path / "mirror.tar", "--eval", root / "eval" / "astronaut.png",
           "-o", tmp_path / "embed", "--embed-model", model, "--embed-similarity", 0.9, "--device", "cpu", "-q")
    report = json.loads((tmp_path / "embed" / "leakage.json").read_text())
    assert [(m["train_key"], m["stage"]) for m in report["matches"]] == [("astro_mirrored", "embedding")]
    assert 0.9 <= report["matches"][0]["similarity"] <= 1.0
    assert report["settings"]["embed_model"] == model

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "tiny-clip" / "config.json").read_text())
    bad = invoke("leakage", "--train", tmp_path / "mirror.tar", "--eval", root / "eval" / "astronaut.png",
                 "-o", tmp_path / "bad", "--embed-model", pickled, expect_ok=False)
    assert bad.exit_code == 1 and "--embed-model" in bad.output and "Traceback" not in bad.output, bad.output


@pytest.mark.parametrize("bands", ["four", "three"])
def test_the_hash_index_finds_exactly_what_a_scan_finds(bands):
    """The band search behind the perceptual stage misses no pair within the radius and adds none."""
    from ddaug.leakage.index import FOUR_BANDS, THREE_BANDS, HashIndex

    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**64, 10_000, dtype=np.uint64)
    queries = hashes[:300].copy()
    flips = rng.integers(0, 13, len(queries))  # 0 to 12 bits flipped: inside and outside each radius
    for round_ in range(12):
        queries ^= np.where(flips > round_, np.uint64(1) << rng.integers(0, 64, len(queries)).astype(np.uint64),
                            np.uint64(0))
    queries = np.concatenate([queries, rng.integers(0, 2**64, 100, dtype=np.uint64)])
    index = HashIndex(hashes, bands=FOUR_BANDS if bands == "four" else THREE_BANDS)
    for radius in (0, 4, 10):
        q, i, d = index.query(queries, radius)
        got = set(zip(q.tolist(), i.tolist(), d.tolist()))
        distances = np.bitwise_count(queries[:, None] ^ hashes[None, :])
        want = {(a, b, int(distances[a, b])) for a, b in zip(*np.nonzero(distances <= radius))}
        assert got == want and len(got) > 0


def test_drop_killed_mid_shard_leaves_no_partial_shard_and_resumes(leak_set, tmp_path):
    """kill -9 as the second filtered shard is renamed into place: nothing half-written carries
    a final name, and the same command finishes the job with the finished shard kept."""
    import subprocess
    import sys

    root, expected, _ = leak_set
    cmd = [sys.executable, "-m", "ddaug", "leakage", "--train", str(root / "train" / "web"), "--train",
           str(root / "train" / "augmented"), "--eval", str(root / "eval"), "-o", str(tmp_path / "report"),
           "--drop", str(tmp_path / "clean"), "-q"]
    killed = subprocess.run(cmd, env={**os.environ, "DDAUG_CRASH_AT": "stats-replace:2"}, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    names = sorted(os.listdir(tmp_path / "clean"))
    assert "shard-000-000001.tar" not in names, names  # written, not committed: under a temporary name
    assert any(n.startswith("shard-000-000001.tar.tmp") for n in names), names
    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "1 of them finished before" in resumed.stdout
    assert not [n for n in os.listdir(tmp_path / "clean") if ".tmp" in n]
    original = {**read_samples(root / "train" / "web"), **read_samples(root / "train" / "augmented")}
    kept = read_samples(tmp_path / "clean")
    assert set(kept) == set(original) - set(expected) and all(kept[k] == original[k] for k in kept)


def test_two_drops_into_one_folder_at_once_both_finish_with_one_copy(leak_set, tmp_path):
    """The same command started twice (two terminals, a retried job step): the one that finds a
    filtered shard committed by the other uses it instead of crashing."""
    import signal
    import subprocess
    import sys
    import time

    root, expected, _ = leak_set
    def cmd(report):
        return [sys.executable, "-m", "ddaug", "leakage", "--train", str(root / "train" / "web"), "--eval",
                str(root / "eval"), "-o", str(tmp_path / report), "--drop", str(tmp_path / "clean"), "-q"]

    first = subprocess.Popen(cmd("report"), env={**os.environ, "DDAUG_STOP_AT": "stats-replace:1"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):  # frozen just before committing its first filtered shard
            with open(f"/proc/{first.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "T":
                    break
            time.sleep(0.05)
        second = subprocess.run(cmd("report2"), capture_output=True, text=True)
        assert second.returncode == 0, second.stderr[-2000:]
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0 and "Traceback" not in err, err[-2000:]
    assert not [n for n in os.listdir(tmp_path / "clean") if ".tmp" in n]
    kept = read_samples(tmp_path / "clean")
    original = read_samples(root / "train" / "web")
    assert set(kept) == set(original) - set(expected) and all(kept[k] == original[k] for k in kept)
