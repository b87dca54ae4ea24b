"""A small OpenAI-compatible chat-completions server on localhost.

It serves any `respond(image, text) -> Reply` callable, by default a TransformersVLM (the tiny
model in tests and demos), so the openai backend can be exercised offline end to end, or
TranslationResponder, a deterministic English-to-Chinese word table for `translate`. Faults can
be queued (429, 500, timeout, malformed body, connection reset) to test the client's retries.
With a prompt_scorer it also answers vLLM's prompt-logprobs requests (`prompt_logprobs`,
`add_generation_prompt`), which `ddaug score --backend openai` sends.
Not a production server: use vLLM or SGLang for real models.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import io
import json
import logging
import re
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from PIL import Image

from ddaug.shards.schema import IMAGE_TAG

from .replies import Reply
from .vlm import Prompt

log = logging.getLogger(__name__)

Responder = Callable[[Image.Image | None, str, int], Reply]  # image (None: text only), text, max_tokens
# messages ("<image>" tags inline), images, add_generation_prompt -> per prompt token (id, logprob or
# None for the first, rank, text): what a server computes for vLLM's prompt_logprobs.
PromptScorer = Callable[[list, list, bool], list]
FAULTS = ("ok", "429", "500", "timeout", "malformed", "reset", "no-content")  # "ok": serve normally


def _image_from_url(url: str) -> Image.Image:
    if not url.startswith("data:") or ";base64," not in url:
        raise ValueError("only base64 data URLs are accepted")
    data = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    return Image.open(io.BytesIO(data)).convert("RGB")


def _parse_request(body: dict) -> tuple[Image.Image | None, str]:
    """The user's image (None for a text-only request) and text."""
    user = [m for m in body["messages"] if m.get("role") == "user"][-1]
    parts = user["content"] if isinstance(user["content"], list) else [{"type": "text", "text": user["content"]}]
    images = [_image_from_url(p["image_url"]["url"]) for p in parts if p.get("type") == "image_url"]
    text = "".join(p.get("text", "") for p in parts if p.get("type") == "text")
    if len(images) > 1:
        raise ValueError(f"expected one image at most, got {len(images)}")
    return (images[0] if images else None), text


def _parse_conversation(body: dict) -> tuple[list[dict], list[Image.Image]]:
    """Every message, content parts flattened to text with an "<image>" tag per image part."""
    messages, images = [], []
    for m in body["messages"]:
        parts = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
        text = ""
        for p in parts:
            if p.get("type") == "image_url":
                images.append(_image_from_url(p["image_url"]["url"]))
                text += "<image>"
            elif p.get("type") == "text":
                text += p.get("text", "")
        messages.append({"role": m["role"], "content": text})
    return messages, images


def prompt_logprobs_body(tokens: list, requested: int | None) -> dict:
    """vLLM's reply fields for a prompt: usage.prompt_tokens and, when asked, prompt_logprobs
    (null for the first token, then {token id: {logprob, rank, decoded_token}} per token)."""
    out: dict = {"usage": {"prompt_tokens": len(tokens), "completion_tokens": 0, "total_tokens": len(tokens)}}
    if requested is not None:
        out["prompt_logprobs"] = [None] + [{str(t): {"logprob": lp, "rank": rank, "decoded_token": text}}
                                           for t, lp, rank, text in tokens[1:]]
    return out


class _QuietHTTPServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        # socketserver prints a traceback to stderr when a handler raises, typically a client
        # that gave up (a "timeout" fault outlives its request, even the server) and a write to
        # its closed socket. That lands in whatever output is running then: log it instead.
        log.debug("chat server: error while serving %s", client_address, exc_info=True)


