"""`score` as a pipeline Stage: read a sample -> the VLM's loss on its answers (batched) -> the
same sample with a `score` block.

The output is a scored copy of the input: image members are the input's bytes, unchanged, and
the json is the input sample's own json (its augment/caption block, tags, source) with the new
key and a `score` block added. An input that is not a ddaug shard gets a fresh sample json.
With image_gain, each conversation is scored a second time with every image blanked (mid-grey,
same size): loss_blank - loss says how much the answers need the picture.
"""

from __future__ import annotations

import collections
import json
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

from ddaug.pipeline import SampleFailure
from ddaug.pipeline.images import FORMAT_MEMBER_EXT, read_image
from ddaug.shards.schema import TEXT_ONLY_TASK, build_sample, encode_sample_json, image_member_names
from ddaug.sources import SourceItem
from ddaug.sources.readers import _split_member_name, index_tar

from .conversation import AnswerLoss, answer_turns
from .transformers_scorer import Conversation

BLANK_GREY = (128, 128, 128)


class ScoreBackend(Protocol):
    backend: str
    model_name: str

    def describe(self) -> dict[str, Any]: ...

    def score(self, conversations: list[Conversation]) -> list[AnswerLoss | Exception]: ...


def blanked(images: list[Image.Image]) -> list[Image.Image]:
    """Each image as a flat mid-grey picture of its size: the same tokens, no content."""
    return [Image.new("RGB", img.size, BLANK_GREY) for img in images]


@dataclass
class ScoreUnit:
    conversation: Conversation
    members: list[tuple[str, bytes]]        # (extension, bytes) of each image, as stored in the input
    sources: list[dict[str, Any]]           # source records of the images (fresh samples only)
    original: dict[str, Any] | None         # the input shard's sample json, when it has one
    model_sizes: list[list[int]] = field(default_factory=list)  # what the model was shown, per image
    pending: dict[str, Any] = field(default_factory=dict)  # openai backend: requests sent at load time


@dataclass
class ScoreResult:
    unit: ScoreUnit
    loss: AnswerLoss
    blank: AnswerLoss | None


