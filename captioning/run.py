"""`ddaug caption` as a library call: options in, shards out."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

from pipeline.command import DEFAULT_BATCH_SIZE, RunOptions, UserError, execute
from pipeline.job import JobSummary

from .openai_api import OpenAIVLM
from .questions import QuestionError, QuestionPicker, load_questions_file
from .stage import CaptionStage
from .vlm import GenerationSettings, TransformersVLM, VLMLoadError

DEFAULT_MAX_PIXELS = 1024 * 1024


@dataclass
class CaptionOptions:
    vlm: str = "qwen2.5-vl-7b"
    backend: str = "transformers"          # transformers | openai
    task: str = "caption"                  # caption | instruct
    lang: str = "en"                       # en | zh | mix
    stage: str = "stage1"
    questions_file: str | None = None
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    dtype: str = "bf16"
    trust_remote_code: bool = False
    domain: str = "business"
    drop_truncated: bool = False
    api_base: str | None = None
    concurrency: int = 8
    timeout: float = 120.0
    max_retries: int = 5
    retry_backoff: float = 1.0


def _file_sha(path: str | None) -> str | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def make_picker(opts: CaptionOptions) -> QuestionPicker:
    try:
        custom = load_questions_file(opts.questions_file) if opts.questions_file else None
        return QuestionPicker(lang=opts.lang, stage=opts.stage, custom=custom)
    except QuestionError as exc:
        raise UserError(str(exc)) from None


def run_caption(run: RunOptions, opts: CaptionOptions) -> JobSummary:
    picker = make_picker(opts)
    if opts.backend == "openai" and not opts.api_base:
        raise UserError("--api-base is required with --backend openai (e.g. http://localhost:8000/v1)")
    # Everything that changes what is written; a rerun into the folder must match it. Never the key.
    config = {"vlm": opts.vlm, "backend": opts.backend, "task": opts.task, "lang": opts.lang,
              "stage": opts.stage, "questions_sha256": _file_sha(opts.questions_file),
              "max_pixels": opts.max_pixels, "generation": opts.generation.record(),
              "dtype": opts.dtype if opts.backend == "transformers" else None,
              "domain": opts.domain, "drop_truncated": opts.drop_truncated,
              "shard_size": run.shard_size, "prefix": run.prefix, "seed": run.seed}
    if opts.backend == "openai":
        # The server batches across requests; keep enough in flight to fill --concurrency.
        run = replace(run, batch_size=max(run.batch_size or DEFAULT_BATCH_SIZE, 2 * opts.concurrency))

    def make_stage(placement):
        if opts.backend == "openai":
            vlm = OpenAIVLM(opts.api_base, opts.vlm, settings=opts.generation, concurrency=opts.concurrency,
                            timeout=opts.timeout, max_retries=opts.max_retries, backoff=opts.retry_backoff)
        else:
            try:
                vlm = TransformersVLM(opts.vlm, device=placement.device, dtype=opts.dtype,
                                      settings=opts.generation, trust_remote_code=opts.trust_remote_code)
            except VLMLoadError as exc:
                raise UserError(str(exc)) from None
        return CaptionStage(vlm, picker, task=opts.task, seed=run.seed, max_pixels=opts.max_pixels,
                            drop_truncated=opts.drop_truncated,
                            tags={"domain": opts.domain, "task": opts.task, "stage": opts.stage})

    return execute("caption", run, config, make_stage)
