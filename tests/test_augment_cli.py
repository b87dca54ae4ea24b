"""`ddaug augment` through the CLI: sizes, resume, reruns, bad input, conversations, schema."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from ddaug.shards.schema import validate_sample

from conftest import decode, invoke, read_samples, sample_meta

FAST = ["--model", "tiny-random", "--device", "cpu", "-q"]


def _assert_schema(folder):
    samples = read_samples(folder)
    assert samples
    for key, members in samples.items():
        assert validate_sample(key, sample_meta(members), set(members)) == [], key
    return samples


def test_folder_native_sizes_and_provenance(tmp_path, photo_dir, photos):
    out = tmp_path / "out"
    invoke("augment", photo_dir, "-o", out, *FAST, "--batch-size", "3")
    samples = _assert_schema(out)
    assert len(samples) == 4
    by_name = {}
    for key, members in samples.items():
        meta = sample_meta(members)
        name = os.path.splitext(os.path.basename(meta["source"]["uri"]))[0]
        by_name[name] = (members, meta)
        aug = meta["augment"]
        assert aug["mode"] == "img2img" and aug["timestep"] == 25 and aug["strength"] == 0.025
        assert aug["cond"] == "zeros" and aug["unet_calls"] == 1 and aug["scheduler"] == "EulerDiscreteScheduler"
        assert meta["tags"] == {"domain": "general", "task": "image", "stage": None}
    for name, arr in photos.items():
        members, meta = by_name[name]
        img = decode(members["png"])
        assert img.shape == arr.shape, name          # native size, odd sizes included
        src = meta["source"]["images"][0]
        assert (src["width"], src["height"]) == (arr.shape[1], arr.shape[0])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 4 and manifest["failed"] == 0
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["strength"] == 0.025 and "torch" in run["versions"]
    for shard in manifest["shards"]:
        assert os.path.getsize(out / shard["name"]) == shard["bytes"]


def test_odd_size_333x517(tmp_path):
    from skimage import data

    big = np.concatenate([data.astronaut(), data.astronaut()], axis=1)[:333, :517]
    Image.fromarray(big).save(tmp_path / "odd.png")
    out = tmp_path / "out"
    invoke("augment", tmp_path / "odd.png", "-o", out, *FAST)
    (members,) = read_samples(out).values()
    assert decode(members["png"]).shape == (333, 517, 3)


def _tar_names(folder) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(str(folder / "*.tar")))


def test_results_do_not_depend_on_batch_size_or_process_split(tmp_path, photo_dir):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    invoke("augment", photo_dir, "-o", a, *FAST, "--batch-size", "2", "--shard-size", "2")
    for rank in ("0", "1"):
        invoke("augment", photo_dir, "-o", b, *FAST, "--batch-size", "2", "--shard-size", "2",
               "--world-size", "2", "--rank", rank)
    invoke("augment", photo_dir, "-o", c, *FAST, "--batch-size", "1")
    sa, sb, sc = read_samples(a), read_samples(b), read_samples(c)
    assert set(sa) == set(sb) == set(sc)
    assert _tar_names(a) == _tar_names(b)  # a unit's shard name is the unit's, whichever worker made it
    for key in sa:
        # Same blocks, same batches: the split run is byte-identical to the one-process run.
        assert sa[key]["png"] == sb[key]["png"]
        assert np.abs(decode(sa[key]["png"]).astype(int) - decode(sc[key]["png"]).astype(int)).max() <= 1


def test_rerun_is_idempotent_and_crash_leftovers_are_redone(tmp_path, photo_dir):
    out = tmp_path / "out"
    invoke("augment", photo_dir, "-o", out, *FAST, "--shard-size", "2")
    shards = sorted(glob.glob(str(out / "*.tar")))
    assert len(shards) == 2
    original = {p: open(p, "rb").read() for p in shards}

    # Rerun: nothing to do, nothing changes.
    r = invoke("augment", photo_dir, "-o", out, *FAST, "--shard-size", "2")
    assert "skipped 4" in r.output
    assert {p: open(p, "rb").read() for p in shards} == original

    # Simulate a crash while writing the second shard: its done marker is gone, a truncated
    # temporary tar of a dead process is left behind, and the final tar was never linked.
    last = shards[-1]
    marker = json.loads(open(last[:-4] + ".stats.json").read())
    os.remove(last[:-4] + ".stats.json")
    with open(last + ".tmp-999999.0badc0de", "wb") as f:
        f.write(original[last][:700])
    os.remove(last)
    r = invoke("augment", photo_dir, "-o", out, *FAST, "--shard-size", "2")
    assert "done 2, skipped 2" in r.output
    assert not glob.glob(str(out / "*.tmp*"))
    assert {p: open(p, "rb").read() for p in shards} == original  # byte-identical rebuild

    # A crash between the done marker's link (the commit) and the tar's: the rerun links the
    # complete temporary tar the marker names into place.
    marker = json.loads(open(last[:-4] + ".stats.json").read())
    os.rename(last, out / marker["attempt"])
    r = invoke("augment", photo_dir, "-o", out, *FAST, "--shard-size", "2")
    assert "skipped 4" in r.output and not glob.glob(str(out / "*.tmp*"))
    assert open(last, "rb").read() == original[last]

    # A tar without a done marker (an older ddaug died between its rename and its marker) is redone.
    os.remove(last[:-4] + ".stats.json")
    invoke("augment", photo_dir, "-o", out, *FAST, "--shard-size", "2")
    assert open(last, "rb").read() == original[last]
    assert len(read_samples(out)) == 4
    assert invoke("inspect", out, "--verify").exit_code == 0


def test_different_config_refused_unless_overwrite(tmp_path, photo_dir):
    out = tmp_path / "out"
    invoke("augment", photo_dir, "-o", out, *FAST)
    r = invoke("augment", photo_dir, "-o", out, *FAST, "--strength", "0.05", expect_ok=False)
    assert r.exit_code == 1 and "different config" in r.output and "strength" in r.output
    assert "Traceback" not in r.output
    invoke("augment", photo_dir, "-o", out, *FAST, "--strength", "0.05", "--overwrite")
    meta = sample_meta(next(iter(read_samples(out).values())))
    assert meta["augment"]["timestep"] == 50


def test_broken_files_are_recorded_and_run_continues(tmp_path, photos):
    d = tmp_path / "mixed"
    d.mkdir()
    Image.fromarray(photos["astronaut"]).save(d / "good.png")
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.png").write_text("definitely not a png")
    good = (tmp_path / "tmp.jpg")
    Image.fromarray(photos["chelsea"]).save(good)
    (d / "truncated.jpg").write_bytes(good.read_bytes()[:200])
    out = tmp_path / "out"
    r = invoke("augment", d, "-o", out, *FAST)
    assert "done 1" in r.output and "failed 3" in r.output
    ledger = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    reasons = {os.path.basename(f["source"]): f["reason"] for f in ledger}
    assert set(reasons) == {"empty.jpg", "text.png", "truncated.jpg"}
    assert "empty" in reasons["empty.jpg"] and "not an image" in reasons["text.png"]
    assert all(f["stage"] == "decode" for f in ledger)


def test_nothing_readable_exits_nonzero_with_one_line(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "a.png").write_text("nope")
    r = invoke("augment", d, "-o", tmp_path / "out", *FAST, expect_ok=False)
    assert r.exit_code == 1 and "nothing could be processed" in r.output
    assert len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("args, needle", [
    (["--strength", "0"], "--strength"),
    (["--strength", "1.5"], "--strength"),
    (["--model", "not-a-preset"], "--model"),
    (["--image-format", "gif"], "--image-format"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "lots"], "--batch-size"),
])
def test_bad_flags_name_the_flag(tmp_path, photo_dir, args, needle):
    r = invoke("augment", photo_dir, "-o", tmp_path / "o", "--device", "cpu", *args, expect_ok=False)
    assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output


def test_missing_input_and_unwritable_output(tmp_path, photo_dir):
    r = invoke("augment", tmp_path / "nope", "-o", tmp_path / "o", *FAST, expect_ok=False)
    assert r.exit_code == 1 and "input not found" in r.output
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    r = invoke("augment", photo_dir, "-o", a_file / "out", *FAST, expect_ok=False)
    assert r.exit_code == 1 and "cannot create output folder" in r.output
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            return  # root writes anywhere; the file-parent case above covers this user
        r = invoke("augment", photo_dir, "-o", locked, *FAST, expect_ok=False)
        assert r.exit_code == 1 and "not writable" in r.output
    finally:
        locked.chmod(0o700)


def test_llamafactory_json_conversation_and_multi_image(tmp_path, photos):
    media = tmp_path / "media"
    media.mkdir()
    for name, arr in photos.items():
        Image.fromarray(arr).save(media / f"{name}.jpg", quality=95)
    records = [
        {"messages": [{"role": "user", "content": "<image>What animal is this?"},
                      {"role": "assistant", "content": "A cat."}], "images": ["chelsea.jpg"],
         "system": "be brief"},
        {"messages": [{"role": "user", "content": "<image><image>Compare the two pictures."},
                      {"role": "assistant", "content": "A drink and a rocket."}],
         "images": ["coffee.jpg", "rocket.jpg"]},
        {"conversations": [{"from": "human", "value": "<image>Who is this?"},
                           {"from": "gpt", "value": "An astronaut."}], "images": ["astronaut.jpg"]},
        {"messages": [{"role": "user", "content": "<image>Bad"}], "images": ["missing.jpg"]},
    ]
    ds = tmp_path / "data" / "train.json"
    ds.parent.mkdir()
    ds.write_text(json.dumps(records))
    out = tmp_path / "out"
    r = invoke("augment", ds, "--media-dir", media, "-o", out, *FAST)
    assert "done 3" in r.output and "failed 1" in r.output
    samples = _assert_schema(out)
    metas = {json.dumps(sample_meta(m)["messages"][0]["content"]): (m, sample_meta(m)) for m in samples.values()}
    cat_members, cat = metas[json.dumps("<image>What animal is this?")]
    assert cat["messages"] == records[0]["messages"] and cat["extra"] == {"system": "be brief"}
    assert cat["tags"]["task"] == "conversation"
    pair_members, pair = metas[json.dumps("<image><image>Compare the two pictures.")]
    assert pair["images"] == [f"{pair['key']}.0.png", f"{pair['key']}.1.png"]
    assert decode(pair_members["0.png"]).shape == photos["coffee"].shape
    assert decode(pair_members["1.png"]).shape == photos["rocket"].shape
    assert len(pair["augment"]["seeds"]) == 2
    _, astro = metas[json.dumps("<image>Who is this?")]
    assert astro["messages"][1] == {"role": "assistant", "content": "An astronaut."}
    (failure,) = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert failure["stage"] == "read" and "missing.jpg" in failure["reason"]


def test_shards_as_input_ours_and_foreign(tmp_path, photo_dir, photos):
    first = tmp_path / "first"
    invoke("augment", photo_dir, "-o", first, *FAST, "--shard-size", "2")
    second = tmp_path / "second"
    invoke("augment", str(first / "shard-000-{000000..000001}.tar"), "-o", second, *FAST, "--mode", "vae")
    assert len(read_samples(second)) == 4
    # A foreign tar: jpg + txt per sample, one sample whose json is broken.
    foreign = tmp_path / "foreign.tar"
    with tarfile.open(foreign, "w") as tf:
        for name in ("astronaut", "rocket"):
            p = tmp_path / f"{name}.jpg"
            Image.fromarray(photos[name]).save(p)
            tf.add(p, f"{name}.jpg")
        txt = tmp_path / "cap.txt"
        txt.write_text("a caption")
        tf.add(txt, "astronaut.txt")
        bad = tmp_path / "bad.json"
        bad.write_text("{not json")
        tf.add(bad, "rocket.json")
    out = tmp_path / "third"
    r = invoke("augment", foreign, "-o", out, *FAST)
    assert "done 1" in r.output and "failed 1" in r.output
    (meta,) = [sample_meta(m) for m in read_samples(out).values()]
    assert meta["extra"]["text"] == "a caption"
    assert "json does not parse" in (out / "failures.jsonl").read_text()


def test_list_file_and_jpeg_output(tmp_path, photo_dir):
    lst = tmp_path / "list.txt"
    lst.write_text("# my list\nphotos/astronaut.png\nphotos/sub/coffee.png\n")
    out = tmp_path / "out"
    invoke("augment", lst, "-o", out, *FAST, "--image-format", "jpeg", "--quality", "90", "--max-side", "40")
    samples = _assert_schema(out)
    assert len(samples) == 2
    for members in samples.values():
        meta = sample_meta(members)
        assert "jpg" in members and max(decode(members["jpg"]).shape[:2]) == 40
        assert max(meta["source"]["images"][0]["resized_to"]) == 40


def test_second_plain_process_on_a_running_folder_is_told_to_join(tmp_path, photo_dir):
    from ddaug.shards.store import OutputFolder, StoreError
    from ddaug.shards.units import Worker

    out = tmp_path / "out"
    out.mkdir()
    holder = Worker(str(out), timeout=30)  # a live worker holding a unit's lease
    holder.start()
    try:
        assert holder.try_take("000-000000", holder.now())
        r = invoke("augment", photo_dir, "-o", out, *FAST, expect_ok=False)
        assert r.exit_code == 1 and "--join" in r.output and "Traceback" not in r.output
        r = invoke("augment", photo_dir, "-o", out, *FAST, "--overwrite", expect_ok=False)
        assert r.exit_code == 1 and "still writing" in r.output
    finally:
        holder.stop()
    # A folder holding another command's finished shards is refused (an empty one is not: see
    # test_hardening_runs.py, a run that failed before any work must not block the next).
    invoke("augment", photo_dir, "-o", out, *FAST)
    with pytest.raises(StoreError, match="ddaug augment"):
        OutputFolder(str(out), prefix="shard", command="caption", config={}, run_info={})


def test_console_script_help_and_python_cli(tmp_path):
    for cmd in (["ddaug", "augment", "--help"], [sys.executable, "-m", "ddaug", "inspect", "--help"]):
        r = subprocess.run(cmd, capture_output=True, text=True,
                           cwd=os.path.dirname(os.path.dirname(__file__)))
        assert r.returncode == 0 and "Examples:" in r.stdout, r.stderr


def test_odd_image_modes_decode_to_rgb_at_display_size(tmp_path, photos):
    d = tmp_path / "modes"
    d.mkdir()
    base = Image.fromarray(photos["coffee"])  # 83x61 (w x h)
    base.convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray((np.asarray(base.convert("L")).astype(np.uint16) * 257)).save(d / "gray16.png")
    pal = base.convert("P", palette=Image.Palette.ADAPTIVE)
    pal.info["transparency"] = 0
    pal.save(d / "palette.png", transparency=0)
    rgba = base.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: composited on white
    rgba.save(d / "transparent.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    base.save(d / "rotated.jpg", exif=exif.tobytes())
    frames = [base, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    out = tmp_path / "out"
    r = invoke("augment", d, "-o", out, *FAST, "--mode", "vae")
    assert "done 6" in r.output and "failed 0" in r.output
    got = {}
    for members in read_samples(out).values():
        meta = sample_meta(members)
        src = meta["source"]["images"][0]
        got[os.path.basename(src["uri"])] = (decode(members["png"]).shape, src)
    assert got["rotated.jpg"][0] == (83, 61, 3)  # EXIF applied: width and height swap
    for name in ("cmyk.jpg", "gray16.png", "palette.png", "transparent.png", "anim.gif"):
        assert got[name][0] == (61, 83, 3), name
    assert got["cmyk.jpg"][1]["format"] == "JPEG" and got["anim.gif"][1]["format"] == "GIF"


def test_transparent_pixels_become_white():
    import io

    from ddaug.sources import decode_image

    buf = io.BytesIO()
    Image.new("RGBA", (4, 4), (10, 20, 30, 0)).save(buf, format="PNG")
    rgb, _ = decode_image(buf.getvalue())
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255)
    buf = io.BytesIO()
    Image.new("I;16", (4, 4), 65535).save(buf, format="PNG")
    assert decode_image(buf.getvalue())[0].getpixel((0, 0)) == (255, 255, 255)


def test_disk_full_mid_run_stops_cleanly_and_rerun_completes(tmp_path, photo_dir, monkeypatch):
    import errno

    from ddaug.shards.writer import ShardWriter

    out = tmp_path / "out"
    real_write = ShardWriter.write
    calls = {"n": 0}

    def failing_write(self, key, files):
        calls["n"] += 1
        if calls["n"] == 3:  # the first sample of the second shard
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, key, files)

    monkeypatch.setattr(ShardWriter, "write", failing_write)
    r = invoke("augment", photo_dir, "-o", out, *FAST, "--shard-size", "2", expect_ok=False)
    assert r.exit_code == 1 and "No space left on device" in r.output and "rerun" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert len(glob.glob(str(out / "*.tar"))) == 1 and not glob.glob(str(out / "*.tmp*"))
    assert invoke("inspect", out, "--verify").exit_code == 0  # the finished shard is valid

    monkeypatch.setattr(ShardWriter, "write", real_write)  # space freed
    r = invoke("augment", photo_dir, "-o", out, *FAST, "--shard-size", "2")
    assert "done 2, skipped 2" in r.output
    assert len(read_samples(out)) == 4


def test_an_encoding_bug_fails_one_sample_not_the_run(tmp_path, photo_dir, monkeypatch):
    import ddaug.shards.codec as codec
    real_encode = codec.encode_image
    seen = {"n": 0}

    def flaky_encode(pixels, image_format, quality=95):
        seen["n"] += 1
        if seen["n"] == 2:
            raise RuntimeError("encoder exploded")
        return real_encode(pixels, image_format, quality)

    monkeypatch.setattr("ddaug.augment.stage.encode_image", flaky_encode)
    out = tmp_path / "out"
    r = invoke("augment", photo_dir, "-o", out, *FAST, "--workers", "1")
    assert "done 3" in r.output and "failed 1" in r.output
    (failure,) = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert failure["stage"] == "augment" and "encoder exploded" in failure["reason"]


def test_run_reports_where_the_time_went(tmp_path, photo_dir):
    """-v ends with a breakdown: the job's parts, the model's own parts, and what bounds the run."""
    result = invoke("-v", "augment", photo_dir, "-o", tmp_path / "out", "--model", "tiny-random",
                    "--device", "cpu", "--batch-size", "2")
    line = next(ln for ln in result.output.splitlines() if "where the time went" in ln)
    for part in ("read+decode", "model", "vae encode", "unet", "vae decode", "build members", "write tar",
                 "commit shard"):
        assert f"{part} " in line, (part, line)
    assert re.search(r"\. (Bound by|No single bound)", line), line


def test_batch_follows_pixels(tiny_model_dir):
    """--batch-size N means N images' worth of 1024² pixels per model call: proportionally fewer
    large images (a folder of big scans does not run out of memory), more small ones, up to
    MAX_IMAGES_PER_CALL (COCO-sized photos fill the GPU instead of running 16 at a time)."""
    from ddaug.augment import DiffusionFlavour, RecipeSettings, load_components, resolve_spec
    from ddaug.augment.recipe import MAX_IMAGES_PER_CALL, images_per_call

    flavour = DiffusionFlavour(load_components(resolve_spec(tiny_model_dir)), RecipeSettings(dtype="fp32"),
                               "cpu", batch_size=8)
    assert flavour.batch_for((1024, 1024)) == 8
    assert flavour.batch_for((2048, 1024)) == 4
    assert flavour.batch_for((4096, 4096)) == 1
    assert flavour.batch_for((512, 512)) == 32
    assert flavour.batch_for((512, 640)) == 25          # a 480x640 COCO photo's canvas
    assert flavour.batch_for((64, 128)) == MAX_IMAGES_PER_CALL
    assert images_per_call((512, 640), 16) == 51
    assert images_per_call((512, 640), 32) == MAX_IMAGES_PER_CALL == 64  # auto's 32 on an H100, capped
    assert images_per_call((64, 64), 200) == 200       # an explicit batch above the cap is kept
    helped = " ".join(invoke("augment", "--help").output.split())
    assert f"up to {MAX_IMAGES_PER_CALL} images" in helped  # --help states the cap in force


def test_canvases_are_few_and_fit_the_image():
    """Each side is padded up to a multiple of CANVAS_STEP (or of the nets' multiple if larger),
    never below two of the nets' units: a canvas holds its image, and 1,000 COCO-like sizes fall
    on far fewer canvases than padded to 32."""
    import random

    from ddaug.augment.recipe import CANVAS_STEP, canvas_for

    assert canvas_for(480, 640, 32) == (512, 640)
    assert canvas_for(427, 640, 32) == (512, 640)
    assert canvas_for(1, 1, 32) == (128, 128)
    assert canvas_for(1024, 1024, 32) == (1024, 1024)
    assert canvas_for(70, 70, 128) == (256, 256)   # a net whose own multiple is larger
    rng = random.Random(0)
    sizes = [(rng.choice([480, 427, 360, 640, 512]) + rng.randint(-3, 3), 640) for _ in range(1000)]
    canvases = {canvas_for(h, w, 32) for h, w in sizes}
    fine = {(-(-h // 32) * 32, -(-w // 32) * 32) for h, w in sizes}
    assert len(canvases) < len(fine)
    for h, w in sizes:
        ch, cw = canvas_for(h, w, 32)
        assert ch >= h and cw >= w and ch % CANVAS_STEP == 0 and cw % CANVAS_STEP == 0
        assert ch - h < CANVAS_STEP and cw - w < CANVAS_STEP


def test_auto_batch_size_fits_free_memory(tiny_model_dir):
    """--batch-size auto: the peaks of batches of 1 and 2 give a fixed and a per-image part; the
    batch is what fits the budget, at least 1, at most the cap. The probe runs small images and
    scales the per-image part by pixels. On CPU it is a fixed 8."""
    from ddaug.augment import DiffusionFlavour, RecipeSettings, load_components, resolve_spec
    from ddaug.augment.recipe import batch_from_memory

    gib = 2 ** 30
    # 5 GiB free for a 1.5 GiB batch of one and 2.5 GiB batch of two: 0.5 fixed + 1 per image.
    assert batch_from_memory(5 * gib, int(1.5 * gib), int(2.5 * gib), cap=16) == 4
    assert batch_from_memory(70 * gib, int(1.5 * gib), int(2.5 * gib), cap=16) == 16
    assert batch_from_memory(1 * gib, int(1.5 * gib), int(2.5 * gib), cap=16) == 1
    # Probed at 512²: 0.25 GiB per image there is 1 GiB per 1024² image.
    assert batch_from_memory(5 * gib, int(0.75 * gib), int(1.0 * gib), cap=16, scale=4) == 4
    flavour = DiffusionFlavour(load_components(resolve_spec(tiny_model_dir)), RecipeSettings(dtype="fp32"), "cpu")
    assert flavour.batch_size is None and flavour.fit_batch_size() == 8 and flavour.batch_for((1024, 1024)) == 8


def test_compile_choice():
    """--compile auto never torch.compiles (it never paid in bench/RESULTS.md); always compiles
    on a GPU only; the reason is what -v logs."""
    from ddaug.augment.run import choose_compile

    assert choose_compile("auto", "cuda:0") == (False, choose_compile("auto", "cuda:0")[1])
    assert "--compile always" in choose_compile("auto", "cuda:0")[1]
    assert choose_compile("always", "cuda:1")[0] is True
    assert choose_compile("always", "cpu")[0] is False
    assert choose_compile("never", "cuda:0")[0] is False


def test_bound_report_reads_gpu_busy_time():
    """With the GPU's utilization sampled (NVML), -v names the bound from how busy the GPU was,
    not from which thread was busiest: the GPU itself, reading, shape changes, small batches."""
    from ddaug.pipeline.timing import StageTimes

    def sampled(busy_percent: int) -> StageTimes:
        t = StageTimes()
        t.add("unet", 9.5, gpu=True)      # events say 95%: an upper bound that NVML corrects
        t.add("model", 9.8)
        t.count("gpu busy %", busy_percent * 10)
        t.count("gpu samples", 10)
        return t

    assert sampled(90).bottleneck(10.0).startswith("Bound by the GPU (busy 90%, nvidia-smi)")
    shapes = sampled(60)
    shapes.count("model calls", 40)
    shapes.count("new shapes", 30)
    text = shapes.bottleneck(10.0)
    assert "GPU busy 60% (nvidia-smi)" in text and "30 of 40 model calls were at a new" in text
    reading = sampled(40)
    reading.add("wait for input", 5.0)
    reading.count("model calls", 10)
    reading.count("images", 20)
    reading.count("batch slots", 640)
    text = reading.bottleneck(10.0)
    assert "reading/decoding inputs" in text and "2.0 images per call" in text
    events_only = StageTimes()
    events_only.add("unet", 9.0, gpu=True)
    assert "CUDA events" in events_only.bottleneck(10.0)


def test_fewer_units_than_processes_warns_and_a_lone_worker_does_them_all(tmp_path, photo_dir):
    result = invoke("-v", "augment", photo_dir, "-o", tmp_path / "out", *FAST, "--world-size", "2", "--rank", "1")
    assert "--shard-size" in result.output and "nothing to do" in result.output
    assert len(read_samples(tmp_path / "out")) == 4  # no static split: the one worker took the only unit


def test_compile_flag_checks(tmp_path, photo_dir):
    result = invoke("augment", photo_dir, "-o", tmp_path / "out", *FAST, "--compile", "never",
                    "--compile-cache", tmp_path / "cc", expect_ok=False)
    assert result.exit_code != 0 and "--compile-cache" in result.output and "Traceback" not in result.output
    result = invoke("augment", photo_dir, "-o", tmp_path / "out", *FAST, "--compile", "sometimes", expect_ok=False)
    assert result.exit_code == 2 and "--compile" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_sizes_that_pad_alike_share_a_batch(tmp_path, photos):
    """61x83 and 58x82 pad to the same size: one batch, each cropped back to its own size, and the
    same pixels as when each runs alone."""
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(photos["coffee"]).save(src / "a.png")
    Image.fromarray(photos["coffee"][:58, :82]).save(src / "b.png")
    together = invoke("-v", "augment", src, "-o", tmp_path / "together", *FAST, "--batch-size", "2")
    assert "one by one" not in together.output
    invoke("augment", src, "-o", tmp_path / "alone", *FAST, "--batch-size", "1")
    a, b = read_samples(tmp_path / "together"), read_samples(tmp_path / "alone")
    for key in a:
        pa, pb = decode(a[key]["png"]), decode(b[key]["png"])
        assert pa.shape == pb.shape and pa.shape[:2] in {(61, 83), (58, 82)}
        assert np.abs(pa.astype(int) - pb.astype(int)).max() <= 1


def test_a_model_whose_scheduler_cannot_take_one_timestep_is_one_line(tmp_path, photo_dir):
    """Many SDXL fine-tunes ship EulerAncestral (or DDIM, UniPC...) in scheduler_config.json;
    diffusers' set_timesteps of those takes no custom timesteps, so the recipe's single step
    cannot be set up. That is one line naming --scheduler, never a traceback; --scheduler euler
    runs the same folder."""
    from ddaug.augment import save_tiny_random

    folder = save_tiny_random(str(tmp_path / "model"))
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    config = json.load(open(path))
    config["_class_name"] = "EulerAncestralDiscreteScheduler"
    json.dump(config, open(path, "w"))
    args = ["--model", folder, "--device", "cpu", "-q"]
    r = invoke("augment", photo_dir, "-o", tmp_path / "out", *args, expect_ok=False)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert "EulerAncestralDiscreteScheduler" in r.output and "--scheduler euler" in r.output
    invoke("augment", photo_dir, "-o", tmp_path / "out", *args, "--scheduler", "euler")
    assert len(read_samples(tmp_path / "out")) == 4


def test_gpu_timeline_reads_its_events_only_once_they_completed(monkeypatch):
    """A launched batch records its `done` event, then the timeline's last mark, and finish()
    waits on `done` only. torch refuses elapsed_time() on an event the GPU has not reached yet
    ("Both events must be completed"), which would fail a finished batch and rerun it. CUDA
    events are modelled here as a stream: synchronizing one completes it and all before it."""
    import types

    import torch

    from ddaug.pipeline.timing import DeviceTimeline, StageTimes

    stream = []

    class StreamEvent:
        def __init__(self, enable_timing=False):
            self.at, self.completed = None, False

        def record(self):
            self.at = len(stream)
            stream.append(self)

        def synchronize(self):
            for ev in stream[:self.at + 1]:
                ev.completed = True

        def query(self):
            return self.completed

        def elapsed_time(self, end):
            if not (self.completed and end.completed):
                raise RuntimeError("Both events must be completed before calculating elapsed time.")
            return 1000.0 * (end.at - self.at)

    monkeypatch.setattr(torch.cuda, "Event", StreamEvent)
    times = StageTimes()
    timeline = DeviceTimeline(types.SimpleNamespace(type="cuda"), times)
    for part in ("host->device", "vae encode", "unet", "vae decode"):
        timeline.mark(part)
    done = torch.cuda.Event()
    done.record()                      # the order DiffusionFlavour._launch records them in
    timeline.mark("device->host")
    done.synchronize()                 # what its finish() waits on
    timeline.finish()
    assert set(times.seconds) == {"host->device", "vae encode", "unet", "vae decode", "device->host"}
    assert times.gpu_parts == set(times.seconds) and times.seconds["device->host"] == 2.0


def test_job_stages_next_batches_while_launched_ones_still_run(tmp_path, monkeypatch):
    """A launched batch is collected without waiting only once its device says it is done, so
    the main thread stages the next batches meanwhile instead of sitting in finish() (the GPU
    would run dry between batches). Simulated on CPU: each launched batch reports 'still
    running' for its first two polls. Outputs are those of an unpatched run."""
    from ddaug.augment.recipe import DiffusionFlavour

    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(100, 100), (200, 100), (100, 200), (200, 200)]):  # four canvases
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(src / f"{i}.png")
    invoke("augment", src, "-o", tmp_path / "plain", *FAST)

    events: list[str] = []
    stage, launch = DiffusionFlavour.stage, DiffusionFlavour.launch_staged

    def staging(self, *args, **kwargs):
        events.append("stage")
        return stage(self, *args, **kwargs)

    def launching(self, staged):
        polls = []  # a device's queue: launching returns at once, the work happens by finish()

        def finishing():
            events.append("finish")
            return launch(self, staged)()
        finishing.ready = lambda: polls.append(1) or len(polls) > 2
        return finishing

    monkeypatch.setattr(DiffusionFlavour, "stage", staging)
    monkeypatch.setattr(DiffusionFlavour, "launch_staged", launching)
    invoke("augment", src, "-o", tmp_path / "launched", *FAST)
    assert events.count("finish") == events.count("stage") == 4, events
    assert events[:3] == ["stage"] * 3, events  # three batches staged before the first is collected
    assert read_samples(tmp_path / "plain") == read_samples(tmp_path / "launched")


