"""The openai backend: answer losses from a server that returns prompt logprobs (vLLM).

It is the caption client (captioning/openai_api.py: a pool of --concurrency threads, retries
with backoff, the key from $OPENAI_API_KEY, same-origin redirects only) with another request
and reply. vLLM's chat completions take `prompt_logprobs: 0` and `add_generation_prompt`
(both beyond the OpenAI schema) and return `prompt_logprobs`: per prompt token a mapping
{token id: {"logprob", "rank", "decoded_token"}} (null for the first token).

The client has no tokenizer, so it asks the server where each answer starts: for answer turn
i, the prompt token count of the conversation before it with the generation prompt, and (for
an answer followed by more turns) of the conversation through it. The whole conversation is
then sent once with prompt_logprobs, and the answer tokens are the positions between those
counts: the same tokens as the transformers backend (conversation.py). A single-turn sample
costs two requests; the first is a prompt the second extends, which vLLM's prefix cache reuses.
"""

from __future__ import annotations

import base64
import json
import math
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from ddaug.captioning.images import SEND_AS_IS, encode_for_request
from ddaug.captioning.openai_api import BackendUnavailable, OpenAIVLM, RequestFailed
from ddaug.captioning.vlm import GenerationSettings
from ddaug.shards.schema import IMAGE_TAG

from .conversation import AnswerLoss, answer_turns, content_parts
from .transformers_scorer import Conversation


@dataclass
class PromptRequest:
    messages: list[dict[str, Any]]    # OpenAI chat messages, images as data URLs
    add_generation_prompt: bool
    logprobs: bool                    # ask for prompt_logprobs (else only the token count is used)


@dataclass
class PromptReply:
    tokens: int
    logprobs: list[float | None] | None


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def request_image(image, data: bytes | None = None, fmt: str | None = None) -> str:
    """What a request carries for one image: the file's own bytes when the server can take them
    and they are what was scored (not downsized), else a JPEG q95 of the picture (PNG for a
    blank one: flat, so tiny and exact)."""
    if data is not None and fmt in SEND_AS_IS:
        return data_url(data, SEND_AS_IS[fmt])
    flat = image.getextrema() and all(lo == hi for lo, hi in image.getextrema())
    return data_url(*encode_for_request(image, lossless=flat))


def chat_messages(messages: list[dict[str, Any]], urls: list[str]) -> list[dict[str, Any]]:
    """ddaug messages as OpenAI chat messages: a turn with images as content parts (the URLs in
    tag order), else a string."""
    next_url = iter(urls)
    out = []
    for m in messages:
        text = str(m.get("content", ""))
        if IMAGE_TAG in text:
            out.append({"role": m["role"], "content": content_parts(
                text, lambda n: {"type": "image_url", "image_url": {"url": next(next_url)}})})
        else:
            out.append({"role": m["role"], "content": text})
    return out


def _token_logprob(entry: Any) -> float:
    """The prompt token's logprob from one prompt_logprobs entry (requested with 0 alternatives,
    so the entry holds the prompt token alone)."""
    if not isinstance(entry, dict) or len(entry) != 1:
        raise ValueError("a prompt_logprobs entry is not a one-token mapping")
    (value,) = entry.values()
    logprob = float(value["logprob"] if isinstance(value, dict) else value)
    if not math.isfinite(logprob):
        raise ValueError("a prompt logprob is not finite")
    return logprob


