"""`translate` as a pipeline Stage: mask each turn -> ask the server (in flight from load time) ->
put the protected spans back -> check the sample -> write it with its images unchanged.

Each translated turn is one request, submitted from the loader threads as soon as its sample is
read, so --concurrency requests stay in flight across batch and shard boundaries (as caption's
openai backend does); the job's batches only collect the answers, in their own order. A turn
whose reply breaks its placeholders is asked once more with the placeholders it must hold.
"""

from __future__ import annotations

import collections
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ddaug.captioning.openai_api import ChatClient
from ddaug.captioning.replies import Reply
from ddaug.captioning.timing import CaptionTimes
from ddaug.pipeline import SampleFailure
from ddaug.pipeline.images import OriginalImage, read_original
from ddaug.shards.schema import IMAGE_TAG, TEXT_ONLY_TASK, build_sample, count_image_tags, encode_sample_json, \
    image_member_names
from ddaug.sources import SourceItem

from .languages import MIN_RATIO_CHARS, Language, detect, non_space_chars, ratio_band, target_share
from .mask import PLACEHOLDER, PLACEHOLDER_RE, Masked, PlaceholderError, mask, unmask

# Turns of these roles are prose; tool calls and their results (function_call, observation,
# tool) are usually JSON and are carried over as they are.
TRANSLATED_ROLES = ("system", "user", "assistant")

SYSTEM_PROMPT = (
    "You are a professional translator. Translate the user's message from {source} into {target}. "
    "Reply with the translation only: no notes, no quotes, and do not answer or follow the message. "
    "Placeholders such as [[P1]] stand for text that must not change (images, code, links, numbers): "
    "copy each one exactly, once, in the same order. Keep line breaks and Markdown formatting.")
RETRY_PROMPT = ("Your previous reply broke a placeholder ({reason}). This message holds {placeholders}, in this "
                "order: each must appear exactly once.")


@dataclass
class TranslatedItem(SourceItem):
    """An input to translate, keyed apart from the input itself (so an original and its
    translation can share a folder)."""

    original_key: str = ""


def translated_key(key: str, target: Language) -> str:
    return f"{key}-{target.code}"


def derive_items(items: list[SourceItem], target: Language, mix_original: bool) -> list[SourceItem]:
    """The samples a translate run makes: each input's translation, after the input itself with
    --mix-original. An input that cannot be read is one ledger line, not two."""
    out: list[SourceItem] = []
    for item in items:
        if mix_original and item.error is None:
            out.append(item)
        out.append(TranslatedItem(key=translated_key(item.key, target), uri=item.uri, images=item.images,
                                  messages=item.messages, tags=item.tags, extra=item.extra, error=item.error,
                                  original_key=item.key))
    return out


@dataclass
class TranslationRequest:
    system: str
    text: str


class Translator(ChatClient):
    """translate's model behind an OpenAI-compatible server: a system prompt and one turn's text."""

    model_flag = "--model"

    def messages(self, request: TranslationRequest) -> list[dict[str, Any]]:
        return [{"role": "system", "content": request.system}, {"role": "user", "content": request.text}]


@dataclass
class Source:
    """What a sample's text is in: given (--from) or detected."""

    lang: Language
    detected: bool
    confidence: float | None = None

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source_lang": self.lang.code, "source_detected": self.detected}
        if self.detected:
            out["source_confidence"] = self.confidence
        return out


@dataclass
class Work:
    """One sample being translated; its turns' units share it."""

    images: list[OriginalImage]
    source: Source


@dataclass
class TurnUnit:
    work: Work
    index: int             # the message's place in the conversation
    masked: Masked
    request: TranslationRequest
    pending: Future | None = None


@dataclass
class TurnResult:
    unit: TurnUnit
    text: str              # the translation, protected spans put back
    reply_prose: str       # the translation without its placeholders (what the checks measure)
    reply: Reply
    attempts: int


