"""ddaug command line: parse options, call library code. Nothing else lives here."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys

import click

from ddaug.augment.presets import DEFAULT_MAX_PIXELS, PRESETS

log = logging.getLogger("ddaug")


# The user-fixable errors, by the module that defines each. Only modules already imported are
# looked up: an exception cannot come from a module that never loaded, and importing them all
# to catch one would load torch (seconds) into a command that does not use it.
USER_ERRORS = {"ddaug.pipeline.command": "UserError", "ddaug.shards.store": "StoreError",
               "ddaug.sources.readers": "SourceError", "ddaug.shards.inspect": "InspectError",
               "ddaug.augment.models": "ModelLoadError", "ddaug.captioning.vlm": "VLMLoadError",
               "ddaug.shards.questions": "QuestionError", "ddaug.shards.loader": "LoaderError",
               "ddaug.shards.export": "ExportError"}


def _known_errors() -> tuple[type[Exception], ...]:
    loaded = (getattr(sys.modules.get(module), name, None) for module, name in USER_ERRORS.items())
    return tuple(cls for cls in loaded if cls is not None)


def user_errors(fn):
    """User-fixable problems become one `Error: ...` line and exit code 1, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _known_errors() as exc:
            raise click.ClickException(str(exc)) from None
    return wrapper


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    if verbose < 2:
        quiet_model_libraries()


# The environment variables diffusers, transformers and huggingface_hub read when they load.
QUIET_LIBRARY_ENV = {"DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_VERBOSITY": "error",
                     "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def quiet_model_libraries() -> None:
    """diffusers/transformers warn about benign things on every load (dtype casts, custom
    timestep schedules); keep the terminal for what the user needs. Through their environment
    variables (a value the user set wins), so that a command that never loads them, such as
    caption against a server, does not import them (seconds of start-up) just to quiet them."""
    for name, value in QUIET_LIBRARY_ENV.items():
        os.environ.setdefault(name, value)
    if "diffusers" in sys.modules:  # loaded already (a caller in the same process): set it now
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    if "transformers" in sys.modules:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-vv: also library logs).")
def cli(verbose: int) -> None:
    """ddaug: diffusion-domain data for VLM fine-tuning.

    \b
    Remedies for a VLM that forgets general skills on diffusion-generated images:
      augment   give natural general data diffusion traits (SDXL/SSD-1B/LCM, one step)
      caption   recaption business images with a VLM (caption and instruct data)
      translate translate conversations through an LLM server (bilingual data)
      score     the VLM's loss on each sample's answers (with and without the image)
      inspect   summarise, verify and preview shards
      plan      what a training recipe (sources, ratios, stages) will draw
      export    shards -> LLaMA-Factory, ms-swift, Megatron-Energon or HF datasets
      demo      offline end-to-end run on bundled photos with tiny models
      gap       how far general (and augmented) images are from business, and which dose closes it
      leakage   find eval images (or near copies) inside training shards; drop them
    """
    _setup_logging(verbose)


class BatchSize(click.ParamType):
    """A positive integer, or auto (None: the command chooses)."""

    name = "N|auto"

    def convert(self, value, param, ctx):
        if value is None or value == "auto":
            return None
        if isinstance(value, int) and value >= 1:
            return value
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = 0
        if number < 1:
            self.fail(f"{value!r} is not a positive integer or auto", param, ctx)
        return number


