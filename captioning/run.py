"""`ddaug caption` as a library call: options in, shards out."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import math
import os
import urllib.parse
from dataclasses import dataclass, field, replace
from typing import Iterator

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
class ModelOptions:
    """How a command reaches its VLM: in this process (transformers) or on a server (openai).
    The API key is never an option: the openai backend reads it from $OPENAI_API_KEY."""

    vlm: str = "qwen2.5-vl-7b"             # transformers: preset, hub id or folder; openai: the served model name
    backend: str = "transformers"          # transformers | openai
    max_pixels: int | None = None          # None: the backend's default; 0: no cap
    dtype: str = "bf16"                    # transformers backend only
    trust_remote_code: bool = False        # let a model repo's own Python code run
    api_base: str | None = None            # openai: server URL ending in /v1
    concurrency: int = 8                   # openai: requests in flight
    timeout: float = 120.0                 # openai: seconds per request before it is retried
    max_retries: int = 5                   # openai: retries on 429/5xx/timeouts/resets
    retry_backoff: float = 1.0             # openai: first backoff in seconds, doubled per retry


@dataclass
class CaptionOptions(ModelOptions):
    """What `ddaug caption` runs beyond the shared `RunOptions`: the VLM and its backend
    (ModelOptions), the question pool and generation. `run_caption(run, opts)` takes both."""

    task: str = "caption"                  # caption | instruct
    lang: str = "en"                       # en | zh | mix
    stage: str = "stage1"                  # question wording set (stage1 | stage2), also tags.stage
    questions_file: str | None = None      # .txt or .json that replaces the built-in pools
    lossless: bool = False                 # openai: send downsized images as PNG, not JPEG q95
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    domain: str = "business"               # tags.domain of the output samples
    drop_truncated: bool = False           # truncated or degenerate answers go to the ledger, not the shards


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


def max_pixels_for(opts: ModelOptions) -> int | None:
    if opts.max_pixels is None:
        return DEFAULT_MAX_PIXELS[opts.backend]
    return opts.max_pixels or None


@contextlib.contextmanager
def forgetting_failed_start(run: RunOptions, started: list) -> Iterator[None]:
    """A start that failed before any shard (model or server unusable) must not leave a run.json
    that refuses the corrected command as "made with a different config". started is filled
    once the run has opened (and locked) the folder: before that, a run.json is another run's."""
    fresh = not os.path.exists(os.path.join(run.output, RUN_FILE))
    try:
        yield
    except UserError:
        if fresh and started and not glob.glob(os.path.join(glob.escape(run.output), f"{glob.escape(run.prefix)}-*")):
            try:
                os.remove(os.path.join(run.output, RUN_FILE))
            except OSError:
                pass
        raise


def check_options(opts: CaptionOptions) -> None:
    """One line per bad value, before anything is opened (NaN passes click's range checks)."""
    check_numbers({"--temperature": opts.generation.temperature, "--top-p": opts.generation.top_p})
    check_model_options(opts)


def check_numbers(numbers: dict[str, float]) -> None:
    for flag, value in numbers.items():
        if not math.isfinite(value):
            raise UserError(f"{flag} must be a finite number, not {value}")


def check_model_options(opts: ModelOptions) -> None:
    """The server options: finite numbers, and with --backend openai a usable --api-base."""
    check_numbers({"--timeout": opts.timeout, "--retry-backoff": opts.retry_backoff})
    if opts.backend == "openai":
        check_api_base(opts.api_base, "--api-base is required with --backend openai")


def check_api_base(api_base: str | None, missing: str = "--api-base is required") -> None:
    """One line for an --api-base that is missing, not an http(s) URL, or holds credentials."""
    if not api_base:
        raise UserError(f"{missing} (e.g. http://localhost:8000/v1)")
    url = urllib.parse.urlsplit(api_base)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise UserError(f"--api-base must be an http(s) URL such as http://localhost:8000/v1, not {api_base!r}")
    if url.username or url.password:
        raise UserError("--api-base must not hold credentials; the key goes in $OPENAI_API_KEY")


def run_caption(run: RunOptions, opts: CaptionOptions) -> JobSummary:
    """`ddaug caption` as a call: read `run.inputs`, write captioned shards into `run.output`
    (resuming what is there), and return the counts. Raises `UserError` for what the user can fix."""
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
        return CaptionStage(vlm, picker, task=opts.task, seed=run.seed, max_pixels=max_pixels,
                            drop_truncated=opts.drop_truncated, lossless=opts.lossless,
                            tags={"domain": opts.domain, "task": opts.task, "stage": opts.stage})

    return execute_with_model("caption", run, config, make_stage)


def execute_with_model(command: str, run: RunOptions, config: dict, make_stage, **execute_kwargs) -> JobSummary:
    """execute() for a stage that loads a model or connects to a server: a start that fails
    before any shard leaves no run.json behind (forgetting_failed_start), and the stage is closed
    (its request threads stopped) however the run ends."""
    stages = []
    started = []  # make_stage runs once the folder is open and locked by this run

    def make(placement):
        started.append(True)
        stages.append(make_stage(placement))
        return stages[-1]

    try:
        with forgetting_failed_start(run, started):
            return execute(command, run, config, make, **execute_kwargs)
    finally:
        for stage in stages:
            stage.close()
