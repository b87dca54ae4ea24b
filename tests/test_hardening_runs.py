"""Hardening of runs and their output folder: flags never name files outside -o, a run
deletes only what it made, user errors are one line (and leave no poisoned run.json), memory is
bounded by a pixel cap, and the manifest is kept up to date incrementally."""

from __future__ import annotations

import errno
import glob
import io
import json
import os
import shutil

import pytest
import torch
from PIL import Image

from conftest import invoke, read_samples, sample_meta
from test_export import _crafted_tar

FAST = ["--model", "tiny-random", "--device", "cpu", "-q"]


def one_line_error(r, *needles):
    """A user error: non-zero exit, one line, no traceback, naming what is wrong."""
    assert r.exit_code != 0, r.output
    assert "Traceback" not in r.output
    lines = [line for line in r.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 or (r.exit_code == 2 and lines[-1].startswith("Error:")), r.output
    for needle in needles:
        assert needle in r.output, (needle, r.output)


@pytest.fixture(scope="module")
def augmented(tmp_path_factory, photos):
    """One finished augment output (4 photos, 2 shards) to copy and damage."""
    root = tmp_path_factory.mktemp("augmented")
    src = root / "photos"
    src.mkdir()
    for name, arr in photos.items():
        Image.fromarray(arr).save(src / f"{name}.png")
    invoke("augment", src, "-o", root / "out", *FAST, "--shard-size", "2")
    return root


def _copy(augmented, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(augmented / "out", out)
    return out


# -- class 10: flags that name files never write outside -o ----------------------------------------
@pytest.mark.parametrize("prefix", ["../escaped", "/tmp/ddaug-abs-prefix", "a/b", ".hidden", "..", ""])
def test_prefix_must_be_a_plain_file_name(tmp_path, photo_dir, prefix):
    out = tmp_path / "deep" / "out"
    r = invoke("augment", photo_dir, "-o", out, *FAST, "--prefix", prefix, expect_ok=False)
    one_line_error(r, "--prefix")
    assert not (tmp_path / "deep").exists() and not glob.glob("/tmp/ddaug-abs-prefix*")
    assert not glob.glob(str(tmp_path / "deep" / "escaped*"))


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/ddaug-abs-name", "sub/name", "..", "x" * 300])
@pytest.mark.parametrize("fmt", ["llamafactory", "swift"])
def test_export_name_must_be_a_plain_file_name(tmp_path, augmented, fmt, name):
    out = tmp_path / "a" / "b" / "export"
    r = invoke("export", augmented / "out", "-o", out, "--format", fmt, "--name", name, expect_ok=False)
    one_line_error(r, "--name")
    assert not (tmp_path / "a").exists() and not glob.glob("/tmp/ddaug-abs-name*")
    assert not glob.glob(str(tmp_path / "escaped*"))


def test_library_calls_refuse_path_names_too(tmp_path):
    from ddaug.shards.export import ExportError, export
    from ddaug.shards.store import OutputFolder, StoreError

    with pytest.raises(StoreError, match="plain file name"):
        OutputFolder(str(tmp_path / "o"), prefix="../x", command="augment", config={}, run_info={})
    with pytest.raises(ExportError, match="plain file name"):
        export([str(tmp_path)], "swift", str(tmp_path / "e"), name="../x")
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()


# -- class 11: a run deletes only what it made -----------------------------------------------------
USER_FILES = ["photos-000-000000.tar", "notes.tmp", "data.tar.tmp", "keep-000-x.tmp", "mine.tar",
              "run.json.tmp-notapid", "manifest.json.tmp-xyz", "other.stats.json", "shard-000-1.tar",
              "shard-000-000000.tar.tmp.bak", "xshard-000-000001.tar", "shard-000-000001.tar.tmp",
              "plan-000.json.bak", "plan-1.json", ".lease-notes", ".worker-me.json"]


def test_run_and_overwrite_delete_only_their_own_files(tmp_path, photo_dir):
    out = tmp_path / "out"
    out.mkdir()
    for name in USER_FILES:
        (out / name).write_bytes(b"the user's own file")
    (out / "other.stats.json").write_text('{"not": "ddaug"}')
    # A leftover of this run's own (a shard being written when its process died) does go.
    (out / "shard-000-000001.tar.tmp-999999.0badc0de").write_bytes(b"half a tar")
    invoke("augment", photo_dir, "-o", out, *FAST, "--shard-size", "2")
    assert not (out / "shard-000-000001.tar.tmp-999999.0badc0de").exists()
    own = sorted(glob.glob(str(out / "shard-000-00000*.tar")))
    assert len(own) == 2 and invoke("inspect", *own, "--verify").exit_code == 0
    r = invoke("augment", photo_dir, "-o", out, *FAST, "--shard-size", "2")
    assert "skipped 4" in r.output
    invoke("augment", photo_dir, "-o", out, *FAST, "--shard-size", "2", "--overwrite")
    for name in USER_FILES:
        assert (out / name).exists(), name
    assert (out / "other.stats.json").read_text() == '{"not": "ddaug"}'
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == ["shard-000-000000.tar", "shard-000-000001.tar"]


def test_overwrite_with_another_prefix_removes_the_previous_runs_shards(tmp_path, photo_dir):
    out = tmp_path / "out"
    invoke("augment", photo_dir, "-o", out, *FAST, "--prefix", "first", "--shard-size", "2")
    assert len(glob.glob(str(out / "first-*.tar"))) == 2
    r = invoke("augment", photo_dir, "-o", out, *FAST, "--prefix", "second", expect_ok=False)
    one_line_error(r, "different config", "prefix")
    invoke("augment", photo_dir, "-o", out, *FAST, "--prefix", "second", "--overwrite")
    assert not glob.glob(str(out / "first-*")) and len(glob.glob(str(out / "second-*.tar"))) == 1
    assert invoke("inspect", out, "--verify").exit_code == 0


# -- class 13: user errors are one line, and nothing is poisoned -----------------------------------
@pytest.mark.parametrize("device, needle", [
    pytest.param("cuda", "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    pytest.param("cuda:9", "CUDA", marks=pytest.mark.skipif(torch.cuda.device_count() > 9, reason="10 GPUs")),
    pytest.param("mps", "MPS", marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="has MPS")),
    ("cpuu", "not a torch device"),
    ("meta", "ddaug runs on cpu, cuda or mps"),
])
@pytest.mark.parametrize("command", ["augment", "caption"])
def test_an_unusable_device_is_one_line_before_the_folder_is_touched(tmp_path, photo_dir, command, device, needle):
    out = tmp_path / "out"
    extra = ["--model", "tiny-random"] if command == "augment" else ["--vlm", "tiny-random"]
    r = invoke(command, photo_dir, "-o", out, *extra, "--device", device, "-q", expect_ok=False)
    one_line_error(r, "--device", needle)
    assert not out.exists()


@pytest.mark.parametrize("value, needle", [("nan", "finite"), ("-nan", "finite"), ("inf", "range")])
def test_non_finite_numbers_are_refused(tmp_path, photo_dir, value, needle):
    r = invoke("augment", photo_dir, "-o", tmp_path / "out", *FAST, "--strength", value, expect_ok=False)
    one_line_error(r, "--strength", needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--timeout", "--retry-backoff"])
def test_non_finite_caption_client_numbers_are_refused(tmp_path, photo_dir, flag):
    r = invoke("caption", photo_dir, "-o", tmp_path / "out", "--backend", "openai", "--vlm", "m",
               "--api-base", "http://127.0.0.1:9/v1", flag, "nan", expect_ok=False)
    one_line_error(r, flag, "finite")


def test_a_model_that_fails_to_load_leaves_no_config_that_refuses_the_fixed_command(tmp_path, photo_dir):
    out = tmp_path / "out"
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    r = invoke("augment", photo_dir, "-o", out, "--model", not_a_model, "--device", "cpu", "-q", expect_ok=False)
    assert r.exit_code == 1 and "Traceback" not in r.output
    invoke("augment", photo_dir, "-o", out, *FAST, "--strength", "0.05")  # the corrected command
    assert len(read_samples(out)) == 4
    assert json.loads((out / "run.json").read_text())["config"]["model"] == "tiny-random"
    # Once a folder holds finished work, a different config is still refused.
    r = invoke("augment", photo_dir, "-o", out, *FAST, expect_ok=False)
    one_line_error(r, "different config", "strength")


def test_a_caption_server_refusing_the_model_leaves_no_config_that_refuses_the_fixed_command(
        tmp_path, photo_dir, monkeypatch):
    from ddaug.captioning.replies import Reply
    from ddaug.captioning.server import ChatServer

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    out = tmp_path / "out"
    with ChatServer(lambda image, text, n: Reply("A picture."), model="served") as srv:
        common = ["--backend", "openai", "--api-base", srv.url, "-q"]
        r = invoke("caption", photo_dir, "-o", out, *common, "--vlm", "typo", expect_ok=False)
        assert r.exit_code == 1 and "Traceback" not in r.output
        invoke("caption", photo_dir, "-o", out, *common, "--vlm", "served")
    assert len(read_samples(out)) == 4


def test_a_broken_run_json_or_done_marker_is_one_line(tmp_path, augmented, photo_dir):
    out = _copy(augmented, tmp_path)
    src = augmented / "photos"
    (out / "run.json").write_text("{not json")
    r = invoke("augment", src, "-o", out, *FAST, "--shard-size", "2", expect_ok=False)
    one_line_error(r, "run.json", "--overwrite")
    out = tmp_path / "out2"
    shutil.copytree(augmented / "out", out)
    (out / "shard-000-000001.stats.json").write_bytes(b"\xff\xfe garbage")
    r = invoke("augment", src, "-o", out, *FAST, "--shard-size", "2", expect_ok=False)
    one_line_error(r, "shard-000-000001.stats.json", "not a ddaug done marker")


def test_disk_full_when_the_folder_is_set_up_is_one_line(tmp_path, photo_dir, monkeypatch):
    import ddaug.shards.writer as writer
    def no_space(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "atomic_write_bytes", no_space)
    r = invoke("augment", photo_dir, "-o", tmp_path / "out", *FAST, expect_ok=False)
    one_line_error(r, "No space left on device", str(tmp_path / "out"))


def test_a_folder_without_hard_links_is_refused_in_one_line_before_any_work(tmp_path, photo_dir, monkeypatch):
    def no_links(src, dst, *args, **kwargs):  # vfat, SMB, FUSE mounts of object stores
        raise OSError(errno.EPERM, "Operation not permitted", src, None, dst)

    monkeypatch.setattr(os, "link", no_links)
    r = invoke("augment", photo_dir, "-o", tmp_path / "out", *FAST, expect_ok=False)
    one_line_error(r, str(tmp_path / "out"), "without hard links")
    assert ".tmp-" not in r.output and "rerun" not in r.output, r.output
    assert not [n for n in os.listdir(tmp_path / "out") if n.startswith(".")]  # no probe left behind


def test_a_shard_removed_by_hand_is_named_and_redone_once_its_marker_goes(tmp_path, augmented):
    out, src = _copy(augmented, tmp_path), augmented / "photos"
    ref = read_samples(out)
    os.remove(out / "shard-000-000000.tar")
    r = invoke("augment", src, "-o", out, *FAST, "--shard-size", "2", expect_ok=False)
    one_line_error(r, str(out / "shard-000-000000.tar"), "is missing", "shard-000-000000.stats.json")
    assert ".tmp-" not in r.output and "rerun" not in r.output, r.output
    os.remove(out / "shard-000-000000.stats.json")
    invoke("augment", src, "-o", out, *FAST, "--shard-size", "2")
    assert read_samples(out) == ref


def test_inspect_names_a_corrupt_manifest_or_ledger(tmp_path, augmented):
    for name, content in [("manifest.json", b"{\"shards\": [1, 2"), ("manifest.json", b"[]"),
                          ("manifest.json", b"\xff\xfe\x00"), ("failures.jsonl", b"{\"key\": 1}\nnot json\n"),
                          ("failures.jsonl", b"\xff\xfe\n"), ("failures.jsonl", b"\"a string\"\n")]:
        out = tmp_path / f"case-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(augmented / "out", out)
        (out / name).write_bytes(content)
        r = invoke("inspect", out, "--verify", expect_ok=False)
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert f"PROBLEM  {out / name}" in r.output, r.output
        if name == "failures.jsonl":  # the summary reads the ledger: it still comes out, naming it
            r = invoke("inspect", out, "--json")
            assert any(str(out / name) in p for p in json.loads(r.output)["problems"])


def test_inspect_outputs_into_a_missing_folder_are_one_line(tmp_path, augmented):
    out = augmented / "out"
    key = next(iter(read_samples(out)))
    missing = tmp_path / "no" / "such"
    r = invoke("inspect", out, "--show", key, "--save-image", missing / "one.png", expect_ok=False)
    one_line_error(r, "cannot write", "one.png")
    r = invoke("inspect", out, "--preview", missing / "sheet.png", expect_ok=False)
    one_line_error(r, "cannot write", "sheet.png")
    r = invoke("inspect", out, "--preview", tmp_path / "sheet.unknownext", expect_ok=False)
    one_line_error(r, "cannot write", "sheet.unknownext")
    assert not missing.exists()


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_export_skips_a_key_too_long_for_the_file_system(tmp_path, photos):
    png = _png(photos["rocket"])
    samples = []
    for key in ("k" * 300, "short"):
        meta = {"key": key, "messages": [{"role": "user", "content": "<image>What is it?"},
                                         {"role": "assistant", "content": "A rocket."}],
                "images": [f"{key}.png"]}
        samples += [(f"{key}.png", png), (f"{key}.json", json.dumps(meta).encode())]
    shards = tmp_path / "shards"
    shards.mkdir()
    _crafted_tar(shards / "s-000-000000.tar", samples)
    r = invoke("export", shards, "-o", tmp_path / "lf", "--format", "llamafactory")
    assert "1 samples written" in r.output and "1 key too long for a file name" in r.output
    records = json.loads((tmp_path / "lf" / "ddaug.json").read_text())
    assert len(records) == 1 and all(os.path.exists(tmp_path / "lf" / p) for p in records[0]["images"])


@pytest.mark.parametrize("content", [b"{broken", b"[1, 2]", b"\xff\xfe"])
def test_export_refuses_a_broken_dataset_info_without_writing(tmp_path, augmented, content):
    lf = tmp_path / "lf"
    lf.mkdir()
    (lf / "dataset_info.json").write_bytes(content)
    r = invoke("export", augmented / "out", "-o", lf, "--format", "llamafactory", expect_ok=False)
    one_line_error(r, "dataset_info.json")
    assert (lf / "dataset_info.json").read_bytes() == content
    assert sorted(os.listdir(lf)) == ["dataset_info.json"]


# -- class 8: memory is bounded by a pixel cap -----------------------------------------------------
def test_images_above_the_pixel_cap_are_downsized_and_the_original_size_recorded(tmp_path, photo_dir, photos):
    out = tmp_path / "out"
    invoke("augment", photo_dir, "-o", out, *FAST, "--max-pixels", "1500")
    assert json.loads((out / "run.json").read_text())["config"]["max_pixels"] == 1500
    for members in read_samples(out).values():
        meta = sample_meta(members)
        src = meta["source"]["images"][0]
        img = Image.open(io.BytesIO(members["png"]))
        assert img.width * img.height <= 1500
        if src["width"] * src["height"] > 1500:
            assert src["resized_to"] == [img.width, img.height]
            assert abs(img.width / img.height - src["width"] / src["height"]) < 0.1
        else:
            assert "resized_to" not in src and img.size == (src["width"], src["height"])
    # The default is the documented bound, recorded in the folder's config.
    default = tmp_path / "default"
    invoke("augment", photo_dir, "-o", default, *FAST)
    assert json.loads((default / "run.json").read_text())["config"]["max_pixels"] == 4096 * 4096


@pytest.mark.parametrize("limit", [3000, 1500])  # 4096-pixel photos: Pillow warns (1-2x) or refuses (>2x)
def test_images_above_the_decode_limit_go_to_the_ledger_with_a_clear_reason(tmp_path, photo_dir, monkeypatch, limit):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    small = photo_dir / "sub" / "rocket.png"  # 41x33 = 1353 pixels: under the limit, written
    out = tmp_path / "out"
    r = invoke("augment", photo_dir, "-o", out, *FAST)
    assert "done 1" in r.output and "failed 3" in r.output
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert len(failures) == 3
    for f in failures:
        assert f["stage"] == "decode" and "image too large" in f["reason"]
        assert "decompression bomb limit" in f["reason"] and "downsize it first" in f["reason"]
    assert str(small) not in {f["source"] for f in failures}


# -- class 14: the manifest is kept up to date incrementally ---------------------------------------
def test_each_done_marker_is_read_once_and_workers_retries_still_agree(tmp_path, monkeypatch):
    import ddaug.shards.store as store
    from ddaug.shards.store import Failure, OutputFolder

    reads = []
    real_read = store._read_json
    monkeypatch.setattr(store, "_read_json", lambda p: reads.append(os.path.basename(p)) or real_read(p))

    from ddaug.shards.units import unit_name

    def commit(folder, unit, keys, failed=()):
        writer = folder.new_shard(unit)
        for k in keys:
            if k not in failed:
                writer.write(k, {"json": json.dumps({"key": k}).encode()})
        folder.commit_shard(unit, writer, covered_keys=list(keys),
                            failures=[Failure(k, f"/in/{k}", "decode", "broken") for k in failed], seconds=0.0)

    out = str(tmp_path / "out")
    workers = [OutputFolder(out, prefix="p", command="augment", config={}, run_info={}, join=True) for _ in (0, 1)]
    for i in range(20):  # two workers interleaved, every third shard with a failure
        keys = [f"k{i:02d}-{j}" for j in range(3)]
        commit(workers[i % 2], unit_name(0, i), keys, failed=keys[:1] if i % 3 == 0 else ())
    stats_reads = [n for n in reads if n.endswith(".stats.json")]
    assert len(stats_reads) <= 2 * 20, len(stats_reads)  # each worker reads each marker once, not per commit
    # A retry (a later plan round) that now succeeds takes the key out of the ledger.
    commit(workers[0], unit_name(1, 0), ["k00-0"])
    for f in workers:
        f.close()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    ledger = [json.loads(line) for line in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()]
    assert manifest["samples"] == 20 * 3 - 7 + 1 and manifest["failed"] == 6 == len(ledger)
    assert [s["name"] for s in manifest["shards"]][:2] == ["p-000-000000.tar", "p-000-000001.tar"]
    # In (round, unit) order, as a from-scratch rebuild lists them; k00-0 is no longer a failure.
    assert [f["key"] for f in ledger] == ["k03-0", "k06-0", "k09-0", "k12-0", "k15-0", "k18-0"]
    # A fresh process (a rerun) reading the folder from scratch writes the same summary.
    before = ((tmp_path / "out" / "manifest.json").read_bytes(), (tmp_path / "out" / "failures.jsonl").read_bytes())
    again = OutputFolder(out, prefix="p", command="augment", config={}, run_info={})
    again.refresh_summary()
    again.close()
    assert ((tmp_path / "out" / "manifest.json").read_bytes(),
            (tmp_path / "out" / "failures.jsonl").read_bytes()) == before
    assert all(os.path.exists(tmp_path / "out" / s["name"]) for s in manifest["shards"])


def test_plan_on_a_binary_recipe_is_one_line(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(b"\x8f\xff\x00binary")
    r = invoke("plan", recipe, expect_ok=False)
    one_line_error(r, "recipe", "not UTF-8")
