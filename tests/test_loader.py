"""The trainer's side: mixing, stages, splitting, resume, robustness, collator, recipes, and
reading ddaug shards with plain webdataset and HF datasets."""

from __future__ import annotations

import collections
import glob
import json
import logging
import os
import shutil

import pytest
import torch
from PIL import Image

from ddaug.captioning import builtin_pool
from conftest import invoke
from ddaug.shards import CheckpointableLoader, ChatCollator, LoaderError, MixedShardDataset, TrainingStage


def _keys(samples):
    return [s["key"] for s in samples]


def test_mix_ratio_over_11000_samples_is_within_one_point(shard_sets):
    ds = MixedShardDataset(shard_sets, stages=[TrainingStage("mix", {"business": 10, "general": 1}, samples=11000)],
                           decode=False, seed=3)
    counts = collections.Counter()
    for s in ds:
        counts[s["source"]] += 1
        assert s["tags"]["domain"] == s["source"]  # each sample comes from the set it says
    assert sum(counts.values()) == 11000
    assert abs(counts["business"] / 11000 - 10 / 11) < 0.01


def test_samples_look_like_llamafactory_records(shard_sets):
    ds = MixedShardDataset(shard_sets, weights={"business": 1, "general": 1}, seed=0)
    sample = next(iter(ds))
    assert set(sample) >= {"key", "images", "messages", "tags", "source", "stage", "meta"}
    assert isinstance(sample["images"][0], Image.Image) and sample["images"][0].mode == "RGB"
    assert sample["messages"][0]["content"].count("<image>") == len(sample["images"])
    raw = next(iter(MixedShardDataset(shard_sets, weights={"business": 1, "general": 1}, seed=0, decode=False)))
    assert raw["key"] == sample["key"] and isinstance(raw["images"][0], bytes)


def test_stages_switch_and_rewrite_caption_questions(shard_sets):
    stages = [TrainingStage("bulk", {"business": 1}, samples=30),
              TrainingStage("polish", {"business": 1, "general": 1}, samples=20, questions="stage2")]
    ds = MixedShardDataset(shard_sets, stages=stages, decode=False, seed=1)
    out = list(ds)
    assert [s["stage"] for s in out] == ["bulk"] * 30 + ["polish"] * 20
    stage1 = {q.text for lang in ("en", "zh") for q in builtin_pool(lang, "stage1")}
    stage2 = {q.text: q.lang for lang in ("en", "zh") for q in builtin_pool(lang, "stage2")}
    for s in out:
        question = s["messages"][0]["content"].removeprefix("<image>")
        if s["stage"] == "bulk":
            assert question in stage1
        elif s["source"] == "business":
            assert stage2[question] == s["meta"]["caption"]["lang"]  # same language, new wording
        else:
            assert question == s["meta"]["messages"][0]["content"].removeprefix("<image>")  # not a caption
    assert ds.stage_at(0).name == "bulk" and ds.stage_at(29).name == "bulk" and ds.stage_at(30).name == "polish"


@pytest.mark.parametrize("source", ["business", "general"])  # 8 shards >= 4 slots; 2 shards < 4 slots
def test_ranks_and_workers_split_an_epoch_without_duplicates(shard_sets, source):
    seen = []
    for rank in (0, 1):
        ds = MixedShardDataset({source: shard_sets[source]}, rank=rank, world_size=2, decode=False, seed=5)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        seen += [s["key"] for s in loader]
    expected = 24 if source == "business" else 4
    assert len(seen) == expected and len(set(seen)) == expected


def test_set_epoch_reshuffles_and_resampled_is_endless(shard_sets):
    ds = MixedShardDataset({"business": shard_sets["business"]}, decode=False, seed=2)
    first = _keys(ds)
    ds.set_epoch(1)
    second = _keys(ds)
    assert sorted(first) == sorted(second) and first != second
    endless = MixedShardDataset(shard_sets, weights={"business": 10, "general": 1}, decode=False, resampled=True)
    it = iter(endless)
    assert len([next(it) for _ in range(200)]) == 200  # more than the 28 samples there are


