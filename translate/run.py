"""`ddaug translate` as a library call: options in, shards out."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ddaug.captioning.run import check_api_base, check_numbers, execute_with_model
from ddaug.captioning.vlm import GenerationSettings
from ddaug.pipeline.command import DEFAULT_BATCH_SIZE, RunOptions, UserError
from ddaug.pipeline.job import JobSummary

from .languages import identifier, language
from .stage import TranslateStage, Translator, derive_items


@dataclass
class TranslateOptions:
    """What `ddaug translate` runs beyond the shared `RunOptions`: the language pair, the server
    and its model, the checks, generation and the client's limits. `run_translate(run, opts)`
    takes both. The API key is never an option: it is read from $OPENAI_API_KEY."""

    target: str = "zh"                     # --to: a code of languages.LANGUAGES
    source: str = "auto"                   # --from: a code, or auto (detected per sample)
    model: str = ""                        # the name the server serves the model under
    api_base: str | None = None            # server URL ending in /v1
    mix_original: bool = False             # also keep each original, as its own sample
    min_target_share: float = 0.5          # share of a translation's letters in the target language
    generation: GenerationSettings = field(default_factory=lambda: GenerationSettings(max_new_tokens=2048))
    concurrency: int = 16                  # requests (turns) in flight
    timeout: float = 120.0                 # seconds per request before it is retried
    max_retries: int = 5                   # retries on 429/5xx/timeouts/resets
    retry_backoff: float = 1.0             # first backoff in seconds, doubled per retry


def _languages(opts: TranslateOptions):
    try:
        target = language(opts.target)
    except ValueError as exc:
        raise UserError(f"--to: {exc}") from None
    source = None
    if opts.source.strip().lower() != "auto":
        try:
            source = language(opts.source)
        except ValueError as exc:
            raise UserError(f"--from: {exc} (or auto)") from None
        if source == target:
            raise UserError(f"--from and --to are both {target.code}: nothing to translate")
    return source, target


def check_options(opts: TranslateOptions) -> None:
    numbers = {"--temperature": opts.generation.temperature, "--top-p": opts.generation.top_p,
               "--timeout": opts.timeout, "--retry-backoff": opts.retry_backoff,
               "--min-target-share": opts.min_target_share}
    check_numbers(numbers)
    if not opts.model:
        raise UserError("--model is required: the name the server serves the model under")
    check_api_base(opts.api_base)


def run_translate(run: RunOptions, opts: TranslateOptions) -> JobSummary:
    """`ddaug translate` as a call: read `run.inputs`, write translated shards into `run.output`
    (resuming what is there), and return the counts. Raises `UserError` for what the user can fix."""
    check_options(opts)
    source, target = _languages(opts)
    # Everything that changes what is written; a rerun into the folder must match it. Never the key.
    config = {"model": opts.model, "from": source.code if source else "auto", "to": target.code,
              "mix_original": opts.mix_original, "min_target_share": opts.min_target_share,
              "generation": opts.generation.record(), "shard_size": run.shard_size, "prefix": run.prefix,
              "seed": run.seed}
    # Requests go out at load time, up to the job's look-ahead (2 batches of turns): batches of 2C
    # keep C in flight while a shard is drained and committed (as caption's openai backend).
    run = replace(run, batch_size=max(run.batch_size or DEFAULT_BATCH_SIZE, 2 * opts.concurrency))

    def make_stage(placement):
        client = Translator(opts.api_base, opts.model, settings=opts.generation, concurrency=opts.concurrency,
                            timeout=opts.timeout, max_retries=opts.max_retries, backoff=opts.retry_backoff)
        stage = TranslateStage(client, target, source=source, mix_original=opts.mix_original,
                               min_target_share=opts.min_target_share, seed=run.seed)
        if source is None or source.scripts & target.scripts:  # detection, or a share by language id
            identifier()  # load py3langid's model (~2 s) once, here, rather than in a loader thread
        return stage

    return execute_with_model("translate", run, config, make_stage,
                              derive_items=lambda items: derive_items(items, target, opts.mix_original))