class FiniteFloatRange(click.FloatRange):
    """FloatRange that also refuses nan and inf (nan passes every range comparison)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def _plain_name(ctx, param, value: str) -> str:
    """Flags that name files inside the output folder take a plain file name, never a path."""
    from ddaug.shards.writer import check_plain_name

    try:
        return check_plain_name(value, "the name")
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def run_options(fn):
    """Options every shard-writing command shares."""
    options = [
        click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
                     help="Output folder for shards, manifest.json, failures.jsonl, run.json."),
        click.option("--media-dir", type=click.Path(file_okay=False), default=None,
                     help="Base folder for image paths in .json/.jsonl datasets (default: the dataset's folder)."),
        click.option("--device", default=None, help="torch device (default: cuda:LOCAL_RANK if available, else cpu)."),
        click.option("--batch-size", type=BatchSize(), default="auto", show_default=True,
                     help="Images per model call at 1024² (augment: the same pixels per call at other sizes, up to 64 "
                          "images; same-canvas images are batched "
                          "together). auto: augment fits it to free GPU memory (at most 32; 8 on CPU), caption uses 8."),
        click.option("--shard-size", type=click.IntRange(min=1), default=1000, show_default=True,
                     help="Inputs per shard (failed inputs make a shard smaller)."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Run seed; each sample's seed derives from it and the sample key."),
        click.option("--prefix", default="shard", show_default=True, callback=_plain_name,
                     help="Shard file name prefix (a plain file name)."),
        click.option("--workers", type=click.IntRange(min=1), default=None, show_default="4 to 8, by CPU count",
                     help="Threads for reading/decoding and for encoding output."),
        click.option("--join", is_flag=True,
                     help="Work beside the workers already on -o (any number, any host): take the plan's units "
                          "by lease. Implied under torchrun/accelerate (WORLD_SIZE > 1) and in Slurm arrays."),
        click.option("--plan-only", is_flag=True,
                     help="Write the plan (the job's units) into -o and exit, e.g. before submitting a Slurm array."),
        click.option("--lease-timeout", type=FiniteFloatRange(min=0, min_open=True), default=120.0,
                     show_default=True,
                     help="Seconds a worker's unit lease lives without a heartbeat (renewed every timeout/4); "
                          "then another worker takes the unit over."),
        click.option("--rank", type=click.IntRange(min=0), default=None,
                     help="Names this worker (default: $RANK from accelerate/torchrun). Work is taken by lease, "
                          "not split by rank."),
        click.option("--world-size", type=click.IntRange(min=1), default=None,
                     help="Workers started together (default: $WORLD_SIZE); more than 1 implies --join."),
        click.option("--overwrite", is_flag=True, help="Delete earlier output in the folder and start fresh."),
        click.option("--retry-failures", is_flag=True,
                     help="Retry only the inputs listed in OUT/failures.jsonl (same inputs and options as the run)."),
        click.option("--drop-text-only", is_flag=True,
                     help="Leave out records without images (default: pass them through unchanged, json only)."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def server_options(concurrency: int, scope: str):
    """Options of the commands that talk to an OpenAI-compatible server; scope starts each help
    text (which backend they apply to)."""
    def first(text: str) -> str:
        return scope + (text[0].lower() + text[1:] if scope else text)

    options = [
        click.option("--api-base", envvar="OPENAI_BASE_URL", default=None,
                     help=first("Server URL ending in /v1 (default: $OPENAI_BASE_URL). Key: $OPENAI_API_KEY.")),
        click.option("--concurrency", type=click.IntRange(min=1), default=concurrency, show_default=True,
                     help=first("Requests in flight.")),
        click.option("--timeout", type=FiniteFloatRange(min=0, min_open=True), default=120.0, show_default=True,
                     help=first("Seconds per request before it is retried.")),
        click.option("--max-retries", type=click.IntRange(min=0), default=5, show_default=True,
                     help=first("Retries on 429/5xx/timeouts/resets, with exponential backoff.")),
        click.option("--retry-backoff", type=FiniteFloatRange(min=0), default=1.0, show_default=True,
                     help=first("First backoff in seconds (doubles per retry, capped at 30; Retry-After wins).")),
    ]

    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


def _run_options(kw: dict):
    from ddaug.pipeline.command import RunOptions

    keys = ("output", "media_dir", "device", "batch_size", "shard_size", "seed", "prefix", "workers",
            "rank", "world_size", "overwrite", "quiet", "retry_failures", "drop_text_only", "join",
            "plan_only", "lease_timeout")
    given = {k: kw.pop(k) for k in keys}
    if given["workers"] is None:
        del given["workers"]  # RunOptions' default follows the CPU count
    return RunOptions(inputs=tuple(kw.pop("inputs")), **given)


def _validate_model(ctx, param, value: str) -> str:
    if value in PRESETS or os.path.isdir(os.path.expanduser(value)) or value.count("/") == 1:
        return value
    raise click.BadParameter(f"{value!r} is not a preset ({', '.join(PRESETS)}), a folder, or a hub id (org/name)")


def _report(command: str, summary, output: str) -> None:
    click.echo(f"{command}: {summary.line()} -> {output}", err=True)


@cli.command(epilog="""\b
Examples:
  ddaug augment photos/ -o out/general-sdxl                      # SDXL, strength 0.025, zeros
  ddaug augment llava.json --media-dir imgs/ -o out/ --model ssd-1b
  ddaug augment 'gen-{000..009}.tar' -o out/ --model lcm-sdxl --image-format webp
  ddaug augment photos/ -o out/ --compile always --compile-cache ~/.cache/ddaug-compile  # compiled VAE
  accelerate launch --multi_gpu --num_processes 8 -m ddaug augment photos/ -o out/  # 8 workers
  ddaug augment photos/ -o out/ --join                             # one more worker, e.g. on another host
  ddaug augment photos/ -o out/ --model tiny --device cpu          # offline: the tiny model trained here