def test_launches_overlap_on_two_model_threads_only_where_memory_allows(tmp_path, monkeypatch):
    """The next batch is set up while the last one is still launching, on a second model thread,
    when the two batches' memory shares fit together: batches of one canvas take 0.6 of the
    memory the batch size was fitted to, those of the other 0.3. Two 0.6 batches never launch at
    once, a 0.6 and a 0.3 do, launches start in the order batches were formed, and the shards are
    byte-identical to a one-thread run."""
    import threading
    import time

    import ddaug.augment.recipe as recipe
    import ddaug.pipeline.job as job
    from ddaug.augment.recipe import DiffusionFlavour

    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(3)
    monkeypatch.setattr(recipe, "MAX_IMAGES_PER_CALL", 2)  # batches of two: three per canvas
    square, tall = (100, 100), (200, 100)  # batches formed: square, square, tall, tall, square, tall
    for i, (h, w) in enumerate([square] * 4 + [tall] * 4 + [square] * 2 + [tall] * 2):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(src / f"{i:02d}.png")
    monkeypatch.setattr(DiffusionFlavour, "memory_share", lambda self, n, canvas: 0.6 if canvas[0] == canvas[1] else 0.3)
    launch = DiffusionFlavour.launch_staged
    lock, active, spans, launches = threading.Lock(), [], [], []

    def slow_launch(self, staged):
        share = self.memory_share(staged.n, tuple(staged.pixels.shape[1:3]))
        with lock:
            first = not launches
            launches.append(share)
            active.append(share)
            spans.append(("first" if first else "start", sorted(active)))
        time.sleep(0.2)  # a launch that takes a while, as a new shape's set-up does
        try:
            return launch(self, staged)
        finally:
            with lock:
                active.remove(share)
                if first:
                    spans.append(("first done", []))

    monkeypatch.setattr(DiffusionFlavour, "launch_staged", slow_launch)
    outs = {}
    for threads in (1, 2):
        monkeypatch.setattr(job, "MODEL_THREADS", threads)
        spans.clear()
        launches.clear()
        outs[threads] = tmp_path / f"threads{threads}"
        invoke("augment", src, "-o", outs[threads], *FAST, "--batch-size", "2", "--shard-size", "12")
        overlapping = [at_start for _, at_start in spans if len(at_start) > 1]
        if threads == 1:
            assert not overlapping, spans
    assert overlapping and all(sum(s) <= 1.0 for s in overlapping), spans  # 0.6 + 0.3, never 0.6 + 0.6
    # The first launch (where kernels get compiled and loaded) runs alone.
    assert [event for event, _ in spans[:2]] == ["first", "first done"], spans
    assert read_samples(outs[1]) == read_samples(outs[2])
    [a], [b] = (glob.glob(str(o / "*.tar")) for o in outs.values())
    assert open(a, "rb").read() == open(b, "rb").read()


