"""`ddaug export`: LLaMA-Factory (json, jsonl, parquet), ms-swift and Megatron-Energon, and
crafted tar keys that try to write outside the output folder."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest
from PIL import Image

from conftest import invoke, read_samples


def _check_llamafactory_records(records, root):
    for rec in records:
        tags = sum(m["content"].count("<image>") for m in rec["messages"])
        assert tags == len(rec["images"]) >= 1
        assert {m["role"] for m in rec["messages"]} <= {"system", "user", "assistant"}
        for path in rec["images"]:
            assert Image.open(os.path.join(root, path)).size[0] > 0


def test_llamafactory_json_jsonl_and_dataset_info(shard_sets, tmp_path):
    out = tmp_path / "lf"
    invoke("export", shard_sets["business"], shard_sets["general"], "-o", out, "--format", "llamafactory", "-q")
    records = json.load(open(out / "ddaug.json"))
    assert len(records) == 28
    _check_llamafactory_records(records, out)
    invoke("export", shard_sets["general"], "-o", out, "--format", "llamafactory", "--jsonl", "--name", "gen", "-q")
    lines = [json.loads(x) for x in open(out / "gen.jsonl")]
    assert len(lines) == 4
    info = json.load(open(out / "dataset_info.json"))
    assert set(info) == {"ddaug", "gen"}  # a second export adds its entry
    assert info["gen"] == {"file_name": "gen.jsonl", "formatting": "sharegpt",
                           "columns": {"messages": "messages", "images": "images"},
                           "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                    "assistant_tag": "assistant", "system_tag": "system"}}
    # the exported image is the shard's image, byte for byte
    samples = read_samples(shard_sets["general"])
    rec = lines[0]
    key = os.path.basename(rec["images"][0]).split(".")[0]
    assert open(out / rec["images"][0], "rb").read() == samples[key]["png"]


def test_llamafactory_parquet_embeds_image_bytes(shard_sets, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "lf"
    invoke("export", shard_sets["business"], "-o", out, "--format", "llamafactory", "--embed", "-q")
    table = pq.read_table(out / "ddaug.parquet").to_pylist()
    assert len(table) == 24 and not (out / "images").exists()
    for row in table:
        assert len(row["images"]) == row["messages"][0]["content"].count("<image>") == 1
        Image.open(io.BytesIO(row["images"][0]["bytes"])).load()
    assert json.load(open(out / "dataset_info.json"))["ddaug"]["file_name"] == "ddaug.parquet"


def test_swift_jsonl_has_channels(shard_sets, tmp_path):
    out = tmp_path / "swift"
    invoke("export", shard_sets["business"], shard_sets["general"], "-o", out, "--format", "swift", "-q")
    rows = [json.loads(x) for x in open(out / "ddaug.jsonl")]
    assert len(rows) == 28
    assert {r["channel"] for r in rows} == {"business", "general"}
    for r in rows:
        assert all(os.path.isabs(p) and os.path.exists(p) for p in r["images"])
        assert r["messages"][-1]["role"] == "assistant"


def test_energon_prepare_and_load(shard_sets, tmp_path):
    energon = pytest.importorskip("megatron.energon")
    out = tmp_path / "energon"
    invoke("export", shard_sets["business"], shard_sets["general"], "-o", out, "--format", "energon", "-q")
    assert (out / ".nv-meta" / "index.sqlite").exists() and (out / ".nv-meta" / "dataset.yaml").exists()

    @energon.stateless
    def cook(raw):
        meta = raw["json"]
        image = next(v for k, v in raw.items() if k in ("png", "jpg", "webp"))
        return energon.VQASample(**energon.basic_sample_keys(raw), image=image,
                                 context=meta["messages"][0]["content"], answers=[meta["messages"][1]["content"]])

    class ChatEncoder(energon.DefaultTaskEncoder):
        cookers = [energon.Cooker(cook)]

        def batch(self, samples):
            return samples

    ds = energon.get_train_dataset(str(out), worker_config=energon.WorkerConfig(rank=0, world_size=1, num_workers=0),
                                   batch_size=4, shuffle_buffer_size=None, max_samples_per_sequence=None,
                                   task_encoder=ChatEncoder(), repeat=False)
    keys = [s.__key__ for batch in energon.get_loader(ds) for s in batch]
    assert len(keys) == 28 == len(set(keys))


def _crafted_tar(path, names):
    with tarfile.open(path, "w") as tf:
        for name, data in names:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("fmt", ["llamafactory", "swift"])
def test_crafted_keys_never_escape_the_output_folder(tmp_path, photos, fmt):
    buf = io.BytesIO()
    Image.fromarray(photos["rocket"]).save(buf, format="PNG")
    png = buf.getvalue()

    def meta(key):
        return json.dumps({"key": key, "images": [f"{key}.png"],
                           "messages": [{"role": "user", "content": "<image>Q"},
                                        {"role": "assistant", "content": "A"}]}).encode()

    evil = tmp_path / "evil.tar"
    _crafted_tar(evil, [("../../escape.png", png), ("../../escape.json", meta("../../escape")),
                        ("/tmp/abs_escape.png", png), ("/tmp/abs_escape.json", meta("/tmp/abs_escape")),
                        ("good.png", png), ("good.json", meta("good"))])
    out = tmp_path / "deep" / "out"
    result = invoke("export", evil, "-o", out, "--format", fmt, "-q")
    assert "1 samples written" in result.output and "unsafe key" in result.output
    assert not (tmp_path / "escape.png").exists() and not (tmp_path / "deep" / "escape.png").exists()
    assert not os.path.exists("/tmp/abs_escape.png")
    written = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "deep") for f in fs]
    assert all(os.path.realpath(p).startswith(os.path.realpath(out)) for p in written)


def test_export_bad_flag_combination_is_one_line(shard_sets, tmp_path):
    r = invoke("export", shard_sets["general"], "-o", tmp_path / "x", "--format", "swift", "--embed", expect_ok=False)
    assert r.exit_code == 2 and "--embed" in r.output and "Traceback" not in r.output
    r = invoke("export", tmp_path / "nothing", "-o", tmp_path / "x", "--format", "swift", expect_ok=False)
    assert r.exit_code == 1 and "no such shard" in r.output