class ChatServer:
    """`with ChatServer(respond, model="tiny") as srv: srv.url` -> http://127.0.0.1:PORT/v1"""

    default_max_tokens = 256

    def __init__(self, respond: Responder, model: str = "tiny-random", api_key: str | None = None,
                 host: str = "127.0.0.1", port: int = 0, timeout_sleep: float = 5.0, parallel: bool = False,
                 prompt_scorer: PromptScorer | None = None):
        self.respond = respond
        # With a prompt scorer, a request that sets prompt_logprobs or add_generation_prompt (vLLM's
        # extensions) is answered with the prompt's token count and logprobs, as vLLM does.
        self.prompt_scorer = prompt_scorer
        self.model = model
        self.api_key = api_key
        self.timeout_sleep = timeout_sleep
        self.faults: collections.deque[str] = collections.deque()
        self.requests: list[dict] = []     # what clients sent (headers without the key, body)
        # One generation at a time (models are not thread-safe), unless respond is (parallel).
        self._lock = threading.Lock() if not parallel else contextlib.nullcontext()
        self._httpd = _QuietHTTPServer((host, port), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def inject(self, *faults: str) -> None:
        """Queue faults; each request takes the next one (if any) instead of a normal answer."""
        unknown = set(faults) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {unknown}; known: {FAULTS}")
        self.faults.extend(faults)

    def __enter__(self) -> "ChatServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test and demo output clean
                pass

            def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _json(self, status: int, obj: dict, headers: dict | None = None) -> None:
                self._send(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"), headers)

            def _authorized(self) -> bool:
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    self._json(401, {"error": {"message": "invalid api key"}})
                    return False
                return True

            def _prompt_logprobs(self, body: dict) -> None:
                messages, images = _parse_conversation(body)
                with server._lock:
                    tokens = server.prompt_scorer(messages, images, bool(body.get("add_generation_prompt", True)))
                self._json(200, {"id": f"chatcmpl-{len(server.requests)}", "object": "chat.completion",
                                 "model": server.model,
                                 "choices": [{"index": 0, "finish_reason": "length",
                                              "message": {"role": "assistant", "content": ""}}],
                                 **prompt_logprobs_body(tokens, body.get("prompt_logprobs"))})

            def do_GET(self):
                if not self._authorized():
                    return
                if self.path.rstrip("/").endswith("/models"):
                    self._json(200, {"object": "list", "data": [{"id": server.model, "object": "model"}]})
                else:
                    self._json(404, {"error": {"message": "not found"}})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if not self._authorized():
                    return
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    return self._json(404, {"error": {"message": "not found"}})
                fault = server.faults.popleft() if server.faults else None
                fault = None if fault == "ok" else fault
                headers = {k: v for k, v in self.headers.items() if k.lower() != "authorization"}
                server.requests.append({"headers": headers, "body": raw.decode("utf-8", "replace"), "fault": fault})
                if fault == "429":
                    return self._json(429, {"error": {"message": "rate limited"}}, {"Retry-After": "0"})
                if fault == "500":
                    return self._json(500, {"error": {"message": "internal error"}})
                if fault == "timeout":
                    time.sleep(server.timeout_sleep)
                    return self._json(503, {"error": {"message": "too slow"}})
                if fault == "malformed":
                    return self._send(200, b'{"choices": [{"message": {"content": "cut sh')
                if fault == "reset":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return None
                try:
                    body = json.loads(raw)
                    if server.prompt_scorer and ("prompt_logprobs" in body or "add_generation_prompt" in body):
                        return self._prompt_logprobs(body)
                    image, text = _parse_request(body)
                    max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens")
                                     or server.default_max_tokens)
                except (ValueError, KeyError, IndexError, TypeError) as exc:
                    return self._json(400, {"error": {"message": f"bad request: {exc}"}})
                with server._lock:
                    reply = server.respond(image, text, max_tokens)
                content = None if fault == "no-content" else reply.text
                self._json(200, {
                    "id": f"chatcmpl-{len(server.requests)}", "object": "chat.completion", "model": server.model,
                    "choices": [{"index": 0, "finish_reason": reply.finish_reason,
                                 "message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": reply.prompt_tokens or 0,
                              "completion_tokens": reply.completion_tokens or 0,
                              "total_tokens": (reply.prompt_tokens or 0) + (reply.completion_tokens or 0)}})

        return Handler


def vlm_responder(vlm) -> Responder:
    """Serve a TransformersVLM: one image + text per request."""
    def respond(image: Image.Image, text: str, max_tokens: int) -> Reply:
        return vlm.generate([Prompt(image, text)], max_new_tokens=max_tokens)[0]
    return respond


# -- a deterministic translator, for translate's tests, benchmark and demos ---------------------------
_ZH_WORDS = {
    "a": "一个", "an": "一个", "the": "", "is": "是", "are": "是", "this": "这", "that": "那", "what": "什么",
    "image": "图片", "picture": "图片", "photo": "照片", "shows": "显示", "show": "显示", "describe": "描述",
    "in": "在", "on": "在", "of": "的", "and": "和", "with": "和", "near": "靠近", "detail": "细节",
    "cat": "猫", "cats": "猫", "dog": "狗", "sits": "坐", "red": "红色", "blue": "蓝色", "sofa": "沙发",
    "window": "窗户", "rocket": "火箭", "sky": "天空", "coffee": "咖啡", "cup": "杯子", "table": "桌子",
    "man": "男人", "woman": "女人", "there": "那里", "how": "怎么", "many": "多少", "see": "看见",
    "code": "代码", "link": "链接", "visit": "访问", "email": "邮件", "write": "写", "yes": "是的", "no": "不",
}
_ZH_PUNCTUATION = {".": "。", ",": "，", "?": "？", "!": "！", ":": "：", ";": "；"}
TRANSLATION_FAULTS = ("drop-placeholder", "duplicate-placeholder", "swap-placeholders", "source-language",
                      "empty", "add-image-tag", "repeat", "full-width-placeholders")


class TranslationResponder:
    """A stand-in translator into Chinese: each English word through a small table (others to
    two Han characters derived from the word, so the same input always gives the same output),
    placeholders kept, punctuation made Chinese. `faults` maps a trigger word to one of
    TRANSLATION_FAULTS: a request whose text holds the word gets that fault instead, whatever
    the order requests arrive in (so each of translate's checks can be made to fire)."""

    def __init__(self, faults: dict[str, str] | None = None, latency: float = 0.0):
        unknown = set((faults or {}).values()) - set(TRANSLATION_FAULTS)
        if unknown:
            raise ValueError(f"unknown translation faults {unknown}; known: {TRANSLATION_FAULTS}")
        self.faults = {word.lower(): fault for word, fault in (faults or {}).items()}
        self.latency = latency  # seconds per request (a server's generation time, for benchmarks)

    @staticmethod
    def _word(word: str) -> str:
        known = _ZH_WORDS.get(word.lower())
        if known is not None:
            return known
        digest = zlib.crc32(word.lower().encode("utf-8"))
        return chr(0x4E00 + digest % 0x5000) + chr(0x4E00 + (digest >> 16) % 0x5000)

    def translate(self, text: str) -> str:
        from ddaug.translate.mask import PLACEHOLDER_RE

        out = []
        for m in re.finditer(rf"(?P<ph>{PLACEHOLDER_RE.pattern})|(?P<word>[^\W\d_]+(?:'[^\W\d_]+)?)|(?P<nl>\n)|\s+|.",
                             text):
            if m.group("ph"):
                out.append(m.group(0))
            elif m.group("word"):
                out.append(self._word(m.group("word")))
            elif m.group("nl"):
                out.append("\n")
            elif not m.group(0).isspace():
                out.append(_ZH_PUNCTUATION.get(m.group(0), m.group(0)))
        return "".join(out)

    def _fault(self, text: str, translated: str, fault: str) -> str:
        from ddaug.translate.mask import PLACEHOLDER_RE

        placeholders = [m.group(0) for m in PLACEHOLDER_RE.finditer(translated)]
        if fault == "drop-placeholder" and placeholders:
            return translated.replace(placeholders[-1], "", 1)
        if fault == "duplicate-placeholder" and placeholders:
            return translated + placeholders[0]
        if fault == "swap-placeholders" and len(placeholders) >= 2:
            a, b = placeholders[0], placeholders[1]
            return translated.replace(a, "\0").replace(b, a).replace("\0", b)
        if fault == "source-language":
            return text
        if fault == "empty":
            return ""
        if fault == "add-image-tag":
            return translated + IMAGE_TAG
        if fault == "full-width-placeholders":  # harmless: the brackets a Chinese reply may use
            return PLACEHOLDER_RE.sub(lambda m: f"［［P{m.group(1)}］］", translated)
        if fault == "repeat":  # a reply looping on its words
            return translated + PLACEHOLDER_RE.sub("", translated) * 5
        return translated

    def __call__(self, image: Image.Image | None, text: str, max_tokens: int) -> Reply:
        if self.latency:
            time.sleep(self.latency)
        translated = self.translate(text)
        words = {w.lower() for w in re.findall(r"[^\W\d_]+", text)}
        for trigger, fault in self.faults.items():
            if trigger in words:
                translated = self._fault(text, translated, fault)
                break
        return Reply(translated, "stop", prompt_tokens=len(text.split()), completion_tokens=len(translated))