def test_outputs_do_not_depend_on_how_many_batches_are_in_flight(tmp_path, monkeypatch):
    """LAUNCH_DEPTH and the order the block's partial batches are flushed in (job.tail_order's,
    from their sizes) change when batches run, never what is in them: shards are byte-identical
    at depth 0 and 4, and with the batches ordered as their canvases first came instead of by
    size every sample is the same (only their order in the shard follows the batches), with
    several canvases whose last batches are partial."""
    import builtins

    import ddaug.pipeline.job as job

    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(1)
    sizes = [(100, 100)] * 5 + [(200, 100)] * 2 + [(100, 200)] * 3 + [(60, 60)]
    for i in rng.permutation(len(sizes)):
        h, w = sizes[i]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(src / f"{i:02d}.png")
    flushed: dict[str, list[list[int]]] = {}  # run -> the batch sizes each block flushed, in order

    def flush_order(keys, key):  # job.py's `sorted` of the block's last batches, or not sorted
        ordered = builtins.sorted(keys, key=key) if run.endswith("by size") else list(keys)
        flushed.setdefault(run, []).append([-key(k) for k in ordered])
        return ordered

    monkeypatch.setattr(job, "sorted", flush_order, raising=False)
    outs = []
    for depth, run in ((0, "depth 0 by size"), (4, "depth 4 by size"), (4, "depth 4 as they came")):
        monkeypatch.setattr(job, "LAUNCH_DEPTH", depth)
        outs.append(tmp_path / run.replace(" ", "-"))
        invoke("augment", src, "-o", outs[-1], *FAST, "--batch-size", "2", "--shard-size", "6")
    assert flushed["depth 4 by size"] != flushed["depth 4 as they came"], flushed
    shards = [[open(p, "rb").read() for p in sorted(glob.glob(str(o / "*.tar")))] for o in outs]
    assert len(shards[0]) == 2 and shards[0] == shards[1] != shards[2]
    assert read_samples(outs[0]) == read_samples(outs[2])


