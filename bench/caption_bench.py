"""Captioning throughput on a GPU: a per-image `generate` loop vs `ddaug caption`, same inputs.

A Qwen2-VL-2B-shaped model (published sizes, random weights: same FLOPs) is saved with
save_pretrained next to a processor with an in-process tokenizer, and loaded through ddaug's
real `--vlm FOLDER` path. Random weights rarely emit the end token, so every answer runs to
--new-tokens, which is what the comparison wants.

    python bench/caption_bench.py --images 64 --loop-images 4 --new-tokens 256 --max-pixels 448 1024
    python bench/caption_bench.py --cocolike ../shared/bench/cocolike.py --images 128 --max-pixels 448 --batch 32
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time

import checkout  # noqa: E402,F401  (ddaug from this checkout, installed or not)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from results import emit  # noqa: E402

QWEN2_VL_2B_TEXT = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
QWEN2_VL_2B_VISION = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                          spatial_merge_size=2, temporal_patch_size=2)


def build_vlm_folder(folder: str) -> None:
    from transformers import AutoProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from ddaug.captioning import save_tiny_vlm

    save_tiny_vlm(folder)  # processor (tokenizer trained in process) + a tiny model we replace
    processor = AutoProcessor.from_pretrained(folder)
    tok = processor.tokenizer
    # Give every id of the full-size vocabulary a text, so random-weight answers decode to words
    # (ids past the tokenizer would decode to nothing and fail as empty answers).
    tok.add_tokens([f" w{i}" for i in range(QWEN2_VL_2B_TEXT["vocab_size"] - len(tok))])
    processor.save_pretrained(folder)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>", "<|image_pad|>",
                                                      "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    cfg = Qwen2VLConfig(text_config=dict(QWEN2_VL_2B_TEXT, eos_token_id=ids["<|im_end|>"],
                                         pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"]),
                        vision_config=QWEN2_VL_2B_VISION, image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2VLForConditionalGeneration(cfg).to(torch.bfloat16)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()


def make_inputs(folder: str, n: int) -> None:
    from skimage import data

    os.makedirs(folder, exist_ok=True)
    bases = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    for i in range(n):
        Image.fromarray(bases[i % 4]).resize((1024, 1024)).save(os.path.join(folder, f"b{i:04d}.jpg"), quality=92)


def per_image_loop(folder: str, paths: list[str], new_tokens: int, max_pixels: int) -> tuple[float, int]:
    """The obvious loop: one image, one generate call, at a time (same model, same pixels)."""
    from ddaug.captioning import GenerationSettings, TransformersVLM
    from ddaug.captioning.vlm import Prompt

    vlm = TransformersVLM(folder, device="cuda", dtype="bf16", settings=GenerationSettings(max_new_tokens=new_tokens))
    tokens = 0

    def one(path):
        img = Image.open(path).convert("RGB")
        scale = min(1.0, (max_pixels / (img.width * img.height)) ** 0.5)
        img = img.resize((int(img.width * scale), int(img.height * scale)))
        return vlm.generate([Prompt(img, "Describe this image in detail.")])[0]

    one(paths[0])  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for p in paths:
        tokens += one(p).completion_tokens
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    del vlm
    torch.cuda.empty_cache()
    return secs, tokens


def ddaug_caption(folder: str, in_dir: str, out_dir: str, new_tokens: int, max_pixels: int, batch: int):
    from ddaug.captioning import GenerationSettings
    from ddaug.captioning.run import CaptionOptions, run_caption
    from ddaug.pipeline.command import RunOptions

    t0 = time.perf_counter()
    summary = run_caption(RunOptions(inputs=(in_dir,), output=out_dir, device="cuda", batch_size=batch,
                                     shard_size=10_000, workers=8, overwrite=True, quiet=True),
                          CaptionOptions(vlm=folder, max_pixels=max_pixels, dtype="bf16",
                                         generation=GenerationSettings(max_new_tokens=new_tokens)))
    return time.perf_counter() - t0, summary.done


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--loop-images", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--max-pixels", type=int, nargs="+", default=[448, 1024], help="sides: cap is side*side")
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 16], help="batch per --max-pixels entry")
    ap.add_argument("--cocolike", default=None, help="path of cocolike.py: mixed-size COCO-like photos instead of 1024² crops")
    ap.add_argument("--results", default=None)
    args = ap.parse_args()
    import transformers
    from transformers.utils import logging as tlog

    tlog.set_verbosity_error()
    work = tempfile.mkdtemp(prefix="ddaug-capbench-")
    folder, in_dir = os.path.join(work, "vlm"), os.path.join(work, "in")
    t = time.perf_counter()
    build_vlm_folder(folder)
    if args.cocolike:
        from augment_bench import make_cocolike

        make_cocolike(args.cocolike, in_dir, args.images)
    else:
        make_inputs(in_dir, args.images)
    setup_s = time.perf_counter() - t
    paths = sorted(os.path.join(in_dir, f) for f in os.listdir(in_dir))
    rows = []
    for side, batch in zip(args.max_pixels, args.batch):
        mp = side * side
        loop_s, loop_tok = per_image_loop(folder, paths[: args.loop_images], args.new_tokens, mp)
        loop_rate = args.loop_images / loop_s
        rows.append(f"| per-image `generate` loop, max_pixels {side}² | {args.loop_images} | {loop_rate:.3f} | "
                    f"{loop_tok / loop_s:.0f} | 1.00x |")
        print(rows[-1], flush=True)
        secs, done = ddaug_caption(folder, in_dir, os.path.join(work, f"out{side}"), args.new_tokens, mp, batch)
        rate = done / secs
        rows.append(f"| `ddaug caption` end to end incl. model load, batch {batch}, max_pixels {side}² | {done} | "
                    f"{rate:.3f} | {done * args.new_tokens / secs:.0f} (upper bound) | {rate / loop_rate:.2f}x |")
        print(rows[-1], flush=True)
    workload = f"COCO-like ({args.images} images from cocolike.py, seed 0)" if args.cocolike else "1024² crops"
    lines = [f"## caption, Qwen2-VL-2B architecture (random weights), {args.new_tokens} new tokens, {workload}",
             f"- date {datetime.date.today()}, device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"transformers {transformers.__version__}, python {platform.python_version()}",
             f"- command: `python bench/caption_bench.py --images {args.images} --loop-images {args.loop_images} "
             f"--new-tokens {args.new_tokens} --max-pixels {' '.join(map(str, args.max_pixels))} "
             f"--batch {' '.join(map(str, args.batch))}{' --cocolike ' + args.cocolike if args.cocolike else ''}` "
             f"(setup {setup_s:.0f}s)",
             "", "| path | images | img/s | new tokens/s | vs loop |", "|---|---|---|---|---|", *rows, ""]
    emit(lines, args.results)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
