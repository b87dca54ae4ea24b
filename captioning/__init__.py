"""Recaption business (diffusion-generated) images with a VLM: caption and instruct data.
Names load their modules on first use: the openai backend never loads torch or transformers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ddaug.lazy import lazy_exports

_PUBLIC = {
    **dict.fromkeys(["Question", "QuestionError", "QuestionPicker", "builtin_pool", "format_pools",
                     "load_questions_file"], "ddaug.shards.questions"),
    **dict.fromkeys(["MalformedReply", "Reply", "answer_flags", "is_degenerate", "parse_instruct"], ".replies"),
    **dict.fromkeys(["CaptionOptions", "run_caption"], ".run"),
    **dict.fromkeys(["VLM_PRESETS", "GenerationSettings", "TransformersVLM", "VLMLoadError", "save_tiny_vlm"], ".vlm"),
}
__all__ = list(_PUBLIC)
__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC)

if TYPE_CHECKING:  # for type checkers and IDEs
    from ddaug.shards.questions import (Question, QuestionError, QuestionPicker, builtin_pool, format_pools,
                                        load_questions_file)

    from .replies import MalformedReply, Reply, answer_flags, is_degenerate, parse_instruct
    from .run import CaptionOptions, run_caption
    from .vlm import VLM_PRESETS, GenerationSettings, TransformersVLM, VLMLoadError, save_tiny_vlm