""")
@click.argument("inputs", nargs=-1, required=True)
@run_options
@click.option("--model", default="sdxl", show_default=True, callback=_validate_model,
              help=f"Preset ({', '.join(PRESETS)}), hub id, or local diffusers folder.")
@click.option("--unet", default=None, help="Separate UNet hub id/folder (e.g. an LCM UNet).")
@click.option("--vae", default=None, help="Override the VAE (hub id/folder), e.g. madebyollin/sdxl-vae-fp16-fix.")
@click.option("--scheduler", type=click.Choice(["auto", "euler", "lcm"]), default="auto", show_default=True,
              help="auto: LCM for LCM UNets, else the model's own (Euler for SDXL/SSD-1B).")
@click.option("--mode", type=click.Choice(["img2img", "vae"]), default="img2img", show_default=True,
              help="img2img: VAE + one UNet denoise step; vae: VAE round trip only.")
@click.option("--strength", type=FiniteFloatRange(0, 1, min_open=True), default=0.025, show_default=True,
              help="Noise to timestep round(strength*1000) (25 for 0.025), then ONE UNet call there.")
@click.option("--cond", type=click.Choice(["zeros", "empty"]), default="zeros", show_default=True,
              help="zeros: zero text/pooled embeddings, no text encoders loaded; empty: encode \"\" once.")
@click.option("--latent", type=click.Choice(["mean", "sample"]), default="mean", show_default=True,
              help="VAE latent: the posterior mean, or a sample seeded per image.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
              help="Compute dtype (default bf16 on GPU, fp32 on CPU). fp16 upcasts the SDXL VAE to fp32.")
@click.option("--image-format", type=click.Choice(["png", "webp", "jpeg"]), default="png", show_default=True,
              help="Output encoding; png/webp are lossless so the traits survive.")
@click.option("--quality", type=click.IntRange(1, 100), default=95, show_default=True, help="JPEG quality.")
@click.option("--max-side", type=click.IntRange(min=8), default=None,
              help="Downsize images whose longer side exceeds this first (recorded). Default: native size.")
@click.option("--max-pixels", type=click.IntRange(min=0), default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Downsize larger images to this many pixels first (recorded): bounds memory. 0: no cap.")
@click.option("--domain", default="general", show_default=True, help="tags.domain of the output samples.")
@click.option("--stage", "stage_tag", default=None, help="tags.stage of the output samples.")
@click.option("--compile", "compile_", type=click.Choice(["auto", "always", "never"]), default="auto",
              show_default=True, is_flag=False, flag_value="auto",
              help="GPU kernels. auto: the VAE's norms as ddaug's fused Triton kernels (a few seconds of JIT on a "
                   "machine's first run); never: PyTorch's own kernels only; always: torch.compile the VAE "
                   "(~2 min cold, slower end to end in every measured job). -v says what was chosen.")
@click.option("--compile-cache", type=click.Path(file_okay=False), default=None,
              help="Folder for the compiled kernels (Triton's and torch.compile's), kept across runs.")
@user_errors
def augment(**kw) -> None:
    """Give natural images diffusion traits, keeping their conversations.

    Each image is VAE-encoded, noised to t=round(strength*1000), denoised with exactly one
    unguided UNet call (zero conditioning by default), decoded at its native size, and written
    to webdataset shards with its conversation unchanged. Reruns resume; see docs/output.md.
    """
    from ddaug.augment.recipe import RecipeSettings
    from ddaug.augment.run import AugmentOptions, run_augment

    run = _run_options(kw)
    dtype = _dtype(kw["dtype"], run.device)
    recipe = RecipeSettings(mode=kw["mode"], strength=kw["strength"], cond=kw["cond"], latent=kw["latent"],
                            seed=run.seed, dtype=dtype)
    opts = AugmentOptions(model=kw["model"], unet=kw["unet"], vae=kw["vae"], scheduler=kw["scheduler"],
                          image_format=kw["image_format"], quality=kw["quality"], max_side=kw["max_side"],
                          max_pixels=kw["max_pixels"] or None,
                          domain=kw["domain"], stage=kw["stage_tag"], recipe=recipe, compile=kw["compile_"],
                          compile_cache=kw["compile_cache"])
    _report("augment", run_augment(run, opts), run.output)


def _dtype(requested: str | None, device: str | None) -> str:
    """bf16 on GPU, fp32 on CPU unless asked otherwise."""
    if requested:
        return requested
    import torch

    return "fp32" if (device or "").startswith("cpu") or not torch.cuda.is_available() else "bf16"


def vlm_options(openai_backend: str):
    """--vlm, --backend and the options of how the model sees the images, for commands that run a
    VLM here (transformers) or ask a server (openai: openai_backend says which kind)."""
    def decorate(fn):
        options = [
            click.option("--vlm", default="qwen2.5-vl-7b", show_default=True,
                         help="transformers: a preset (see docs/commands.md), hub id or local folder; openai: the served "
                              "model name."),
            click.option("--backend", type=click.Choice(["transformers", "openai"]), default="transformers",
                         show_default=True, help=f"transformers: run the VLM here; openai: {openai_backend}."),
            click.option("--max-pixels", type=click.IntRange(min=0), default=None,
                         help="Downsize what the VLM sees to at most this many pixels (0: no cap). The shard keeps "
                              "the original. Default: 1048576 for transformers; none for openai (the server "
                              "resizes to its own budget)."),
            click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
                         help="transformers backend compute dtype (default bf16 on GPU, fp32 on CPU)."),
            click.option("--trust-remote-code", is_flag=True,
                         help="Allow the model repo's own Python code to run (off by default)."),
        ]
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


def _check_vlm(vlm: str, backend: str) -> str:
    """A transformers model must be a preset, a folder or a hub id; a server names its own."""
    from ddaug.captioning.vlm import VLM_PRESETS

    if backend == "transformers" and not (vlm in VLM_PRESETS or os.path.isdir(os.path.expanduser(vlm))
                                          or vlm.count("/") == 1):
        raise click.BadParameter(f"{vlm!r} is not a preset ({', '.join(VLM_PRESETS)}), a folder, or a hub id",
                                 param_hint="--vlm")
    return vlm


def _list_questions(ctx, param, value) -> None:
    if not value or ctx.resilient_parsing:
        return
    from ddaug.shards.questions import format_pools, load_questions_file

    from ddaug.shards.questions import QuestionError

    path = ctx.params.get("questions_file")
    try:
        click.echo(format_pools(load_questions_file(path) if path else None))
    except QuestionError as exc:
        raise click.UsageError(str(exc)) from None
    ctx.exit()


@cli.command(epilog="""\b
Examples:
  ddaug caption business/ -o out/cap-s1                       # Qwen2.5-VL-7B, English, stage1 wording
  ddaug caption business/ -o out/cap-zh --lang zh --stage stage2 --vlm qwen2-vl-2b
  ddaug caption business/ -o out/qa --task instruct --lang mix
  ddaug caption business/ -o out/cap --backend openai --api-base http://localhost:8000/v1 \\
        --vlm Qwen/Qwen2.5-VL-7B-Instruct --concurrency 32   # a vLLM/SGLang server; key: $OPENAI_API_KEY
  ddaug caption business/ -o /shared/cap --vlm qwen2-vl-2b --join  # one more worker on a running job
  ddaug caption --list-questions                              # the built-in question pools
  ddaug caption imgs/ -o out/ --vlm tiny-random --device cpu  # offline smoke test
