"""`ddaug caption --backend openai` against a simulated server: is the client keeping it busy?

A local OpenAI-compatible server (a separate process: a threading HTTP server that parses each
request, then answers after a latency drawn uniformly from [L/2, 3L/2], deterministic per
request) stands in for vLLM/SGLang at their typical per-request latency. A perfect client at
--concurrency C gets C / L requests per second; the table gives ddaug's rate against that, the
peak RSS of the ddaug process, and where -v says the time went. Latency 0 measures the client's
own ceiling (what one machine can send).

    python bench/caption_server_bench.py --latency 3 --concurrency 64 256 --images 1536 5120
    python bench/caption_server_bench.py --latency 0 --concurrency 64 --images 3000 --size 1456x816
    python bench/caption_server_bench.py --downsize-cpu     # ms CPU per image of the request image path
"""

from __future__ import annotations

import argparse
import datetime
import heapq
import json
import os
import platform
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import checkout  # noqa: E402,F401  (ddaug from this checkout, installed or not)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results import emit, run_ddaug  # noqa: E402

ANSWER = ("The image shows a product photo on a plain background, with soft studio light and a "
          "small caption in the lower corner.")


# -- the simulated server (run with --serve, in its own process) ----------------------------------
def serve(port: int, latency: float, model: str) -> None:
    counter = iter(range(10 ** 12))
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _json(self, obj) -> None:
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self._json({"object": "list", "data": [{"id": model, "object": "model"}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            url = body["messages"][0]["content"][0]["image_url"]["url"]
            assert url.startswith("data:image/") and ";base64," in url
            with lock:
                n = next(counter)
            time.sleep(latency * random.Random(n).uniform(0.5, 1.5))
            self._json({"id": f"c{n}", "object": "chat.completion", "model": model,
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": ANSWER}}],
                        "usage": {"prompt_tokens": 300, "completion_tokens": 24, "total_tokens": 324}})

    ThreadingHTTPServer.request_queue_size = 1024
    httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    httpd.daemon_threads = True
    print("ready", flush=True)
    httpd.serve_forever()


def perfect_client_seconds(latency: float, first: int, n: int, concurrency: int) -> float:
    """How long a client that always keeps `concurrency` requests in flight would take for the
    simulator's requests first..first+n-1 (the server draws each one's latency from its number)."""
    slots = [0.0] * concurrency
    for i in range(first, first + n):
        heapq.heappush(slots, heapq.heappop(slots) + latency * random.Random(i).uniform(0.5, 1.5))
    return max(slots)


def _share(rate: float, ideal: float) -> str:
    return f"{rate / ideal:.1%}" if ideal != float("inf") else "n/a (latency 0: client ceiling)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- inputs ------------------------------------------------------------------------------------
def make_inputs(folder: str, n: int, size: tuple[int, int]) -> float:
    """n JPEG files (q92) of real photos at size; 8 distinct pictures, the rest hard links."""
    from PIL import Image
    from skimage import data

    os.makedirs(folder, exist_ok=True)
    bases = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.cat(), data.immunohistochemistry(),
             data.colorwheel(), data.retina()]
    paths = []
    for i, arr in enumerate(bases):
        p = os.path.join(folder, f"base{i}.jpg")
        Image.fromarray(arr).convert("RGB").resize(size).save(p, quality=92)
        paths.append(p)
    mean_bytes = sum(os.path.getsize(p) for p in paths) / len(paths)
    for i in range(len(bases), n):
        os.link(paths[i % len(paths)], os.path.join(folder, f"img{i:06d}.jpg"))
    return mean_bytes


RSS_WRAPPER = ("import atexit, resource, sys; sys.argv[0] = 'ddaug'; "
               "atexit.register(lambda: print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
               "file=sys.stderr)); from ddaug.cli import main; main()")


def run_client(in_dir: str, out_dir: str, api_base: str, concurrency: int, shard_size: int, extra: list[str]):
    cmd = [sys.executable, "-c", RSS_WRAPPER, "-v", "caption", in_dir, "-o", out_dir, "--backend", "openai",
           "--api-base", api_base, "--vlm", "sim", "--concurrency", str(concurrency), "--shard-size",
           str(shard_size), "-q", *extra]
    out, wall, done, seconds, where = run_ddaug(cmd)
    rss = int(re.search(r"PEAK_RSS_KB (\d+)", out).group(1))
    return done, seconds, wall, rss, where


def downsize_cpu(results: str | None, passes: int = 25) -> None:
    """CPU per image (one core) of what the openai backend does to an input before sending it."""
    from ddaug.sources import read_sources

    import torch

    from ddaug.captioning.images import load_caption_image, torch_resize

    work = tempfile.mkdtemp(prefix="ddaug-downsize-")
    rows = []
    try:
        for size, cap, label in [((1456, 816), 1024 * 1024, "-> 1 MP JPEG q95"), ((2048, 2048), 1024 * 1024,
                                 "-> 1 MP JPEG q95"), ((1456, 816), None, "sent as is (no cap)")]:
            folder = os.path.join(work, f"{size[0]}x{size[1]}")
            if not os.path.isdir(folder):
                make_inputs(folder, 8, size)
            items = read_sources((folder,), None)
            for item in items:  # imports and first-call set-up are once per process, not per image
                load_caption_image(item, max_pixels=cap, for_server=True)
            t0 = time.process_time()
            for _ in range(passes):
                for item in items:
                    load_caption_image(item, max_pixels=cap, for_server=True)
            ms = (time.process_time() - t0) / (passes * len(items)) * 1000
            rows.append(f"| {size[0]}x{size[1]} JPEG q92 {label} | {ms:.1f} |")
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit([f"## caption request image path, CPU per image on one core ({datetime.date.today()})",
          "- command: `python bench/caption_server_bench.py --downsize-cpu`",
          f"- resize: {'torch uint8 antialiased bicubic (AVX2 kernel)' if torch_resize() else 'Pillow BILINEAR'}; "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores", "",
          "| input | ms CPU per image |", "|---|---|", *rows, ""], results)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--latency", type=float, default=3.0, help="mean server latency in seconds (uniform ±50%%)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--images", type=int, nargs="+", default=None, help="per --concurrency entry")
    ap.add_argument("--size", default="1024x1024", help="input WxH (JPEG q92)")
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=1, help="runs per --concurrency entry (the spread is reported)")
    ap.add_argument("--extra", default="", help="more ddaug caption flags, e.g. '--max-pixels 1048576'")
    ap.add_argument("--downsize-cpu", action="store_true", help="only measure the client's per-image CPU")
    ap.add_argument("--results", default=None)
    args = ap.parse_args()
    if args.downsize_cpu:
        return downsize_cpu(args.results)
    if args.serve:
        return serve(args.port, args.latency, "sim")
    size = tuple(int(v) for v in args.size.split("x"))
    images = args.images or [c * 20 for c in args.concurrency]
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", "--port", str(port), "--latency", str(args.latency)],
                              stdout=subprocess.PIPE, text=True)
    work = tempfile.mkdtemp(prefix="ddaug-capsrv-")
    rows, spread = [], []
    served = 0  # requests the simulator has answered: the next one's latency follows from it
    try:
        assert server.stdout.readline().strip() == "ready"
        in_dir = os.path.join(work, "in")
        mean_bytes = make_inputs(in_dir, max(images), size)
        for c, n in zip(args.concurrency, images):
            sub = os.path.join(work, f"in{n}")
            if not os.path.isdir(sub):
                os.makedirs(sub)
                for name in sorted(os.listdir(in_dir))[:n]:
                    os.link(os.path.join(in_dir, name), os.path.join(sub, name))
            ideal = c / args.latency if args.latency else float("inf")
            shares = []
            for rep in range(args.repeat):
                perfect = perfect_client_seconds(args.latency, served, n, c) if args.latency else 0.0
                out = os.path.join(work, f"out{c}")
                load = os.getloadavg()[0]
                done, secs, wall, rss, where = run_client(sub, out, f"http://127.0.0.1:{port}/v1", c,
                                                          args.shard_size, args.extra.split())
                served += n
                shares.append(done / wall / ideal)
                rows.append(f"| {c} | {done} | {rep + 1} | {load:.2f} | {wall:.1f} | {done / wall:.1f} | "
                            f"{_share(done / wall, ideal)} | {secs:.1f} | {done / secs:.1f} | "
                            f"{_share(done / secs, ideal)} | {_share(n / perfect, ideal) if perfect else 'n/a'} | "
                            f"{rss / 1024:.0f} | {where} |")
                print(rows[-1], flush=True)
                shutil.rmtree(out, ignore_errors=True)
            if args.latency:
                spread.append(f"- C={c}: end to end {min(shares):.1%} to {max(shares):.1%} of C/latency "
                              f"(median {statistics.median(shares):.1%}) over {len(shares)} run(s)")
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
    import PIL

    lines = [f"## caption --backend openai against a simulated server, latency {args.latency:g}s ±50%, "
             f"{args.size} JPEG inputs (mean {mean_bytes / 1024:.0f} KiB)",
             f"- date {datetime.date.today()}, {os.cpu_count()} CPU cores (shared), python {platform.python_version()}, "
             f"pillow {PIL.__version__}; server: a threading HTTP server in its own process on the same machine",
             f"- command: `python bench/caption_server_bench.py --latency {args.latency:g} --concurrency "
             f"{' '.join(map(str, args.concurrency))} --images {' '.join(map(str, images))} --size {args.size} "
             f"--shard-size {args.shard_size} --repeat {args.repeat}" + (f" --extra '{args.extra}'" if args.extra else "") + "`",
             "- end to end: from the ddaug process's start to its exit (imports, server check, reading, "
             "the last shard's commit); job: the run's own `done ... in Xs`; perfect C-slot client: the rate of a "
             "client that keeps C requests in flight from the first to the last, for the same latency draws",
             "", "| concurrency | images | run | load avg (1 min) | process seconds | end-to-end req/s | of C/latency | "
             "job seconds | job req/s | of C/latency | perfect C-slot client | peak RSS MiB | -v: where the time went |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|", *rows, "", *spread, ""]
    emit(lines, args.results)


if __name__ == "__main__":
    main()
