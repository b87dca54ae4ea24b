"""`ddaug leakage` speed: training images checked per second, and the hash index's query time.

    python bench/leakage_bench.py --images 2000 --size 512 --workers 1 4 --index 1000 100000 1000000

Part 1 writes --images training images (random crops of 12 real photos, scikit-image, JPEG q90
at --size on the longer side, 500 per shard) and checks them against 50 eval images (crops of
6 other photos) through `run_leakage`, without --drop: decoding, both digests, the pHash and
its index query, per image. No pair is a copy, so every match it reports is a false positive.
Part 2 indexes N random 64-bit hashes and times 1,000 queries at radius 10 (half of them within
10 bits of an indexed hash), checking the answers against a brute-force scan.
Appends a section to bench/RESULTS.md unless --no-results.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from results import emit  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "retina", "brick", "page",
          "clock", "immunohistochemistry", "hubble_deep_field", "grass", "gravel", "text", "colorwheel", "logo")


EVAL_PHOTOS = 6  # eval crops come from the first six photos, training crops from the others


def _pool(names: tuple[str, ...]) -> list[np.ndarray]:
    from skimage import data

    out = []
    for name in names:
        arr = getattr(data, name)()
        out.append(np.stack([arr] * 3, -1) if arr.ndim == 2 else arr[..., :3])
    return out


def _random_crop(pool, rng, size: int) -> Image.Image:
    photo = pool[rng.integers(len(pool))]
    h, w = photo.shape[:2]
    ch, cw = rng.integers(h // 3, h + 1), rng.integers(w // 3, w + 1)
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    img = Image.fromarray(np.ascontiguousarray(photo[y: y + ch, x: x + cw]))
    scale = size / max(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BICUBIC)


def write_training(folder: str, n: int, size: int, per_shard: int = 500) -> None:
    rng = np.random.default_rng(1)
    pool = _pool(PHOTOS[EVAL_PHOTOS:])
    os.makedirs(folder, exist_ok=True)
    for start in range(0, n, per_shard):
        with tarfile.open(os.path.join(folder, f"train-{start // per_shard:04d}.tar"), "w") as tf:
            for i in range(start, min(n, start + per_shard)):
                buf = io.BytesIO()
                _random_crop(pool, rng, size).save(buf, "JPEG", quality=90)
                info = tarfile.TarInfo(f"s{i:08d}.jpg")
                info.size = buf.tell()
                buf.seek(0)
                tf.addfile(info, buf)


def write_eval(folder: str, n: int = 50) -> None:
    rng = np.random.default_rng(2)
    pool = _pool(PHOTOS[:EVAL_PHOTOS])
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        _random_crop(pool, rng, 384).save(os.path.join(folder, f"e{i:03d}.png"))


def bench_checking(root: str, workers: int, quiet: bool = True) -> tuple[float, float, int, dict]:
    """(wall seconds of the training pass, CPU seconds of the whole run, images, report)."""
    from ddaug.leakage import LeakageOptions, run_leakage

    cpu = time.process_time()
    report = run_leakage(LeakageOptions(train=(os.path.join(root, "train"),), eval=(os.path.join(root, "eval"),),
                                        report_dir=os.path.join(root, f"report-{workers}"), workers=workers,
                                        quiet=quiet))
    return report["seconds"]["train"], time.process_time() - cpu, report["train"]["images"], report


def bench_index(n: int, rng: np.random.Generator, queries: int = 1000, radius: int = 10) -> dict:
    from ddaug.leakage.index import HashIndex

    hashes = rng.integers(0, 2**64, n, dtype=np.uint64)
    t0 = time.perf_counter()
    index = HashIndex(hashes)
    build = time.perf_counter() - t0
    near = hashes[rng.integers(0, n, queries // 2)].copy()
    for _ in range(radius):  # up to `radius` flipped bits each
        near ^= np.uint64(1) << rng.integers(0, 64, len(near)).astype(np.uint64)
    q = np.concatenate([near, rng.integers(0, 2**64, queries - len(near), dtype=np.uint64)])
    t0 = time.perf_counter()
    found_q, found_i, _ = index.query(q, radius)
    query = time.perf_counter() - t0
    # The brute-force answer, for equality and for the time it takes: every query up to 100,000
    # indexed hashes, 100 near and 100 random ones above.
    checked = range(queries) if n < 10**6 else [*range(100), *range(queries - 100, queries)]
    t0 = time.perf_counter()
    for j in checked:
        expect = set(np.nonzero(np.bitwise_count(hashes ^ q[j]) <= radius)[0].tolist())
        assert expect == set(found_i[found_q == j].tolist()), f"index answer differs from brute force (query {j})"
    brute = (time.perf_counter() - t0) / len(checked)
    return {"n": n, "bands": len(index.bands), "build_s": build, "query_us": query / queries * 1e6,
            "brute_us": brute * 1e6, "hits": len(found_q), "checked": len(checked)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--index", type=int, nargs="+", default=[1000, 100_000, 1_000_000])
    ap.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"))
    ap.add_argument("--no-results", action="store_true")
    args = ap.parse_args()

    import PIL
    import scipy

    root = tempfile.mkdtemp(prefix="ddaug-leakage-bench-")
    t0 = time.perf_counter()
    write_training(os.path.join(root, "train"), args.images, args.size)
    write_eval(os.path.join(root, "eval"))
    print(f"wrote {args.images} training images in {time.perf_counter() - t0:.1f}s under {root}", flush=True)
    rows = []
    for workers in args.workers:
        bench_checking(root, workers)  # page cache and imports warm
        secs, cpu, n, report = bench_checking(root, workers)
        rows.append((workers, n / secs, cpu / n * 1e3, len(report["matches"])))
        print(f"workers={workers}: {n} images in {secs:.2f}s = {n / secs:,.0f} img/s, {cpu / n * 1e3:.1f} ms CPU each; "
              f"{len(report['matches'])} matches", flush=True)
    rng = np.random.default_rng(0)
    index_rows = []
    for n in args.index:
        r = bench_index(n, rng)
        index_rows.append(r)
        print(f"index {n:,}: build {r['build_s']:.2f}s, query {r['query_us']:.0f} us, brute {r['brute_us']:.0f} us",
              flush=True)

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [f"\n## `ddaug leakage` speed ({time.strftime('%Y-%m-%d')})",
             f"- machine: {platform.processor() or platform.machine()}, {cpus} CPUs usable, load average {load} "
             f"(1/5/15 min) at the end; python "
             f"{platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}, pillow {PIL.__version__}",
             f"- command: `python bench/leakage_bench.py --images {args.images} --size {args.size} --workers "
             f"{' '.join(map(str, args.workers))} --index {' '.join(map(str, args.index))}`",
             f"- training images: random crops of scikit-image photos, JPEG q90, {args.size} px on the longer side, "
             f"500 per tar; checked against 50 eval images of other photos (PNG, 384 px, each with its 10 crops hashed) "
             f"by `run_leakage` without --drop: read, decode, digests, pHash, index query; second of two runs",
             "", "| threads (--workers) | training images/s (wall) | CPU ms per image, all threads | matches (all false) |",
             "|---|---|---|---|"]
    lines += [f"| {w} | {rate:,.0f} | {cpu_ms:.1f} | {matches} |" for w, rate, cpu_ms, matches in rows]
    lines += ["", "Hash index (multi-index), 1,000 queries at radius 10, half of them near an indexed hash; "
              "answers checked against a brute-force scan (all of them below a million hashes, 200 above):", "",
              "| indexed hashes | bands | build | query (per hash) | brute-force scan (per hash) | hits |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['n']:,} | {r['bands']} | {r['build_s']:.2f} s | {r['query_us']:,.0f} µs | "
              f"{r['brute_us']:,.0f} µs | {r['hits']} |" for r in index_rows]
    emit(lines, None if args.no_results else args.results)


if __name__ == "__main__":
    main()
