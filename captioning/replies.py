"""Judging what a VLM said: instruct-reply parsing and answer quality flags."""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field

from ddaug.shards.schema import IMAGE_TAG


@dataclass
class Reply:
    """One generation, from either backend."""

    text: str
    finish_reason: str = "stop"       # stop | length | error
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


class MalformedReply(ValueError):
    """An instruct reply with no usable question/answer pair."""


_QUESTION_KEYS = ("question", "q", "问题", "提问")
_ANSWER_KEYS = ("answer", "a", "回答", "答案", "答")
_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)
_LABELLED = re.compile(
    r"(?:^|\n)\s*[*#>\-\s]*(?:question|q|问题|提问)\s*[*]*\s*[:：]\s*(?P<q>.+?)\s*"
    r"(?:\n\s*[*#>\-\s]*)(?:answer|a|回答|答案|答)\s*[*]*\s*[:：]\s*(?P<a>.+)$",
    re.I | re.S)


def _pick(obj: dict, keys: tuple[str, ...]) -> str | None:
    lowered = {str(k).strip().lower(): v for k, v in obj.items()}
    for k in keys:
        v = lowered.get(k)
        if isinstance(v, str) and v.strip():
            return v.strip()
    return None


def _json_objects(text: str):
    decoder = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch in "{[":
            try:
                obj, _ = decoder.raw_decode(text, i)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, list) and obj and isinstance(obj[0], dict):
                obj = obj[0]
            if isinstance(obj, dict):
                yield obj


def parse_instruct(text: str) -> tuple[str, str]:
    """(question, answer) from a reply: JSON (bare, fenced, inside prose, a one-element list,
    zh/en key names) or "Question: ... / Answer: ..." lines. Raises MalformedReply."""
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for chunk in candidates:
        for obj in _json_objects(chunk):
            q, a = _pick(obj, _QUESTION_KEYS), _pick(obj, _ANSWER_KEYS)
            if q and a:
                return _clean_question(q), a
    m = _LABELLED.search(text.strip())
    if m and m.group("q").strip() and m.group("a").strip():
        return _clean_question(m.group("q")), m.group("a").strip()
    snippet = " ".join(text.split())[:80]
    raise MalformedReply(f"no question/answer pair in reply: {snippet!r}")


def _clean_question(q: str) -> str:
    q = q.replace(IMAGE_TAG, "").strip()
    if not q:
        raise MalformedReply("empty question")
    return q


def _units(text: str) -> list[str]:
    """Words for spaced scripts, characters for CJK (which has no spaces)."""
    words = text.split()
    if len(words) * 4 < len(text.replace(" ", "")) / 2:  # long "words": unspaced script
        return [ch for ch in text if not ch.isspace()]
    return words


def is_degenerate(text: str) -> bool:
    """Repeated-token degeneration: a short block repeated to the end, or text that compresses
    far better than language does."""
    units = _units(text)
    n = len(units)
    if n < 16:
        return False
    for period in range(1, min(32, n // 4) + 1):
        block = units[n - period:]
        repeats, end = 1, n - period
        while end - period >= 0 and units[end - period:end] == block:
            repeats += 1
            end -= period
        if repeats >= 4 and repeats * period >= max(12, 0.3 * n):
            return True
    raw = text.encode("utf-8")
    return len(raw) >= 200 and len(zlib.compress(raw, 9)) / len(raw) < 0.12


def answer_flags(text: str, finish_reason: str) -> list[str]:
    flags = []
    if not text.strip():
        flags.append("empty")
    if finish_reason == "length":
        flags.append("truncated")
    if is_degenerate(text):
        flags.append("degenerate")
    return flags
