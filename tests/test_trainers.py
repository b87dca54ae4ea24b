"""Every reader docs/training.md names loads ddaug data with 1- and 2-image samples, a text-only
sample and mixed JPEG/PNG members, and gets every turn and every image: HF datasets (through
`export --format hf`), Megatron-Energon (the shipped sample type and cooker, `energon info`, `lint`
and `preview`), plain webdataset, the ddaug loader, and the LLaMA-Factory / ms-swift exports."""

from __future__ import annotations

import glob
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import decode, invoke, read_samples, sample_meta

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def mixed_set(tmp_path_factory, photos):
    """An `augment` shard set whose samples hold 1 image, 2 images (3 turns each way) or none."""
    root = tmp_path_factory.mktemp("mixed")
    (root / "imgs").mkdir()
    for name, arr in photos.items():
        Image.fromarray(arr).save(root / "imgs" / f"{name}.png")
    turns = [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "A photo."},
             {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]
    records = [
        {"id": "single", "messages": turns, "images": ["imgs/astronaut.png"]},
        {"id": "pair", "messages": [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "<image>Left, <image>right: same?"},
                                    {"role": "assistant", "content": "No."}, *turns[2:]],
         "images": ["imgs/coffee.png", "imgs/chelsea.png"]},
        {"id": "chat", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
        {"id": "rocket", "messages": [{"role": "user", "content": "<image>And this?"}, *turns[1:]],
         "images": ["imgs/rocket.png"]},
    ]
    (root / "data.json").write_text(json.dumps(records))
    out = root / "shards"
    invoke("augment", root / "data.json", "-o", out, "--model", "tiny-random", "--device", "cpu",
           "--shard-size", 2, "-q")
    return str(out)


def _expected(*folders) -> dict[str, dict]:
    """key -> {"messages", "images": [pixels]} from the tars, read with plain tarfile."""
    out = {}
    for folder in folders:
        for key, members in read_samples(folder).items():
            meta = sample_meta(members)
            out[key] = {"messages": meta["messages"],
                        "images": [decode(members[n[len(key) + 1:]]) for n in meta["images"]]}
    return out


def _same_images(got, want) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert np.array_equal(np.asarray(g.convert("RGB")), w)


def test_hf_export_loads_every_image(mixed_set, shard_sets, tmp_path):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "hf"
    result = invoke("export", mixed_set, shard_sets["business"], "-o", out, "--format", "hf", "-q")
    assert "28 samples written" in result.output
    ds = datasets.load_dataset("parquet", data_files=str(out / "ddaug.parquet"), split="train")
    want = _expected(mixed_set, shard_sets["business"])
    assert sorted(ds["key"]) == sorted(want)
    counts = set()
    for row in ds:
        _same_images(row["images"], want[row["key"]]["images"])
        assert row["messages"] == want[row["key"]]["messages"]
        assert json.loads(row["json"])["key"] == row["key"]
        counts.add(len(row["images"]))
    assert counts == {0, 1, 2}
    assert {row["tags"]["task"] for row in ds} >= {"text-only", "conversation", "caption"}
    # the business set mixes JPEG and PNG members: both arrive
    formats = {json.loads(r)["source"]["images"][0]["format"] for r, k in zip(ds["json"], ds["key"])
               if json.loads(r)["tags"]["task"] == "caption"}
    assert formats == {"JPEG", "PNG"}


def _energon_export(mixed_set, tmp_path):
    pytest.importorskip("megatron.energon")
    out = tmp_path / "energon"
    invoke("export", mixed_set, "-o", out, "--format", "energon", "-q")
    return out


def _energon_samples(path, task_encoder=None):
    from megatron.energon import DefaultTaskEncoder, WorkerConfig, get_loader, get_train_dataset

    class KeepSamples(type(task_encoder) if task_encoder else DefaultTaskEncoder):
        def batch(self, samples):
            return samples

    encoder = KeepSamples()
    ds = get_train_dataset(str(path), worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0),
                           batch_size=2, shuffle_buffer_size=None, max_samples_per_sequence=None,
                           task_encoder=encoder, repeat=False)
    return [s for batch in get_loader(ds) for s in batch]


