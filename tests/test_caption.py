"""`ddaug caption`: both backends on the tiny Qwen2-VL, question pools, instruct parsing, flags."""

from __future__ import annotations

import base64
import glob
import json
import os
import socket

import pytest
from PIL import Image

from ddaug.captioning import builtin_pool, is_degenerate, parse_instruct, save_tiny_vlm
from ddaug.shards.questions import builtin_stages, format_pools
from ddaug.captioning.replies import MalformedReply, Reply
from ddaug.captioning.server import ChatServer, vlm_responder
from conftest import invoke, read_samples, sample_meta


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory):
    return save_tiny_vlm(str(tmp_path_factory.mktemp("tiny-vlm")))


@pytest.fixture
def business_dir(tmp_path, photos):
    """Real photo crops stored as JPEG, PNG and WebP, as a folder of 'business' images."""
    d = tmp_path / "business"
    d.mkdir()
    fmts = [("jpg", {"quality": 90}), ("png", {}), ("webp", {"lossless": True}), ("jpg", {"quality": 80})]
    for (name, arr), (ext, kw) in zip(photos.items(), fmts):
        Image.fromarray(arr).resize((arr.shape[1] * 2, arr.shape[0] * 2)).save(d / f"{name}.{ext}", **kw)
    return d


@pytest.fixture
def no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def _files_by_name(folder) -> dict[str, bytes]:
    return {os.path.splitext(os.path.basename(p))[0]: open(p, "rb").read() for p in glob.glob(f"{folder}/*")}


def _caption(inputs, out, *extra, expect_ok=True):
    return invoke("caption", inputs, "-o", out, "--device", "cpu", "--max-new-tokens", 8, "-q", *extra,
                  expect_ok=expect_ok)


def test_transformers_backend_writes_trainer_ready_samples(tmp_path, business_dir, tiny_vlm_dir):
    out = tmp_path / "out"
    result = _caption(business_dir, out, "--vlm", tiny_vlm_dir, "--batch-size", 2, "--shard-size", 3)
    assert "done 4" in result.output
    samples = read_samples(out)
    originals = _files_by_name(business_dir)
    stage1 = {q.text: q.id for q in builtin_pool("en", "stage1")}
    assert len(samples) == 4 and len(glob.glob(str(out / "*.tar"))) == 2
    for key, members in samples.items():
        meta = sample_meta(members)
        (image_member,) = [s for s in members if s != "json"]
        # bytes copied unchanged, under the extension of their real format
        assert members[image_member] == originals[key.rsplit("-", 1)[0]]
        user, assistant = meta["messages"]
        assert user["role"] == "user" and user["content"].startswith("<image>")
        question = user["content"][len("<image>"):]
        assert stage1[question] == meta["caption"]["question_id"]
        assert assistant["role"] == "assistant" and assistant["content"].strip()
        assert meta["tags"] == {"domain": "business", "task": "caption", "stage": "stage1"}
        cap = meta["caption"]
        assert cap["backend"] == "transformers" and cap["model"] == tiny_vlm_dir
        assert cap["pool"] == "en/stage1" and cap["lang"] == "en"
        assert cap["generation"]["max_new_tokens"] == 8 and cap["generation"]["do_sample"] is False
        assert cap["prompt_tokens"] > 0 and 1 <= cap["completion_tokens"] <= 8
        assert cap["finish_reason"] in ("stop", "length")
        assert ("truncated" in cap["flags"]) == (cap["finish_reason"] == "length")
    verify = invoke("inspect", out, "--verify")
    assert "pools" in verify.output and "en/stage1" in verify.output


