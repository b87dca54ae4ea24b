"""Text-only records (a conversation, no image): not failures. By default they pass through
unchanged as a sample with a json member only and `tags.task` "text-only"; `--drop-text-only`
leaves them out before the run starts (counted, never in the ledger)."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from ddaug.shards.schema import IMAGE_TAG, TEXT_ONLY_TASK, build_sample, count_image_tags, encode_sample_json
from ddaug.sources import SourceItem

from .job import SampleFailure

TEXT_ONLY_COUNT = "text-only"


def is_text_only(item: SourceItem) -> bool:
    return not item.images and item.error is None and bool(item.messages)


def text_only_units(item: SourceItem) -> list:
    """What a stage's load returns for a text-only item: no work units, so the job hands it
    straight to the builders. A conversation that asks for images it does not have is broken."""
    tags = count_image_tags(item.messages)
    if tags:
        raise SampleFailure("read", f"conversation has {tags} {IMAGE_TAG} tags but the record has no image")
    return []


class TextOnlyCounter:
    """Counts text-only samples built (builder threads share it) into a stage's counts."""

    def __init__(self, counts: Counter):
        self.counts = counts
        self._lock = threading.Lock()

    def members(self, item: SourceItem, tags: dict[str, Any], block_name: str, block: dict[str, Any]) -> dict[str, bytes]:
        """The json-only sample of a text-only item: its conversation and extra fields unchanged."""
        sample = build_sample(item.key, messages=item.messages, image_names=[],
                              source={"uri": item.uri, "images": []},
                              tags={**tags, "task": TEXT_ONLY_TASK}, block_name=block_name,
                              block={**block, "passed_through": "no image"}, extra=item.extra)
        with self._lock:
            self.counts[TEXT_ONLY_COUNT] += 1
        return {"json": encode_sample_json(sample)}


def drop_text_only(items: list[SourceItem]) -> tuple[list[SourceItem], int]:
    kept = [it for it in items if not is_text_only(it)]
    return kept, len(items) - len(kept)