def _collate_keys(samples):
    return [(s["key"], s["stage"]) for s in samples]


def _staged(shard_sets):
    return MixedShardDataset(shard_sets, stages=[TrainingStage("a", {"business": 10, "general": 1}, samples=60),
                                                 TrainingStage("b", {"business": 1, "general": 1}, samples=40)],
                             decode=False, seed=7)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_state_dict_continues_exactly(shard_sets, workers):
    reference = [b for b in CheckpointableLoader(_staged(shard_sets), batch_size=4, num_workers=workers,
                                                 collate_fn=_collate_keys)]
    assert sum(len(b) for b in reference) == 100  # each worker ends on its own partial batch
    loader = CheckpointableLoader(_staged(shard_sets), batch_size=4, num_workers=workers, collate_fn=_collate_keys)
    it = iter(loader)
    head = [next(it) for _ in range(17)]  # an odd count: the next batch is worker 1's turn, in stage "b"
    state = json.loads(json.dumps(loader.state_dict()))  # as saved with a checkpoint
    del it
    resumed = CheckpointableLoader(_staged(shard_sets), batch_size=4, num_workers=workers, collate_fn=_collate_keys)
    resumed.load_state_dict(state)
    assert head + list(resumed) == reference


def test_resume_refuses_a_different_layout(shard_sets):
    loader = CheckpointableLoader(_staged(shard_sets), batch_size=4, num_workers=2, collate_fn=_collate_keys)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    del it
    other = CheckpointableLoader(_staged(shard_sets), batch_size=4, num_workers=1, collate_fn=_collate_keys)
    other.load_state_dict(state)
    with pytest.raises(LoaderError, match="num_workers"):
        list(other)