""")
@click.argument("inputs", nargs=-1, required=True)
@run_options
@vlm_options("call an OpenAI-compatible chat-completions server")
@click.option("--task", type=click.Choice(["caption", "instruct"]), default="caption", show_default=True,
              help="caption: ask a detailed-description question; instruct: the VLM writes a question and its answer.")
@click.option("--lang", type=click.Choice(["en", "zh", "mix"]), default="en", show_default=True,
              help="Question language; mix picks one per sample (deterministically).")
@click.option("--stage", default="stage1", show_default=True,
              help="Question wording set (stage1, stage2: disjoint), also written to tags.stage.")
@click.option("--questions", "questions_file", type=click.Path(exists=True, dir_okay=False), default=None,
              is_eager=True, help="Replace the pools: .txt (one question per line) or .json ([{id, text}] or {id: text}).")
@click.option("--list-questions", is_flag=True, expose_value=False, is_eager=True, callback=_list_questions,
              help="Print the question pools (or the --questions file) and exit.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Answer length limit; answers cut there are flagged 'truncated'.")
@click.option("--send-lossless", is_flag=True,
              help="openai backend: send images downsized for --max-pixels as PNG instead of JPEG q95 (slower, 5-8x bytes).")
@click.option("--temperature", type=FiniteFloatRange(min=0), default=0.0, show_default=True,
              help="0: greedy decoding; > 0 samples (seeded by --seed).")
@click.option("--top-p", type=FiniteFloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              help="Nucleus sampling, with --temperature > 0.")
@click.option("--domain", default="business", show_default=True, help="tags.domain of the output samples.")
@click.option("--drop-truncated", is_flag=True,
              help="Send truncated or degenerate answers to failures.jsonl instead of writing them (flagged otherwise).")
@server_options(concurrency=8, scope="openai backend: ")
@user_errors
def caption(**kw) -> None:
    """Recaption images with a VLM into caption or instruct data.

    Each image is shown to the VLM with an image-independent question from the chosen
    language/stage pool (a pure function of --seed and the sample key), and written to
    webdataset shards with its bytes unchanged and a [user, assistant] conversation. Reruns
    resume; failures go to failures.jsonl. See docs/commands.md for real models and vLLM servers.
    """
    from ddaug.captioning import GenerationSettings
    from ddaug.captioning.run import CaptionOptions, run_caption

    run = _run_options(kw)
    vlm = _check_vlm(kw["vlm"], kw["backend"])
    generation = GenerationSettings(max_new_tokens=kw["max_new_tokens"], temperature=kw["temperature"],
                                    top_p=kw["top_p"], seed=run.seed)
    # With a server the dtype is the server's; choosing one here would load torch for nothing.
    dtype = _dtype(kw["dtype"], run.device) if kw["backend"] == "transformers" else kw["dtype"] or CaptionOptions.dtype
    opts = CaptionOptions(vlm=vlm, backend=kw["backend"], task=kw["task"], lang=kw["lang"], stage=kw["stage"],
                          questions_file=kw["questions_file"], max_pixels=kw["max_pixels"],
                          lossless=kw["send_lossless"],
                          generation=generation, dtype=dtype,
                          trust_remote_code=kw["trust_remote_code"], domain=kw["domain"],
                          drop_truncated=kw["drop_truncated"], api_base=kw["api_base"],
                          concurrency=kw["concurrency"], timeout=kw["timeout"], max_retries=kw["max_retries"],
                          retry_backoff=kw["retry_backoff"])
    _report("caption", run_caption(run, opts), run.output)


@cli.command(epilog="""\b
Examples:
  ddaug translate out/general -o out/general-zh --to zh --model Qwen/Qwen2.5-7B-Instruct \\
        --api-base http://localhost:8000/v1       # a vLLM/SGLang server; key: $OPENAI_API_KEY
  ddaug translate llava.json --media-dir imgs/ -o out/llava-ja --to ja --from en --model m --concurrency 64
  ddaug translate out/general -o out/bilingual --to zh --mix-original --model m   # both, as two samples
  ddaug translate out/general -o out/general-zh --to zh --model m --retry-failures  # only the ledger's inputs
