"""Peak memory of `ddaug caption` reading a parquet file far larger than its batches.

Writes a parquet of N rows, each a `messages` conversation and an `images` list holding one
embedded JPEG of random pixels (incompressible, ~1.1 MB at 1024x1024), then runs
`ddaug caption FILE --backend openai` against a localhost chat server in another process and
reports the child's peak RSS (getrusage ru_maxrss) beside the file size.

    python bench/parquet_memory.py /tmp/pq --rows 3000 --row-group 100
    python bench/parquet_memory.py /tmp/pq --rows 3000 --row-group 0      # one row group for all rows
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import time

import numpy as np
from PIL import Image

import checkout  # noqa: F401  (ddaug from this checkout, installed or not)

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_parquet(path: str, rows: int, row_group: int, side: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    blobs = []
    for i in range(8):  # 8 distinct images, cycled: the bytes are read, not their variety
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    schema = pa.schema([("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
                        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())])))])
    group = row_group or rows
    with pq.ParquetWriter(path, schema, use_dictionary=False) as writer:  # no dedup of the 8 blobs
        for start in range(0, rows, 100):
            batch = [{"messages": [{"role": "user", "content": f"<image>Row {i}?"},
                                   {"role": "assistant", "content": "An answer."}],
                      "images": [{"bytes": blobs[i % 8], "path": f"{i}.jpg"}]}
                     for i in range(start, min(rows, start + 100))]
            writer.write_table(pa.Table.from_pylist(batch, schema=schema), row_group_size=group)
    return os.path.getsize(path)


def serve(port_queue, stop):
    from ddaug.captioning.replies import Reply
    from ddaug.captioning.server import ChatServer

    with ChatServer(lambda image, text, n: Reply("A picture of noise."), model="m") as srv:
        port_queue.put(srv.url)
        stop.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir")
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--row-group", type=int, default=100, help="rows per row group; 0: one for the whole file")
    ap.add_argument("--side", type=int, default=1024)
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    path = os.path.join(args.workdir, f"big-{args.rows}-rg{args.row_group}.parquet")
    t0 = time.time()
    size = os.path.getsize(path) if os.path.exists(path) else write_parquet(path, args.rows, args.row_group, args.side)
    print(f"parquet {path}: {size / 2**30:.2f} GiB, {args.rows} rows, row groups of {args.row_group or args.rows} "
          f"({time.time() - t0:.0f}s)", flush=True)
    queue, stop = multiprocessing.Queue(), multiprocessing.Event()
    server = multiprocessing.Process(target=serve, args=(queue, stop), daemon=True)
    server.start()
    url = queue.get(timeout=60)
    out = os.path.join(args.workdir, f"out-{args.rows}-rg{args.row_group}")
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
           "OPENAI_API_KEY": "EMPTY"}
    cmd = [sys.executable, "-m", "cli", "caption", path, "-o", out, "--overwrite", "-q", "--backend", "openai",
           "--api-base", url, "--vlm", "m", "--max-pixels", "65536", "--concurrency", "8"]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE)
    seconds = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    stop.set()
    server.join(5)
    manifest = json.load(open(os.path.join(out, "manifest.json"))) if proc.returncode == 0 else {}
    print(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "(no output)")
    print(json.dumps({"file_gib": round(size / 2**30, 2), "rows": args.rows, "row_group": args.row_group or args.rows,
                      "peak_rss_gib": round(peak, 3), "seconds": round(seconds, 1),
                      "samples": manifest.get("samples"), "rc": proc.returncode}))


if __name__ == "__main__":
    main()
