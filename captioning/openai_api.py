"""The openai backend: any OpenAI-compatible chat-completions server (vLLM, SGLang, hosted APIs).

ChatClient is the client every command that talks to such a server shares (caption's OpenAIVLM,
translate's translator): the key, the request pool, retries, timeouts and origin rules; a
subclass says only what the messages of one request are. For caption, images go as base64
data URLs inside the user message. A persistent pool of --concurrency
threads sends requests as they are submitted, so the caption stage can submit each image as
soon as it is read and C requests stay in flight across batch and shard boundaries (the job
still orders and writes the answers deterministically). 429, 5xx, timeouts, resets and
unparsable bodies are retried with exponential backoff (honouring Retry-After), then recorded
as a failure of that sample. The API key comes from the environment and never reaches a log
line, an error message, a file, or another origin (redirects across origins are refused).
"""

from __future__ import annotations

import base64
import http.client
import itertools
import json
import logging
import os
import queue
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import Future
from typing import Any

from ddaug.pipeline import JobAbort
from ddaug.pipeline.timing import StageTimes

from .images import encode_for_request
from .replies import Reply
from .timing import CaptionTimes
from .vlm import GenerationSettings, Prompt

log = logging.getLogger(__name__)

API_KEY_ENV = "OPENAI_API_KEY"
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
SENDABLE_MIME = {"image/png", "image/jpeg", "image/webp", "image/gif"}


class BackendUnavailable(JobAbort):
    """The server cannot be used at all (unreachable, bad key): stop the run with one line."""


class RequestFailed(Exception):
    """One request failed for good after its retries; the sample goes to the failure ledger."""


def read_api_key() -> str | None:
    """$OPENAI_API_KEY without surrounding whitespace (a trailing newline from `cat key.txt` is
    common); one that still holds whitespace or control characters is refused without echoing it."""
    key = (os.environ.get(API_KEY_ENV) or "").strip()
    if not key:
        return None
    if any(ch.isspace() or not ch.isprintable() or ord(ch) > 126 for ch in key):
        raise BackendUnavailable(f"${API_KEY_ENV} holds whitespace, control or non-ASCII characters "
                                 f"inside it; set it to the bare key")
    return key


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only within the origin of --api-base: urllib would otherwise resend the
    Authorization header to whatever host the server names."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if _origin(newurl) != _origin(req.full_url):
            raise BackendUnavailable(f"the server redirected {_origin(req.full_url)[1]} to another origin "
                                     f"({urllib.parse.urlsplit(newurl).netloc}); not following it with the API "
                                     f"key: point --api-base at the final address")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class RequestPool:
    """`threads` daemon threads sending submitted requests, lower priority number first, then in
    submission order. Persistent across batches and shards, so nothing drains between them."""

    def __init__(self, threads: int, send, name: str = "openai"):
        self._send = send
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, request: Any, priority: int = 1) -> Future:
        future: Future = Future()
        if self._closed:
            future.cancel()
        else:
            self._queue.put((priority, next(self._order), future, request))
        return future

    def _work(self) -> None:
        while True:
            _, _, future, request = self._queue.get()
            if future is None:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self._send(request))
            except BaseException as exc:  # delivered to whoever waits on this sample
                future.set_exception(exc)

    def close(self) -> None:
        """Cancel what has not started; running requests finish (their threads are daemons)."""
        self._closed = True
        while True:
            try:
                _, _, future, _ = self._queue.get_nowait()
            except queue.Empty:
                break
            if future is not None:
                future.cancel()
        for _ in self._threads:
            self._queue.put((2, next(self._order), None, None))


