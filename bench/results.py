"""Where every benchmark's markdown block goes: stdout, and appended to --results when given;
and running a `ddaug` command as a user would, reading its summary line."""

from __future__ import annotations

import os
import re
import subprocess
import time


def emit(lines: list[str], results: str | None) -> None:
    text = "\n".join(lines)
    print(text)
    if results:
        with open(results, "a", encoding="utf-8") as f:
            f.write(text + "\n")


def run_ddaug(cmd: list[str]) -> tuple[str, float, int, float, str]:
    """Run one ddaug command line (-v, so it says where the time went) with loopback unproxied;
    (its output, wall seconds, samples done, the job's own seconds, where the time went). Stops
    the benchmark with the command's output if it fails."""
    env = dict(os.environ, NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"ddaug failed ({proc.returncode}):\n{text[-3000:]}")
    m = re.search(r"done (\d+), .*? in ([\d.]+)s", text)
    where = re.search(r"where the time went: (.*)", text)
    return text, wall, int(m.group(1)), float(m.group(2)), where.group(1).strip() if where else ""
