"""The openai backend: any OpenAI-compatible chat-completions server (vLLM, SGLang, hosted APIs).

Images go as base64 data URLs inside the user message. Requests run with bounded concurrency;
429, 5xx, timeouts, resets and unparsable bodies are retried with exponential backoff (honouring
Retry-After), then recorded as a failure of that sample. The API key comes from the environment
and never reaches a log line, an error message or a file.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import os
import random
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline import JobAbort

from .replies import Reply
from .vlm import GenerationSettings, Prompt

log = logging.getLogger(__name__)

API_KEY_ENV = "OPENAI_API_KEY"
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
SENDABLE_MIME = {"image/png", "image/jpeg", "image/webp", "image/gif"}


class BackendUnavailable(JobAbort):
    """The server cannot be used at all (unreachable, bad key): stop the run with one line."""


class RequestFailed(Exception):
    """One request failed for good after its retries; the sample goes to the failure ledger."""


class OpenAIVLM:
    backend = "openai"

    def __init__(self, api_base: str, model: str, *, settings: GenerationSettings, concurrency: int = 8,
                 timeout: float = 120.0, max_retries: int = 5, backoff: float = 1.0, check: bool = True):
        self.api_base = api_base.rstrip("/")
        self.model_name = model
        self.settings = settings
        self.concurrency = max(1, concurrency)
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self._key = os.environ.get(API_KEY_ENV) or None
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="openai")
        if check:
            self.check_server()

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "model": self.model_name, "api_base": self.api_base}

    # -- HTTP ---------------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        return headers

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def check_server(self) -> None:
        """Fail fast with one line if the server is unreachable or refuses the key."""
        req = urllib.request.Request(f"{self.api_base}/models", headers=self._headers())
        try:
            with urllib.request.urlopen(req, timeout=min(self.timeout, 30)) as resp:
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
                                     f"(it serves: {', '.join(map(str, served))}); fix --vlm")

    def _payload(self, prompt: Prompt) -> bytes:
        if prompt.data is not None and prompt.mime in SENDABLE_MIME:
            data, mime = prompt.data, prompt.mime
        else:  # downsized for --max-pixels, or a format servers may not take: send PNG
            buf = io.BytesIO()
            prompt.image.save(buf, format="PNG", compress_level=1)
            data, mime = buf.getvalue(), "image/png"
        url = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
        body: dict[str, Any] = {
            "model": self.model_name,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": prompt.text}]}],
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
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return json.loads(resp.read())

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), 60.0)
            except ValueError:
                pass
        return min(self.backoff * 2 ** attempt, 30.0) * (0.5 + random.random() / 2)

    def _one(self, prompt: Prompt) -> Reply:
        payload = self._payload(prompt)
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            retry_after = None
            t0 = time.monotonic()
            try:
                body = self._post(payload)
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
        usage = body.get("usage") or {}
        return Reply((content or "").strip(), choice.get("finish_reason") or "stop",
                     usage.get("prompt_tokens"), usage.get("completion_tokens"), seconds)

    def generate(self, prompts: list[Prompt]) -> list[Reply | Exception]:
        def attempt(p: Prompt):
            try:
                return self._one(p)
            except RequestFailed as exc:
                return exc
        return list(self._pool.map(attempt, prompts))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