class ChatClient:
    """Requests to an OpenAI-compatible chat-completions server, --concurrency at a time, each
    retried on its own. Subclasses define messages(request)."""

    backend = "openai"
    model_flag = "--vlm"  # the flag that names the served model, for the error that says it is not served

    def __init__(self, api_base: str, model: str, *, settings: GenerationSettings, concurrency: int = 8,
                 timeout: float = 120.0, max_retries: int = 5, backoff: float = 1.0, check: bool = True,
                 times: StageTimes | None = None):
        self.api_base = api_base.rstrip("/")
        self.model_name = model
        self.settings = settings
        self.concurrency = max(1, concurrency)
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.times = times or CaptionTimes(self.concurrency)
        self._key = read_api_key()
        self._opener = urllib.request.build_opener(_SameOriginRedirects)
        if check:
            self.check_server()
        self._pool = RequestPool(self.concurrency, self._attempt)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "model": self.model_name, "api_base": self.api_base}

    # -- HTTP ---------------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        return headers

    def _scrub(self, text: str) -> str:
        if not self._key:
            return text
        for form in (self._key, repr(self._key)[1:-1], json.dumps(self._key)[1:-1]):
            text = text.replace(form, "***")
        return text

    def check_server(self) -> None:
        """Fail fast with one line if the server is unreachable or refuses the key."""
        req = urllib.request.Request(f"{self.api_base}/models", headers=self._headers())
        try:
            with self._opener.open(req, timeout=min(self.timeout, 30)) as resp:
                body = json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise BackendUnavailable(f"{self.api_base} refused the API key (HTTP {exc.code}); "
                                         f"set {API_KEY_ENV}") from None
            return  # some servers have no /models; the first request will tell
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise BackendUnavailable(f"cannot reach the server at {self.api_base} ({self._scrub(str(reason))}); "
                                     f"is it running? check --api-base") from None
        served = [m.get("id") for m in body.get("data", []) if isinstance(m, dict)] if isinstance(body, dict) else []
        if served and self.model_name not in served:
            raise BackendUnavailable(f"{self.api_base} does not serve model {self.model_name!r} "
                                     f"(it serves: {', '.join(map(str, served))}); fix {self.model_flag}")

    def messages(self, request: Any) -> list[dict[str, Any]]:
        """The chat messages of one request."""
        raise NotImplementedError

    def _payload(self, request: Any) -> bytes:
        body: dict[str, Any] = {
            "model": self.model_name,
            "messages": self.messages(request),
            "max_tokens": self.settings.max_new_tokens,
            "temperature": max(self.settings.temperature, 0.0),
            "n": 1,
        }
        if not self.settings.greedy:
            body["top_p"] = self.settings.top_p
            body["seed"] = self.settings.seed
        return json.dumps(body).encode("utf-8")

    def _post(self, payload: bytes) -> dict[str, Any]:
        req = urllib.request.Request(f"{self.api_base}/chat/completions", data=payload,
                                     headers=self._headers(), method="POST")
        with self._opener.open(req, timeout=self.timeout) as resp:
            return json.loads(resp.read())

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), 60.0)
            except ValueError:
                pass
        return min(self.backoff * 2 ** attempt, 30.0) * (0.5 + random.random() / 2)

    def _one(self, request: Any) -> Reply:
        with self.times.measure_cpu("request JSON"):
            payload = self._payload(request)
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            retry_after = None
            t0 = time.monotonic()
            try:
                with self.times.measure("waiting on the server"):
                    body = self._post(payload)
                with self.times.measure_cpu("reply JSON"):
                    return self._reply(body, time.monotonic() - t0)
            except urllib.error.HTTPError as exc:
                if exc.code in (401, 403):
                    raise BackendUnavailable(f"{self.api_base} refused the API key (HTTP {exc.code}); "
                                             f"set {API_KEY_ENV}") from None
                last = f"HTTP {exc.code}"
                if exc.code not in RETRY_STATUS:
                    detail = self._scrub(exc.read(300).decode("utf-8", "replace")).strip()
                    raise RequestFailed(f"server answered HTTP {exc.code}: {' '.join(detail.split())[:200]}") from None
                retry_after = exc.headers.get("Retry-After") if exc.headers else None
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, ConnectionRefusedError):
                    last = "connection refused"
                else:
                    last = f"connection error: {self._scrub(str(exc.reason))}"
            except (socket.timeout, TimeoutError):
                last = f"timed out after {self.timeout:g}s"
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                last = f"connection error: {type(exc).__name__}"
            except (ValueError, KeyError, IndexError, TypeError) as exc:  # unparsable or off-schema body
                last = f"malformed response: {self._scrub(str(exc))[:120]}"
            if attempt < self.max_retries:
                delay = self._delay(attempt, retry_after)
                log.info("request failed (%s); retry %d/%d in %.1fs", last, attempt + 1, self.max_retries, delay)
                time.sleep(delay)
        if last == "connection refused":
            raise BackendUnavailable(f"the server at {self.api_base} went away (connection refused after "
                                     f"{self.max_retries} retries); finished shards are intact, rerun to resume")
        raise RequestFailed(f"{last} after {self.max_retries + 1} attempts")

    @staticmethod
    def _reply(body: dict[str, Any], seconds: float) -> Reply:
        # choices[0].message.content is where chat completions put the answer.
        choice = body["choices"][0]
        content = choice["message"].get("content")
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if content is not None and not isinstance(content, str):
            raise TypeError(f"message.content is {type(content).__name__}")
        try:  # JSON may escape lone surrogates ("\ud800"), which no sample file can store
            (content or "").encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RequestFailed(f"the answer is not valid Unicode ({exc.reason} at character {exc.start})") from None
        usage = body.get("usage") or {}
        return Reply((content or "").strip(), choice.get("finish_reason") or "stop",
                     usage.get("prompt_tokens"), usage.get("completion_tokens"), seconds)

    def _attempt(self, request: Any) -> Reply | RequestFailed:
        try:
            return self._one(request)
        except RequestFailed as exc:
            return exc

    def submit(self, request: Any, priority: int = 1) -> Future:
        """Queue one request; the future gives a Reply or a RequestFailed, or raises
        BackendUnavailable. Lower priority numbers go first (second tries)."""
        return self._pool.submit(request, priority)

    def generate(self, requests: list[Any]) -> list[Reply | Exception]:
        return [f.result() for f in [self.submit(r) for r in requests]]

    def close(self) -> None:
        self._pool.close()


class OpenAIVLM(ChatClient):
    """caption's VLM behind a server: one image and the question per request."""

    def messages(self, prompt: Prompt) -> list[dict[str, Any]]:
        if prompt.data is not None and prompt.mime in SENDABLE_MIME:
            data, mime = prompt.data, prompt.mime
        else:  # a picture, not bytes (library use): a high-quality JPEG
            data, mime = encode_for_request(prompt.image, lossless=False)
        url = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
        return [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": prompt.text}]}]