""")
@click.argument("inputs", nargs=-1, required=True)
@run_options
@click.option("--to", "target", required=True, help="Target language code (zh, ja, ko, fr, de, ru, ar, ...).")
@click.option("--from", "source", default="auto", show_default=True,
              help="Source language code, or auto: detected per sample (scripts, then py3langid).")
@click.option("--model", required=True, help="The model name the server serves (as in its /v1/models).")
@click.option("--mix-original", is_flag=True,
              help="Keep each original too: two samples per input (KEY and KEY-LANG), tagged with their languages.")
@click.option("--min-target-share", type=FiniteFloatRange(0, 1), default=0.5, show_default=True,
              help="Share of a translation's letters that must be in the target language (else: failures.jsonl).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Length limit of one turn's translation; one cut there goes to failures.jsonl.")
@click.option("--temperature", type=FiniteFloatRange(min=0), default=0.0, show_default=True,
              help="0: greedy decoding; > 0 samples (seeded by --seed).")
@click.option("--top-p", type=FiniteFloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              help="Nucleus sampling, with --temperature > 0.")
@server_options(concurrency=16, scope="")
@user_errors
def translate(**kw) -> None:
    """Translate the conversations of shards or datasets through an LLM server.

    Each system, user and assistant turn goes to an OpenAI-compatible chat-completions server
    (vLLM, SGLang) with its image tags, code, JSON, URLs, e-mail addresses and numbers hidden
    behind placeholders, which are put back after. Images are carried over byte for byte. A
    translation that loses a placeholder, changes the image tags, falls outside the pair's
    length band or is not in the target language goes to failures.jsonl. Reruns resume. See
    docs/translate.md.
    """
    from ddaug.captioning import GenerationSettings
    from ddaug.translate.run import TranslateOptions, run_translate

    run = _run_options(kw)
    generation = GenerationSettings(max_new_tokens=kw["max_new_tokens"], temperature=kw["temperature"],
                                    top_p=kw["top_p"], seed=run.seed)
    opts = TranslateOptions(target=kw["target"], source=kw["source"], model=kw["model"], api_base=kw["api_base"],
                            mix_original=kw["mix_original"], min_target_share=kw["min_target_share"],
                            generation=generation, concurrency=kw["concurrency"], timeout=kw["timeout"],
                            max_retries=kw["max_retries"], retry_backoff=kw["retry_backoff"])
    _report("translate", run_translate(run, opts), run.output)


@cli.command(epilog="""\b
Examples:
  ddaug score out/cap-s1 -o out/cap-s1-scored --vlm qwen2.5-vl-7b --image-gain   # loss with and without the image
  ddaug score out/general-sdxl -o out/general-scored --vlm qwen2-vl-2b --batch-size 16
  ddaug score out/cap-s1 -o out/scored --backend openai --api-base http://localhost:8000/v1 \\
        --vlm Qwen/Qwen2.5-VL-7B-Instruct --concurrency 32     # vLLM: prompt logprobs; key: $OPENAI_API_KEY
  ddaug inspect out/cap-s1-scored --scores-plot scores.png      # quantiles and histograms
  ddaug score shards/ -o scored/ --vlm tiny-random --device cpu  # offline smoke test
""")
@click.argument("inputs", nargs=-1, required=True)
@run_options
@vlm_options("a server that returns prompt logprobs (vLLM)")
@click.option("--image-gain", is_flag=True,
              help="Also score each conversation with its images blanked (mid-grey, same size); "
                   "image_gain = loss_blank - loss.")
@server_options(concurrency=8, scope="openai backend: ")
@user_errors
def score(**kw) -> None:
    """Score each sample's answers by the VLM's mean token loss (perplexity = exp(loss)).

    The loss is the cross-entropy of the assistant turns' tokens (labels masked to the answers, as
    a trainer sees them) given the image and everything before. Output: a scored copy of the
    input shards, each sample's json with a `score` block, for `inspect --scores-plot` and the
    recipe's `keep`. Reruns resume; failures go to failures.jsonl. See docs/score.md.
    """
    from ddaug.scoring.run import ScoreOptions, run_score

    run = _run_options(kw)
    opts = ScoreOptions(vlm=_check_vlm(kw["vlm"], kw["backend"]), backend=kw["backend"], image_gain=kw["image_gain"],
                        max_pixels=kw["max_pixels"], dtype=_dtype(kw["dtype"], run.device),
                        trust_remote_code=kw["trust_remote_code"], api_base=kw["api_base"],
                        concurrency=kw["concurrency"], timeout=kw["timeout"], max_retries=kw["max_retries"],
                        retry_backoff=kw["retry_backoff"])
    _report("score", run_score(run, opts), run.output)


@cli.command(epilog="""\b
Examples:
  ddaug inspect out/                       # summary of every shard in the folder
  ddaug inspect out/ --verify              # decode everything, check schema and manifest
  ddaug inspect 'out/shard-000-{000000..000009}.tar' --json
  ddaug inspect out/ --show astronaut-1a2b3c4d5e6f --save-image a.png
  ddaug inspect out/ --preview sheet.png   # source | output thumbnails with PSNR
  ddaug inspect scored/ --scores-plot scores.png   # histograms of `ddaug score` losses
  watch ddaug inspect out/                 # a running job: units per state, workers and their heartbeats
