"""Translate the conversations of general data through an OpenAI-compatible LLM server."""

from .languages import LANGUAGES, Language, language
from .run import TranslateOptions, run_translate

__all__ = ["LANGUAGES", "Language", "language", "TranslateOptions", "run_translate"]
