"""`ddaug score` throughput with the tiny Qwen2-VL on CPU: batch 1 against batched.

Conversations on crops of scikit-image's photos (a few sizes, so batches group by pixel count
as they do on real data) are written as a LLaMA-Factory dataset and scored through
`run_score`, the library call behind the command, once per batch size into a fresh folder.
Samples/s is over the job alone (after the model is loaded); the losses of every sample are
compared across batch sizes.

    python bench/score_bench.py --samples 96 --batch 1 8 --results bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from results import emit  # noqa: E402

ANSWERS = ["A cat sits on a red sofa near the window.", "The photo shows a rocket on a launch pad under a clear blue sky.",
           "一杯咖啡放在木桌上，旁边有一个勺子。", "An astronaut in a white suit stands before a flag."]
SIDES = [(128, 96), (160, 160), (224, 168), (256, 192)]


def write_dataset(folder: str, samples: int) -> str:
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    records = []
    for i in range(samples):
        arr = photos[i % len(photos)]
        w, h = SIDES[(i // len(photos)) % len(SIDES)]
        top, left = (7 * i) % (arr.shape[0] - h), (11 * i) % (arr.shape[1] - w)
        Image.fromarray(arr[top:top + h, left:left + w]).save(os.path.join(folder, f"p{i:04d}.png"))
        records.append({"messages": [{"role": "user", "content": "<image>Describe this image in detail."},
                                     {"role": "assistant", "content": ANSWERS[i % len(ANSWERS)] * (1 + i % 3)}],
                        "images": [f"p{i:04d}.png"]})
    path = os.path.join(folder, "chat.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--image-gain", action="store_true", help="also score with the images blanked")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--results", default=None, help="append the markdown block to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import ddaug
    from ddaug.captioning import save_tiny_vlm
    from ddaug.pipeline.command import RunOptions
    from ddaug.scoring.run import ScoreOptions, run_score
    from ddaug.shards.inspect import iter_shard, find_shards

    root = tempfile.mkdtemp(prefix="ddaug-score-bench-")
    model = save_tiny_vlm(os.path.join(root, "tiny-vlm"))
    os.makedirs(os.path.join(root, "in"))
    dataset = write_dataset(os.path.join(root, "in"), args.samples)
    rows, losses = [], {}
    for batch in args.batch:
        out = os.path.join(root, f"out-b{batch}")
        summary = run_score(RunOptions(inputs=(dataset,), output=out, device="cpu", batch_size=batch, quiet=True),
                            ScoreOptions(vlm=model, dtype="fp32", image_gain=args.image_gain))
        scores = {json.loads(s.members["json"])["source"]["images"][0]["sha256"]: json.loads(s.members["json"])["score"]["loss"]
                  for shard in find_shards([out]) for s in iter_shard(shard)}
        losses[batch] = scores
        rows.append((batch, summary.done, summary.seconds, summary.done / summary.seconds))
    first = losses[args.batch[0]]
    drift = max(abs(first[k] - other[k]) for other in losses.values() for k in first)
    lines = [f"\n## `ddaug score` on CPU, tiny Qwen2-VL, batch 1 vs batched ({datetime.date.today().isoformat()})",
             "",
             f"- Command: `python bench/score_bench.py --samples {args.samples} --batch {' '.join(map(str, args.batch))}"
             f"{' --image-gain' if args.image_gain else ''}`",
             f"- Device: CPU, {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads "
             f"({os.cpu_count()} cores visible; a shared machine)",
             f"- Versions: ddaug {getattr(ddaug, '__version__', '?')}, torch {torch.__version__}, "
             f"transformers {__import__('transformers').__version__}, python {platform.python_version()}",
             f"- Inputs: {args.samples} single-turn conversations on photo crops of {len(SIDES)} sizes "
             f"(128x96 to 256x192), answers of 10 to 64 characters (1-3 repeats)",
             "",
             "| batch | samples | seconds (after load) | samples/s |",
             "|---|---|---|---|"]
    lines += [f"| {b} | {n} | {s:.2f} | {r:.1f} |" for b, n, s, r in rows]
    lines += ["", f"Largest difference of a sample's loss between batch sizes: {drift:.2e} nats."]
    emit(lines, args.results)


if __name__ == "__main__":
    main()