""")
@click.argument("paths", nargs=-1, required=True)
@click.option("--verify", is_flag=True, help="Decode every sample and check the schema; exit 1 on problems.")
@click.option("--show", "show_key", default=None, help="Print one sample's json.")
@click.option("--save-image", type=click.Path(dir_okay=False), default=None, help="With --show: save its first image.")
@click.option("--preview", type=click.Path(dir_okay=False), default=None, help="Write a contact sheet PNG.")
@click.option("--limit", type=click.IntRange(min=1), default=12, show_default=True, help="Rows in the contact sheet.")
@click.option("--scores-plot", type=click.Path(dir_okay=False), default=None,
              help="Write histograms of the samples' scores (from `ddaug score`) as a PNG.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary.")
@user_errors
def inspect(paths, verify, show_key, save_image, preview, limit, scores_plot, as_json) -> None:
    """Summarise, verify, show and preview shards; for a job's folder, also its progress per unit
    and per worker."""
    from ddaug.shards import inspect as ins

    if show_key:
        sample = ins.find_sample(paths, show_key)
        meta = ins.sample_json(sample)
        if save_image:  # first, so that a path it cannot write is the only line
            ins.save_first_image(sample, save_image)
        click.echo(json.dumps(meta, ensure_ascii=False, indent=2))
        if save_image:
            click.echo(f"saved {save_image}", err=True)
        return
    report = ins.inspect_shards(paths, verify=verify)
    if preview:
        n = ins.contact_sheet(paths, preview, limit=limit)
        click.echo(f"wrote {preview} ({n} rows)", err=True)
    if scores_plot:
        n = ins.scores_plot(report, scores_plot)
        click.echo(f"wrote {scores_plot} ({n} scored samples)", err=True)
    if as_json:
        click.echo(json.dumps(report.to_json(), ensure_ascii=False, indent=1))
    else:
        click.echo(_format_report(report))
    if verify and report.problems:
        raise click.ClickException(f"{len(report.problems)} problem(s) found")


def _format_progress(folder: str, p: dict) -> list[str]:
    lines = [f"job      {folder}: {p['units']} unit(s) in {p['rounds']} plan round(s): {p['committed']} committed, "
             f"{len(p['leased'])} leased, {len(p['expired'])} expired, {len(p['pending'])} pending"]
    for state in ("leased", "expired"):
        for u in p[state]:
            lines.append(f"  {state:<8} unit {u['unit']} by worker {u['worker']} (host {u['host']}, pid {u['pid']}), "
                         f"heartbeat {u['heartbeat_age']}s ago")
    if p["pending"]:
        more = f" (+{len(p['pending']) - 8} more)" if len(p["pending"]) > 8 else ""
        lines.append(f"  pending  {', '.join(p['pending'][:8])}{more}")
    for w in p["workers"]:
        current = ", ".join(w["current"]) or "-"
        lines.append(f"  worker   {w['worker']} host {w['host']} pid {w['pid']} {w['state']}: {w['committed']} "
                     f"unit(s) committed, current {current}, heartbeat {w['heartbeat_age']}s ago")
    return lines


def _format_report(report) -> str:
    from ddaug.scoring.summary import format_quantiles

    r = report.to_json()
    progress = [line for folder, p in r["progress"].items() for line in _format_progress(folder, p)]
    lines = progress + [f"shards   {r['shards']}", f"samples  {r['samples']}", f"bytes    {r['bytes']:,}",
             f"formats  {r['formats']}", f"sizes    {r['sizes']} (longer side)"]
    for k, v in r["tags"].items():
        lines.append(f"tags.{k:<6} {v}")
    if r["turns"]:
        lines.append(f"turns    {r['turns']}")
    if r["answer_chars"]:
        lines.append(f"answers  {r['answer_chars']} chars")
    if r["completion_tokens"]:
        lines.append(f"tokens   {r['completion_tokens']} per answer")
    if r["pools"]:
        lines.append(f"pools    {r['pools']}")
    if r["question_ids"]:
        lines.append(f"questions {r['question_ids']}")
    if r["flags"]:
        lines.append(f"flags    {r['flags']}")
    for name, q in r["scores"].items():
        lines.append(format_quantiles(name, q))
    lines.append(f"failures {r['failures'] or 0} (failures.jsonl)")
    for p in r["problems"]:
        lines.append(f"PROBLEM  {p}")
    return "\n".join(lines)


@cli.command(epilog="""\b
Example recipe (YAML):
  seed: 0
  global_batch_size: 64
  sources: {business: out/cap-s1, general: [out/general-sdxl]}
  stages:
    - {name: bulk, samples: 200000, weights: {business: 10, general: 1}}
    - {name: polish, steps: 500, weights: {business: 5, general: 1}, questions: stage2}
\b
Examples:
  ddaug plan recipe.yaml
  ddaug plan recipe.yaml --json