class OpenAIScorer(OpenAIVLM):
    """Submit a conversation, get a future of its AnswerLoss (or a RequestFailed)."""

    def __init__(self, api_base: str, model: str, *, concurrency: int = 8, timeout: float = 120.0,
                 max_retries: int = 5, backoff: float = 1.0, check: bool = True):
        # One generated token per request: the server has to generate something; it is ignored.
        super().__init__(api_base, model, settings=GenerationSettings(max_new_tokens=1), concurrency=concurrency,
                         timeout=timeout, max_retries=max_retries, backoff=backoff, check=check)

    def _payload(self, prompt: PromptRequest) -> bytes:  # type: ignore[override]
        body: dict[str, Any] = {"model": self.model_name, "messages": prompt.messages, "max_tokens": 1,
                                "temperature": 0.0, "n": 1, "add_generation_prompt": prompt.add_generation_prompt}
        if prompt.logprobs:
            body["prompt_logprobs"] = 0
        return json.dumps(body).encode("utf-8")

    def _reply(self, body: dict[str, Any], seconds: float) -> PromptReply:  # type: ignore[override]
        logprobs = body.get("prompt_logprobs")
        if "prompt_logprobs" in body and logprobs is not None:
            if not isinstance(logprobs, list) or not logprobs:
                raise ValueError("prompt_logprobs is not a list")
            values = [None] + [_token_logprob(e) for e in logprobs[1:]]
            return PromptReply(len(values), values)
        body["choices"][0]  # a chat completion at all (else: malformed, retried)
        tokens = (body.get("usage") or {}).get("prompt_tokens")
        # Checked where it is used: a count that is missing or off makes the answer's tokens not nest.
        return PromptReply(tokens if isinstance(tokens, int) else 0, None)

    def _request(self, messages: list[dict[str, Any]], add_generation_prompt: bool, logprobs: bool) -> Future:
        return self._pool.submit(PromptRequest(messages, add_generation_prompt, logprobs))

    def submit(self, conversation: Conversation, priority: int = 1) -> Future:  # type: ignore[override]
        """The conversation's requests go out now; the future gives its AnswerLoss once all are
        answered (or the RequestFailed of one), or raises BackendUnavailable."""
        turns = answer_turns(conversation.messages)
        originals = conversation.originals or [None] * len(conversation.images)
        urls = [request_image(img, *(original or (None, None))) for img, original in zip(conversation.images, originals)]
        chat = chat_messages(conversation.messages, urls)
        bounds = [(self._request(chat[:i], True, False),
                   None if i == len(chat) - 1 else self._request(chat[:i + 1], False, False)) for i in turns]
        full = self._request(chat, False, True)
        parts = [full] + [f for pair in bounds for f in pair if f is not None]
        result: Future = Future()
        waiting = [len(parts)]
        lock = threading.Lock()

        def one_done(_: Future) -> None:
            with lock:
                waiting[0] -= 1
                if waiting[0]:
                    return
            if any(f.cancelled() for f in parts):  # the pool was closed: the run is stopping
                result.cancel()
                return
            if not result.set_running_or_notify_cancel():
                return
            try:
                result.set_result(self._answer_loss(bounds, full))
            except BaseException as exc:  # BackendUnavailable: delivered to whoever waits on the sample
                result.set_exception(exc)

        for f in parts:
            f.add_done_callback(one_done)
        return result

    def _answer_loss(self, bounds: list[tuple[Future, Future | None]], full: Future) -> AnswerLoss | RequestFailed:
        replies = [full.result()] + [f.result() for pair in bounds for f in pair if f is not None]
        failed = next((r for r in replies if isinstance(r, RequestFailed)), None)
        if failed is not None:
            return failed
        whole = replies[0]
        if whole.logprobs is None:
            raise BackendUnavailable(f"{self.api_base} returned no prompt_logprobs; scoring needs a server that "
                                     f"supports them (vLLM: it returns prompt_logprobs for chat completions)")
        nll, tokens = 0.0, 0
        for start_future, end_future in bounds:
            start = start_future.result().tokens
            end = end_future.result().tokens if end_future is not None else whole.tokens
            if not 1 <= start < end <= whole.tokens:
                return RequestFailed(f"the server's token counts do not nest ({start}, {end}, {whole.tokens})")
            nll -= sum(whole.logprobs[start:end])
            tokens += end - start
        return AnswerLoss(nll, tokens)
