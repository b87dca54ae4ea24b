"""What elastic work costs: plan, lease and commit per unit against a unit's work, and how a
job scales with 1, 2 and 4 worker processes (CPU, the tiny-random model).

    python bench/elastic_bench.py --images 48 --shard-size 2 --procs 1 2 4

Part 1, in this process: writing and checking the plan of --plan-keys synthetic inputs, and the
protocol's own cost per unit (take the lease, write and link the done marker and a small tar,
release), over --units units in a temporary folder. Part 2: `ddaug augment --join` as 1, 2 and
4 processes started together on the same images (wall time from the first start to the last
exit, model load included), each output compared with the one-process one, and the unit work
time that the done markers record.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def protocol_cost(units: int, plan_keys: int, shard_size: int) -> dict[str, float]:
    from ddaug.shards.store import OutputFolder
    from ddaug.shards.units import UnitQueue, Unit, Worker, plan_work

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = OutputFolder(os.path.join(tmp, "plan"), prefix="shard", command="bench", config={}, run_info={})
        items = [SimpleNamespace(key=f"input-{i:09d}-0123456789ab") for i in range(plan_keys)]
        t0 = time.perf_counter()
        work = plan_work(folder, items, shard_size, "cfg", retry=False)
        out["plan write s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        plan_work(folder, items, shard_size, "cfg", retry=False)  # a joining worker reads and checks it
        out["plan check s"] = time.perf_counter() - t0
        out["plan bytes"] = os.path.getsize(os.path.join(folder.path, "plan-000.json"))
        out["plan units"] = len(work.units)

        folder = OutputFolder(os.path.join(tmp, "units"), prefix="shard", command="bench", config={}, run_info={})
        worker = Worker(folder.path, timeout=60)
        worker.start()
        queue = UnitQueue(worker, [Unit(0, i, 1, "") for i in range(units)], folder.marker_name)
        take = commit = 0.0
        for _ in range(units):
            t0 = time.perf_counter()
            unit = queue.take(wait=True)
            t1 = time.perf_counter()
            writer = folder.new_shard(unit.name)
            writer.write(f"k{unit.index}", {"json": b"{}"})
            t2 = time.perf_counter()
            folder.commit_shard(unit.name, writer, covered_keys=[f"k{unit.index}"], failures=[], seconds=0.0,
                                still_mine=lambda: worker.still_mine(unit.name))
            worker.release(unit.name)
            t3 = time.perf_counter()
            take += t1 - t0
            commit += t3 - t2
        worker.stop()
        out["lease take ms/unit"] = 1000 * take / units
        out["commit + summary + release ms/unit"] = 1000 * commit / units
    return out


def make_images(folder: str, n: int) -> None:
    from PIL import Image
    from skimage import data

    os.makedirs(folder)
    big = data.astronaut()
    for i in range(n):
        y, x = (i * 7) % 400, (i * 13) % 400
        Image.fromarray(big[y:y + 64, x:x + 80]).save(os.path.join(folder, f"i{i:03d}.png"))


def run_job(inp: str, out: str, procs: int, shard_size: int) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "ddaug", "augment", inp, "-o", out, "--model", "tiny-random", "--device", "cpu",
           "-q", "--shard-size", str(shard_size), "--batch-size", "4", "--workers", "1", "--join"]
    t0 = time.perf_counter()
    running = [subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(procs)]
    lines = [p.communicate()[1].strip().splitlines()[-1] for p in running]
    wall = time.perf_counter() - t0
    assert all(p.returncode == 0 for p in running), lines
    seconds = [json.load(open(m))["seconds"] for m in glob.glob(os.path.join(out, "*.stats.json"))]
    after_load = max(float(re.search(r"new shard\(s\) in ([0-9.]+)s", line)[1]) for line in lines)
    return {"wall s": wall, "after load s": after_load, "units": len(seconds),
            "unit work s (mean)": statistics.fmean(seconds), "summaries": lines}


def tars(folder: str) -> dict[str, bytes]:
    return {os.path.basename(p): open(p, "rb").read() for p in glob.glob(os.path.join(folder, "*.tar"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=120)
    ap.add_argument("--shard-size", type=int, default=2)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--units", type=int, default=200, help="units for the protocol-cost part")
    ap.add_argument("--plan-keys", type=int, default=1_000_000, help="synthetic inputs for the plan part")
    args = ap.parse_args()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
    cost = protocol_cost(args.units, args.plan_keys, 1000)
    for k, v in cost.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    with tempfile.TemporaryDirectory() as tmp:
        inp = os.path.join(tmp, "in")
        make_images(inp, args.images)
        ref = None
        for n in args.procs:
            out = os.path.join(tmp, f"out{n}")
            r = run_job(inp, out, n, args.shard_size)
            same = "reference" if ref is None else ("byte-identical" if tars(out) == ref else "DIFFERENT")
            ref = ref or tars(out)
            print(f"{n} process(es): wall {r['wall s']:.1f} s ({args.images / r['wall s']:.2f} img/s incl. start), "
                  f"slowest worker's job after its model loaded {r['after load s']:.1f} s "
                  f"({args.images / r['after load s']:.1f} img/s); {r['units']} units, unit work "
                  f"{r['unit work s (mean)']:.3f} s mean; output {same}")
            for line in r["summaries"]:
                print(f"    {line}")


if __name__ == "__main__":
    main()