class _TarJsons:
    """The json member of a sample in an input tar, by the reader's uri (`tar#key`, `~n` for a
    key repeated later in the tar). The tar's index is kept for the shard being read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()

    def _index(self, path: str) -> dict[str, Any]:
        with self._lock:
            if path in self._cache:
                self._cache.move_to_end(path)
                return self._cache[path]
        samples, _ = index_tar(path)
        by_uri, seen = {}, collections.Counter()
        for s in samples:  # the same rule as sources.readers.read_tar
            seen[s.key] += 1
            by_uri[f"{path}#{s.key}" + (f"~{seen[s.key]}" if seen[s.key] > 1 else "")] = s
        with self._lock:
            self._cache[path] = by_uri
            while len(self._cache) > 8:  # the loader threads read a few shards at most at once
                self._cache.popitem(last=False)
        return by_uri

    def read(self, item: SourceItem) -> dict[str, Any] | None:
        path, sep, _ = item.uri.partition("#")
        if not sep or not path.endswith(".tar"):
            return None
        sample = self._index(path).get(item.uri)
        if sample is None or "json" not in sample.members:
            return None
        m = sample.members["json"]
        with open(path, "rb") as f:
            f.seek(m.offset)
            meta = json.loads(f.read(m.size))
        return meta if isinstance(meta, dict) and isinstance(meta.get("messages"), list) else None


def _member_ext(ref_uri: str, fmt: str) -> str:
    """A tar member keeps its extension; a file gets the one of its real format."""
    if "#" in ref_uri and ref_uri.split("#", 1)[0].endswith(".tar"):
        return _split_member_name(os.path.basename(ref_uri.split("#", 1)[1]))[1].rsplit(".", 1)[-1]
    return FORMAT_MEMBER_EXT.get(fmt, "png")


class ScoreStage:
    command = "score"

    def __init__(self, backend: ScoreBackend, *, image_gain: bool = False, max_pixels: int | None = None):
        self.backend = backend
        self.image_gain = image_gain
        self.max_pixels = max_pixels
        self.device = getattr(backend, "device", None)
        self.streaming = hasattr(backend, "submit")  # requests go out at load time (openai backend)
        self._jsons = _TarJsons()

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if close:
            close()

    # -- loader threads ---------------------------------------------------------------------------
    def load(self, item: SourceItem) -> list[ScoreUnit]:
        original = self._jsons.read(item)
        messages = item.messages
        answer_turns(messages)
        refs = list(range(len(item.images)))
        if original and isinstance(original.get("images"), list):
            # Images in the order of their <image> tags (the json's list), not the tar's member order.
            by_name = {os.path.basename(r.uri.split("#", 1)[-1]): i for i, r in enumerate(item.images)}
            order = [by_name.get(str(name)) for name in original["images"]]
            if None not in order and sorted(order) == refs:
                refs = order
        images, members, sources, originals = [], [], [], []
        for i in refs:
            loaded = read_image(item, i, max_pixels=self.max_pixels)
            images.append(loaded.image)
            originals.append(None if "resized_to" in loaded.source else (loaded.data, loaded.source["format"]))
            members.append((_member_ext(item.images[i].uri, loaded.source["format"]), loaded.data))
            source = dict(loaded.source)
            source.pop("resized_to", None)  # the stored image is the original; score.model_images says what was scored
            sources.append(source)
        unit = ScoreUnit(Conversation(messages, images, originals), members, sources, original,
                         [list(img.size) for img in images])
        if self.streaming:
            unit.pending["loss"] = self.backend.submit(unit.conversation)
            if self.image_gain and images:
                unit.pending["blank"] = self.backend.submit(Conversation(messages, blanked(images)))
        return [unit]

    def bucket(self, unit: ScoreUnit):
        if self.streaming:
            return 0  # the server batches; any mix can go together
        images = unit.conversation.images
        if not images:
            return (0, 0)
        # Similar pixel counts give similar vision-token counts, so padding wastes little.
        return (len(images), round(math.log2(sum(i.width * i.height for i in images)) * 4))

    # -- the model thread ---------------------------------------------------------------------------
    def _scores(self, units: list[ScoreUnit], which: str) -> list[AnswerLoss | Exception | None]:
        if self.streaming:
            return [u.pending[which].result() if which in u.pending else None for u in units]
        if which == "loss":
            return self.backend.score([u.conversation for u in units])
        with_images = [i for i, u in enumerate(units) if u.conversation.images]
        out: list[AnswerLoss | Exception | None] = [None] * len(units)
        blanks = self.backend.score([Conversation(units[i].conversation.messages,
                                                  blanked(units[i].conversation.images)) for i in with_images])
        for i, res in zip(with_images, blanks):
            out[i] = res
        return out

    def run(self, units: list[ScoreUnit]) -> list[ScoreResult | SampleFailure]:
        losses = self._scores(units, "loss")
        blanks = self._scores(units, "blank") if self.image_gain else [None] * len(units)
        results: list[ScoreResult | SampleFailure] = []
        for unit, loss, blank in zip(units, losses, blanks):
            unit.pending.clear()
            unit.conversation.images = []  # the model is done with the pixels; the shard keeps the bytes
            failed = next((r for r in (loss, blank) if isinstance(r, Exception)), None)
            if failed is not None:
                results.append(failed if isinstance(failed, SampleFailure)
                               else SampleFailure("score", f"request failed: {failed}"))
            else:
                results.append(ScoreResult(unit, loss, blank))
        return results

    # -- builder threads ------------------------------------------------------------------------------
    def _block(self, unit: ScoreUnit, res: ScoreResult, item: SourceItem) -> dict[str, Any]:
        block = {**self.backend.describe(), "loss": round(res.loss.loss, 6),
                 "perplexity": round(math.exp(min(res.loss.loss, 700.0)), 6), "tokens": res.loss.tokens,
                 "answers": len(answer_turns(unit.conversation.messages)), "max_pixels": self.max_pixels,
                 "model_images": unit.model_sizes, "input": item.uri}
        if self.image_gain:
            if res.blank is None:  # no image to blank: a text-only sample
                block.update(loss_blank=None, image_gain=None)
            else:
                block.update(loss_blank=round(res.blank.loss, 6),
                             image_gain=round(res.blank.loss - res.loss.loss, 6), blank="mid-grey, same size")
        return block

    def build(self, item: SourceItem, results: list[ScoreResult]) -> dict[str, bytes]:
        (res,) = results
        unit = res.unit
        names = image_member_names(item.key, [ext for ext, _ in unit.members]) if unit.members else []
        block = self._block(unit, res, item)
        if unit.original is not None:
            sample = {**unit.original, "key": item.key, "images": names, "score": block}
        else:
            tags = {"domain": None, "task": "conversation", "stage": None, **item.tags}
            if not names:
                tags["task"] = TEXT_ONLY_TASK  # a conversation without images, as every command marks it
            sample = build_sample(item.key, messages=item.messages, image_names=names,
                                  source={"uri": item.uri, "images": unit.sources}, tags=tags,
                                  block_name="score", block=block, extra=item.extra)
        files = {name[len(item.key) + 1:]: data for name, (_, data) in zip(names, unit.members)}
        files["json"] = encode_sample_json(sample)
        return files
