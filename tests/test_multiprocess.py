"""Several processes on one input, as on a multi-GPU node: --rank/--world-size processes
started together on mixed sizes (which join each other and take units by lease) give the shards
of one process, byte for byte and name for name; when one is killed with SIGKILL the others
finish its units, and a rerun of it alone finds the set complete."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time

from PIL import Image

from conftest import invoke, read_samples

ARGS = ["--model", "tiny-random", "--device", "cpu", "-q", "--shard-size", "2", "--batch-size", "4",
        "--workers", "1"]


def _mixed_sizes(folder) -> None:
    """12 crops over several canvases (from 40x33 to 150x280), some sharing a canvas."""
    from skimage import data

    os.makedirs(folder)
    big = data.astronaut()
    sizes = [(40, 33), (61, 83), (64, 64), (150, 280), (100, 130), (58, 82), (129, 129), (33, 200),
             (90, 90), (140, 60), (64, 128), (120, 250)]
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(big[i * 10:i * 10 + h, i * 5:i * 5 + w]).save(os.path.join(folder, f"m{i:02d}.png"))


def _ranks(inp, out, world: int, ranks=None, crash: dict[int, str] | None = None) -> dict[int, tuple[int, str]]:
    """Start the given ranks together as plain processes; crash maps a rank to a DDAUG_CRASH_AT
    point (shards/writer.py), where that process kills itself with SIGKILL. A rank that is to
    crash starts first and holds a unit before the others start: on a busy machine they could
    otherwise take every unit before it has imported torch, and it would never reach its point."""
    procs = {}
    order = sorted(ranks if ranks is not None else range(world), key=lambda r: r not in (crash or {}))
    for r in order:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        if crash and r in crash:
            env["DDAUG_CRASH_AT"] = crash[r]
        procs[r] = subprocess.Popen([sys.executable, "-m", "ddaug", "augment", str(inp), "-o",
                                     str(out), *ARGS, "--rank", str(r), "--world-size", str(world)],
                                    env=env, stderr=subprocess.PIPE, text=True)
        if crash and r in crash:
            deadline = time.monotonic() + 300
            while procs[r].poll() is None and time.monotonic() < deadline and not any(
                    n.startswith(".lease-") for n in (os.listdir(out) if os.path.isdir(out) else [])):
                time.sleep(0.05)
    return {r: (p.wait(timeout=600), p.stderr.read()) for r, p in procs.items()}


def test_ranks_match_one_process_and_a_killed_rank_reruns_alone(tmp_path):
    inp = tmp_path / "in"
    _mixed_sizes(inp)
    one = tmp_path / "one"
    # The reference is a process with the same thread settings: CPU kernels sum in a different
    # order with a different thread count, as GPU kernels do with a different batch.
    (rc, err), = _ranks(inp, one, 1).values()
    assert rc == 0, err
    ref = read_samples(one)
    assert len(ref) == 12

    split = tmp_path / "split"
    results = _ranks(inp, split, 3)
    assert all(rc == 0 for rc, _ in results.values()), results
    got = read_samples(split)
    assert set(got) == set(ref)
    for key in ref:
        assert got[key]["png"] == ref[key]["png"], key          # byte-identical images
        assert got[key]["json"] == ref[key]["json"], key
    names = sorted(os.path.basename(p) for p in glob.glob(str(one / "*.tar")))
    assert sorted(os.path.basename(p) for p in glob.glob(str(split / "*.tar"))) == names  # names too

    # Rank 1 dies (SIGKILL) while writing its second sample; the others take its unit over and finish.
    crashed = tmp_path / "crashed"
    codes = {r: rc for r, (rc, _) in _ranks(inp, crashed, 3, crash={1: "tar-write:2"}).items()}
    assert codes[0] == 0 and codes[2] == 0 and codes[1] == -9, codes
    assert len(read_samples(crashed)) == 12
    # Rerun rank 1 alone: nothing is left to do, and the set equals one process's.
    (rc, err), = _ranks(inp, crashed, 3, ranks=[1]).values()
    assert rc == 0 and "done 0" in err, err
    done = read_samples(crashed)
    assert set(done) == set(ref)
    for key in ref:
        assert done[key]["png"] == ref[key]["png"], key
    verify = invoke("inspect", crashed, "--verify")
    assert "PROBLEM" not in verify.output
