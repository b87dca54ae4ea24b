"""Recaption business (diffusion-generated) images with a VLM: caption and instruct data."""

from ddaug.shards.questions import Question, QuestionError, QuestionPicker, builtin_pool, format_pools, load_questions_file
from .replies import MalformedReply, Reply, answer_flags, is_degenerate, parse_instruct
from .run import CaptionOptions, run_caption
from .vlm import VLM_PRESETS, GenerationSettings, TransformersVLM, VLMLoadError, save_tiny_vlm

__all__ = ["Question", "QuestionError", "QuestionPicker", "builtin_pool", "format_pools", "load_questions_file",
           "MalformedReply", "Reply", "answer_flags", "is_degenerate", "parse_instruct", "CaptionOptions",
           "run_caption", "VLM_PRESETS", "GenerationSettings", "TransformersVLM", "VLMLoadError", "save_tiny_vlm"]
