"""Loader throughput: ddaug's MixedShardDataset vs plain webdataset reading the same shards.

    python bench/loader_bench.py --samples 4000 --size 512 --workers 0 4

Writes ddaug-schema shards of real photos (scikit-image, JPEG), then, in one run, times:
  plain    webdataset.WebDataset(tars).decode("pil"), iterated (the baseline)
  ddaug    MixedShardDataset(decode=True) over the same shards, one source
  mixed    MixedShardDataset with two sources at 10:1 (same total bytes per sample)
each with DataLoader num_workers in --workers. Appends a section to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time

import checkout  # noqa: E402,F401  (ddaug from this checkout, installed or not)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def write_shards(folder: str, n: int, size: int, per_shard: int, tag: str) -> list[str]:
    import webdataset as wds
    from skimage import data

    from ddaug.shards.schema import build_sample, encode_sample_json

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    os.makedirs(folder, exist_ok=True)
    paths = []
    for start in range(0, n, per_shard):
        path = os.path.join(folder, f"shard-000-{start // per_shard:06d}.tar")
        with wds.TarWriter(path) as tw:
            for i in range(start, min(n, start + per_shard)):
                img = Image.fromarray(photos[i % 4]).resize((size, size))
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                key = f"{tag}{i:07d}"
                meta = build_sample(key, messages=[{"role": "user", "content": "<image>Describe this image in detail."},
                                                   {"role": "assistant", "content": "A photo. " * 20}],
                                    image_names=[f"{key}.jpg"], source={"uri": key, "images": []},
                                    tags={"domain": tag, "task": "caption", "stage": None},
                                    block_name="caption", block={"task": "caption"})
                tw.write({"__key__": key, "jpg": buf.getvalue(), "json": encode_sample_json(meta)})
        paths.append(path)
    return paths


def timed(make_iterable, workers: int) -> tuple[float, int]:
    loader = torch.utils.data.DataLoader(make_iterable(), batch_size=None, num_workers=workers)
    t0 = time.perf_counter()
    n = 0
    for sample in loader:
        n += 1
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--per-shard", type=int, default=250)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 4])
    ap.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    args = ap.parse_args()

    import webdataset as wds

    from ddaug.shards import MixedShardDataset, TrainingStage

    root = tempfile.mkdtemp(prefix="ddaug-loader-bench-")
    big = write_shards(os.path.join(root, "business"), args.samples, args.size, args.per_shard, "business")
    small = write_shards(os.path.join(root, "general"), max(args.per_shard * 2, args.samples // 10), args.size,
                         args.per_shard, "general")

    def plain():
        return wds.WebDataset(big, shardshuffle=False, empty_check=False,
                              nodesplitter=wds.shardlists.single_node_only,
                              workersplitter=wds.shardlists.split_by_worker).decode("pil")

    def ddaug_one():
        return MixedShardDataset({"business": big}, decode=True, rank=0, world_size=1)

    def ddaug_mixed():
        return MixedShardDataset({"business": big, "general": small}, rank=0, world_size=1, stages=[
            TrainingStage("s", {"business": 10, "general": 1}, samples=args.samples)])

    rows = []
    for workers in args.workers:
        result = {}
        for name, fn in (("plain webdataset", plain), ("ddaug loader", ddaug_one), ("ddaug 10:1 mix", ddaug_mixed)):
            timed(fn, workers)  # warm the page cache and imports
            secs, n = timed(fn, workers)
            result[name] = n / secs
            print(f"workers={workers} {name:<18} {n} samples in {secs:.2f}s = {n / secs:,.0f} samples/s", flush=True)
        base = result["plain webdataset"]
        rows.append((workers, result, base))

    lines = [f"\n## Loader throughput ({time.strftime('%Y-%m-%d')})",
             f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}, "
             f"torch {torch.__version__}, webdataset {wds.__version__ if hasattr(wds, '__version__') else '?'}",
             f"- command: `python bench/loader_bench.py --samples {args.samples} --size {args.size} "
             f"--per-shard {args.per_shard} --workers {' '.join(map(str, args.workers))}`",
             f"- data: {args.samples} JPEG q90 {args.size}² real photos + json per sample, {args.per_shard} per shard; "
             "decode to PIL RGB on",
             "", "| DataLoader workers | plain webdataset | ddaug loader | ddaug 10:1 mix | ddaug / plain |",
             "|---|---|---|---|---|"]
    for workers, result, base in rows:
        lines.append(f"| {workers} | {base:,.0f}/s | {result['ddaug loader']:,.0f}/s | {result['ddaug 10:1 mix']:,.0f}/s | "
                     f"{result['ddaug loader'] / base:.0%} |")
    with open(args.results, "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    np.random.seed(0)
    main()