def _check_energon(samples, want):
    from ddaug.shards.energon import DdaugChatSample

    assert sorted(s.__key__ for s in samples) == sorted(want)
    for s in samples:
        assert isinstance(s, DdaugChatSample)
        assert s.messages == want[s.__key__]["messages"]  # every turn, the system turn too
        assert len(s.images) == len(want[s.__key__]["images"])
        for tensor, pixels in zip(s.images, want[s.__key__]["images"]):  # CHW float in [0, 1]
            assert np.array_equal((tensor.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), pixels)
    assert sorted(len(s.images) for s in samples) == [0, 1, 1, 2]


def test_energon_sample_type_loads_every_turn_and_image(mixed_set, tmp_path):
    out = _energon_export(mixed_set, tmp_path)
    _check_energon(_energon_samples(out), _expected(mixed_set))
    # energon's own CLI reads the export: info names the sample type, lint reads every sample
    env = {**os.environ, "PYTHONPATH": REPO}
    cli = [sys.executable, "-m", "megatron.energon.cli.main"]
    info = subprocess.run(cli + ["info", str(out)], capture_output=True, text=True, env=env)
    assert info.returncode == 0, info.stderr[-2000:]
    assert "DdaugChatSample" in info.stdout and "4 samples" in info.stdout
    lint = subprocess.run(cli + ["lint", str(out)], capture_output=True, text=True, env=env)
    assert lint.returncode == 0, (lint.stdout + lint.stderr)[-2000:]
    preview = subprocess.run(cli + ["preview", str(out)], input="n\n", capture_output=True, text=True, env=env)
    assert preview.returncode == 0 and "messages (list)" in preview.stdout, preview.stderr[-2000:]


def test_energon_cooker_on_a_crude_dataset(mixed_set, tmp_path):
    from megatron.energon import DefaultTaskEncoder

    from ddaug.shards.energon import ddaug_cooker

    out = _energon_export(mixed_set, tmp_path)
    # what `energon prepare --sample-type CrudeWebdataset` writes (older ddaug exports)
    (out / ".nv-meta" / "dataset.yaml").write_text(
        "__module__: megatron.energon\n__class__: CrudeWebdataset\nsubflavors: {}\n")

    class Cooked(DefaultTaskEncoder):
        cookers = [ddaug_cooker]

    _check_energon(_energon_samples(out, Cooked()), _expected(mixed_set))


def test_plain_webdataset_and_ddaug_loader(mixed_set):
    import webdataset as wds

    from ddaug.shards import MixedShardDataset

    want = _expected(mixed_set)
    tars = sorted(glob.glob(os.path.join(mixed_set, "*.tar")))
    # plain webdataset: the json lists the image members in <image> order
    for s in wds.WebDataset(tars, shardshuffle=False).decode("pil"):
        images = [s[name[len(s["__key__"]) + 1:]] for name in s["json"]["images"]]
        _same_images(images, want[s["__key__"]]["images"])
    ds = MixedShardDataset({"general": mixed_set}, seed=0, rank=0, world_size=1)
    got = {s["key"]: s for s in ds}
    assert set(got) == set(want)
    for key, s in got.items():
        _same_images(s["images"], want[key]["images"])
        assert s["messages"] == want[key]["messages"]


def test_llamafactory_and_swift_exports_keep_imageless_and_multi_image_samples(mixed_set, tmp_path):
    want = _expected(mixed_set)
    invoke("export", mixed_set, "-o", tmp_path / "lf", "--format", "llamafactory", "-q")
    records = json.load(open(tmp_path / "lf" / "ddaug.json"))
    invoke("export", mixed_set, "-o", tmp_path / "swift", "--format", "swift", "-q")
    rows = [json.loads(x) for x in open(tmp_path / "swift" / "ddaug.jsonl")]
    for recs, root in ((records, tmp_path / "lf"), (rows, tmp_path / "swift")):
        assert sorted(len(r["images"]) for r in recs) == [0, 1, 1, 2]
        for r in recs:
            key = next(k for k, w in want.items() if w["messages"] == r["messages"] and len(w["images"]) == len(r["images"]))
            _same_images([Image.open(os.path.join(root, p)) for p in r["images"]], want[key]["images"])
