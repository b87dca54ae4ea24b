"""The sample schema: one `{key}.json` per sample beside its image member(s).

{
  "key": "astronaut-1a2b3c4d5e6f",
  "messages": [{"role": "user", "content": "<image>..."}, {"role": "assistant", "content": "..."}],
  "images": ["astronaut-1a2b3c4d5e6f.png"],           # member names, in <image> order
  "source": {"uri": "...", "images": [{"uri", "sha256", "width", "height", "format"}]},
  "tags": {"domain": "general", "task": "conversation", "stage": null},
  "augment": {...}  or  "caption": {...},              # how the sample was made
  "extra": {...}                                       # optional: other fields carried from input
}

`messages`/`images` follow the LLaMA-Factory and ms-swift convention: when there are messages,
the number of "<image>" tags equals the number of images.
"""

from __future__ import annotations

import json
from typing import Any

IMAGE_TAG = "<image>"
IMAGE_SUFFIXES = ("png", "webp", "jpg", "jpeg", "bmp", "tif", "tiff", "gif")
PROVENANCE_BLOCKS = ("augment", "caption", "translate", "score")
ROLES = {"system", "user", "assistant", "observation", "function_call", "tool"}
# tags.task of a record without images, passed through unchanged (a json member only).
TEXT_ONLY_TASK = "text-only"


def image_member_names(key: str, exts: list[str]) -> list[str]:
    """`{key}.png` for one image, `{key}.0.png`, `{key}.1.png`... for several."""
    if len(exts) == 1:
        return [f"{key}.{exts[0]}"]
    return [f"{key}.{i}.{ext}" for i, ext in enumerate(exts)]


def count_image_tags(messages: list[dict[str, Any]]) -> int:
    return sum(str(m.get("content", "")).count(IMAGE_TAG) for m in messages if isinstance(m, dict))


def build_sample(key: str, *, messages: list[dict[str, Any]], image_names: list[str],
                 source: dict[str, Any], tags: dict[str, Any], block_name: str,
                 block: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    sample = {"key": key, "messages": messages, "images": image_names, "source": source,
              "tags": tags, block_name: block}
    if extra:
        sample["extra"] = extra
    return sample


def encode_sample_json(sample: dict[str, Any]) -> bytes:
    return json.dumps(sample, ensure_ascii=False, sort_keys=True).encode("utf-8")


def message_problems(messages: list[Any]) -> list[str]:
    """What --verify and the exports refuse in a conversation: unknown roles, non-text content."""
    return [f"message {i} needs a known role and string content" for i, m in enumerate(messages)
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str)]


def validate_sample(key: str, meta: Any, member_suffixes: set[str]) -> list[str]:
    """Problems with one sample (empty list if it is valid). member_suffixes are the parts of
    the member names after `{key}.`, e.g. {"png", "json"}."""
    problems = []
    if not isinstance(meta, dict):
        return ["json is not an object"]
    if meta.get("key") != key:
        problems.append(f"json key {meta.get('key')!r} does not match member key")
    messages = meta.get("messages")
    if not isinstance(messages, list):
        problems.append("messages is not a list")
        messages = []
    problems += message_problems(messages)
    images = meta.get("images")
    text_only = isinstance(meta.get("tags"), dict) and meta["tags"].get("task") == TEXT_ONLY_TASK
    if not isinstance(images, list) or not (images or text_only):
        problems.append("images must be a non-empty list")
        images = []
    if text_only and (images or not messages):
        problems.append(f"a {TEXT_ONLY_TASK} sample needs messages and no images")
    for name in images:
        suffix = str(name)[len(key) + 1:] if str(name).startswith(key + ".") else None
        if suffix is None or suffix not in member_suffixes:
            problems.append(f"image member {name!r} is missing")
        elif suffix.rsplit(".", 1)[-1] not in IMAGE_SUFFIXES:
            problems.append(f"image member {name!r} has no image extension")
    if messages and count_image_tags(messages) != len(images):
        problems.append(f"{count_image_tags(messages)} <image> tags for {len(images)} images")
    source = meta.get("source")
    if not isinstance(source, dict) or not isinstance(source.get("images"), list):
        problems.append("source must hold uri and images")
    else:
        for s in source["images"]:
            if not isinstance(s, dict) or not {"uri", "sha256", "width", "height", "format"} <= set(s):
                problems.append("source image entry needs uri, sha256, width, height, format")
                break
        if len(source["images"]) != len(images):
            problems.append("source.images and images differ in length")
    tags = meta.get("tags")
    if not isinstance(tags, dict) or not {"domain", "task", "stage"} <= set(tags):
        problems.append("tags must hold domain, task and stage")
    if not any(isinstance(meta.get(b), dict) for b in PROVENANCE_BLOCKS):
        problems.append(f"no provenance block ({', '.join(PROVENANCE_BLOCKS)})")
    return problems