""")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable plan.")
@user_errors
def plan(recipe: str, as_json: bool) -> None:
    """Print what a training recipe will draw: samples per source and stage, and the epochs of
    each source that uses, before any training. The trainer loads the same file with
    ddaug.load_recipe(path).dataset()."""
    from ddaug.shards.recipe import format_plan, load_recipe
    from ddaug.shards.recipe import plan as make_plan

    p = make_plan(load_recipe(recipe))
    click.echo(json.dumps(p, indent=1) if as_json else format_plan(p))


@cli.command(epilog="""\b
Examples:
  ddaug export out/cap-s1 out/general -o lf/ --format llamafactory            # json + images/ + dataset_info.json
  ddaug export out/cap-s1 -o lf/ --format llamafactory --embed --name cap    # parquet, image bytes inside
  ddaug export out/cap-s1 out/general -o swift/ --format swift               # jsonl with channel = tags.domain
  ddaug export out/cap-s1 -o energon/ --format energon                       # shards + .nv-meta (energon prepare)
  ddaug export out/cap-s1 out/general -o hf/ --format hf                     # parquet for HF datasets, images list
""")
@click.argument("paths", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--format", "fmt", required=True, type=click.Choice(["llamafactory", "swift", "energon", "hf"]))
@click.option("--name", default="ddaug", show_default=True, callback=_plain_name,
              help="Dataset name (a plain file name; also the dataset_info key).")
@click.option("--jsonl", is_flag=True, help="llamafactory: write jsonl instead of one json array.")
@click.option("--embed", is_flag=True, help="llamafactory: parquet with the image bytes embedded (needs pyarrow).")
@click.option("--channel-tag", default="domain", show_default=True, help="swift: the tag whose value becomes `channel`.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@user_errors
def export(paths, output, fmt, name, jsonl, embed, channel_tag, quiet) -> None:
    """Export shards for trainers that do not read tars. Keys from tars never write outside -o."""
    from ddaug.shards.export import export as run_export

    if fmt != "llamafactory" and (jsonl or embed):
        raise click.BadParameter("only with --format llamafactory", param_hint="--jsonl/--embed")
    kwargs = {"show_progress": not quiet}
    if fmt == "llamafactory":
        kwargs.update(name=name, jsonl=jsonl, embed=embed)
    elif fmt == "swift":
        kwargs.update(name=name, channel_tag=channel_tag)
    elif fmt == "hf":
        kwargs.update(name=name)
    summary = run_export(paths, fmt, output, **kwargs)
    click.echo(f"export ({fmt}): {summary.line()} -> {output} ({', '.join(summary.files)})", err=True)


@cli.command(epilog="""\b
Example:
  ddaug demo -o demo-out && open demo-out/preview.png
""")
@click.option("-o", "--output", type=click.Path(file_okay=False), default="demo-out", show_default=True)
@user_errors
def demo(output: str) -> None:
    """Offline end-to-end run on CPU: bundled photos -> augment (tiny) -> inspect + preview -> caption."""
    from ddaug.demo import run_demo

    for line in run_demo(output):
        click.echo(line)


def _parse_doses(ctx, param, values) -> tuple:
    from ddaug.gap import check_folders, parse_dose

    doses = []
    for value in values:
        try:
            dose = parse_dose(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
        _validate_model(ctx, param, dose.model)
        doses.append(dose)
    try:
        check_folders(doses)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return tuple(doses)


@cli.command(epilog="""\b
Examples:
  ddaug gap --business biz/ --general photos/                         # the gap before augmenting
  ddaug gap --business out/cap-s1 --general llava.json --media-dir imgs/ --augmented out/general-sdxl
  ddaug gap --business biz/ --general photos/ --augmented sdxl=out/sdxl --augmented ssd=out/ssd1b \\
        --plot gap.png --json > gap.json
  ddaug gap --business biz/ --general photos/ --samples 200 --dose-dir dose/ \\
        --dose sdxl@0.01 --dose sdxl@0.025 --dose sdxl@0.05 --dose ssd-1b@0.025 --dose sdxl@vae:webp
