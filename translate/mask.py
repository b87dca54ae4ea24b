"""What a translation must not touch, hidden from the model behind numbered placeholders.

Before a turn is sent, its protected spans (image tags, fenced and inline code, JSON objects,
URLs, e-mail addresses, numbers, and any text that already looks like a placeholder) are
replaced with [[P1]], [[P2]]... in order; the model is told to keep them. After, each
placeholder is put back as the span it stands for. A reply that loses, repeats, reorders or
invents a placeholder is refused: the spans could no longer be put back where they belong.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ddaug.shards.schema import IMAGE_TAG

PLACEHOLDER = "[[P{}]]"
# As written, and as models sometimes echo it: spaces inside, lower case, or the full-width
# brackets of a Chinese or Japanese reply (［［P1］］).
PLACEHOLDER_RE = re.compile(r"[\[［]{2}\s*[Pp]\s*(\d+)\s*[\]］]{2}")

# Highest priority first: a span inside an earlier kind's span stays part of that one (a number
# in a URL, a URL in a code block).
_PATTERNS = [
    ("code block", re.compile(r"```.*?(?:```|\Z)", re.S)),   # unterminated: code to the end
    ("inline code", re.compile(r"`[^`\n]+`")),
    ("json", None),                                         # found by parsing, see _json_spans
    ("url", re.compile(r"(?:https?|ftp)://[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+"
                       r"|www\.[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")),
    ("email", re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")),
    ("image tag", re.compile(re.escape(IMAGE_TAG))),
    ("placeholder", PLACEHOLDER_RE),                        # literal look-alikes in the source
    # ASCII neighbours only: \w would take CJK characters as word characters (共有3只).
    ("number", re.compile(r"(?<![A-Za-z0-9_.])\d+(?:[.,:]\d+)*(?![A-Za-z0-9_])")),
]
_URL_TRAILING = ".,;:!?'"


class PlaceholderError(ValueError):
    """A reply whose placeholders cannot be put back; the message says which and how."""


@dataclass
class Masked:
    text: str            # what the model is sent
    spans: list[str]     # spans[i] is what [[P{i+1}]] stands for

    @property
    def prose(self) -> str:
        """The text without its placeholders: what is really translated."""
        return PLACEHOLDER_RE.sub(" ", self.text)


def _trim_url(text: str, start: int, end: int) -> int:
    """Sentence punctuation after a URL, and a closing bracket it did not open, are not the URL's."""
    while end > start:
        last = text[end - 1]
        opening = {")": "(", "]": "["}.get(last)
        if last in _URL_TRAILING or (opening and text.count(last, start, end) > text.count(opening, start, end)):
            end -= 1
        else:
            break
    return end


def _json_spans(text: str):
    decoder = json.JSONDecoder()
    i = text.find("{")
    while i >= 0:
        try:
            value, end = decoder.raw_decode(text, i)
        except (ValueError, RecursionError):
            end = -1
        else:
            if isinstance(value, dict):
                yield i, end
                i = text.find("{", end)
                continue
        i = text.find("{", i + 1)


def protected_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, kind) of every protected span, in text order, none overlapping."""
    taken: list[tuple[int, int, str]] = []

    def free(start: int, end: int) -> bool:
        return all(end <= s or start >= e for s, e, _ in taken)

    for kind, pattern in _PATTERNS:
        found = _json_spans(text) if pattern is None else ((m.start(), m.end()) for m in pattern.finditer(text))
        for start, end in found:
            if kind == "url":
                end = _trim_url(text, start, end)
            if end > start and free(start, end):
                taken.append((start, end, kind))
    return sorted(taken)


def mask(text: str) -> Masked:
    out, spans, pos = [], [], 0
    for start, end, _ in protected_spans(text):
        out.append(text[pos:start])
        spans.append(text[start:end])
        out.append(PLACEHOLDER.format(len(spans)))
        pos = end
    out.append(text[pos:])
    return Masked("".join(out), spans)


def unmask(reply: str, masked: Masked) -> str:
    """reply with its placeholders put back; PlaceholderError unless it holds each of them once,
    in order, and no other."""
    ids = [int(m.group(1)) for m in PLACEHOLDER_RE.finditer(reply)]
    n = len(masked.spans)
    unknown = sorted({i for i in ids if not 1 <= i <= n})
    if unknown:
        raise PlaceholderError(f"placeholder {PLACEHOLDER.format(unknown[0])} invented (the source has {n})")
    lost = [i for i in range(1, n + 1) if i not in ids]
    if lost:
        raise PlaceholderError(f"placeholder {PLACEHOLDER.format(lost[0])} lost "
                               f"({len(lost)} of {n} missing: {_shown(masked, lost[0])})")
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise PlaceholderError(f"placeholder {PLACEHOLDER.format(repeated[0])} duplicated "
                               f"({_shown(masked, repeated[0])})")
    if ids != sorted(ids):
        first = next(a for a, b in zip(ids, sorted(ids)) if a != b)
        raise PlaceholderError(f"placeholders reordered ({PLACEHOLDER.format(first)} moved: "
                               f"{_shown(masked, first)})")
    return PLACEHOLDER_RE.sub(lambda m: masked.spans[int(m.group(1)) - 1], reply)


def _shown(masked: Masked, i: int) -> str:
    span = masked.spans[i - 1]
    return repr(span if len(span) <= 40 else span[:37] + "...")
