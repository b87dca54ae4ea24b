"""An adversarial pass over the hardening, as a hostile and a careless user
would run ddaug, through the CLI. Each test is one defect that pass found."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import invoke, read_samples, sample_meta

FAST = ["--model", "tiny-random", "--device", "cpu", "-q"]


def _ledger(out) -> list[dict]:
    return [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]


def _raw_chat_server(body: bytes) -> ThreadingHTTPServer:
    """A chat-completions server that answers every request with the same raw body."""
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _send(self, data: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send(b'{"object": "list", "data": [{"id": "m", "object": "model"}]}')

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._send(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_caption_answer_with_a_lone_surrogate_is_one_ledger_line(tmp_path, photo_dir, monkeypatch):
    # JSON may escape a lone surrogate; such an answer cannot be stored in a UTF-8 sample. It used
    # to print a traceback per image ("unexpected error building") after 6 retries' worth of work.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    server = _raw_chat_server(b'{"choices": [{"index": 0, "finish_reason": "stop", '
                              b'"message": {"role": "assistant", "content": "A cat \\ud800."}}]}')
    out = tmp_path / "cap"
    try:
        result = invoke("caption", photo_dir, "-o", out, "--backend", "openai", "--vlm", "m", "-q",
                        "--api-base", f"http://127.0.0.1:{server.server_address[1]}/v1", expect_ok=False)
    finally:
        server.shutdown()
    assert "Traceback" not in result.output, result.output
    ledger = _ledger(out)
    assert len(ledger) == 4 and all("not valid Unicode" in x["reason"] for x in ledger), ledger


def test_llamafactory_export_skips_conversations_llamafactory_drops(tmp_path, photo_dir):
    # LLaMA-Factory's sharegpt converter drops ("Skipping this abnormal example") a conversation
    # whose turns are not user/assistant pairs after an optional system turn. The export used to
    # write them and count them as written: the trainer then lost them without a word here.
    turn = lambda role, text: {"role": role, "content": text}  # noqa: E731
    rows = [
        {"messages": [turn("user", "<image>What is it?"), turn("assistant", "A photo.")], "images": ["photos/astronaut.png"]},
        {"messages": [turn("system", "Be brief."), turn("user", "Hi"), turn("assistant", "Hello.")]},
        {"messages": [turn("user", "<image>A question nobody answered")], "images": ["photos/chelsea.png"]},
        {"messages": [turn("assistant", "I speak first."), turn("user", "<image>")], "images": ["photos/chelsea.png"]},
        {"messages": [turn("user", "Hi"), turn("tool", "{}")]},
    ]
    dataset = tmp_path / "chat.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shards = tmp_path / "shards"
    invoke("augment", dataset, "-o", shards, *FAST)
    out = tmp_path / "lf"
    result = invoke("export", shards, "-o", out, "--format", "llamafactory", "-q")
    assert "2 samples written" in result.output and "3 turns LLaMA-Factory drops" in result.output, result.output
    records = json.loads((out / "ddaug.json").read_text())
    # (the text-only record needs no batch, so the shard holds it first)
    assert sorted([m["role"] for m in r["messages"]] for r in records) == [["system", "user", "assistant"], ["user", "assistant"]]
    assert len(list((out / "images").iterdir())) == 1  # no image of a skipped sample is left behind


def test_retry_failures_does_not_call_new_inputs_already_done(tmp_path, photo_dir):
    # Inputs added since the last run are not retried failures: --retry-failures leaves them, and
    # its summary used to count them as "skipped (already done)", so the user believed them made.
    (photo_dir / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    invoke("augment", photo_dir, "-o", out, *FAST)
    (photo_dir / "broken.png").write_bytes((photo_dir / "astronaut.png").read_bytes())  # fixed
    (photo_dir / "new.png").write_bytes((photo_dir / "chelsea.png").read_bytes())       # added
    result = invoke("augment", photo_dir, "-o", out, *FAST, "--retry-failures")
    assert "done 1, skipped 4 (already done)" in result.output, result.output
    assert "new inputs left for a plain rerun 1" in result.output, result.output
    result = invoke("augment", photo_dir, "-o", out, *FAST)
    assert "done 1, skipped 5 (already done)" in result.output, result.output
    assert len(read_samples(out)) == 6


def _chat_shards(tmp_path, *extra) -> str:
    rows = [{"messages": [{"role": "user", "content": f"<image>What is in picture {i}?"},
                          {"role": "assistant", "content": f"Picture {i}."}], "images": [f"photos/{name}.png"]}
            for i, name in enumerate(["astronaut", "chelsea"])]
    dataset = tmp_path / "chat.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / ("shards" + "-".join(extra))
    invoke("augment", dataset, "-o", out, *FAST, *extra)
    return out


def test_a_shard_folder_named_twice_is_exported_once(tmp_path, photo_dir):
    # `export A A` (or A and one of A's tars) wrote every sample twice: a doubled dose in training.
    shards = _chat_shards(tmp_path)
    tar = sorted(shards.glob("*.tar"))[0]
    out = tmp_path / "lf"
    result = invoke("export", shards, shards, tar, "-o", out, "--format", "llamafactory", "-q")
    assert "2 samples written" in result.output, result.output
    assert len(json.loads((out / "ddaug.json").read_text())) == 2
    result = invoke("export", shards, tar, "-o", tmp_path / "en", "--format", "energon", "-q")
    assert "2 samples written" in result.output, result.output


def test_energon_export_of_sets_sharing_keys_is_one_line_and_links_nothing(tmp_path, photo_dir):
    # docs/training.md's own case (two runs over one input set) share keys. Energon's prepare refused
    # them after the tars were linked, and its message said to run `--fix-duplicates`, which
    # rewrites the linked tars in place: the user's own shards.
    img2img, vae = _chat_shards(tmp_path), _chat_shards(tmp_path, "--mode", "vae")
    out = tmp_path / "en"
    result = invoke("export", img2img, vae, "-o", out, "--format", "energon", expect_ok=False)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code != 0 and len(lines) == 1 and "share sample keys" in lines[0], result.output
    assert "fix-duplicates" not in result.output
    assert not list(out.rglob("*.tar"))


def test_energon_export_into_its_input_folder_is_refused(tmp_path, photo_dir):
    # prepare indexes every tar under -o: the input's own tars beside their links (duplicates),
    # and it left .idx files in the user's shard folder.
    shards = _chat_shards(tmp_path)
    before = sorted(p.name for p in shards.iterdir())
    result = invoke("export", shards, "-o", shards, "--format", "energon", expect_ok=False)
    assert result.exit_code != 0 and "hold one another" in result.output, result.output
    assert sorted(p.name for p in shards.iterdir()) == before


@pytest.mark.parametrize("stages, says", [
    ("stages: 5", "stages:"),                                             # was a TypeError traceback
    ("stages:\n  - {name: s, samples: 1e30, weights: {b: 1}}", "samples"),  # YAML reads 1e30 as a string
    ("stages:\n  - {name: s, samples: 10, weights: {b: .inf}}", "weight of b"),  # NaN shares downstream
    ("stages:\n  - {name: s, samples: 10, weights: {b: nan}}", "weight of b"),   # was accepted as NaN
    ("seed: x\nstages:\n  - {name: s, samples: 10, weights: {b: 1}}", "seed"),
    ("global_batch_size: 0\nstages:\n  - {name: s, steps: 10, weights: {b: 1}}", "global_batch_size"),
])
def test_a_careless_recipe_is_one_line(tmp_path, photo_dir, stages, says):
    shards = _chat_shards(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"sources:\n  b: {shards}\n{stages}\n")
    result = invoke("plan", recipe, expect_ok=False)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert len(lines) == 1 and says in lines[0], result.output