def test_rerun_skips_and_batching_does_not_change_answers(tmp_path, business_dir, tiny_vlm_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    _caption(business_dir, a, "--vlm", tiny_vlm_dir, "--batch-size", 4, "--lang", "mix")
    again = _caption(business_dir, a, "--vlm", tiny_vlm_dir, "--batch-size", 4, "--lang", "mix")
    assert "done 0, skipped 4" in again.output
    assert len(glob.glob(str(a / "*.tar"))) == 1
    # Batch of one vs batch of four (left padding): same questions, same greedy answers.
    _caption(business_dir, b, "--vlm", tiny_vlm_dir, "--batch-size", 1, "--lang", "mix")
    sa, sb = read_samples(a), read_samples(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sample_meta(sa[key])["messages"] == sample_meta(sb[key])["messages"]
    langs = {sample_meta(m)["caption"]["lang"] for m in sa.values()}
    assert langs <= {"en", "zh"}


def test_changed_question_settings_are_refused_in_the_same_folder(tmp_path, business_dir, tiny_vlm_dir):
    out = tmp_path / "out"
    _caption(business_dir, out, "--vlm", tiny_vlm_dir)
    result = _caption(business_dir, out, "--vlm", tiny_vlm_dir, "--stage", "stage2", expect_ok=False)
    assert result.exit_code == 1 and "stage" in result.output and "Traceback" not in result.output


def test_stage_pools_are_disjoint_and_listed():
    stages = builtin_stages()
    assert len(stages) >= 2
    for lang in ("en", "zh"):
        pools = {s: builtin_pool(lang, s) for s in stages}
        assert all(len(p) >= 4 for p in pools.values())
        for i, s1 in enumerate(stages):
            for s2 in stages[i + 1:]:
                assert not {q.text for q in pools[s1]} & {q.text for q in pools[s2]}
                assert not {q.id for q in pools[s1]} & {q.id for q in pools[s2]}
    listed = invoke("caption", "--list-questions").output
    assert "详细描述图中有什么？" in listed and "Describe this image in detail." in listed
    assert listed.count("[") >= 4 and format_pools() in listed


def test_stage2_and_chinese_questions_come_from_their_pool(tmp_path, business_dir, tiny_vlm_dir):
    out = tmp_path / "out"
    _caption(business_dir, out, "--vlm", tiny_vlm_dir, "--lang", "zh", "--stage", "stage2")
    pool = {q.text for q in builtin_pool("zh", "stage2")}
    for members in read_samples(out).values():
        meta = sample_meta(members)
        assert meta["messages"][0]["content"][len("<image>"):] in pool
        assert meta["tags"]["stage"] == "stage2" and meta["caption"]["pool"] == "zh/stage2"


def test_questions_file_replaces_pools(tmp_path, business_dir, tiny_vlm_dir):
    qfile = tmp_path / "qs.json"
    qfile.write_text(json.dumps([{"id": "mine-a", "text": "What does this show?"},
                                 {"id": "mine-b", "text": "图里是什么？"}]), encoding="utf-8")
    out = tmp_path / "out"
    _caption(business_dir, out, "--vlm", tiny_vlm_dir, "--questions", qfile)
    for members in read_samples(out).values():
        cap = sample_meta(members)["caption"]
        assert cap["question_id"] in ("mine-a", "mine-b") and cap["pool"] == "file:qs.json"
        assert cap["lang"] == ("zh" if cap["question_id"] == "mine-b" else "en")
    listed = invoke("caption", "--questions", qfile, "--list-questions").output
    assert "mine-a" in listed and "en/stage1" not in listed
    bad = tmp_path / "bad.json"
    bad.write_text("[{\"id\": 1}]")
    result = _caption(business_dir, tmp_path / "o2", "--vlm", tiny_vlm_dir, "--questions", bad, expect_ok=False)
    assert result.exit_code == 1 and "--questions" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("reply, expected", [
    ('{"question": "What is on the table?", "answer": "A cup of coffee."}', ("What is on the table?", "A cup of coffee.")),
    ('Sure!\n```json\n{"question": "Where is the cat?", "answer": "On the sofa."}\n```', ("Where is the cat?", "On the sofa.")),
    ('Here you go: {"Question": "<image>How many?", "Answer": "Two."} Hope it helps.', ("How many?", "Two.")),
    ('[{"question": "Q1?", "answer": "A1."}]', ("Q1?", "A1.")),
    ('{"问题": "图中有几个人？", "答案": "两个人。"}', ("图中有几个人？", "两个人。")),
    ("Question: What color is the rocket?\nAnswer: White, with a red tip.", ("What color is the rocket?", "White, with a red tip.")),
    ("问题：这是什么动物？\n回答：一只猫。", ("这是什么动物？", "一只猫。")),
])
def test_instruct_replies_parse(reply, expected):
    assert parse_instruct(reply) == expected


@pytest.mark.parametrize("reply", ["", "I cannot help with that.", '{"question": "", "answer": "x"}',
                                   '{"question": "Why?"}', '{"question": "Why?", "answer": "because', "Question: ?"])
def test_malformed_instruct_replies_are_refused(reply):
    with pytest.raises(MalformedReply):
        parse_instruct(reply)


def test_degeneration_detector():
    assert is_degenerate("The image shows " + "a cat " * 40)
    assert is_degenerate("图中有" + "猫" * 60)
    assert not is_degenerate("A rocket stands on a launch pad under a blue sky, with service towers on both "
                             "sides and a few clouds drifting near the horizon.")
    assert not is_degenerate("一杯咖啡放在木桌上，旁边有一个勺子和一块饼干，背景是模糊的窗户。")


# -- openai backend against a real HTTP server on localhost ----------------------------------------------
@pytest.fixture
def tiny_server(tiny_vlm_dir, no_proxy):
    from ddaug.captioning import GenerationSettings, TransformersVLM

    vlm = TransformersVLM(tiny_vlm_dir, device="cpu", dtype="fp32", settings=GenerationSettings(max_new_tokens=8))
    with ChatServer(vlm_responder(vlm), model="tiny-random", api_key="sk-test-secret-123") as srv:
        yield srv


def test_openai_backend_end_to_end_with_a_429(tmp_path, business_dir, tiny_server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret-123")
    tiny_server.inject("429")  # the first request is rate limited, then served
    out = tmp_path / "out"
    result = invoke("-vv", "caption", business_dir, "-o", out, "--backend", "openai", "--api-base", tiny_server.url,
                    "--vlm", "tiny-random", "--max-new-tokens", 8, "--concurrency", 2)
    assert "done 4" in result.output
    assert [r["fault"] for r in tiny_server.requests].count("429") == 1
    assert len(tiny_server.requests) == 5
    samples = read_samples(out)
    originals = _files_by_name(business_dir)
    sent = [json.loads(r["body"]) for r in tiny_server.requests if r["fault"] is None]
    urls = {part["image_url"]["url"] for b in sent for part in b["messages"][0]["content"] if part["type"] == "image_url"}
    for key, members in samples.items():
        meta = sample_meta(members)
        assert meta["caption"]["backend"] == "openai" and meta["caption"]["model"] == "tiny-random"
        assert meta["messages"][1]["content"].strip()
        original = originals[key.rsplit("-", 1)[0]]
        # the original bytes went over the wire as a data URL
        assert any(u.endswith(base64.b64encode(original).decode()) for u in urls)
    # the key authenticated every request but is written nowhere and logged nowhere
    assert "sk-test-secret-123" not in result.output
    for path in glob.glob(str(out / "*")):
        assert b"sk-test-secret-123" not in open(path, "rb").read(), path
    invoke("inspect", out, "--verify")


def test_openai_unreachable_server_is_one_line(tmp_path, business_dir, no_proxy):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    result = invoke("caption", business_dir, "-o", tmp_path / "out", "--backend", "openai",
                    "--api-base", f"http://127.0.0.1:{port}/v1", "--vlm", "m", expect_ok=False)
    assert result.exit_code == 1
    assert "cannot reach the server" in result.output and "Traceback" not in result.output
    assert not glob.glob(str(tmp_path / "out" / "*.tar"))


def test_openai_wrong_key_and_missing_api_base(tmp_path, business_dir, tiny_server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    result = invoke("caption", business_dir, "-o", tmp_path / "o", "--backend", "openai",
                    "--api-base", tiny_server.url, "--vlm", "tiny-random", expect_ok=False)
    assert result.exit_code == 1 and "OPENAI_API_KEY" in result.output and "sk-wrong" not in result.output
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    result = invoke("caption", business_dir, "-o", tmp_path / "o2", "--backend", "openai", expect_ok=False)
    assert result.exit_code == 1 and "--api-base" in result.output


def _scripted_server(respond):
    return ChatServer(lambda image, text, max_tokens: respond(image, text, max_tokens), model="scripted")


def test_instruct_task_parses_retries_once_then_records_failure(tmp_path, business_dir, no_proxy):
    # rocket (the narrowest photo) never gets a parsable reply; the others only on the retry.
    def respond(image, text, max_tokens):
        if "could not be parsed" in text and image.width > 70:
            return Reply('```json\n{"question": "What is shown?", "answer": "A photo."}\n```')
        return Reply("Sorry, here is a description instead of JSON.")

    with _scripted_server(respond) as srv:
        out = tmp_path / "out"
        result = invoke("caption", business_dir, "-o", out, "--backend", "openai", "--api-base", srv.url,
                        "--vlm", "scripted", "--task", "instruct", "--max-pixels", 0)
        assert len(srv.requests) == 8  # 4 first tries + 4 retries
    assert "done 3" in result.output and "failed 1" in result.output and "instruct retries 4" in result.output
    samples = read_samples(out)
    for members in samples.values():
        meta = sample_meta(members)
        assert meta["messages"][0]["content"] == "<image>What is shown?"
        assert meta["messages"][1]["content"] == "A photo."
        assert meta["tags"]["task"] == "instruct" and meta["caption"]["attempts"] == 2
        assert meta["caption"]["pool"] == "en/instruct"
    failures = [json.loads(line) for line in open(out / "failures.jsonl")]
    assert len(failures) == 1 and "rocket" in failures[0]["source"]
    assert "malformed instruct reply after a retry" in failures[0]["reason"]


def test_answer_flags_counted_and_drop_truncated(tmp_path, business_dir, no_proxy):
    # one answer per photo: fine, empty, cut at the limit, degenerate
    chelsea = Image.open(business_dir / "chelsea.webp").convert("RGB").tobytes()

    def respond(image, text, max_tokens):
        w = image.width
        if image.tobytes() == chelsea:
            return Reply("   ")
        if w == 166:
            return Reply("A cup of coffee on a saucer, seen from", "length")
        if w == 66:
            return Reply("The rocket " + "is tall " * 30)
        return Reply("A clear photo with a single subject in the centre.")

    with _scripted_server(respond) as srv:
        kept = tmp_path / "kept"
        result = invoke("caption", business_dir, "-o", kept, "--backend", "openai", "--api-base", srv.url,
                        "--vlm", "scripted", "--max-pixels", 0)
        dropped = tmp_path / "dropped"
        result2 = invoke("caption", business_dir, "-o", dropped, "--backend", "openai", "--api-base", srv.url,
                         "--vlm", "scripted", "--max-pixels", 0, "--drop-truncated")
    flags = {k: sample_meta(m)["caption"]["flags"] for k, m in read_samples(kept).items()}
    by_name = {k.rsplit("-", 1)[0]: v for k, v in flags.items()}
    assert by_name["coffee"] == ["truncated"] and by_name["rocket"] == ["degenerate"]
    assert "truncated 1" in result.output and "degenerate 1" in result.output and "empty 1" in result.output
    assert len(flags) == 3  # the empty answer is never written
    reasons = {json.loads(line)["reason"] for line in open(kept / "failures.jsonl")}
    assert reasons == {"empty answer"}
    assert len(read_samples(dropped)) == 1 and "failed 3" in result2.output
    report = invoke("inspect", kept, "--json").output
    assert json.loads(report)["flags"] == {"truncated": 1, "degenerate": 1}


def test_workers_split_the_input_without_overlap(tmp_path, business_dir, tiny_vlm_dir):
    out = tmp_path / "out"
    for rank in (0, 1):  # --world-size 2 joins: the second finds the first's units committed
        _caption(business_dir, out, "--vlm", tiny_vlm_dir, "--rank", rank, "--world-size", 2, "--shard-size", 2)
    per_unit = {}
    for shard in glob.glob(str(out / "*.stats.json")):
        stats = json.load(open(shard))
        per_unit[os.path.basename(shard)] = set(stats["keys"])
    # units of --shard-size 2: two units of two photos each, no key in both
    first, second = per_unit.values()
    assert len(per_unit) == 2 and len(first) == len(second) == 2 and not first & second
    assert len(first | second) == 4 == len(read_samples(out))
    manifest = json.load(open(out / "manifest.json"))
    assert sum(s["samples"] for s in manifest["shards"]) == 4
