"""`ddaug caption` as a library call: options in, shards out."""

from __future__ import annotations

import glob
import hashlib
import math
import os
import urllib.parse
from dataclasses import dataclass, field, replace

from ddaug.pipeline.command import DEFAULT_BATCH_SIZE, RunOptions, UserError, execute
from ddaug.pipeline.job import JobSummary
from ddaug.shards.store import RUN_FILE

from .openai_api import OpenAIVLM
from ddaug.shards.questions import QuestionError, QuestionPicker, load_questions_file
from .stage import CaptionStage
from .vlm import GenerationSettings, TransformersVLM, VLMLoadError

# What the VLM is shown at most, per backend, when --max-pixels is not given. A local model
# gets 1 MP (its memory and speed scale with vision tokens). A server resizes to its own
# budget (vLLM and SGLang run the model's own processor, e.g. Qwen2.5-VL's 12.8 MP cap), so
# capping here only costs the client a decode+resize+encode per image and the picture a second
# resampling: images go as their original bytes unless the user sets a cap (e.g. for upload
# bandwidth or a hosted API's size limit).
DEFAULT_MAX_PIXELS = {"transformers": 1024 * 1024, "openai": None}


@dataclass
class CaptionOptions:
    vlm: str = "qwen2.5-vl-7b"
    backend: str = "transformers"          # transformers | openai
    task: str = "caption"                  # caption | instruct
    lang: str = "en"                       # en | zh | mix
    stage: str = "stage1"
    questions_file: str | None = None
    max_pixels: int | None = None          # None: the backend's default; 0: no cap
    lossless: bool = False                 # openai: send downsized images as PNG, not JPEG q95
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


def max_pixels_for(opts: CaptionOptions) -> int | None:
    if opts.max_pixels is None:
        return DEFAULT_MAX_PIXELS[opts.backend]
    return opts.max_pixels or None


def _forget_failed_start(output: str, prefix: str) -> None:
    """A start that failed before any shard (model or server unusable) must not leave a run.json
    that refuses the corrected command as "made with a different config"."""
    if not glob.glob(os.path.join(glob.escape(output), f"{glob.escape(prefix)}-*")):
        try:
            os.remove(os.path.join(output, RUN_FILE))
        except OSError:
            pass


def check_options(opts: CaptionOptions) -> None:
    """One line per bad value, before anything is opened (NaN passes click's range checks)."""
    numbers = {"--temperature": opts.generation.temperature, "--top-p": opts.generation.top_p,
               "--timeout": opts.timeout, "--retry-backoff": opts.retry_backoff}
    for flag, value in numbers.items():
        if not math.isfinite(value):
            raise UserError(f"{flag} must be a finite number, not {value}")
    if opts.backend != "openai":
        return
    if not opts.api_base:
        raise UserError("--api-base is required with --backend openai (e.g. http://localhost:8000/v1)")
    url = urllib.parse.urlsplit(opts.api_base)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise UserError(f"--api-base must be an http(s) URL such as http://localhost:8000/v1, not {opts.api_base!r}")
    if url.username or url.password:
        raise UserError("--api-base must not hold credentials; the key goes in $OPENAI_API_KEY")


def run_caption(run: RunOptions, opts: CaptionOptions) -> JobSummary:
    check_options(opts)
    picker = make_picker(opts)
    max_pixels = max_pixels_for(opts)
    # Everything that changes what is written; a rerun into the folder must match it. Never the key.
    config = {"vlm": opts.vlm, "backend": opts.backend, "task": opts.task, "lang": opts.lang,
              "stage": opts.stage, "questions_sha256": _file_sha(opts.questions_file),
              "max_pixels": max_pixels, "generation": opts.generation.record(),
              "dtype": opts.dtype if opts.backend == "transformers" else None,
              "domain": opts.domain, "drop_truncated": opts.drop_truncated,
              "shard_size": run.shard_size, "prefix": run.prefix, "seed": run.seed}
    if opts.lossless and opts.backend == "openai":
        config["request_encoding"] = "png"  # absent by default, so folders made before it still match
    if opts.backend == "openai":
        # The model runs on the server: this process needs no device, and placing it on one
        # would load torch (seconds of start-up) for nothing.
        run = replace(run, device="cpu")
        # Requests go out at load time, up to the job's look-ahead (2 batches): batches of 2C keep
        # C in flight while a shard is drained, fsynced and committed (captioning/stage.py).
        run = replace(run, batch_size=max(run.batch_size or DEFAULT_BATCH_SIZE, 2 * opts.concurrency))
    stages = []
    started = []  # make_stage runs once the folder is open and locked by this run

    def make_stage(placement):
        started.append(True)
        if opts.backend == "openai":
            vlm = OpenAIVLM(opts.api_base, opts.vlm, settings=opts.generation, concurrency=opts.concurrency,
                            timeout=opts.timeout, max_retries=opts.max_retries, backoff=opts.retry_backoff)
        else:
            try:
                vlm = TransformersVLM(opts.vlm, device=placement.device, dtype=opts.dtype,
                                      settings=opts.generation, trust_remote_code=opts.trust_remote_code)
            except VLMLoadError as exc:
                raise UserError(str(exc)) from None
        stages.append(CaptionStage(vlm, picker, task=opts.task, seed=run.seed, max_pixels=max_pixels,
                                   drop_truncated=opts.drop_truncated, lossless=opts.lossless,
                                   tags={"domain": opts.domain, "task": opts.task, "stage": opts.stage}))
        return stages[-1]

    fresh = not os.path.exists(os.path.join(run.output, RUN_FILE))
    try:
        return execute("caption", run, config, make_stage)
    except UserError:
        if fresh and started:
            _forget_failed_start(run.output, run.prefix)
        raise
    finally:
        for stage in stages:
            stage.close()