def test_samples_are_written_as_their_batches_complete_in_an_order_fixed_by_the_inputs(tmp_path, monkeypatch):
    """A sample goes into the shard when its batch is collected, not behind every input before
    it: the block's first input has the rarest size, is batched last, and is written last, while
    a text-only record read before any batch was formed is written first. The order does not
    depend on timing: builds that finish in random order and another launch depth give the same
    bytes."""
    import random
    import time

    import ddaug.pipeline.job as job
    from ddaug.augment.stage import AugmentStage

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(2)
    rows = [("rare", (200, 100))] + [(f"common{i}", (100, 100)) for i in range(4)]
    for name, (h, w) in rows:
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(photos / f"{name}.png")
    turn = lambda role, text: {"role": role, "content": text}  # noqa: E731
    records = [{"id": "text-only", "messages": [turn("user", "Hi"), turn("assistant", "Hello.")]}]
    records += [{"id": name, "messages": [turn("user", "<image>What is it?"), turn("assistant", "A photo.")],
                 "images": [f"photos/{name}.png"]} for name, _ in rows]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    invoke("augment", tmp_path / "chat.jsonl", "-o", tmp_path / "plain", *FAST)
    [shard] = glob.glob(str(tmp_path / "plain" / "*.tar"))
    with tarfile.open(shard) as tf:
        keys = list(dict.fromkeys(os.path.basename(m.name).partition(".")[0] for m in tf.getmembers()))
    metas = {k: sample_meta(m) for k, m in read_samples(tmp_path / "plain").items()}
    written = [os.path.basename(metas[k]["source"]["images"][0]["uri"]) if metas[k]["source"].get("images")
               else "text-only" for k in keys]
    assert written == ["text-only"] + [f"common{i}.png" for i in range(4)] + ["rare.png"], written

    build = AugmentStage.build

    def slow_build(self, item, results):
        time.sleep(random.uniform(0, 0.05))  # builds finish in any order
        return build(self, item, results)

    monkeypatch.setattr(AugmentStage, "build", slow_build)
    monkeypatch.setattr(job, "LAUNCH_DEPTH", 0)
    invoke("augment", tmp_path / "chat.jsonl", "-o", tmp_path / "slow", *FAST)
    [slow] = glob.glob(str(tmp_path / "slow" / "*.tar"))
    assert open(shard, "rb").read() == open(slow, "rb").read()