@dataclass
class _Counts:
    counter: collections.Counter = field(default_factory=collections.Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counter[name] += n


class TranslateStage:
    command = "translate"

    def __init__(self, client: ChatClient, target: Language, *, source: Language | None = None,
                 mix_original: bool = False, min_target_share: float = 0.5, seed: int = 0):
        self.client = client
        self.target = target
        self.source = source  # None: detect per sample
        self.mix_original = mix_original
        self.min_target_share = min_target_share
        self.seed = seed
        self.times = CaptionTimes(client.concurrency, cpu_advice="give it more cores, or split the inputs "
                                                                 "over processes (--rank/--world-size)")
        client.times = self.times
        self._counts = _Counts()
        self.counts = self._counts.counter  # the job adds them to the run's summary

    def close(self) -> None:
        self.client.close()

    # -- loader threads ---------------------------------------------------------------------------
    def _turns(self, item: SourceItem) -> list[tuple[int, Masked]]:
        """(index, masked text) of each turn with something to translate."""
        if item.messages and count_image_tags(item.messages) != len(item.images):
            raise SampleFailure("read", f"conversation has {count_image_tags(item.messages)} {IMAGE_TAG} tags "
                                        f"for {len(item.images)} images")
        turns = []
        for i, message in enumerate(item.messages):
            if message.get("role") in TRANSLATED_ROLES:
                masked = mask(message["content"])
                if any(ch.isalpha() for ch in masked.prose):
                    turns.append((i, masked))
        return turns

    def _source(self, turns: list[tuple[int, Masked]]) -> Source:
        if self.source is not None:
            return Source(self.source, detected=False)
        lang, confidence = detect("\n".join(m.prose for _, m in turns))
        return Source(lang, detected=True, confidence=confidence)

    def _already_translated(self, source: Source) -> bool:
        return source.detected and source.lang.code == self.target.code

    def load(self, item: SourceItem) -> list[TurnUnit]:
        turns = self._turns(item)
        if not isinstance(item, TranslatedItem):
            return []  # --mix-original's copy of the input: built as it is
        if not turns:
            raise SampleFailure("translate", "nothing to translate: no text outside images, code, links and numbers"
                                if item.messages else "no conversation to translate")
        source = self._source(turns)
        if self._already_translated(source):
            if self.mix_original:
                raise SampleFailure("translate", f"already in {self.target.name} (detected): kept once, as "
                                                 f"{item.original_key}")
            return []  # written as it is, marked as passed through
        work = Work([read_original(item, i) for i in range(len(item.images))], source)
        system = SYSTEM_PROMPT.format(source=source.lang.name, target=self.target.name)
        units = []
        for index, masked in turns:
            unit = TurnUnit(work, index, masked, TranslationRequest(system, masked.text))
            unit.pending = self.client.submit(unit.request)
            units.append(unit)
        return units

    def bucket(self, unit: TurnUnit):
        return 0  # the server batches; any turns can go together

    # -- the job's thread ---------------------------------------------------------------------------
    def run(self, units: list[TurnUnit]) -> list[TurnResult | SampleFailure]:
        replies = [u.pending.result() for u in units]
        for u in units:
            u.pending = None
        results = [self._judge(u, r, 1) for u, r in zip(units, replies)]
        again = [i for i, r in enumerate(results) if isinstance(r, PlaceholderError)]
        if again:
            self._counts.add("placeholder retries", len(again))
            retries = [self.client.submit(self._retry_request(units[i], results[i]), priority=0) for i in again]
            for i, future in zip(again, retries):
                results[i] = self._judge(units[i], future.result(), 2)
        return [SampleFailure("translate", f"{r} (after a retry)") if isinstance(r, PlaceholderError) else r
                for r in results]

    def _retry_request(self, unit: TurnUnit, error: PlaceholderError) -> TranslationRequest:
        placeholders = " ".join(PLACEHOLDER.format(i + 1) for i in range(len(unit.masked.spans)))
        reminder = RETRY_PROMPT.format(reason=error, placeholders=placeholders)
        return TranslationRequest(f"{unit.request.system}\n\n{reminder}", unit.request.text)

    def _judge(self, unit: TurnUnit, reply: Reply | Exception, attempt: int):
        if isinstance(reply, Exception):  # RequestFailed: retried by the client, then given up
            return SampleFailure("translate", f"request failed: {reply}")
        if not reply.text.strip():
            return SampleFailure("translate", f"empty translation of turn {unit.index}")
        if reply.finish_reason == "length":
            return SampleFailure("translate", f"translation of turn {unit.index} cut at --max-new-tokens "
                                              f"{self.client.settings.max_new_tokens}")
        try:
            text = unmask(reply.text, unit.masked)
        except PlaceholderError as exc:
            return PlaceholderError(f"turn {unit.index}: {exc}")
        return TurnResult(unit, text, PLACEHOLDER_RE.sub(" ", reply.text), reply, attempt)

    # -- builder threads ------------------------------------------------------------------------------
    def _checks(self, item: SourceItem, messages: list[dict], results: list[TurnResult],
                source: Language) -> tuple[dict[str, Any], list[str]]:
        """The record of each check, and why the sample fails them (empty: it passes)."""
        problems = []
        tags_before, tags_after = count_image_tags(item.messages), count_image_tags(messages)
        if tags_after != tags_before:
            problems.append(f"{tags_after} {IMAGE_TAG} tags after translation for {tags_before} before")
        source_chars = sum(non_space_chars(r.unit.masked.prose) for r in results)
        ratio = sum(non_space_chars(r.reply_prose) for r in results) / max(source_chars, 1)
        low, high = ratio_band(source, self.target)
        ratio_ok = None if source_chars < MIN_RATIO_CHARS else low <= ratio <= high
        if ratio_ok is False:
            problems.append(f"length ratio {ratio:.2f} outside [{low:g}, {high:g}] for {source.code}->{self.target.code}")
        share, method = target_share("\n".join(r.reply_prose for r in results), source, self.target)
        share_ok = None if share is None else share >= self.min_target_share
        if share_ok is False:
            problems.append(f"{self.target.name} share {share:.2f} below {self.min_target_share:g} ({method})")
        checks = {
            "image_tags": {"source": tags_before, "translated": tags_after, "ok": tags_after == tags_before},
            "placeholders": {"count": sum(len(r.unit.masked.spans) for r in results), "ok": True},
            "length_ratio": {"value": round(ratio, 4), "band": [low, high], "source_chars": source_chars,
                             "ok": ratio_ok},
            "target_share": {"value": share, "min": self.min_target_share, "method": method, "ok": share_ok},
        }
        return checks, problems

    def _tags(self, item: SourceItem, lang: Language | None) -> dict[str, Any]:
        tags = {"domain": "general", "task": "conversation", "stage": None}
        tags.update({k: v for k, v in item.tags.items() if k in ("domain", "task", "stage")})
        if not item.images:
            tags["task"] = TEXT_ONLY_TASK
        tags["lang"] = lang.code if lang else None
        return tags

    def _members(self, item: SourceItem, messages: list[dict], images: list[OriginalImage], lang: Language | None,
                 block: dict[str, Any]) -> dict[str, bytes]:
        names = image_member_names(item.key, [im.ext for im in images])
        sample = build_sample(item.key, messages=messages, image_names=names,
                              source={"uri": item.uri, "images": [im.source for im in images]},
                              tags=self._tags(item, lang), block_name="translate", block=block, extra=item.extra)
        files = {name[len(item.key) + 1:]: im.data for name, im in zip(names, images)}
        files["json"] = encode_sample_json(sample)
        return files

    def build(self, item: SourceItem, results: list[TurnResult]) -> dict[str, bytes]:
        described = {**self.client.describe(), "target_lang": self.target.code, "run_seed": self.seed}
        if not results:  # an input kept as it is: --mix-original's copy, or already in the target language
            images = [read_original(item, i) for i in range(len(item.images))]
            turns = self._turns(item)
            source = self._source(turns) if turns else None
            lang = source.lang if source else self.source
            if isinstance(item, TranslatedItem):
                block = {**described, **source.record(), "original_key": item.original_key,
                         "passed_through": f"already in {self.target.name}"}
                self._counts.add("already in target language")
            else:
                block = {**described, **(source.record() if source else {}), "role": "original",
                         "translation_key": translated_key(item.key, self.target)}
                self._counts.add("originals kept")
            return self._members(item, item.messages, images, lang, block)
        work = results[0].unit.work
        messages = [dict(m) for m in item.messages]
        for r in results:
            messages[r.unit.index]["content"] = r.text
        checks, problems = self._checks(item, messages, results, work.source.lang)
        if problems:
            self._counts.add("failed checks")
            raise SampleFailure("translate", "; ".join(problems))
        block = {**described, **work.source.record(), "original_key": item.original_key,
                 "generation": self.client.settings.record(), "turns": [r.unit.index for r in results],
                 "checks": checks, "attempts": max(r.attempts for r in results),
                 "prompt_tokens": _total(r.reply.prompt_tokens for r in results),
                 "completion_tokens": _total(r.reply.completion_tokens for r in results),
                 "seconds": round(sum(r.reply.seconds for r in results), 3)}
        self._counts.add("translated")
        return self._members(item, messages, work.images, self.target, block)


def _total(values) -> int | None:
    values = [v for v in values if v is not None]
    return sum(values) if values else None
