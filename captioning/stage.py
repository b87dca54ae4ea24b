"""`caption` as a pipeline Stage: read image -> ask the VLM (batched) -> judge the reply -> sample.

The image member is the input file's bytes, unchanged: recaptioning must not alter the very
diffusion traits the data is meant to carry.
"""

from __future__ import annotations

import collections
import io
import math
from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image

from pipeline import SampleFailure
from pipeline.images import FORMAT_MEMBER_EXT, LoadedImage, read_image
from pipeline.passthrough import TextOnlyCounter, text_only_units
from shards.schema import IMAGE_TAG, build_sample, encode_sample_json, image_member_names
from sources import SourceItem

from .questions import INSTRUCT_RETRY, Question, QuestionPicker
from .replies import MalformedReply, Reply, answer_flags, parse_instruct
from .vlm import GenerationSettings, Prompt

TASKS = ("caption", "instruct")
_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "MPO": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}


class VLMBackend(Protocol):
    backend: str
    model_name: str
    settings: GenerationSettings

    def describe(self) -> dict[str, Any]: ...

    def generate(self, prompts: list[Prompt]) -> list[Reply | Exception]: ...


@dataclass
class CaptionUnit:
    loaded: LoadedImage
    ext: str
    prompt: Question   # the caption question, or the instruct prompt sent to the VLM
    lang: str


@dataclass
class CaptionResult:
    unit: CaptionUnit
    question: str      # the user turn written to the sample (without the <image> tag)
    answer: str
    reply: Reply
    attempts: int
    flags: list[str]


def _exif_rotated(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.getexif().get(0x0112, 1) not in (0, 1)
    except Exception:
        return True


class CaptionStage:
    command = "caption"

    def __init__(self, vlm: VLMBackend, picker: QuestionPicker, *, task: str = "caption", seed: int = 0,
                 max_pixels: int | None = None, drop_truncated: bool = False,
                 tags: dict[str, Any] | None = None):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}")
        self.vlm = vlm
        self.picker = picker
        self.task = task
        self.seed = seed
        self.max_pixels = max_pixels
        self.drop_truncated = drop_truncated
        self.tags = tags or {}
        self.counts: collections.Counter = collections.Counter()  # flags and retries, for the summary
        self.text_only = TextOnlyCounter(self.counts)

    # -- loader threads ---------------------------------------------------------------------------
    def load(self, item: SourceItem) -> list[CaptionUnit]:
        if not item.images:
            return text_only_units(item)
        if len(item.images) != 1:
            raise SampleFailure("read", f"caption takes one image per sample; this one has {len(item.images)}")
        loaded = read_image(item, 0, max_pixels=self.max_pixels)
        fmt = loaded.source["format"]
        if fmt not in FORMAT_MEMBER_EXT:
            raise SampleFailure("decode", f"{fmt} images cannot be stored unchanged in a shard: {loaded.source['uri']}")
        if self.task == "caption":
            prompt = self.picker.caption_question(self.seed, item.key)
        else:
            prompt = self.picker.instruct_prompt(self.seed, item.key)
        return [CaptionUnit(loaded, FORMAT_MEMBER_EXT[fmt], prompt, prompt.lang)]

    def bucket(self, unit: CaptionUnit):
        if self.vlm.backend == "openai":
            return 0  # the server batches; any mix of sizes can go together
        # Similar pixel counts give similar vision-token counts, so left padding wastes little.
        w, h = unit.loaded.image.size
        return round(math.log2(w * h) * 4)

    # -- the job's thread ---------------------------------------------------------------------------
    def _prompt(self, unit: CaptionUnit, text: str) -> Prompt:
        src = unit.loaded.source
        send_original = "resized_to" not in src and src["format"] in _MIME and not _exif_rotated(unit.loaded.data)
        return Prompt(unit.loaded.image, text, unit.loaded.data if send_original else None,
                      _MIME.get(src["format"]) if send_original else None)

    def run(self, units: list[CaptionUnit]) -> list[CaptionResult | SampleFailure]:
        replies = self.vlm.generate([self._prompt(u, u.prompt.text) for u in units])
        results = [self._judge(u, r, 1) for u, r in zip(units, replies)]
        if self.task == "instruct":
            # A malformed instruct reply gets one more try, with a stricter reminder.
            again = [i for i, r in enumerate(results) if isinstance(r, MalformedReply)]
            if again:
                self.counts["instruct retries"] += len(again)
                retry = self.vlm.generate([self._prompt(units[i], f"{units[i].prompt.text}\n\n{INSTRUCT_RETRY[units[i].lang]}")
                                           for i in again])
                for i, reply in zip(again, retry):
                    results[i] = self._judge(units[i], reply, 2)
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
        names = image_member_names(item.key, [unit.ext])
        messages = [{"role": "user", "content": IMAGE_TAG + res.question},
                    {"role": "assistant", "content": res.answer}]
        tags = {"domain": "business", "task": self.task, "stage": None}
        tags.update({k: v for k, v in self.tags.items() if v is not None})
        block = {**self.vlm.describe(), "task": self.task, "question_id": unit.prompt.id,
                 "pool": unit.prompt.pool, "lang": unit.lang, "generation": self.vlm.settings.record(),
                 "max_pixels": self.max_pixels, "model_image": list(unit.loaded.image.size),
                 "prompt_tokens": res.reply.prompt_tokens, "completion_tokens": res.reply.completion_tokens,
                 "finish_reason": res.reply.finish_reason, "flags": res.flags, "attempts": res.attempts,
                 "seconds": round(res.reply.seconds, 3), "run_seed": self.seed}
        if self.task == "instruct":
            block["prompt"] = unit.prompt.text
        # The stored image is the original; the downsized copy the model saw is model_image.
        source = {k: v for k, v in unit.loaded.source.items() if k != "resized_to"}
        sample = build_sample(item.key, messages=messages, image_names=names,
                              source={"uri": item.uri, "images": [source]},
                              tags=tags, block_name="caption", block=block, extra=item.extra)
        return {unit.ext: unit.loaded.data, "json": encode_sample_json(sample)}