def test_launch_budget_lets_a_full_batch_through_once_overlapping_launches_have_ended(tmp_path, monkeypatch):
    """Shares are fractions of the fitted memory, and adding and taking them back in floating
    point leaves a residue ((0.35 + 0.45) - 0.35 - 0.45 > 0). After three pairs of overlapping
    launches, 0.35+0.45, 2/3+0.3 and 0.75+0.2, in whichever order each pair ends, the residue
    passed half an ulp of 1.0, and the next full batch (share 1.0) waited for memory no launch
    held: the job hung. The launches of a pair are held together by a barrier and each pair's
    first share fits beside neither of the last pair's, so the sequence does not depend on
    timing (the run's first launch goes alone, so a 0.1 batch leads); the job runs in a thread and
    is let through if it hangs."""
    import threading

    import ddaug.augment.recipe as recipe
    import ddaug.pipeline.job as job
    from ddaug.augment.recipe import DiffusionFlavour

    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(4)
    monkeypatch.setattr(recipe, "MAX_IMAGES_PER_CALL", 2)  # batches of two, one canvas each, in this order
    shares = {1024: 0.1, 128: 0.35, 256: 0.45, 384: 2 / 3, 512: 0.3, 640: 0.75, 768: 0.2, 896: 1.0}  # by canvas height
    heights = [h for h in shares for _ in range(2)]
    for i, h in enumerate(heights):
        Image.fromarray(rng.integers(0, 255, (h, 128, 3), dtype=np.uint8)).save(src / f"{i:02d}.png")
    monkeypatch.setattr(DiffusionFlavour, "memory_share", lambda self, n, canvas: shares[canvas[0]])
    launch = DiffusionFlavour.launch_staged
    pair = threading.Barrier(2, timeout=60)
    launched = []

    def paired_launch(self, staged):
        launched.append(staged.pixels.shape[1])
        if 2 <= len(launched) <= 7:
            pair.wait()  # launches 2+3, 4+5 and 6+7 hold their shares at once
        return launch(self, staged)

    monkeypatch.setattr(DiffusionFlavour, "launch_staged", paired_launch)
    budgets = []

    class RecordedBudget(job.LaunchBudget):
        def __init__(self):
            super().__init__()
            budgets.append(self)

    monkeypatch.setattr(job, "LaunchBudget", RecordedBudget)
    monkeypatch.setattr(job, "MODEL_THREADS", 2)
    result = {}
    run = threading.Thread(target=lambda: result.update(out=invoke(
        "augment", src, "-o", tmp_path / "out", *FAST, "--batch-size", "2", "--shard-size", "16")), daemon=True)
    run.start()
    run.join(60)  # the job takes seconds
    hung = run.is_alive()
    if hung:
        budgets[-1].open()  # let the stuck batch through, so the test ends
        run.join(120)
    assert not hung, f"the job hung after launches {launched}"
    assert launched == list(shares), launched
    assert len(read_samples(tmp_path / "out")) == len(heights)


