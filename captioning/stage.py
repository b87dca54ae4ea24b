"""`caption` as a pipeline Stage: read image -> ask the VLM (batched) -> judge the reply -> sample.

The image member is the input file's bytes, unchanged: recaptioning must not alter the very
diffusion traits the data is meant to carry (an EXIF-rotated input is stored upright, see
images.py). With the openai backend the request is submitted as soon as the image is read (in
the loader threads, ahead of the job's batches), so --concurrency requests stay in flight across
batch and shard boundaries; the job's batch only collects the answers, in its own order.
"""

from __future__ import annotations

import collections
import contextlib
import math
import re
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from ddaug.pipeline import SampleFailure
from ddaug.pipeline.passthrough import TextOnlyCounter, text_only_units
from ddaug.shards.schema import IMAGE_TAG, build_sample, encode_sample_json, image_member_names
from ddaug.sources import SourceItem

from .images import CaptionImage, load_caption_image
from ddaug.shards.questions import INSTRUCT_RETRY, Question, QuestionPicker
from .replies import MalformedReply, Reply, answer_flags, parse_instruct
from .timing import CaptionTimes
from .vlm import GenerationSettings, Prompt

TASKS = ("caption", "instruct")


class VLMBackend(Protocol):
    backend: str
    model_name: str
    settings: GenerationSettings

    def describe(self) -> dict[str, Any]: ...

    def generate(self, prompts: list[Prompt]) -> list[Reply | Exception]: ...


@dataclass
class CaptionUnit:
    image: CaptionImage
    prompt: Question   # the caption question, or the instruct prompt sent to the VLM
    lang: str
    pending: Future | None = None  # openai backend: the request, submitted at load time


@dataclass
class CaptionResult:
    unit: CaptionUnit
    question: str      # the user turn written to the sample (without the <image> tag)
    answer: str
    reply: Reply
    attempts: int
    flags: list[str]


