"""Hostile and careless inputs, through the CLI: exports of shard sets that share keys,
an output folder inside the input, records the readers used to drop or die on, names that are
not UTF-8, FIFOs, devices and huge files. Each bad input is one ledger line; the rest is made."""

from __future__ import annotations

import codecs
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

from conftest import invoke, read_samples, sample_meta

FAST = ["--model", "tiny-random", "--device", "cpu", "-q"]


def _ledger(out) -> list[dict]:
    return [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]


def _verify(out) -> None:
    invoke("inspect", out, "--verify")  # exit 1 on any problem


def _png_bytes(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _chat_dataset(tmp_path, photo_dir) -> str:
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"<image>What is in picture {i}?"},
                          {"role": "assistant", "content": f"Picture {i}."}], "images": [rel]}
            for i, rel in enumerate(["photos/astronaut.png", "photos/sub/coffee.png", "photos/chelsea.png"])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# -- class 1: export ---------------------------------------------------------------------------------
def test_export_keeps_shard_sets_with_shared_keys_apart(tmp_path, photo_dir):
    dataset = _chat_dataset(tmp_path, photo_dir)
    img2img, vae = tmp_path / "img2img", tmp_path / "vae"
    invoke("augment", dataset, "-o", img2img, *FAST)
    invoke("augment", dataset, "-o", vae, *FAST, "--mode", "vae")
    a, b = read_samples(img2img), read_samples(vae)
    assert set(a) == set(b) and len(a) == 3              # same inputs: the same keys
    assert all(a[k]["png"] != b[k]["png"] for k in a)    # different pixels

    out = tmp_path / "lf"
    r = invoke("export", img2img, vae, "-o", out, "--format", "llamafactory")
    assert "6 samples written; skipped: none" in r.output
    records = json.loads((out / "ddaug.json").read_text())
    assert len(records) == 6 and len({rec["images"][0] for rec in records}) == 6
    for rec, shard_set in zip(records, [a] * 3 + [b] * 3):
        key = os.path.basename(rec["images"][0]).split(".")[0]
        assert (out / rec["images"][0]).read_bytes() == shard_set[key]["png"]  # each record: its own pixels

    swift = tmp_path / "swift"
    invoke("export", img2img, vae, "-o", swift, "--format", "swift")
    lines = [json.loads(x) for x in (swift / "ddaug.jsonl").read_text().splitlines()]
    for rec, shard_set in zip(lines, [a] * 3 + [b] * 3):
        key = os.path.basename(rec["images"][0]).split(".")[0]
        assert open(rec["images"][0], "rb").read() == shard_set[key]["png"]

    # A file that is not this image, under the name the image would take, is never replaced.
    from ddaug.shards.export import image_file_name

    key = sorted(a)[0]
    taken = tmp_path / "lf2" / "images" / image_file_name(key, "png", a[key]["png"])
    taken.parent.mkdir(parents=True)
    taken.write_bytes(b"someone else's file")
    r = invoke("export", img2img, "-o", tmp_path / "lf2", "--format", "llamafactory")
    assert "2 samples written; skipped: 1 image name clash" in r.output
    assert taken.read_bytes() == b"someone else's file"
    # Exporting the same set again into the same folder reuses its images (equal bytes, equal names).
    r = invoke("export", img2img, "-o", out, "--format", "llamafactory", "--name", "again")
    assert "3 samples written; skipped: none" in r.output


# -- class 2: outputs are not inputs -------------------------------------------------------------------
def test_output_folder_inside_the_input_is_never_read(tmp_path, photo_dir):
    out = photo_dir / "out"
    invoke("augment", photo_dir, "-o", out, *FAST)
    r = invoke("augment", photo_dir, "-o", out, *FAST)     # the rerun after a crash, or by mistake
    assert "done 0, skipped 4" in r.output
    assert json.loads((out / "manifest.json").read_text())["samples"] == 4
    # Another run's output folder inside the input is not read either ...
    invoke("augment", photo_dir, "-o", photo_dir / "vae", *FAST, "--mode", "vae")
    assert len(read_samples(photo_dir / "vae")) == 4
    # ... and naming -o (or a shard in it) as an input is refused in one line ...
    for bad in (out, out / "shard-000-000000.tar"):
        r = invoke("augment", photo_dir, bad, "-o", out, *FAST, expect_ok=False)
        assert r.exit_code == 1 and "never reads its own output" in r.output and "Traceback" not in r.output
    # ... but an output folder named as the input is read (caption of an augment output).
    invoke("augment", out, "-o", tmp_path / "second", *FAST, "--mode", "vae")
    assert len(read_samples(tmp_path / "second")) == 4