def test_a_compiled_vae_is_never_launched_from_two_threads_at_once(tmp_path, monkeypatch):
    """torch.compile's Dynamo is not thread-safe (pytorch/pytorch#118260, #126024: a compile in
    one thread makes a call in another fail), so with --compile always launches take turns on
    the model threads even where their memory shares would fit together (0.3 each here). The
    VAE is compiled for real, with Dynamo's eager backend (CPU, no C compiler)."""
    import threading
    import time

    import ddaug.augment.recipe as recipe
    import ddaug.augment.run as augment_run
    import ddaug.pipeline.job as job
    from ddaug.augment.recipe import DiffusionFlavour

    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(5)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(src / f"{i:02d}.png")
    monkeypatch.setattr(recipe, "MAX_IMAGES_PER_CALL", 2)
    monkeypatch.setattr(job, "MODEL_THREADS", 2)
    monkeypatch.setattr(DiffusionFlavour, "memory_share", lambda self, n, canvas: 0.3)
    monkeypatch.setattr(augment_run, "choose_compile", lambda setting, device: (True, "compiling (test)"))
    compile_vae, launch = DiffusionFlavour.compile_vae, DiffusionFlavour.launch_staged
    monkeypatch.setattr(DiffusionFlavour, "compile_vae", lambda self: compile_vae(self, backend="eager"))
    lock, active, most = threading.Lock(), [0], [0]

    def slow_launch(self, staged):
        assert self.compiled
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.2)  # long enough for a second thread's launch to start, were it let
        try:
            return launch(self, staged)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(DiffusionFlavour, "launch_staged", slow_launch)
    invoke("augment", src, "-o", tmp_path / "out", *FAST, "--batch-size", "2", "--compile", "always")
    assert most[0] == 1
    assert len(read_samples(tmp_path / "out")) == 8
