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
      inspect   summarise, verify and preview shards
      plan      what a training recipe (sources, ratios, stages) will draw
      export    shards -> LLaMA-Factory, ms-swift, Megatron-Energon or HF datasets
      demo      offline end-to-end run on bundled photos with tiny models
      gap       how far general (and augmented) images are from business, and which dose closes it
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
        click.option("--rank", type=click.IntRange(min=0), default=None,
                     help="This process's part of the input (default: $RANK from accelerate/torchrun, else 0)."),
        click.option("--world-size", type=click.IntRange(min=1), default=None,
                     help="Number of processes sharing the input (default: $WORLD_SIZE, else 1)."),
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


def _run_options(kw: dict):
    from ddaug.pipeline.command import RunOptions

    keys = ("output", "media_dir", "device", "batch_size", "shard_size", "seed", "prefix", "workers",
            "rank", "world_size", "overwrite", "quiet", "retry_failures", "drop_text_only")
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
  accelerate launch --multi_gpu --num_processes 8 cli.py augment photos/ -o out/  # per GPU
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
    to webdataset shards with its conversation unchanged. Reruns resume; see README.
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
  ddaug caption --list-questions                              # the built-in question pools
  ddaug caption imgs/ -o out/ --vlm tiny-random --device cpu  # offline smoke test
""")
@click.argument("inputs", nargs=-1, required=True)
@run_options
@click.option("--vlm", default="qwen2.5-vl-7b", show_default=True,
              help="transformers: a preset (see README), hub id or local folder; openai: the served model name.")
@click.option("--backend", type=click.Choice(["transformers", "openai"]), default="transformers", show_default=True,
              help="transformers: run the VLM here; openai: call an OpenAI-compatible chat-completions server.")
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
@click.option("--max-pixels", type=click.IntRange(min=0), default=None,
              help="Downsize what the VLM sees to at most this many pixels (0: no cap). The shard keeps the original. "
                   "Default: 1048576 for transformers; none for openai (the server resizes to its own budget).")
@click.option("--send-lossless", is_flag=True,
              help="openai backend: send images downsized for --max-pixels as PNG instead of JPEG q95 (slower, 5-8x bytes).")
@click.option("--temperature", type=FiniteFloatRange(min=0), default=0.0, show_default=True,
              help="0: greedy decoding; > 0 samples (seeded by --seed).")
@click.option("--top-p", type=FiniteFloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              help="Nucleus sampling, with --temperature > 0.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
              help="transformers backend compute dtype (default bf16 on GPU, fp32 on CPU).")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model repo's own Python code to run (off by default).")
@click.option("--domain", default="business", show_default=True, help="tags.domain of the output samples.")
@click.option("--drop-truncated", is_flag=True,
              help="Send truncated or degenerate answers to failures.jsonl instead of writing them (flagged otherwise).")
@click.option("--api-base", envvar="OPENAI_BASE_URL", default=None,
              help="openai backend: server URL ending in /v1 (default: $OPENAI_BASE_URL). Key: $OPENAI_API_KEY.")
@click.option("--concurrency", type=click.IntRange(min=1), default=8, show_default=True,
              help="openai backend: requests in flight.")
@click.option("--timeout", type=FiniteFloatRange(min=0, min_open=True), default=120.0, show_default=True,
              help="openai backend: seconds per request before it is retried.")
@click.option("--max-retries", type=click.IntRange(min=0), default=5, show_default=True,
              help="openai backend: retries on 429/5xx/timeouts/resets, with exponential backoff.")
@click.option("--retry-backoff", type=FiniteFloatRange(min=0), default=1.0, show_default=True,
              help="openai backend: first backoff in seconds (doubles per retry, capped at 30; Retry-After wins).")
@user_errors
def caption(**kw) -> None:
    """Recaption images with a VLM into caption or instruct data.

    Each image is shown to the VLM with an image-independent question from the chosen
    language/stage pool (a pure function of --seed and the sample key), and written to
    webdataset shards with its bytes unchanged and a [user, assistant] conversation. Reruns
    resume; failures go to failures.jsonl. See README for real models and vLLM servers.
    """
    from ddaug.captioning import GenerationSettings
    from ddaug.captioning.run import CaptionOptions, run_caption
    from ddaug.captioning.vlm import VLM_PRESETS

    run = _run_options(kw)
    vlm = kw["vlm"]
    if kw["backend"] == "transformers" and not (vlm in VLM_PRESETS or os.path.isdir(os.path.expanduser(vlm))
                                                 or vlm.count("/") == 1):
        raise click.BadParameter(f"{vlm!r} is not a preset ({', '.join(VLM_PRESETS)}), a folder, or a hub id",
                                 param_hint="--vlm")
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
  ddaug inspect out/                       # summary of every shard in the folder
  ddaug inspect out/ --verify              # decode everything, check schema and manifest
  ddaug inspect 'out/shard-000-{000000..000009}.tar' --json
  ddaug inspect out/ --show astronaut-1a2b3c4d5e6f --save-image a.png
  ddaug inspect out/ --preview sheet.png   # source | output thumbnails with PSNR
""")
@click.argument("paths", nargs=-1, required=True)
@click.option("--verify", is_flag=True, help="Decode every sample and check the schema; exit 1 on problems.")
@click.option("--show", "show_key", default=None, help="Print one sample's json.")
@click.option("--save-image", type=click.Path(dir_okay=False), default=None, help="With --show: save its first image.")
@click.option("--preview", type=click.Path(dir_okay=False), default=None, help="Write a contact sheet PNG.")
@click.option("--limit", type=click.IntRange(min=1), default=12, show_default=True, help="Rows in the contact sheet.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary.")
@user_errors
def inspect(paths, verify, show_key, save_image, preview, limit, as_json) -> None:
    """Summarise, verify, show and preview shards."""
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
    if as_json:
        click.echo(json.dumps(report.to_json(), ensure_ascii=False, indent=1))
    else:
        click.echo(_format_report(report))
    if verify and report.problems:
        raise click.ClickException(f"{len(report.problems)} problem(s) found")


def _format_report(report) -> str:
    r = report.to_json()
    lines = [f"shards   {r['shards']}", f"samples  {r['samples']}", f"bytes    {r['bytes']:,}",
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
    shards.load_recipe(path).dataset()."""
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


def main() -> None:
    cli(prog_name="ddaug")


if __name__ == "__main__":
    sys.exit(main())
