"""Batching loader samples for a Hugging Face VLM processor, with loss only on assistant tokens."""

from __future__ import annotations

from typing import Any

import torch

from .schema import IMAGE_TAG

IGNORE_INDEX = -100


def to_chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """LLaMA-Factory style ("<image>" tags in string content) -> processor chat format (content
    parts with {"type": "image"} where the tags were)."""
    out = []
    for m in messages:
        parts: list[dict[str, Any]] = []
        for i, piece in enumerate(str(m.get("content", "")).split(IMAGE_TAG)):
            if i:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": m["role"], "content": parts})
    return out


class ChatCollator:
    """collate_fn for MixedShardDataset samples: applies the processor's chat template, runs the
    processor on text + images, and returns its tensors plus `labels` in which every token that
    is not part of an assistant turn (system, user, image, template, padding) is -100.

    Assistant spans are found by rendering the conversation up to each assistant turn (with the
    generation prompt) and through it; this works for any template whose turns are delimited by
    special tokens (ChatML/Qwen, LLaVA, Idefics...). Images must all come before the first
    assistant turn (true of ddaug samples); a sample that breaks this raises ValueError.
    """

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)

    def _render(self, conv, generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(conv, tokenize=False, add_generation_prompt=generation_prompt)

    def _length(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        texts, images, spans_text = [], [], []
        for s in samples:
            conv = to_chat_messages(s["messages"])
            first_answer = next((i for i, m in enumerate(conv) if m["role"] == "assistant"), len(conv))
            if any(p["type"] == "image" for m in conv[first_answer:] for p in m["content"]):
                raise ValueError(f"{s.get('key')}: an image after the first assistant turn")
            texts.append(self._render(conv, False))
            images.extend(s["images"])
            spans = []
            for i, m in enumerate(conv):
                if m["role"] == "assistant":
                    spans.append((self._render(conv[:i], True), self._render(conv[:i + 1], False)))
            spans_text.append(spans)
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "right"  # labels below index from the left edge
        try:
            batch = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        finally:
            self.tokenizer.padding_side = side
        ids = batch["input_ids"]
        labels = torch.full_like(ids, IGNORE_INDEX)
        for b, (text, spans) in enumerate(zip(texts, spans_text)):
            # The processor expands each image placeholder into many tokens; prefixes that hold
            # every image are shifted by the same amount.
            length = int(batch["attention_mask"][b].sum())
            shift = length - self._length(text)
            for before, through in spans:
                start, end = self._length(before) + shift, self._length(through) + shift
                labels[b, max(0, start):min(end, length)] = ids[b, max(0, start):min(end, length)]
        batch["labels"] = labels
        return batch