# -- classes 3, 4, 9: records ---------------------------------------------------------------------------
def _foreign_tar(path, photos) -> None:
    jpg = io.BytesIO()
    Image.fromarray(photos["rocket"]).save(jpg, format="JPEG")

    def add(tf, name, data: bytes):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    convo = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                          {"type": "text", "text": "What flies?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "A rocket."}]}]
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        add(tf, "a.jpg", jpg.getvalue())
        add(tf, "a.json", json.dumps({"tags": "x", "system": "be brief"}).encode())
        add(tf, "b.png", _png_bytes(photos["astronaut"]))
        add(tf, "b.png", _png_bytes(photos["chelsea"]))           # the same key again: another sample
        add(tf, os.fsdecode(b"caf\xe9.png"), _png_bytes(photos["coffee"]))  # a name that is not UTF-8
        add(tf, "c.png", _png_bytes(photos["coffee"]))
        add(tf, "c.json", codecs.BOM_UTF8 + json.dumps({"messages": convo}).encode())
        add(tf, "d.png", _png_bytes(photos["coffee"]))
        add(tf, "d.txt", b"caf\xe9 au lait")                         # latin-1 text


def test_bad_records_go_to_the_ledger_and_the_rest_is_made(tmp_path, photo_dir, photos):
    good = {"messages": [{"role": "user", "content": "<image>What is this?"},
                         {"role": "assistant", "content": "A photo."}], "images": ["photos/astronaut.png"]}
    lines = [
        json.dumps(good).encode(),
        json.dumps({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]},
                                 {"role": "assistant", "content": [{"type": "text", "text": "A cup."}]}],
                    "images": ["photos/sub/coffee.png"]}).encode(),
        json.dumps({"messages": json.dumps(good["messages"]), "images": "photos/chelsea.png"}).encode(),
        json.dumps({"conversations": [{"from": "human", "value": "<image>Hi"}, {"from": "gpt", "value": "Hello"}],
                    "images": ["photos/sub/rocket.png"], "tags": "x"}).encode(),
        json.dumps({**good, "messages": "hello there"}).encode(),                                   # ledger
        json.dumps({**good, "messages": [{"role": "narrator", "content": "<image>Once"}]}).encode(),  # ledger
        json.dumps({**good, "images": 5}).encode(),                                                 # ledger
        json.dumps({**good, "images": True}).encode(),                                              # ledger
        b"5", b"null",                                                                              # ledger x2
        b"[" * 100_000 + b"]" * 100_000,                                                            # ledger
        b'{"messages": "caf\xe9"}',                                                                 # ledger
        json.dumps({**good, "messages": [{"role": "user", "content": "<image>\ud800"}]}).encode(),  # ledger
    ]
    (tmp_path / "chat.jsonl").write_bytes(codecs.BOM_UTF8 + b"\n".join(lines) + b"\n")
    (tmp_path / "top-string.json").write_text(json.dumps("abcdef"))                                # ledger, once
    (tmp_path / "bom.json").write_bytes(codecs.BOM_UTF8 + json.dumps([good]).encode())
    (tmp_path / "photos" / "trailing .png ").write_bytes(_png_bytes(photos["rocket"]))
    (tmp_path / "list.txt").write_bytes(codecs.BOM_UTF8 + b"photos/astronaut.png\nphotos/trailing .png \n")
    _foreign_tar(tmp_path / "foreign.tar", photos)
    inputs = [tmp_path / n for n in ("chat.jsonl", "top-string.json", "bom.json", "list.txt", "foreign.tar")]
    out = tmp_path / "out"
    r = invoke("augment", *inputs, "-o", out, *FAST)
    assert "done 12, skipped 0 (already done), failed 11" in r.output, r.output
    _verify(out)  # nothing --verify rejects was written

    metas = [sample_meta(m) for m in read_samples(out).values()]
    by_question = {m["messages"][0]["content"]: m for m in metas if m["messages"]}
    assert by_question["<image>Describe."]["messages"][1] == {"role": "assistant", "content": "A cup."}
    assert by_question["<image>What flies?"]["messages"][1]["content"] == "A rocket."
    assert by_question["<image>Hi"]["extra"]["tags"] == "x"        # kept, not dropped
    assert sum(m["messages"][:1] == good["messages"][:1] for m in metas) == 3  # jsonl, json string, bom.json
    tar_images = {m["source"]["images"][0]["uri"].rsplit("#", 1)[1]: m for m in metas
                  if "foreign.tar" in m["source"]["uri"]}
    assert sorted(tar_images) == ["a.jpg", "b.png", "c.png", "caf\\xe9.png"]  # d: its text is not UTF-8
    assert sum("foreign.tar#b" in m["source"]["uri"] for m in metas) == 2    # both samples of key b
    assert tar_images["a.jpg"]["extra"] == {"tags": "x", "system": "be brief"}
    listed = [m for m in metas if m["source"]["uri"].endswith((".png", ".png ")) and m["messages"] == []]
    assert sorted(os.path.basename(m["source"]["uri"]) for m in listed) == ["astronaut.png", "trailing .png "]

    reasons = sorted(f["reason"] for f in _ledger(out))
    expected = ["images is bool", "images is int", "is nested too deeply", "messages is a string",
                "not UTF-8 text", "record is int", "record is null", "text member is not UTF-8",
                "the file holds a JSON str", "unknown role 'narrator'", "text is not valid Unicode"]
    for want in expected:
        assert sum(want in reason for reason in reasons) == 1, (want, reasons)
    assert len(reasons) == 11


