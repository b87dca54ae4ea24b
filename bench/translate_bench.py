"""`ddaug translate` against the local chat server with an injected latency: does the client keep
--concurrency requests in flight?

The server (ddaug's own ChatServer with its deterministic TranslationResponder, in a separate
process) answers each request after a fixed latency L. Every sample has two turns to translate
(a question and a ~40-word answer) and one photo, so a perfect client at --concurrency C makes
C / (2 L) samples per second. The table gives ddaug's rate against that, from the job's own
seconds (after start-up) and from the process's wall time.

    python bench/translate_bench.py --latency 0.5 --concurrency 16 32 --samples 480 960
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results import emit, run_ddaug  # noqa: E402

ANSWER = ("The picture shows a cat sitting on a red sofa near the window, with a cup of coffee on the "
          "table and a blue sky outside; the light is soft and the room looks calm and quiet in the morning.")
TURNS = 2


def serve(port: int, latency: float) -> None:
    from http.server import ThreadingHTTPServer

    from ddaug.captioning.server import ChatServer, TranslationResponder

    ThreadingHTTPServer.request_queue_size = 1024  # a burst of C connects must not overflow the backlog
    with ChatServer(TranslationResponder(latency=latency), model="sim", port=port, parallel=True):
        print("ready", flush=True)
        while True:
            time.sleep(3600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_dataset(folder: str, n: int) -> str:
    """n records over 8 real photos (512² JPEG q90): one question, one answer each."""
    from PIL import Image
    from skimage import data

    os.makedirs(folder, exist_ok=True)
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.cat(), data.immunohistochemistry(),
              data.colorwheel(), data.retina()]
    for i, arr in enumerate(photos):
        Image.fromarray(arr).convert("RGB").resize((512, 512)).save(os.path.join(folder, f"p{i}.jpg"), quality=90)
    records = [{"id": f"r{i}", "images": [f"p{i % len(photos)}.jpg"],
                "messages": [{"role": "user", "content": f"<image>Describe picture {i} in detail."},
                             {"role": "assistant", "content": ANSWER}]} for i in range(n)]
    path = os.path.join(folder, "data.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f)
    return path


def run_client(dataset: str, out: str, api_base: str, concurrency: int) -> tuple[int, float, float, str]:
    cmd = [sys.executable, "-m", "ddaug", "-v", "translate", dataset, "-o", out, "--to", "zh", "--model", "sim",
           "--api-base", api_base, "--concurrency", str(concurrency), "-q"]
    _, wall, done, seconds, where = run_ddaug(cmd)
    return done, seconds, wall, where


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--latency", type=float, default=0.5, help="server seconds per request")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--samples", type=int, nargs="+", default=None, help="per --concurrency entry (default 30 C)")
    ap.add_argument("--results", default=None, help="append the table to this markdown file")
    args = ap.parse_args()
    if args.serve:
        return serve(args.port, args.latency)
    samples = args.samples or [30 * c for c in args.concurrency]
    port = free_port()
    server = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", "--port", str(port),
                               "--latency", str(args.latency)], stdout=subprocess.PIPE, text=True)
    work = tempfile.mkdtemp(prefix="ddaug-translate-bench-")
    rows = []
    try:
        assert server.stdout.readline().strip() == "ready"
        for c, n in zip(args.concurrency, samples):
            dataset = make_dataset(os.path.join(work, f"in{n}"), n)
            done, secs, wall, where = run_client(dataset, os.path.join(work, f"out{c}"), f"http://127.0.0.1:{port}/v1", c)
            ideal = c / (TURNS * args.latency)
            rows.append(f"| {c} | {done} | {secs:.1f} | {done / secs:.2f} | {wall:.1f} | {done / wall:.2f} | "
                        f"{ideal:.2f} | {done / secs / ideal:.1%} | {where} |")
            print(rows[-1], flush=True)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
    from importlib import metadata

    emit([f"## translate against a local chat server at {args.latency:g} s per request ({datetime.date.today()})",
          f"- machine: {os.cpu_count()} CPU cores (shared with other work), no GPU; python {platform.python_version()}, "
          f"ddaug {metadata.version('ddaug')}, py3langid {metadata.version('py3langid')}; server: ddaug's ChatServer "
          f"with TranslationResponder in its own process on the same machine",
          f"- command: `python bench/translate_bench.py --latency {args.latency:g} --concurrency "
          f"{' '.join(map(str, args.concurrency))} --samples {' '.join(map(str, samples))}`",
          f"- each sample: one 512² JPEG and {TURNS} turns to translate (one request each), so ideal = C / "
          f"({TURNS} x latency) samples/s", "",
          "| concurrency | samples | job s | samples/s (job) | wall s | samples/s (wall) | ideal | job of ideal | "
          "-v: where the time went |", "|---|---|---|---|---|---|---|---|---|", *rows, ""], args.results)


if __name__ == "__main__":
    main()
