"""`ddaug translate` against the local chat server's deterministic translator: protected spans and
images survive byte for byte, each check fires on the fault made for it, --mix-original keeps
both versions, detection tags each sample, bad flags are one line, and a run killed mid-shard
resumes without a half-written shard under its final name."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ddaug.captioning.replies import Reply
from ddaug.captioning.server import ChatServer, TranslationResponder
from conftest import invoke, read_samples, sample_meta

CODE_BLOCK = "```python\nprint('keep me')\n```"
PROTECTED = ["<image>", CODE_BLOCK, "`x = 3`", "https://example.com/cats?id=7", "bob.smith@example.org", "1,024",
             '{"box": [10, 20, 30, 40], "label": "cat"}', "2.5"]


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def _dataset(folder, photos, conversations: list[list[tuple[str, str]]], with_images: bool = True) -> str:
    """A LLaMA-Factory json: one record per conversation of (user, assistant) text; records with
    <image> in their first turn get a photo (PNG and JPEG in turn)."""
    folder.mkdir(exist_ok=True)
    records = []
    for i, turns in enumerate(conversations):
        messages = [{"role": role, "content": text} for user, answer in turns
                    for role, text in (("user", user), ("assistant", answer))]
        record = {"id": f"rec{i}", "messages": messages}
        if with_images and "<image>" in turns[0][0]:
            name = f"img{i}.{'png' if i % 2 else 'jpg'}"
            arr = list(photos.values())[i % len(photos)]
            Image.fromarray(np.ascontiguousarray(arr)).save(folder / name, **({} if i % 2 else {"quality": 90}))
            record["images"] = [name]
        records.append(record)
    path = folder / "data.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return str(path)


def _translate(inputs, out, url, *extra, expect_ok=True):
    return invoke("translate", inputs, "-o", out, "--to", "zh", "--model", "m", "--api-base", url, "-q",
                  "--retry-backoff", 0, *extra, expect_ok=expect_ok)


def _by_original(out) -> dict[str, dict]:
    return {sample_meta(m)["translate"].get("original_key", k): {"meta": sample_meta(m), "members": m}
            for k, m in read_samples(out).items()}


def _failures(out) -> dict[str, str]:
    path = os.path.join(out, "failures.jsonl")
    if not os.path.exists(path):
        return {}
    return {json.loads(line)["key"]: json.loads(line)["reason"] for line in open(path, encoding="utf-8")}


def test_protected_spans_and_images_come_through_unchanged(tmp_path, photos):
    conversations = [
        [("<image>What is in this picture? Describe it in detail.",
          f"A cat sits on a red sofa near the window. It weighs {PROTECTED[7]} kilos.\n{CODE_BLOCK}\n"
          f"Call `x = 3`, visit {PROTECTED[3]}, or email {PROTECTED[4]}.")],
        [("<image>How many cats are there?", f"There are {PROTECTED[5]} cats: {PROTECTED[6]}."),
         ("Is the sofa blue?", "No, the sofa is red.")],
        [("Describe a rocket in the sky.", "A rocket in the blue sky, with a man and a woman near a table.")],
    ]
    data = _dataset(tmp_path / "in", photos, conversations)
    with ChatServer(TranslationResponder(), model="m", parallel=True) as srv:
        result = _translate(data, tmp_path / "out", srv.url, "--concurrency", 4)
        sent = [json.loads(r["body"]) for r in srv.requests]
    assert "done 3" in result.output and "failed 0" in result.output, result.output
    # The model never saw a protected span, only the placeholders and the instruction to keep them.
    for body in sent:
        system, user = body["messages"]
        assert system["role"] == "system" and "[[P1]]" in system["content"] and "Simplified Chinese" in system["content"]
        assert not any(span in user["content"] for span in PROTECTED), user["content"]
    samples = _by_original(tmp_path / "out")
    assert len(samples) == 3
    records = json.loads(open(data, encoding="utf-8").read())
    for record in records:
        key = next(k for k in samples if k.startswith(record["id"]))
        meta, members = samples[key]["meta"], samples[key]["members"]
        assert meta["key"] == f"{key}-zh"
        before = "\n".join(m["content"] for m in record["messages"])
        after = "\n".join(m["content"] for m in meta["messages"])
        for span in PROTECTED:  # each span, as often as before
            assert after.count(span) == before.count(span), span
        assert [m["role"] for m in meta["messages"]] == [m["role"] for m in record["messages"]]
        assert after != before and sum("\u4e00" <= ch <= "\u9fff" for ch in after) > 10
        block = meta["translate"]
        assert (block["source_lang"], block["source_detected"], block["target_lang"], block["model"]) == \
            ("en", True, "zh", "m")
        assert block["checks"]["image_tags"]["ok"] and block["checks"]["target_share"]["value"] == 1.0
        assert block["checks"]["length_ratio"]["band"] == [0.2, 0.8] and block["checks"]["length_ratio"]["ok"]
        assert meta["tags"]["lang"] == "zh"
        if record.get("images"):  # the original bytes, not re-encoded
            (ext,) = [s for s in members if s != "json"]
            assert members[ext] == (tmp_path / "in" / record["images"][0]).read_bytes()
            assert meta["source"]["images"][0]["sha256"]
        else:
            assert set(members) == {"json"} and meta["tags"]["task"] == "text-only"
    invoke("inspect", tmp_path / "out", "--verify")


FAULT_CASES = {  # trigger word -> (fault, what the ledger says)
    "zebra": ("drop-placeholder", "placeholder [[P3]] lost"),
    "parrot": ("duplicate-placeholder", "placeholder [[P1]] duplicated"),
    "tiger": ("swap-placeholders", "placeholders reordered"),
    "lemur": ("source-language", "Simplified Chinese share 0.23 below 0.5 (script)"),  # 1 turn of 2 in English
    "koala": ("empty", "empty translation"),
    "otter": ("add-image-tag", "2 <image> tags after translation for 1 before"),
    "gecko": ("repeat", "length ratio"),
}


def test_each_check_fires_on_its_fault_and_a_500_is_retried(tmp_path, photos):
    good = [("<image>What is in this picture?", "A cat sits on a red sofa near the window, 2 cups.")]
    # Full-width brackets around a placeholder are still that placeholder: not a fault.
    wide = [("<image>Is there a panda near 3 cups?", "Yes, 2 cups.")]
    faulty = [[(f"<image>Is there a {word} near 3 cups and 4 plates?", "Yes, it sits near the window.")]
              for word in FAULT_CASES]
    data = _dataset(tmp_path / "in", photos, [good] + faulty + [wide])
    responder = TranslationResponder(faults={"panda": "full-width-placeholders",
                                             **{word: fault for word, (fault, _) in FAULT_CASES.items()}})
    with ChatServer(responder, model="m") as srv:
        srv.inject("500")  # the first request fails once; its retry succeeds
        result = _translate(data, tmp_path / "out", srv.url, "--concurrency", 1)
        assert srv.requests[0]["fault"] == "500"
    assert f"done 2, skipped 0 (already done), failed {len(FAULT_CASES)}" in result.output, result.output
    assert "placeholder retries 3" in result.output  # lost, duplicated, reordered: asked once more each
    failures = _failures(tmp_path / "out")
    records = json.loads(open(data, encoding="utf-8").read())
    for record in records[1:-1]:
        word = record["messages"][0]["content"].split()[3]
        (key,) = [k for k in failures if k.startswith(record["id"] + "-")]
        assert FAULT_CASES[word][1] in failures[key], (word, failures[key])
    translated = {s["meta"]["translate"]["original_key"].split("-")[0]: s["meta"]
                  for s in _by_original(tmp_path / "out").values()}
    assert set(translated) == {"rec0", f"rec{len(records) - 1}"}
    assert translated[f"rec{len(records) - 1}"]["messages"][0]["content"].startswith("<image>")
    invoke("inspect", tmp_path / "out", "--verify")


def test_a_latin_target_is_checked_by_language_id(tmp_path, photos):
    """English to German shares a script: py3langid tells a reply left in English, whose length
    is within the en->de band, from a German one."""
    german = "Die Katze sitzt auf dem roten Sofa neben dem Fenster und schaut hinaus."

    def respond(image, text, max_tokens):
        return Reply(text if "parrot" in text else german)

    data = _dataset(tmp_path / "in", photos, [[("Describe the cat on the sofa, please.", "The cat sits on the red sofa.")],
                                              [("Describe the parrot on the sofa, please.", "The parrot sits on a sofa.")]])
    with ChatServer(respond, model="m") as srv:
        invoke("translate", data, "-o", tmp_path / "out", "--to", "de", "--from", "en", "--model", "m",
               "--api-base", srv.url, "-q")
    (reason,) = _failures(tmp_path / "out").values()
    assert reason == "German share 0.00 below 0.5 (langid)", reason
    (sample,) = _by_original(tmp_path / "out").values()
    block = sample["meta"]["translate"]
    assert block["source_detected"] is False and block["checks"]["target_share"] == \
        {"value": 1.0, "min": 0.5, "method": "langid", "ok": True}


def test_mix_original_keeps_both_and_detection_tags_each(tmp_path, photos):
    conversations = [
        [("<image>What is in this picture?", "A cat sits on a red sofa near the window.")],
        [("这张图片里有什么？", "一只猫坐在靠近窗户的红色沙发上。")],
        [("Was zeigt dieses Bild?", "Eine Katze sitzt auf einem roten Sofa am Fenster.")],
    ]
    data = _dataset(tmp_path / "in", photos, conversations)
    with ChatServer(TranslationResponder(), model="m") as srv:
        mixed = _translate(data, tmp_path / "mixed", srv.url, "--mix-original")
        alone = _translate(data, tmp_path / "alone", srv.url)
    assert "done 5" in mixed.output and "failed 1" in mixed.output, mixed.output
    samples = read_samples(tmp_path / "mixed")
    langs = {k: (sample_meta(m)["tags"]["lang"], sample_meta(m)["translate"].get("role")) for k, m in samples.items()}
    en, zh, de = (next(k for k in samples if k.startswith(f"rec{i}-") and not k.endswith("-zh")) for i in range(3))
    assert langs[en] == ("en", "original") and langs[f"{en}-zh"] == ("zh", None)
    assert langs[zh] == ("zh", "original") and f"{zh}-zh" not in samples  # already Chinese: kept once
    assert langs[de] == ("de", "original") and sample_meta(samples[f"{de}-zh"])["translate"]["source_lang"] == "de"
    assert sample_meta(samples[en])["messages"] == json.loads(open(data, encoding="utf-8").read())[0]["messages"]
    assert samples[en]["jpg"] == samples[f"{en}-zh"]["jpg"] == (tmp_path / "in" / "img0.jpg").read_bytes()
    assert "already in Simplified Chinese (detected)" in _failures(tmp_path / "mixed")[f"{zh}-zh"]
    # Without --mix-original the Chinese record is the translation as it is, marked so.
    assert "done 3" in alone.output and "already in target language 1" in alone.output, alone.output
    passed = sample_meta(read_samples(tmp_path / "alone")[f"{zh}-zh"])
    assert passed["translate"]["passed_through"] == "already in Simplified Chinese"
    assert passed["messages"] == json.loads(open(data, encoding="utf-8").read())[1]["messages"]
    invoke("inspect", tmp_path / "mixed", "--verify")
    # ddaug's own shards are an input too: their English originals are translated (image members
    # carried byte for byte), the Chinese ones are already done, and no earlier block leaks in.
    with ChatServer(TranslationResponder(), model="m") as srv:
        again = _translate(tmp_path / "mixed", tmp_path / "again", srv.url)
    assert "done 5" in again.output and "already in target language 3" in again.output, again.output
    (from_shard,) = [m for m in read_samples(tmp_path / "again").values()
                     if sample_meta(m)["messages"][0]["content"].startswith("<image>") and
                     sample_meta(m)["translate"].get("source_lang") == "en"]
    assert from_shard["jpg"] == samples[en]["jpg"] and sample_meta(from_shard)["extra"] == {"id": "rec0"}


def test_bad_flags_and_an_unreachable_server_are_one_line(tmp_path, photos):
    data = _dataset(tmp_path / "in", photos, [[("Describe the cat.", "A cat on a sofa.")]])
    with ChatServer(TranslationResponder(), model="m") as srv:
        url = srv.url
        for extra, message in [(["--to", "xx"], "--to: unknown language 'xx'"),
                               (["--to", "en", "--from", "en"], "--from and --to are both en"),
                               (["--to", "zh", "--from", "klingon"], "--from: unknown language 'klingon'"),
                               (["--to", "zh", "--api-base", "ftp://x"], "--api-base must be an http(s) URL")]:
            result = invoke("translate", data, "-o", tmp_path / "bad", "--model", "m", "--api-base", url, *extra,
                            expect_ok=False)
            assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output, result.output
        wrong = invoke("translate", data, "-o", tmp_path / "bad", "--to", "zh", "--model", "other", "--api-base",
                       url, expect_ok=False)
        assert "does not serve model 'other'" in wrong.output and "fix --model" in wrong.output, wrong.output
    gone = invoke("translate", data, "-o", tmp_path / "bad", "--to", "zh", "--model", "m", "--api-base", url,
                  expect_ok=False)
    assert gone.exit_code == 1 and "cannot reach the server" in gone.output, gone.output
    assert not (tmp_path / "bad" / "run.json").exists()  # the corrected command is not refused


def test_killed_mid_run_leaves_no_partial_shard_and_the_rerun_resumes(tmp_path, photos):
    conversations = [[(f"<image>What is in picture {i}?", f"A cat sits on a red sofa near window {i}.")]
                     for i in range(6)]
    data = _dataset(tmp_path / "in", photos, conversations)
    out = tmp_path / "out"
    with ChatServer(TranslationResponder(), model="m", parallel=True) as srv:
        cmd = [sys.executable, "-m", "ddaug", "translate", data, "-o", str(out), "--to", "zh", "--model", "m",
               "--api-base", srv.url, "--shard-size", "2", "-q"]
        env = {**os.environ, "DDAUG_CRASH_AT": "stats-replace:2"}  # just before the second unit's commit
        killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert killed.returncode == -9, killed.stderr
        finished = sorted(p for p in os.listdir(out) if p.endswith(".tar"))
        assert finished == ["shard-000-000000.tar"]  # the second shard died before its commit
        resumed = invoke(*cmd[3:])  # the same command, in process
    assert "done 4, skipped 2" in resumed.output, resumed.output
    samples = read_samples(out)
    assert len(samples) == 6 and not [p for p in os.listdir(out) if p.endswith(".tmp")]
    invoke("inspect", out, "--verify")
