"""One input record (a dataset row, a tar sample's json) -> conversation, image paths, tags, extra.

Input records come in many dialects (LLaMA-Factory `messages`, ShareGPT `conversations` with
from/value, OpenAI content parts). They are normalised to what the shard schema and the exports
accept: turns of {"role": one of schema.ROLES, "content": str}. Anything that cannot be read
that way raises RecordError with the reason for the failure ledger, never drops data quietly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

IMAGE_TAG = "<image>"
# Role names of the dialects ddaug reads, to the schema's roles (shards/schema.py ROLES).
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
              "system": "system", "observation": "observation", "function_call": "function_call",
              "tool": "tool"}
# OpenAI-style content parts that stand for an image (chat completions, responses, HF chat templates).
IMAGE_PART_TYPES = {"image", "image_url", "input_image"}
TEXT_PART_TYPES = {"text", "input_text", "output_text"}
# The fields a reader maps itself; every other field of a record is kept in `extra`.
CONVERSATION_FIELDS = ("messages", "conversations")
IMAGE_FIELDS = ("images", "image")


class RecordError(ValueError):
    """A record that cannot become a sample; the message is the ledger reason."""


@dataclass
class Record:
    messages: list[dict[str, Any]] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    tags: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _flatten_content(content: Any, where: str) -> str:
    """A turn's content as one string: OpenAI content parts are joined, image parts become <image>."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RecordError(f"{where}: content is {_type_name(content)}, expected text or a list of parts")
    pieces = []
    for part in content:
        if isinstance(part, str):
            pieces.append(part)
        elif isinstance(part, dict) and part.get("type") in TEXT_PART_TYPES and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES:
            pieces.append(IMAGE_TAG)
        else:
            kind = part.get("type") if isinstance(part, dict) else _type_name(part)
            raise RecordError(f"{where}: content part of type {kind!r} is neither text nor an image")
    return "".join(pieces)


def _turns(value: Any, field_name: str) -> list[Any]:
    if isinstance(value, str):
        # Some exports store the conversation as a JSON string; read it if it is one.
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise RecordError(f"{field_name} is a string, not a list of turns") from None
    if not isinstance(value, list):
        raise RecordError(f"{field_name} is {_type_name(value)}, not a list of turns")
    return value


def _field(record: dict[str, Any], names: tuple[str, ...]) -> str | None:
    """The first of names the record fills (an empty one yields to a filled alternative)."""
    present = [f for f in names if record.get(f) not in (None, [], "")]
    return present[0] if present else next((f for f in names if f in record), None)


def normalise_messages(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The record's conversation as schema turns ([] when it has none); RecordError if unreadable."""
    field_name = _field(record, CONVERSATION_FIELDS)
    if field_name is None or record[field_name] is None:
        return []
    out = []
    for i, turn in enumerate(_turns(record[field_name], field_name)):
        where = f"{field_name}[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(f"{where} is {_type_name(turn)}, not an object")
        raw_role = turn.get("role", turn.get("from"))
        role = ROLE_NAMES.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise RecordError(f"{where}: unknown role {raw_role!r} (known: {', '.join(sorted(ROLE_NAMES))})")
        content = turn["content"] if "content" in turn else turn.get("value")
        message = {k: v for k, v in turn.items() if k not in ("role", "from", "content", "value")}
        message.update(role=role, content=_flatten_content(content, where))
        out.append(message)
    return out


def record_images(record: dict[str, Any]) -> list[str]:
    """Image paths of a record: a path, or a list of paths (or {"path": ...} objects)."""
    field_name = _field(record, IMAGE_FIELDS)
    if field_name is None or record[field_name] is None:
        return []
    value = record[field_name]
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise RecordError(f"{field_name} is {_type_name(value)}, expected a path or a list of paths")
    paths = []
    for i, entry in enumerate(value):
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            entry = entry["path"]
        if not isinstance(entry, str) or not entry or "\0" in entry:
            what = "empty" if entry == "" else "a path with a NUL byte" if isinstance(entry, str) else _type_name(entry)
            raise RecordError(f"{field_name}[{i}] is {what}, expected a path")
        paths.append(entry)
    return paths


def read_record(record: Any, *, skip: tuple[str, ...] = (), image_paths: bool = True) -> Record:
    """A dataset record or a tar sample's json as a Record; RecordError for anything else.

    Fields other than the conversation, images and tags go to `extra` (minus `skip`); tags that
    are not an object are kept there too rather than dropped. Without image_paths (a tar
    sample, whose images are members) the image fields are not read."""
    if not isinstance(record, dict):
        raise RecordError(f"record is {_type_name(record)}, expected an object")
    try:  # JSON may escape lone surrogates (\ud800), which no UTF-8 sample file can hold
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RecordError(f"text is not valid Unicode ({exc.reason} at character {exc.start})") from None
    except RecursionError:
        raise RecordError("record is nested too deeply to write") from None
    rec = Record(messages=normalise_messages(record), images=record_images(record) if image_paths else [])
    # Only the fields read are left out of extra: an unused alternative (both `messages` and
    # `conversations` filled) is kept, not lost.
    mapped = (_field(record, CONVERSATION_FIELDS),) + ((_field(record, IMAGE_FIELDS),) if image_paths else ()) + skip
    empty_alternative = {f for f in CONVERSATION_FIELDS + IMAGE_FIELDS if record.get(f) in (None, [], "")}
    rec.extra = {k: v for k, v in record.items() if k not in mapped and k != "tags" and k not in empty_alternative}
    tags = record.get("tags")
    if isinstance(tags, dict):
        rec.tags = dict(tags)
    elif tags is not None:
        rec.extra["tags"] = tags
    return rec
