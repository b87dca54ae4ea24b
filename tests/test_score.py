"""`ddaug score`: answer-token losses on the tiny Qwen2-VL through the CLI, checked against a
hand computation; both backends; inspect's quantiles and plot; the recipe's keep in the loader."""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch
from PIL import Image

from conftest import invoke, read_samples, sample_meta


@pytest.fixture(scope="module")
def tiny_vlm_dir(tmp_path_factory):
    from ddaug.captioning import save_tiny_vlm

    return save_tiny_vlm(str(tmp_path_factory.mktemp("tiny-vlm")))


@pytest.fixture(scope="module")
def chats(tmp_path_factory, photos):
    """A LLaMA-Factory dataset: single- and multi-turn conversations on real photos, a text-only
    record, one without an answer and one whose image is broken."""
    root = tmp_path_factory.mktemp("chats")
    for name, arr in photos.items():
        Image.fromarray(arr).save(root / f"{name}.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    records = [
        {"messages": [{"role": "user", "content": "<image>Describe this image in detail."},
                      {"role": "assistant", "content": "A cat sits on a red sofa near the window."}],
         "images": ["chelsea.png"]},
        {"messages": [{"role": "user", "content": "<image>What is this?"},
                      {"role": "assistant", "content": "The photo shows a rocket on a launch pad."},
                      {"role": "user", "content": "And the sky?"},
                      {"role": "assistant", "content": "Under a clear blue sky."}],
         "images": ["rocket.png"]},
        {"messages": [{"role": "system", "content": "You describe photos."},
                      {"role": "user", "content": "详细描述图中有什么？<image>"},
                      {"role": "assistant", "content": "一杯咖啡放在木桌上，旁边有一个勺子。"}],
         "images": ["coffee.png"]},
        {"messages": [{"role": "user", "content": "<image>Describe this image in detail."},
                      {"role": "assistant", "content": "An astronaut in a white suit."}],
         "images": ["astronaut.png"]},
        {"messages": [{"role": "user", "content": "Say something."}, {"role": "assistant", "content": "Something."}]},
        {"messages": [{"role": "user", "content": "<image>Describe this image in detail."}], "images": ["cat.png"]},
        {"messages": [{"role": "user", "content": "<image>Describe."}, {"role": "assistant", "content": "Broken."}],
         "images": ["broken.png"]},
    ]
    (root / "chat.json").write_text(json.dumps(records, ensure_ascii=False))
    return root / "chat.json"


def _scores(folder) -> dict[str, dict]:
    return {k: sample_meta(m) for k, m in read_samples(folder).items()}


@functools.lru_cache(maxsize=1)
def _plain_model(model_dir: str):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoProcessor.from_pretrained(model_dir), AutoModelForImageTextToText.from_pretrained(model_dir).eval()


def _hand_loss(model_dir: str, meta: dict, images: list[Image.Image]) -> float:
    """Cross-entropy of the assistant tokens from the model's plain forward: the answer tokens of
    turn i are those between the conversation before it (with the generation prompt) and through it,
    counted by the processor itself."""
    from ddaug.scoring.conversation import template_messages

    proc, model = _plain_model(model_dir)
    chat = template_messages(meta["messages"])

    def count(msgs, gen):
        text = proc.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
        return proc(text=[text], images=[images] if images else None, return_tensors="pt")

    full = count(chat, False)
    labels = torch.full_like(full["input_ids"], -100)
    for i, m in enumerate(chat):
        if m["role"] == "assistant":
            start, end = count(chat[:i], True)["input_ids"].shape[1], count(chat[:i + 1], False)["input_ids"].shape[1]
            labels[0, start:end] = full["input_ids"][0, start:end]
    with torch.no_grad():
        logits = model(**full).logits
    return float(torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100))


def test_loss_is_the_cross_entropy_of_the_answers_and_batching_does_not_change_it(tmp_path, chats, tiny_vlm_dir):
    one, many = tmp_path / "one", tmp_path / "many"
    invoke("score", chats, "-o", one, "--vlm", tiny_vlm_dir, "--device", "cpu", "--batch-size", 1, "-q")
    result = invoke("score", chats, "-o", many, "--vlm", tiny_vlm_dir, "--device", "cpu", "--batch-size", 4, "-q")
    assert "done 5, skipped 0 (already done), failed 2" in result.output
    a, b = _scores(one), _scores(many)
    assert a.keys() == b.keys() and len(a) == 5
    for key, meta in a.items():
        assert abs(meta["score"]["loss"] - b[key]["score"]["loss"]) < 1e-4, key
        assert meta["score"]["tokens"] == b[key]["score"]["tokens"]
    by_text = {m["messages"][-1]["content"]: m for m in a.values()}
    photos = os.path.dirname(chats)
    for answer, photo in (("A cat sits on a red sofa near the window.", "chelsea"),
                          ("Under a clear blue sky.", "rocket"), ("一杯咖啡放在木桌上，旁边有一个勺子。", "coffee"),
                          ("Something.", None)):
        meta = by_text[answer]
        images = [Image.open(os.path.join(photos, f"{photo}.png")).convert("RGB")] if photo else []
        assert abs(meta["score"]["loss"] - _hand_loss(tiny_vlm_dir, meta, images)) < 1e-4, answer
        assert meta["score"]["perplexity"] == pytest.approx(2.718281828 ** meta["score"]["loss"], rel=1e-5)
    assert by_text["Under a clear blue sky."]["score"]["answers"] == 2
    ledger = [json.loads(line) for line in open(one / "failures.jsonl")]
    assert sorted(r["reason"].split(":")[0] for r in ledger) == ["broken image", "no assistant answer to score"]
    # The output is a dataset: it verifies, and a rerun resumes.
    invoke("inspect", one, "--verify")
    again = invoke("score", chats, "-o", one, "--vlm", tiny_vlm_dir, "--device", "cpu", "-q")
    assert "done 0, skipped 7 (already done)" in again.output