# -- class 6: names of any bytes ---------------------------------------------------------------------------
def test_names_that_are_not_utf8_round_trip(tmp_path, photos):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "plain.png").write_bytes(_png_bytes(photos["astronaut"]))
    name = b"caf\xe9.png"
    with open(os.path.join(os.fsencode(folder), name), "wb") as f:
        f.write(_png_bytes(photos["coffee"]))
    other = b"th\xe9.png"
    with open(os.path.join(os.fsencode(tmp_path), other), "wb") as f:
        f.write(_png_bytes(photos["rocket"]))
    listing = tmp_path / "list.txt"
    listing.write_bytes(other + b"\n")
    out = tmp_path / "out"
    r = invoke("augment", folder, listing, "-o", out, *FAST)
    assert "done 3, skipped 0 (already done), failed 0" in r.output
    uris = [sample_meta(m)["source"]["images"][0]["uri"] for m in read_samples(out).values()]
    assert sorted(os.path.basename(u) for u in uris) == ["caf\\xe9.png", "plain.png", "th\\xe9.png"]
    _verify(out)
    r = invoke("augment", folder, listing, "-o", out, *FAST)
    assert "done 0, skipped 3" in r.output   # the keys are stable: the rerun finds them done

    # A tar whose done marker never came is not passed by --verify.
    (stats,) = out.glob("*.stats.json")
    stats.unlink()
    r = invoke("inspect", out, "--verify", expect_ok=False)
    assert r.exit_code == 1 and "no done marker" in r.output


# -- class 7 (and 9): FIFOs, devices, huge files, broken tars in a folder ---------------------------------------
@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"), reason="needs FIFOs and /dev/zero")
def test_fifos_devices_huge_files_and_bad_tars_are_refused_not_read(tmp_path, photos):
    from ddaug.sources.items import MAX_INPUT_BYTES

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.png").write_bytes(_png_bytes(photos["astronaut"]))
    os.mkfifo(folder / "fifo.png")
    os.mkfifo(folder / "fifo.tar")
    os.symlink("/dev/zero", folder / "zero.png")
    with open(folder / "huge.png", "wb") as f:
        f.truncate(MAX_INPUT_BYTES + 1)               # sparse: costs no disk
    (folder / "empty.tar").write_bytes(b"")
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w") as tf:
        info = tarfile.TarInfo("x.png")
        data = _png_bytes(photos["rocket"])
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    (folder / "gz.tar").write_bytes(gzip.compress(tar_bytes.getvalue()))
    out = folder / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "ddaug", "augment", str(folder), "-o", str(out), *FAST]
    # A FIFO read would block forever and /dev/zero would fill memory: the timeout catches both.
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "done 1, skipped 0 (already done), failed 6" in r.stdout + r.stderr
    reasons = {os.path.basename(f["source"]): f["reason"] for f in _ledger(out)}
    assert "a FIFO, not a regular file" in reasons["fifo.png"]
    assert "a FIFO, not a regular file" in reasons["fifo.tar"]
    assert "a character device, not a regular file" in reasons["zero.png"]
    assert f"over the {MAX_INPUT_BYTES}-byte limit" in reasons["huge.png"]
    assert "not a readable tar" in reasons["empty.tar"]
    assert "gzip-compressed" in reasons["gz.tar"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "done 0, skipped 7" in r.stdout + r.stderr, r.stderr
    assert len(read_samples(out)) == 1


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_inspect_preview_does_not_follow_a_source_uri_into_a_fifo(tmp_path, photos):
    """A sample's source uri is data from a tar: the preview reads it only if it is a plain file."""
    os.mkfifo(tmp_path / "fifo.png")
    meta = {"key": "k", "images": ["k.png"], "source": {"uri": str(tmp_path / "fifo.png"),
                                                        "images": [{"uri": str(tmp_path / "fifo.png")}]}}
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for name, data in (("k.png", _png_bytes(photos["rocket"])), ("k.json", json.dumps(meta).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    os.mkfifo(tmp_path / "fifo.tar")  # a FIFO among the shards of a folder is not opened either
    env = {**os.environ}
    cmd = [sys.executable, "-m", "ddaug", "inspect", str(tmp_path), "--preview",
           str(tmp_path / "sheet.png")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "sheet.png").size[0] > 0
