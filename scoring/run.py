"""`ddaug score` as a library call: options in, scored shards out."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ddaug.captioning.run import ModelOptions, check_model_options, execute_with_model, max_pixels_for
from ddaug.captioning.vlm import VLMLoadError
from ddaug.pipeline.command import DEFAULT_BATCH_SIZE, RunOptions, UserError
from ddaug.pipeline.job import JobSummary

from .stage import ScoreStage


@dataclass
class ScoreOptions(ModelOptions):
    """What `ddaug score` runs beyond the shared `RunOptions`: the VLM and its backend
    (ModelOptions), and whether to score again with the images blanked."""

    image_gain: bool = False               # also score with every image blanked


def run_score(run: RunOptions, opts: ScoreOptions) -> JobSummary:
    """`ddaug score` as a call: a scored copy of `run.inputs` in `run.output`, each sample's json
    with a `score` block (mean answer loss, perplexity, and with image_gain the loss with the
    images blanked); resumes what is there. Raises `UserError` for what the user can fix."""
    check_model_options(opts)
    max_pixels = max_pixels_for(opts)
    # Everything that changes what is written; a rerun into the folder must match it. Never the key.
    config = {"vlm": opts.vlm, "backend": opts.backend, "image_gain": opts.image_gain, "max_pixels": max_pixels,
              "dtype": opts.dtype if opts.backend == "transformers" else None,
              "shard_size": run.shard_size, "prefix": run.prefix}
    if opts.backend == "openai":
        # Requests go out at load time, up to the job's look-ahead (2 batches): batches of 2C keep
        # C conversations in flight while a shard is committed (as caption does).
        run = replace(run, batch_size=max(run.batch_size or DEFAULT_BATCH_SIZE, 2 * opts.concurrency))
    def make_stage(placement) -> ScoreStage:
        if opts.backend == "openai":
            from .openai_scorer import OpenAIScorer

            backend = OpenAIScorer(opts.api_base, opts.vlm, concurrency=opts.concurrency, timeout=opts.timeout,
                                   max_retries=opts.max_retries, backoff=opts.retry_backoff)
        else:
            from .transformers_scorer import TransformersScorer

            try:
                backend = TransformersScorer(opts.vlm, device=placement.device, dtype=opts.dtype,
                                             trust_remote_code=opts.trust_remote_code)
            except VLMLoadError as exc:
                raise UserError(str(exc)) from None
        return ScoreStage(backend, image_gain=opts.image_gain, max_pixels=max_pixels)

    return execute_with_model("score", run, config, make_stage)