def test_image_gain_keeps_the_input_sample_and_inspect_summarises(tmp_path, shard_sets, tiny_vlm_dir):
    out = tmp_path / "scored"
    invoke("score", shard_sets["business"], "-o", out, "--vlm", tiny_vlm_dir, "--device", "cpu", "--image-gain",
           "--shard-size", 10, "-q")
    inputs = {m["source"]["images"][0]["sha256"]: (k, m) for k, m in
              ((k, sample_meta(v)) for k, v in read_samples(shard_sets["business"]).items())}
    scored = read_samples(out)
    assert len(scored) == 24
    for key, members in scored.items():
        meta = sample_meta(members)
        in_key, original = inputs[meta["source"]["images"][0]["sha256"]]
        image = next(s for s in members if s != "json")
        assert members[image] == read_samples(shard_sets["business"])[in_key][image]  # bytes unchanged
        assert meta["caption"] == original["caption"] and meta["messages"] == original["messages"]
        score = meta["score"]
        assert score["image_gain"] == pytest.approx(score["loss_blank"] - score["loss"], abs=2e-6)
        assert score["input"].endswith(f"#{in_key}")
        source = original["source"]["images"][0]
        assert score["model_images"] == [[source["width"], source["height"]]]  # under --max-pixels: as stored
    from ddaug.shards import MixedShardDataset, ShardSource

    gains = {k: sample_meta(m)["score"]["image_gain"] for k, m in scored.items()}
    by_gain = ShardSource("biz", str(out), keep=0.25, keep_by="image_gain")
    drawn = {s["key"] for s in MixedShardDataset([by_gain], decode=False, resampled=False)}
    assert drawn == set(sorted(gains, key=lambda k: -gains[k])[:6])  # the answers that need their image most
    report = invoke("inspect", out, "--verify", "--scores-plot", tmp_path / "scores.png")
    assert "score.loss       n 24" in report.output and "score.image_gain" in report.output
    with Image.open(tmp_path / "scores.png") as img:
        assert img.width > 1000  # three histograms side by side
    summary = json.loads(invoke("inspect", out, "--json").output)
    losses = sorted(sample_meta(m)["score"]["loss"] for m in scored.values())
    assert summary["scores"]["loss"]["min"] == round(losses[0], 4)
    assert summary["scores"]["loss"]["p50"] == round((losses[11] + losses[12]) / 2, 4)
    refused = invoke("inspect", shard_sets["general"], "--scores-plot", tmp_path / "none.png", expect_ok=False)
    assert refused.exit_code == 1 and "no scored samples" in refused.output


def test_recipe_keep_yields_only_the_kept_samples(tmp_path, shard_sets, tiny_vlm_dir):
    out = tmp_path / "scored"
    invoke("score", shard_sets["business"], "-o", out, "--vlm", tiny_vlm_dir, "--device", "cpu", "--shard-size", 6,
           "-q")
    losses = {k: sample_meta(m)["score"]["loss"] for k, m in read_samples(out).items()}
    ranked = sorted(losses, key=lambda k: (losses[k], k))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"seed: 0\nsources:\n  biz: {{paths: {out}, keep: 0.75}}\n  gen: {shard_sets['general']}\n"
                      "stages:\n  - {name: bulk, samples: 60, weights: {biz: 3, gen: 1}}\n"
                      "  - {name: polish, samples: 30, weights: {biz: 1}, keep: {biz: 0.5}}\n")
    from ddaug.shards import load_recipe

    seen: dict[str, set] = {"bulk": set(), "polish": set()}
    for sample in load_recipe(str(recipe)).dataset(decode=False):
        if sample["source"] == "biz":
            seen[sample["stage"]].add(sample["key"])
    assert seen["bulk"] == set(ranked[:18])      # the 6 highest-loss answers never drawn
    assert seen["polish"] == set(ranked[:9])     # half of those: the 9 lowest losses
    plan = invoke("plan", recipe).output
    assert f"keep 0.75: 18 samples with loss <= {round(losses[ranked[17]], 4)}" in plan
    assert "keep 0.375: 9 samples" in plan
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"sources:\n  gen: {{paths: {shard_sets['general']}, keep: 0.5}}\n"
                   "stages:\n  - {name: s, samples: 4, weights: {gen: 1}}\n")
    refused = invoke("plan", bad, expect_ok=False)
    assert refused.exit_code == 1 and "has no samples with a score.loss" in refused.output
    bad.write_text(f"sources:\n  biz: {{paths: {out}, keep: 1.5}}\nstages:\n  - {{name: s, samples: 4, weights: {{biz: 1}}}}\n")
    refused = invoke("plan", bad, expect_ok=False)
    assert refused.exit_code == 1 and "keep must be a fraction in (0, 1], not 1.5" in refused.output


