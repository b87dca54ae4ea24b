"""The transformers backend: the VLM's loss on a conversation's answer tokens, batched.

A batch is right-padded, so every sample keeps the positions it has alone, and its labels are
masked to the answer tokens (conversation.py). One forward pass gives the logits; only the
positions that predict an answer token are turned into log-probabilities, in float32, and
each sample's negative log-likelihood is summed over its own answer tokens.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ddaug.captioning.vlm import load_vlm
from ddaug.pipeline import SampleFailure

from .conversation import AnswerLoss, render

log = logging.getLogger(__name__)


@dataclass
class Conversation:
    messages: list[dict[str, Any]]   # ddaug messages, "<image>" tags inline
    images: list[Image.Image]        # in tag order (what the model is shown)
    # Per image, the file's bytes and format when the picture is that file, not downsized
    # (the openai backend sends them as they are).
    originals: list[tuple[bytes, str] | None] | None = None


@dataclass
class _Encoded:
    batch: Any                          # the processor's tensors, right-padded
    targets: list[list[int]]            # per sample: positions of its answer tokens


class TransformersScorer:
    backend = "transformers"

    def __init__(self, name: str, *, device: str, dtype: str, trust_remote_code: bool = False):
        self.model_name = name
        self.device = torch.device(device)
        self.processor, self.model = load_vlm(name, device=self.device, dtype=dtype,
                                              trust_remote_code=trust_remote_code)
        self.tokenizer = self.processor.tokenizer
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Only the positions from the earliest answer on need logits: the vocabulary projection of
        # the prompt (image tokens included) would cost memory for nothing.
        self._keep_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "model": self.model_name,
                "dtype": str(self.model.dtype).removeprefix("torch.")}

    def _apply_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)

    def _encode(self, texts: list[str], images: list[list[Image.Image]], spans: list[list[tuple[int, int]]]) -> _Encoded:
        batch = self.processor(text=texts, images=images if any(images) else None, return_tensors="pt",
                               padding=True, padding_side="right")
        targets = []
        for row, (text, turn_spans) in enumerate(zip(texts, spans)):
            targets.append(self._answer_positions(batch, row, text, turn_spans))
        return _Encoded(batch.to(self.device), targets)

    def _answer_positions(self, batch, row: int, text: str, spans: list[tuple[int, int]]) -> list[int]:
        """Positions in the processor's ids of the tokens inside spans. The processor expands each
        image placeholder into many tokens; the text after the last image keeps its tokens, so
        positions are found in the plain tokenization and carried over from the end."""
        plain = self.tokenizer(text, return_offsets_mapping=True)
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        shift = len(ids) - len(plain["input_ids"])
        inside = [j for j, (start, _) in enumerate(plain["offset_mapping"])
                  if any(a <= start < b for a, b in spans)]
        if not inside:
            raise SampleFailure("score", "the answers have no tokens")
        if ids[inside[0] + shift:] != plain["input_ids"][inside[0]:]:
            raise SampleFailure("score", "the answer tokens cannot be located in the processor's tokens (an image "
                                         "after an answer? only answers after the last image can be)")
        return [j + shift for j in inside]

    @torch.inference_mode()
    def _forward_logprobs(self, enc: _Encoded) -> list[torch.Tensor]:
        """Per sample, the log-probability (float32) of each of its answer tokens."""
        ids = enc.batch["input_ids"]
        length = ids.shape[1]
        first = min(p for positions in enc.targets for p in positions)
        kwargs = {"logits_to_keep": length - first + 1} if self._keep_logits else {}
        logits = self.model(**enc.batch, **kwargs).logits
        offset = length - logits.shape[1]  # position of logits' first row
        out = []
        for row, positions in enumerate(enc.targets):
            where = torch.tensor(positions, device=logits.device)
            rows = logits[row, where - 1 - offset].float()  # position p is predicted at p - 1
            out.append(torch.log_softmax(rows, dim=-1).gather(1, ids[row, where].unsqueeze(1)).squeeze(1))
        return out

    def score(self, conversations: list[Conversation]) -> list[AnswerLoss | SampleFailure]:
        """Each conversation's answer loss; a conversation that cannot be scored gets its failure
        and does not sink its batch mates."""
        results: list[AnswerLoss | SampleFailure | None] = [None] * len(conversations)
        texts, images, spans, rows = [], [], [], []
        for i, conv in enumerate(conversations):
            try:
                rendered = render(conv.messages, self._apply_template)
            except SampleFailure as exc:
                results[i] = exc
                continue
            texts.append(rendered.text)
            images.append(list(conv.images))
            spans.append(rendered.spans)
            rows.append(i)
        if rows:
            try:
                enc = self._encode(texts, images, spans)
            except SampleFailure:
                if len(rows) == 1:
                    raise
                # One sample's tokens could not be located: encode one by one to name it.
                for i in rows:
                    results[i] = self.score([conversations[i]])[0]
                return results
            for i, logprobs in zip(rows, self._forward_logprobs(enc)):
                results[i] = AnswerLoss(float(-logprobs.sum()), int(logprobs.numel()))
        return results

    @torch.inference_mode()
    def prompt_logprobs(self, messages: list[dict[str, Any]], images: list[Image.Image],
                        add_generation_prompt: bool) -> list[tuple[int, float | None, int | None, str]]:
        """Every token of the rendered conversation with its log-probability given the tokens
        before it, its rank among the vocabulary, and its text; the first has none. What a server
        returns as prompt logprobs."""
        from .conversation import template_messages

        text = self._apply_template(template_messages(messages), add_generation_prompt)
        batch = self.processor(text=[text], images=[images] if images else None, return_tensors="pt").to(self.device)
        ids = batch["input_ids"][0]
        logits = self.model(**batch).logits[0, :-1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = logprobs.gather(1, ids[1:].unsqueeze(1)).squeeze(1)
        ranks = (logprobs > chosen.unsqueeze(1)).sum(dim=1) + 1
        tokens = [self.tokenizer.decode([t]) for t in ids.tolist()]
        out: list[tuple[int, float | None, int | None, str]] = [(int(ids[0]), None, None, tokens[0])]
        out += [(int(t), float(lp), int(r), tok)
                for t, lp, r, tok in zip(ids[1:].tolist(), chosen.tolist(), ranks.tolist(), tokens[1:])]
        return out