""")
@click.option("--business", multiple=True, required=True, help="Business images: any ddaug input (repeat to add).")
@click.option("--general", multiple=True, required=True, help="General images: any ddaug input (repeat to add).")
@click.option("--augmented", multiple=True,
              help="An augmented set to compare with business, PATH or NAME=PATH; repeat for several sets.")
@click.option("--samples", type=click.IntRange(min=4), default=300, show_default=True,
              help="Images drawn per set (seeded).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling, crops and folds.")
@click.option("--crop", type=click.IntRange(min=16), default=64, show_default=True,
              help="Side of the square crops the features come from (even; smaller images are skipped).")
@click.option("--crops", "crops_per_image", type=click.IntRange(min=1), default=16, show_default=True,
              help="Crops per image at most (non-overlapping, native resolution).")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True, help="Cross-validation folds.")
@click.option("--media-dir", type=click.Path(file_okay=False), default=None,
              help="Base folder for image paths in .json/.jsonl datasets.")
@click.option("--workers", type=click.IntRange(min=1), default=4, show_default=True,
              help="Threads for reading and features.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG: mean residual spectra of the sets, and residual crops per set.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--dose", "doses", multiple=True, callback=_parse_doses,
              help="Augment the general sample with MODEL[@STRENGTH|@vae][:png|webp|jpeg] and rank it; repeat.")
@click.option("--dose-dir", type=click.Path(file_okay=False), default=None,
              help="With --dose: folder for the general sample and one augment output per dose (reruns resume).")
@click.option("--device", default=None, help="With --dose: torch device for augment.")
@click.option("-q", "--quiet", is_flag=True, help="With --dose: no progress bars.")
@user_errors
def gap(**kw) -> None:
    """Measure the domain gap between business images and general (or augmented) images.

    For each pair, a logistic regression on low-level forensic features (noise-residual spectra
    at native resolution) is cross-validated; its ROC AUC says how separable the sets are (0.5:
    not at all). Format, JPEG quality, size and aspect are checked for shortcuts. With --dose,
    the general sample is augmented at each dose and the doses are ranked by the gap they leave.
    """
    from ddaug.gap import GapOptions, format_report, run_gap

    if kw["doses"] and not kw["dose_dir"]:
        raise click.BadParameter("--dose needs --dose-dir (where the sample and the augmented images go)",
                                 param_hint="--dose-dir")
    if kw["crop"] % 2:
        raise click.BadParameter(f"{kw['crop']} is odd; give an even number of pixels", param_hint="--crop")
    as_json = kw.pop("as_json")
    opts = GapOptions(**kw, dose_dtype=_dtype(None, kw["device"]) if kw["doses"] else "fp32")
    report, _ = run_gap(opts)
    click.echo(json.dumps(report, ensure_ascii=False, indent=1) if as_json else format_report(report))


@cli.command(epilog="""\b
Examples:
  ddaug leakage --train out/general --train out/cap-s1 --eval bench-images/ -o leak/
  ddaug leakage --train 'out/shard-000-{000000..000099}.tar' --eval eval.json --media-dir imgs/ -o leak/
  ddaug leakage --train out/general --eval bench-images/ -o leak/ --drop out/general-clean
  ddaug leakage --train out/general --eval bench-images/ -o leak/ --phash-distance 6 --min-correlation 0.8
  ddaug leakage --train out/general --eval bench-images/ -o leak/ --embed-model openai/clip-vit-base-patch32 \\
        --embed-similarity 0.95 --device cuda      # also semantic near copies (a CLIP/SigLIP folder or hub id)
""")
@click.option("--train", multiple=True, required=True,
              help="Training shards: a shard folder, a .tar or a {000..009} pattern (repeat to add).")
@click.option("--eval", "eval_", multiple=True, required=True,
              help="Eval images: any ddaug input (folders, images, tars, .json/.jsonl datasets; repeat to add).")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Report folder: leakage.json, matches.png, failures.jsonl.")
@click.option("--drop", type=click.Path(file_okay=False), default=None,
              help="Write the training shards without the matched samples to this folder (the rest byte for byte).")
@click.option("--overwrite", is_flag=True, help="With --drop: replace an earlier output in that folder.")
@click.option("--media-dir", type=click.Path(file_okay=False), default=None,
              help="Base folder for image paths in --eval .json/.jsonl datasets.")
@click.option("--phash-distance", type=click.IntRange(0, 32), default=10, show_default=True,
              help="Near copy: perceptual hash within this many of 64 bits of the eval image or one of its crops.")
@click.option("--min-correlation", type=FiniteFloatRange(-1, 1), default=0.5, show_default=True,
              help="...and their 32x32 grey thumbnails correlate at least this much (rules out look-alike layouts).")
@click.option("--embed-model", default=None,
              help="Also compare image embeddings: a CLIP/SigLIP folder or hub id (safetensors only).")
@click.option("--embed-similarity", type=FiniteFloatRange(-1, 1), default=0.95, show_default=True,
              help="With --embed-model: a match at this cosine similarity or above.")
@click.option("--device", default=None, help="With --embed-model: torch device (default: cuda if available, else cpu).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="With --embed-model: images per model call.")
@click.option("--workers", type=click.IntRange(min=1), default=None, show_default="4 to 8, by CPU count",
              help="Threads decoding and hashing images.")
@click.option("--sheet-rows", type=click.IntRange(min=1), default=50, show_default=True,
              help="Matches drawn in matches.png (leakage.json has them all).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@user_errors
def leakage(**kw) -> None:
    """Find eval images, or near copies of them, inside training shards.

    Each training image is checked against every eval image, cheapest test first: the same
    bytes, the same decoded pixels, a DCT perceptual hash near the eval image's (or one of ten
    crops of it: resized, re-encoded, slightly cropped or augmented copies), and with
    --embed-model the cosine of image embeddings. The report lists each match with its stage
    and distance; a paragraph sums it up. Unreadable inputs are skipped and listed in
    failures.jsonl. --drop writes the shards again without the matched samples.
    """
    from ddaug.leakage import LeakageOptions, LeakageThresholds, run_leakage
    from ddaug.leakage.report import summary_paragraph

    thresholds = LeakageThresholds(phash_distance=kw["phash_distance"], min_correlation=kw["min_correlation"],
                            embed_similarity=kw["embed_similarity"])
    extra = {"workers": kw["workers"]} if kw["workers"] else {}
    opts = LeakageOptions(train=kw["train"], eval=kw["eval_"], report_dir=kw["output"], drop=kw["drop"],
                          overwrite=kw["overwrite"], media_dir=kw["media_dir"], thresholds=thresholds,
                          embed_model=kw["embed_model"], device=kw["device"], batch_size=kw["batch_size"],
                          sheet_rows=kw["sheet_rows"], quiet=kw["quiet"], **extra)
    click.echo(summary_paragraph(run_leakage(opts), kw["output"]))


def main() -> None:
    cli(prog_name="ddaug")


if __name__ == "__main__":
    sys.exit(main())