def test_corrupt_shards_and_samples_are_skipped_then_capped(shard_sets, tmp_path, caplog):
    broken = tmp_path / "broken"
    shutil.copytree(shard_sets["business"], broken)
    shards = sorted(glob.glob(str(broken / "*.tar")))
    data = open(shards[0], "rb").read()
    open(shards[0], "wb").write(data[:len(data) // 3])        # truncated tar
    raw = bytearray(open(shards[1], "rb").read())
    at = raw.find(b'{"caption"')
    raw[at:at + 5] = b"#####"                                  # one json that does not parse
    open(shards[1], "wb").write(bytes(raw))
    with caplog.at_level(logging.WARNING):
        keys = _keys(MixedShardDataset({"business": str(broken)}, decode=False))
    assert 18 <= len(keys) <= 22 and len(set(keys)) == len(keys)  # lost: the tail of shard 0, one json
    assert "skipping" in caplog.text and os.path.basename(shards[0]) in caplog.text
    # every sample broken: the loader stops with a clear error after the cap
    for shard in shards:
        raw = bytearray(open(shard, "rb").read())
        for i in range(len(raw) - 10):
            if raw[i:i + 10] == b'{"caption"':
                raw[i:i + 2] = b"##"
        open(shard, "wb").write(bytes(raw))
    with pytest.raises(LoaderError, match="consecutive"):
        list(MixedShardDataset({"business": str(broken)}, decode=False, max_consecutive_failures=3))


def test_collator_masks_everything_but_assistant_tokens(shard_sets, tmp_path):
    from transformers import AutoProcessor

    from ddaug.captioning import save_tiny_vlm

    processor = AutoProcessor.from_pretrained(save_tiny_vlm(str(tmp_path / "vlm")))
    ds = MixedShardDataset(shard_sets, weights={"business": 1, "general": 1}, seed=4)
    samples = [s for _, s in zip(range(3), ds)]
    samples[1]["messages"] = [{"role": "system", "content": "You are careful."}] + samples[1]["messages"] + [
        {"role": "user", "content": "And the colours?"}, {"role": "assistant", "content": "Mostly grey."}]
    batch = ChatCollator(processor)(samples)
    ids, labels = batch["input_ids"], batch["labels"]
    assert labels.shape == ids.shape and "pixel_values" in batch
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    for b, s in enumerate(samples):
        kept = labels[b][labels[b] != -100]
        answers = [m["content"] for m in s["messages"] if m["role"] == "assistant"]
        assert tok.decode(kept) == "".join(a + "<|im_end|>\n" for a in answers)
        assert not (labels[b][ids[b] == image_id] != -100).any()
        assert (labels[b][batch["attention_mask"][b] == 0] == -100).all()


def test_plain_webdataset_and_hf_datasets_read_the_shards(shard_sets):
    import webdataset as wds

    tars = sorted(glob.glob(os.path.join(shard_sets["business"], "*.tar")))
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("pil"))
    assert len(samples) == 24
    for s in samples:
        img_key = "png" if "png" in s else "jpg"
        assert s[img_key].size[0] > 0 and s["json"]["messages"][0]["content"].startswith("<image>")
    # HF's webdataset builder needs the same member types in every sample: true of augment
    # output (one --image-format); caption output keeps each input's format (here png + jpg).
    datasets = pytest.importorskip("datasets")
    general = sorted(glob.glob(os.path.join(shard_sets["general"], "*.tar")))
    hf = datasets.load_dataset("webdataset", data_files={"train": general}, split="train")
    assert len(hf) == 4 and isinstance(hf[0]["json"], dict) and hf[0]["png"].size[0] > 0


def test_recipe_plan_cli(shard_sets, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
seed: 0
global_batch_size: 4
sources:
  business: {shard_sets['business']}
  general: [{shard_sets['general']}]
stages:
  - name: bulk
    samples: 110
    weights: {{business: 10, general: 1}}
  - name: polish
    steps: 10
    weights: {{business: 1, general: 1}}
    questions: stage2
""")
    plan = json.loads(invoke("plan", recipe, "--json").output)
    assert plan["source_sizes"] == {"business": 24, "general": 4}
    bulk, polish = plan["stages"]
    assert bulk["sources"]["business"]["samples"] == 100 and bulk["sources"]["general"]["samples"] == 10
    assert polish["samples"] == 40 and polish["sources"]["general"]["epochs_after"] == pytest.approx(7.5)
    text = invoke("plan", recipe).output
    assert "stage polish: 40 samples" in text and "stage2" in text
    from ddaug.shards import load_recipe

    ds = load_recipe(str(recipe)).dataset(decode=False)
    assert [s["stage"] for s in ds].count("polish") == 40
    recipe.write_text("sources: {a: nowhere}\nstages: [{weights: {a: 1}}]\n")
    bad = invoke("plan", recipe, expect_ok=False)
    assert bad.exit_code == 1 and "nowhere" in bad.output and "Traceback" not in bad.output


def test_readme_training_script_under_accelerate_two_processes(shard_sets, tmp_path):
    """docs/training.md's example: 2 processes on CPU, a 10:1 mix over two shard sets, a stage switch."""
    import subprocess
    import sys

    from ddaug.captioning import save_tiny_vlm

    vlm = save_tiny_vlm(str(tmp_path / "vlm"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
seed: 0
sources: {{business: {shard_sets['business']}, general: {shard_sets['general']}}}
stages:
  - {{name: bulk, samples: 88, weights: {{business: 10, general: 1}}}}
  - {{name: polish, samples: 24, weights: {{business: 5, general: 1}}, questions: stage2}}
""")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           os.path.join(root, "examples", "train_mix.py"), str(recipe), "--vlm", vlm, "--cpu",
           "--report", str(tmp_path / "report")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": root}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.load(open(tmp_path / f"report.{r}")) for r in (0, 1)]
    total = collections.Counter()
    for rep in reports:
        total.update(rep["counts"])
        assert rep["stages"] == ["bulk", "polish"] and rep["state_slots"] == 2
    assert total["bulk/business"] + total["bulk/general"] == 88
    assert total["polish/business"] + total["polish/general"] == 24
    assert 70 <= total["bulk/business"] <= 86
    # Ranks and workers split each epoch of a source: over both ranks every business image is
    # seen about as often as every other (slots may be up to one epoch apart).
    seen = collections.Counter(k for rep in reports for k in rep["keys"] if k.startswith("biz"))
    assert len(seen) == 24 and max(seen.values()) - min(seen.values()) <= 2