@pytest.fixture
def no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def test_openai_backend_with_prompt_logprobs_matches_transformers(tmp_path, chats, tiny_vlm_dir, no_proxy):
    from ddaug.captioning.replies import Reply
    from ddaug.captioning.server import ChatServer
    from ddaug.scoring.transformers_scorer import TransformersScorer

    local = TransformersScorer(tiny_vlm_dir, device="cpu", dtype="fp32")
    never = lambda image, text, n: Reply("unused")  # noqa: E731
    local_out, served_out = tmp_path / "local", tmp_path / "served"
    invoke("score", chats, "-o", local_out, "--vlm", tiny_vlm_dir, "--device", "cpu", "--image-gain", "-q")
    with ChatServer(never, model="tiny", prompt_scorer=local.prompt_logprobs) as srv:
        srv.inject("500", "429")  # retried like caption's requests
        invoke("score", chats, "-o", served_out, "--backend", "openai", "--api-base", srv.url, "--vlm", "tiny",
               "--max-pixels", 1048576, "--image-gain", "--retry-backoff", 0, "-q")
        bodies = [json.loads(r["body"]) for r in srv.requests if r["fault"] is None]
    full = [b for b in bodies if "prompt_logprobs" in b]
    assert full and all(b["prompt_logprobs"] == 0 and b["add_generation_prompt"] is False for b in full)
    assert all(b["max_tokens"] == 1 for b in bodies) and any(b["add_generation_prompt"] for b in bodies)
    a, b = _scores(local_out), _scores(served_out)
    assert a.keys() == b.keys() and len(a) == 5
    for key in a:
        for field in ("loss", "tokens", "loss_blank"):
            assert b[key]["score"][field] == pytest.approx(a[key]["score"][field], abs=1e-4), (key, field)
        assert b[key]["score"]["backend"] == "openai"
    # A server without prompt logprobs (an OpenAI-compatible one other than vLLM) is one line.
    with ChatServer(never, model="tiny") as srv:
        refused = invoke("score", chats, "-o", tmp_path / "x", "--backend", "openai", "--api-base", srv.url,
                         "--vlm", "tiny", "-q", expect_ok=False)
    assert refused.exit_code == 1 and "returned no prompt_logprobs" in refused.output
    assert "Traceback" not in refused.output and not os.path.exists(tmp_path / "x" / "run.json")


def test_bad_options_are_one_line(tmp_path, chats):
    result = invoke("score", chats, "-o", tmp_path / "o", "--backend", "openai", expect_ok=False)
    assert result.exit_code == 1 and "--api-base is required" in result.output
    result = invoke("score", chats, "-o", tmp_path / "o", "--vlm", "no-such-model", expect_ok=False)
    assert result.exit_code == 2 and "--vlm" in result.output
    assert "Examples:" in invoke("score", "--help").output


def test_killed_run_leaves_no_partial_shard_and_the_rerun_completes(tmp_path, chats):
    """kill -9 with a finished shard written but not committed (just before its done marker's
    link, shards/units.py): the rerun redoes that unit and the folder equals an uninterrupted run's."""
    import signal
    import subprocess
    import sys

    args = ["score", chats, "-o", tmp_path / "out", "--vlm", "tiny-random", "--device", "cpu", "--shard-size", 2, "-q"]
    killed = subprocess.run([sys.executable, "-m", "ddaug", *map(str, args)], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "DDAUG_CRASH_AT": "stats-replace:2"}, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert "skipped 2 (already done)" in invoke(*args).output  # the uncommitted unit is redone
    invoke("score", chats, "-o", tmp_path / "ref", "--vlm", "tiny-random", "--device", "cpu", "--shard-size", 2, "-q")
    got, ref = _scores(tmp_path / "out"), _scores(tmp_path / "ref")
    assert {k: m["score"]["loss"] for k, m in got.items()} == {k: m["score"]["loss"] for k, m in ref.items()}
    assert not [p for p in os.listdir(tmp_path / "out") if ".tmp" in p]
    invoke("inspect", tmp_path / "out", "--verify")