class CaptionStage:
    command = "caption"

    def __init__(self, vlm: VLMBackend, picker: QuestionPicker, *, task: str = "caption", seed: int = 0,
                 max_pixels: int | None = None, drop_truncated: bool = False,
                 tags: dict[str, Any] | None = None, lossless: bool = False):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}")
        self.vlm = vlm
        self.picker = picker
        self.task = task
        self.seed = seed
        self.max_pixels = max_pixels
        self.drop_truncated = drop_truncated
        self.tags = tags or {}
        self.lossless = lossless
        self.streaming = hasattr(vlm, "submit")  # requests go out at load time (openai backend)
        self.counts: collections.Counter = collections.Counter()  # flags and retries, for the summary
        self.text_only = TextOnlyCounter(self.counts)
        if self.streaming:
            self.times = CaptionTimes(vlm.concurrency)
            vlm.times = self.times

    def close(self) -> None:
        close = getattr(self.vlm, "close", None)
        if close:
            close()

    # -- loader threads ---------------------------------------------------------------------------
    def load(self, item: SourceItem) -> list[CaptionUnit]:
        if not item.images:
            return text_only_units(item)
        if len(item.images) != 1:
            raise SampleFailure("read", f"caption takes one image per sample; this one has {len(item.images)}")
        with self.times.measure_cpu("decode+resize+encode") if self.streaming else contextlib.nullcontext():
            image = load_caption_image(item, max_pixels=self.max_pixels, for_server=self.streaming,
                                       lossless=self.lossless)
        if self.task == "caption":
            prompt = self.picker.caption_question(self.seed, item.key)
        else:
            prompt = self.picker.instruct_prompt(self.seed, item.key)
        unit = CaptionUnit(image, prompt, prompt.lang)
        if self.streaming:
            unit.pending = self.vlm.submit(self._prompt(unit, prompt.text))
        return [unit]

    def bucket(self, unit: CaptionUnit):
        if self.streaming:
            return 0  # the server batches; any mix of sizes can go together
        # Similar pixel counts give similar vision-token counts, so left padding wastes little.
        w, h = unit.image.model_size
        return round(math.log2(w * h) * 4)

    # -- the job's thread ---------------------------------------------------------------------------
    def _prompt(self, unit: CaptionUnit, text: str) -> Prompt:
        return Prompt(unit.image.pixels, text, unit.image.send, unit.image.mime)

    def _ask(self, units: list[CaptionUnit], texts: list[str] | None = None) -> list[Reply | Exception]:
        if texts is None and self.streaming:
            return [u.pending.result() for u in units]
        prompts = [self._prompt(u, t) for u, t in zip(units, texts or [u.prompt.text for u in units])]
        if self.streaming:  # a second try: ahead of the queued first tries
            return [f.result() for f in [self.vlm.submit(p, priority=0) for p in prompts]]
        return self.vlm.generate(prompts)

    def run(self, units: list[CaptionUnit]) -> list[CaptionResult | SampleFailure]:
        replies = self._ask(units)
        for u in units:
            u.pending = None
        results = [self._judge(u, r, 1) for u, r in zip(units, replies)]
        if self.task == "instruct":
            # A malformed instruct reply gets one more try, with a stricter reminder.
            again = [i for i, r in enumerate(results) if isinstance(r, MalformedReply)]
            if again:
                self.counts["instruct retries"] += len(again)
                retry = self._ask([units[i] for i in again],
                                  [f"{units[i].prompt.text}\n\n{INSTRUCT_RETRY[units[i].lang]}" for i in again])
                for i, reply in zip(again, retry):
                    results[i] = self._judge(units[i], reply, 2)
        for u in units:  # the model is done with them; keep only what the shard stores
            u.image.pixels = u.image.send = None
        return [SampleFailure("caption", f"malformed instruct reply after a retry: {r}")
                if isinstance(r, MalformedReply) else r for r in results]

    def _judge(self, unit: CaptionUnit, reply: Reply | Exception, attempt: int):
        if isinstance(reply, Exception):
            return SampleFailure("caption", f"request failed: {reply}")
        if self.task == "instruct":
            try:
                question, answer = parse_instruct(reply.text)
            except MalformedReply as exc:
                return exc
        else:
            question, answer = unit.prompt.text, reply.text
        if IMAGE_TAG in answer:
            # The tag marks where the one image goes; a second one in the answer would make a
            # sample that --verify and every trainer refuse (2 tags for 1 image).
            answer = re.sub(rf"[ \t]*{re.escape(IMAGE_TAG)}[ \t]*", " ", answer).strip()
            self.counts["image tag removed from answer"] += 1
        flags = answer_flags(answer, reply.finish_reason)
        self.counts.update(flags)
        if "empty" in flags:
            return SampleFailure("caption", "empty answer")
        if self.drop_truncated and {"truncated", "degenerate"} & set(flags):
            self.counts["dropped"] += 1
            return SampleFailure("caption", f"answer {'/'.join(f for f in flags if f != 'empty')} "
                                            f"(dropped by --drop-truncated; max_new_tokens "
                                            f"{self.vlm.settings.max_new_tokens})")
        return CaptionResult(unit, question, answer, reply, attempt, flags)

    # -- builder threads ------------------------------------------------------------------------------
    def build(self, item: SourceItem, results: list[CaptionResult]) -> dict[str, bytes]:
        if not results:
            tags = {"domain": "business", "stage": None, **{k: v for k, v in self.tags.items() if v is not None}}
            return self.text_only.members(item, tags, "caption", {"run_seed": self.seed})
        (res,) = results
        unit = res.unit
        names = image_member_names(item.key, [unit.image.ext])
        messages = [{"role": "user", "content": IMAGE_TAG + res.question},
                    {"role": "assistant", "content": res.answer}]
        tags = {"domain": "business", "task": self.task, "stage": None}
        tags.update({k: v for k, v in self.tags.items() if v is not None})
        block = {**self.vlm.describe(), "task": self.task, "question_id": unit.prompt.id,
                 "pool": unit.prompt.pool, "lang": unit.lang, "generation": self.vlm.settings.record(),
                 "max_pixels": self.max_pixels, "model_image": list(unit.image.model_size),
                 "prompt_tokens": res.reply.prompt_tokens, "completion_tokens": res.reply.completion_tokens,
                 "finish_reason": res.reply.finish_reason, "flags": res.flags, "attempts": res.attempts,
                 "seconds": round(res.reply.seconds, 3), "run_seed": self.seed}
        if self.task == "instruct":
            block["prompt"] = unit.prompt.text
        # The stored image is the original (upright); the downsized copy the model saw is model_image.
        source = unit.image.source
        sample = build_sample(item.key, messages=messages, image_names=names,
                              source={"uri": item.uri, "images": [source]},
                              tags=tags, block_name="caption", block=block, extra=item.extra)
        return {unit.image.ext: unit.image.stored, "json": encode_sample_json(sample)}
