"""`ddaug gap` on data with a known answer.

business:  crops of real photos carrying one known trace (a 4x decoder-like round trip: box
           down, bicubic up, the way a generator's decoder upsamples), saved PNG, square.
general:   other crops of the same photos, saved JPEG q75, 4:3.
augmented: the general JPEGs given the same trace, saved PNG.
So business vs general must separate, business vs augmented must be near chance, the PNG/JPEG
split must be flagged, and two random halves of one set must score ~0.5.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from conftest import invoke

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "cat", "camera", "coins", "moon", "brick", "grass", "gravel")
N = 80


def _trace(img: Image.Image) -> Image.Image:
    w, h = img.size
    return img.resize((w // 4, h // 4), Image.Resampling.BOX).resize((w, h), Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def known_sets(tmp_path_factory):
    from skimage import data

    pool = []
    for name in PHOTOS:
        arr = getattr(data, name)()
        pool.append(np.stack([arr] * 3, -1) if arr.ndim == 2 else arr[..., :3])
    rng = np.random.default_rng(0)

    def crop(h, w):
        photo = pool[rng.integers(len(pool))]
        y, x = rng.integers(0, photo.shape[0] - h + 1), rng.integers(0, photo.shape[1] - w + 1)
        return Image.fromarray(np.ascontiguousarray(photo[y: y + h, x: x + w]))

    root = tmp_path_factory.mktemp("gap")
    for folder in ("business", "general", "augmented"):
        (root / folder).mkdir()
    for i in range(N):
        _trace(crop(128, 128)).save(root / "business" / f"b{i:03d}.png")
        crop(96, 128).save(root / "general" / f"g{i:03d}.jpg", quality=75)
        with Image.open(root / "general" / f"g{i:03d}.jpg") as general:
            _trace(general.convert("RGB")).save(root / "augmented" / f"a{i:03d}.png")
    return root


def _gap(*args, expect_ok=True):
    return invoke("gap", *args, expect_ok=expect_ok)


def test_known_answer_gap_shortcuts_control_and_plot(known_sets, tmp_path):
    plot = tmp_path / "gap.png"
    r = _gap("--business", known_sets / "business", "--general", known_sets / "general",
             "--augmented", f"traced={known_sets / 'augmented'}", "--samples", N, "--plot", plot, "--json")
    report = json.loads(r.stdout)
    pairs = {p["b"]: p for p in report["pairs"]}
    general, traced, control = pairs["general"], pairs["traced"], report["control"]

    assert general["auc"] > 0.9 and general["ci"][0] > 0.75, general
    assert general["verdict"] == "large gap"
    assert traced["auc"] < 0.7, traced                        # same trace: near chance
    assert general["auc"] - traced["auc"] > 0.25
    assert abs(control["auc"] - 0.5) < 0.15 and control["ci"][0] <= 0.5 <= control["ci"][1], control
    assert control["verdict"] == "no detectable gap" and control["n"] == [N // 2, N // 2]
    assert report["ranking"] == ["traced"]

    sets = {s["name"]: s for s in report["sets"]}
    assert sets["business"]["shortcuts"]["formats"] == {"PNG": 1.0}
    assert sets["general"]["shortcuts"]["formats"] == {"JPEG": 1.0}
    assert sets["general"]["shortcuts"]["jpeg_quality"]["median"] == 75   # estimated from the tables
    assert all(s["sampled"] == N and s["skipped"] == {} for s in sets.values())
    format_warnings = [w for w in general["warnings"] if w.startswith("format:")]
    assert format_warnings and "all PNG" in format_warnings[0] and "JPEG" in format_warnings[0]
    assert "--image-format" in format_warnings[0]
    assert not any(w.startswith("format:") for w in traced["warnings"])
    assert any(w.startswith("aspect:") for w in general["warnings"])    # square vs 4:3

    with Image.open(plot) as img:
        assert img.format == "PNG" and img.width > 600 and img.height > 600
    assert not [p for p in os.listdir(tmp_path) if p != "gap.png"]      # nothing else written

    # The text report says the same, in words.
    text = _gap("--business", known_sets / "business", "--general", known_sets / "general",
                "--augmented", f"traced={known_sets / 'augmented'}", "--samples", N).stdout
    assert "business vs general" in text and "1. business vs traced" in text and "large gap" in text
    assert "WARNING business vs general: format: business is all PNG" in text


def test_sampling_is_seeded_and_reads_tars_and_datasets(known_sets, tmp_path):
    """Inputs are any ddaug source: a webdataset tar in a folder, a LLaMA-Factory dataset."""
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "biz-000000.tar", "w") as tf:
        for name in sorted(os.listdir(known_sets / "business"))[:30]:
            data = (known_sets / "business" / name).read_bytes()
            info = tarfile.TarInfo(f"{name[:-4]}.png")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    names = sorted(os.listdir(known_sets / "general"))[:30]
    records = [{"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Hi."}],
                "images": [f"general/{n}"]} for n in names]
    odd = {"flat.png": Image.new("RGB", (100, 100), "white"),                  # no residual at all
           "gray16.png": Image.fromarray((np.arange(96 * 80).reshape(80, 96) * 8).astype(np.uint16)),
           "rgba.png": Image.new("RGBA", (90, 70), (10, 200, 30, 100))}
    for name, img in odd.items():
        img.save(tmp_path / name)
        records.append({"messages": [], "images": [str(tmp_path / name)]})
    records.append({"messages": [], "images": ["general/missing.jpg"]})
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    records.append({"messages": [], "images": [str(tmp_path / "broken.jpg")]})
    dataset = tmp_path / "general.json"
    dataset.write_text(json.dumps(records))
    args = ("--business", shards, "--general", dataset, "--media-dir", known_sets, "--samples", 40,
            "--crops", 4, "--json")
    first = json.loads(_gap(*args).stdout)
    sets = {s["name"]: s for s in first["sets"]}
    assert sets["business"]["sampled"] == 30 and sets["business"]["available"] == 30
    assert sets["general"]["sampled"] == 33 and sets["general"]["available"] == 35
    skipped = sets["general"]["skipped"]
    assert sum(skipped.values()) == 2 and any("broken image" in k for k in skipped)
    assert any("No such file" in k or "unreadable" in k for k in skipped), skipped
    again = json.loads(_gap(*args).stdout)
    assert again["pairs"] == first["pairs"] and again["control"] == first["control"]
    other = json.loads(_gap(*args, "--seed", 1).stdout)
    assert other["control"]["fold_aucs"] != first["control"]["fold_aucs"]


def test_bad_input_is_one_line(known_sets, tmp_path):
    def error(*args):
        r = _gap(*args, expect_ok=False)
        assert r.exit_code != 0 and "Traceback" not in r.output
        return r.output.strip().splitlines()[-1]

    base = ("--business", known_sets / "business", "--general", known_sets / "general")
    assert "input not found" in error("--business", tmp_path / "nope", "--general", known_sets / "general")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.png").write_bytes(b"")
    assert "--general" in error("--business", known_sets / "business", "--general", empty)
    assert "smaller than the 256-pixel crop" in error(*base, "--crop", 256)
    assert "--crop" in error(*base, "--crop", 63)
    assert "--dose-dir" in error(*base, "--dose", "tiny-random@0.025")
    assert "--dose" in error(*base, "--dose", "tiny-random@lots", "--dose-dir", tmp_path / "d")
    assert "--dose" in error(*base, "--dose", "tiny-random@1.5", "--dose-dir", tmp_path / "d")
    assert "give each dose once" in error(*base, "--dose", "tiny-random", "--dose", "tiny-random@0.025",
                                          "--dose-dir", tmp_path / "d")
    assert "not a preset" in error(*base, "--dose", "no-such-model@0.025", "--dose-dir", tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_dose_finding_ranks_augment_outputs(known_sets, tmp_path):
    """--dose augments the general sample once per dose (real augment runs, tiny-random on CPU)
    and ranks the outputs in one table. tiny-random has random weights, so which dose wins is not
    the point here; that the table ranks real augment outputs by their measured gap is."""
    dose_dir = tmp_path / "dose"
    args = ("--business", known_sets / "business", "--general", known_sets / "general", "--samples", 12,
            "--crops", 2, "--folds", 3, "--device", "cpu", "-q", "--dose-dir", dose_dir,
            "--dose", "tiny-random@0.025", "--dose", "tiny-random@vae:webp")
    report = json.loads(_gap(*args, "--json").stdout)
    labels = ["tiny-random@0.025", "tiny-random@vae:webp"]
    assert [d["label"] for d in report["doses"]] == labels
    assert sorted(report["ranking"]) == sorted(labels)
    pairs = {p["b"]: p for p in report["pairs"]}
    aucs = [pairs[name]["auc"] for name in report["ranking"]]
    assert aucs == sorted(aucs)
    assert len(os.listdir(dose_dir / "general-sample")) == 12
    sets = {s["name"]: s for s in report["sets"]}
    assert sets["tiny-random@vae:webp"]["shortcuts"]["formats"] == {"WEBP": 1.0}
    assert sets["tiny-random@0.025"]["sampled"] == 12
    for dose in report["doses"]:
        assert json.load(open(os.path.join(dose["folder"], "manifest.json")))["shards"]
        assert dose["augment"].startswith("done 12")

    text = _gap(*args).stdout                                # a rerun resumes: nothing augmented again
    assert "1. business vs tiny-random@" in text and "2. business vs tiny-random@" in text
    assert text.count("done 0, skipped 12") == 2
    r = _gap(*args, "--seed", 3, expect_ok=False)           # another sample into the same folder
    assert r.exit_code != 0 and "give a new --dose-dir" in r.output
