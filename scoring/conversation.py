"""A sample's conversation as the model sees it, and which of its tokens are the answers.

The answers of a conversation are its assistant turns. Turn i's tokens are what the chat
template adds between the conversation up to i rendered with the generation prompt and the
conversation through i: the answer text and the template's end-of-turn tokens, the tokens a
trainer that masks labels to the assistant turns learns (LLaMA-Factory, ms-swift).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ddaug.pipeline import SampleFailure
from ddaug.shards.schema import IMAGE_TAG

ANSWER_ROLE = "assistant"


@dataclass
class AnswerLoss:
    """The summed negative log-likelihood of a sample's answer tokens, and how many there are."""

    nll: float
    tokens: int

    @property
    def loss(self) -> float:
        return self.nll / self.tokens


def answer_turns(messages: list[dict[str, Any]]) -> list[int]:
    """Indices of the assistant turns that can be scored; SampleFailure when there are none or
    one opens the conversation (nothing to condition it on)."""
    turns = [i for i, m in enumerate(messages) if m.get("role") == ANSWER_ROLE]
    if not turns:
        raise SampleFailure("read", "no assistant answer to score")
    if turns[0] == 0:
        raise SampleFailure("read", "the conversation opens with an assistant turn: nothing to condition it on")
    return turns


def content_parts(text: str, image_part: Callable[[int], dict[str, Any]]) -> list[dict[str, Any]]:
    """A ddaug message's content ("<image>" tags inline) as chat content parts, image n as
    image_part(n), counting images across calls in the order given."""
    parts: list[dict[str, Any]] = []
    for i, piece in enumerate(text.split(IMAGE_TAG)):
        if i:
            parts.append(image_part(i - 1))
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For a processor's chat template: every content as parts, each <image> tag an image part."""
    return [{"role": m["role"], "content": content_parts(str(m.get("content", "")), lambda n: {"type": "image"})}
            for m in messages]


@dataclass
class RenderedConversation:
    text: str                              # the whole conversation, no generation prompt
    spans: list[tuple[int, int]] = field(default_factory=list)  # character spans of the answer turns


def render(messages: list[dict[str, Any]], apply_template: Callable[..., str]) -> RenderedConversation:
    """The conversation's text and its answer turns' character spans. apply_template(messages,
    add_generation_prompt) renders. A template that does not render the conversation prefix by
    prefix (it rewrites earlier turns once later ones exist) cannot say which tokens an answer
    has: SampleFailure."""
    chat = template_messages(messages)
    full = apply_template(chat, False)
    spans = []
    for i in answer_turns(messages):
        before = apply_template(chat[:i], True)
        through = full if i == len(chat) - 1 else apply_template(chat[:i + 1], False)
        if not (full.startswith(through) and through.startswith(before)) or len(through) <= len(before):
            raise SampleFailure("score", f"the chat template does not render turn {i + 1} as a prefix of the "
                                         f"conversation; its answer tokens cannot be found")
        spans.append((len(before), len(through)))
    return RenderedConversation(full, spans)
