"""Elastic scale-out: any number of workers take a job's units by lease (shards/units.py).

Workers killed with SIGKILL at random moments, workers joining late, a worker frozen past its
lease and resumed, a Slurm array, two torchrun "nodes", and caption with both backends: each
time every input lands exactly once and the shards (names and bytes) equal one worker's.
"""

from __future__ import annotations

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from ddaug.captioning.replies import Reply
from ddaug.captioning.server import ChatServer
from conftest import invoke, read_samples
from test_reliability import _members_per_key

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--model", "tiny-random", "--device", "cpu", "-q", "--shard-size", "1", "--batch-size", "4",
        "--workers", "1"]
ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "NO_PROXY": "127.0.0.1,localhost",
       "no_proxy": "127.0.0.1,localhost"}


def _start(*args, log, env_extra=None, cmd=None) -> subprocess.Popen:
    env = {**os.environ, **ENV, **(env_extra or {})}
    argv = cmd or [sys.executable, "-m", "ddaug"]
    return subprocess.Popen([*argv, *map(str, args)], env=env, stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"), cwd=REPO)


def _wait(cond, timeout: float = 180.0, every: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(every)
    return False


def _leases_of(out, pid: int) -> list[str]:
    held = []
    for path in glob.glob(os.path.join(str(out), ".lease-*")):
        try:
            if json.load(open(path)).get("pid") == pid:
                held.append(os.path.basename(path)[len(".lease-"):])
        except (OSError, ValueError):
            pass
    return held


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def _tars(folder) -> dict[str, bytes]:
    return {os.path.basename(p): open(p, "rb").read() for p in glob.glob(os.path.join(str(folder), "*.tar"))}


def _assert_like_one_worker(out, ref, same_bytes=True) -> None:
    """Every input exactly once, nothing half-written or left over, and the shards of one worker."""
    counts = _members_per_key(out)
    assert set(counts.values()) == {1} and set(counts) == set(_members_per_key(ref)), counts
    assert sorted(_tars(out)) == sorted(_tars(ref))                  # the same names
    if same_bytes:
        assert _tars(out) == _tars(ref)                              # and the same bytes
    left = [n for n in os.listdir(out) if ".tmp" in n or n.startswith((".lease-", ".clock-"))]
    assert not left, left
    manifest, want = (json.load(open(os.path.join(f, "manifest.json"))) for f in (out, ref))
    if not same_bytes:  # the tars' digests differ with their bytes
        for m in (manifest, want):
            m["shards"] = [{k: v for k, v in s.items() if k not in ("bytes", "sha256")} for s in m["shards"]]
    assert manifest == want
    assert "PROBLEM" not in invoke("inspect", out, "--verify").output


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """8 crops over several canvases, and one worker's output of them (a process with the same
    thread settings: CPU kernels sum in another order with another thread count)."""
    from skimage import data

    root = tmp_path_factory.mktemp("elastic")
    inp = root / "in"
    inp.mkdir()
    big = data.astronaut()
    for i, (h, w) in enumerate([(40, 33), (61, 83), (64, 64), (150, 280), (100, 130), (58, 82), (33, 200),
                                (90, 90)]):
        Image.fromarray(big[i * 10:i * 10 + h, i * 5:i * 5 + w]).save(inp / f"m{i:02d}.png")
    ref = root / "ref"
    proc = _start("augment", inp, "-o", ref, *ARGS, log=root / "ref.log")
    assert proc.wait(timeout=600) == 0, (root / "ref.log").read_text()
    assert len(read_samples(ref)) == 8
    return inp, ref


def test_workers_killed_at_random_and_one_joining_late_write_what_one_writes(tmp_path, mixed):
    inp, ref = mixed
    out = tmp_path / "out"
    rnd = random.Random(os.environ.get("DDAUG_TEST_SEED", "elastic"))
    # A killed worker on this host is seen dead at once; the long timeout keeps a live worker's
    # lease from expiring on a machine too busy to run its heartbeat thread on time.
    args = ["augment", inp, "-o", out, *ARGS, "--join", "--lease-timeout", "60"]
    procs = [_start(*args, log=tmp_path / f"w{i}.log") for i in range(4)]
    victims = rnd.sample(range(4), 2)
    for v in victims:  # each at a random moment once it holds a unit (or once the job is over)
        _wait(lambda: _leases_of(out, procs[v].pid) or all(p.poll() is not None for p in procs))
        time.sleep(rnd.uniform(0.0, 0.4))
        procs[v].kill()
    late = _start(*args, log=tmp_path / "late.log")
    for i, p in enumerate([*procs, late]):
        rc = p.wait(timeout=600)
        log = (tmp_path / (f"w{i}.log" if i < 4 else "late.log")).read_text()
        if i in victims:
            assert rc in (0, -signal.SIGKILL), log
        else:
            assert rc == 0 and "augment: done" in log, log  # each survivor's own summary line
    _assert_like_one_worker(out, ref)
    progress = json.loads(invoke("inspect", out, "--json").output)["progress"][str(out)]
    assert progress["committed"] == progress["units"] == 8 and not progress["leased"] + progress["pending"]


def test_a_frozen_worker_is_taken_over_and_its_late_commit_discarded(tmp_path, mixed):
    inp, ref = mixed
    out = tmp_path / "out"
    args = ["augment", inp, "-o", out, *ARGS, "--join", "--lease-timeout", "1.5"]
    # The first worker freezes itself (SIGSTOP) after writing its first sample, holding that unit.
    frozen = _start(*args, log=tmp_path / "frozen.log", env_extra={"DDAUG_STOP_AT": "tar-write:1"})
    assert _wait(lambda: _stopped(frozen.pid)), (tmp_path / "frozen.log").read_text()
    units = _leases_of(out, frozen.pid)  # its unit, and the next one it leased ahead
    assert units
    helper = _start("-v", *args, log=tmp_path / "helper.log")
    assert helper.wait(timeout=600) == 0, (tmp_path / "helper.log").read_text()
    for unit in units:
        assert f"took over unit {unit}" in (tmp_path / "helper.log").read_text()
        assert os.path.exists(out / f"shard-{unit}.stats.json")
    before = _tars(out)
    frozen.send_signal(signal.SIGCONT)  # it comes back, finishes its copies, finds the units committed
    assert frozen.wait(timeout=600) == 0
    log = (tmp_path / "frozen.log").read_text()
    assert "augment: done 0" in log, log
    assert f"units discarded (another worker committed them) {len(units)}" in log, log
    assert _tars(out) == before  # nothing written twice, nothing replaced
    _assert_like_one_worker(out, ref)


def test_slurm_array_recipe(tmp_path, mixed):
    """examples/slurm_array.sh's body for 3 array tasks (no Slurm here: its variables are set)."""
    inp, ref = mixed
    out = tmp_path / "out"
    tasks = []
    for task in range(3):
        env = {"INPUT": str(inp), "OUT": str(out), "DDAUG": f"{sys.executable} -m ddaug",
               "DDAUG_ARGS": " ".join(ARGS), "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_JOB_ID": "77",
               "SLURM_JOB_ID": str(78 + task)}
        tasks.append(_start(os.path.join(REPO, "examples", "slurm_array.sh"), cmd=["bash"],
                            log=tmp_path / f"task{task}.log", env_extra=env))
    for task, p in enumerate(tasks):
        assert p.wait(timeout=600) == 0, (tmp_path / f"task{task}.log").read_text()
    _assert_like_one_worker(out, ref)
    labels = sorted(w["label"] for w in json.loads(invoke("inspect", out, "--json").output)["progress"][str(out)]
                    ["workers"])
    assert labels == ["rank 0", "rank 1", "rank 2"]  # every task joined (SLURM_ARRAY_TASK_ID implies --join)


def test_torchrun_two_nodes_of_two(tmp_path, mixed):
    """`torchrun --nnodes=2 --nproc-per-node=2` as two local "nodes": four workers join."""
    inp, ref = mixed
    out = tmp_path / "out"
    port = 29500 + os.getpid() % 1000
    nodes = [_start("--nnodes=2", "--nproc-per-node=2", f"--node-rank={k}", "--master-addr=127.0.0.1",
                    f"--master-port={port}", "-m", "ddaug", "augment", inp, "-o", out, *ARGS,
                    cmd=[sys.executable, "-m", "torch.distributed.run"], log=tmp_path / f"node{k}.log")
             for k in range(2)]
    for k, p in enumerate(nodes):
        assert p.wait(timeout=600) == 0, (tmp_path / f"node{k}.log").read_text()[-3000:]
    _assert_like_one_worker(out, ref)
    workers = json.loads(invoke("inspect", out, "--json").output)["progress"][str(out)]["workers"]
    assert sorted(w["label"] for w in workers) == ["rank 0", "rank 1", "rank 2", "rank 3"]


def _without_seconds(members: dict[str, bytes]) -> dict[str, bytes]:
    """A caption sample's members, its json without `caption.seconds` (the one field that is
    a measurement, not a result)."""
    meta = json.loads(members["json"])
    meta["caption"].pop("seconds")
    return {**members, "json": json.dumps(meta, sort_keys=True).encode()}


def _assert_captions_like_one_worker(out, ref) -> None:
    _assert_like_one_worker(out, ref, same_bytes=False)
    got, want = read_samples(out), read_samples(ref)
    assert {k: _without_seconds(v) for k, v in got.items()} == {k: _without_seconds(v) for k, v in want.items()}


@pytest.fixture
def business(tmp_path, photos):
    d = tmp_path / "business"
    d.mkdir()
    for i in range(8):
        arr = list(photos.values())[i % 4]
        Image.fromarray(arr).resize((arr.shape[1] + 3 * i, arr.shape[0] + i)).save(d / f"b{i}.png")
    return d


def test_a_killed_worker_not_yet_reaped_is_gone_at_once(tmp_path, mixed):
    """A worker killed while its parent has not reaped it (a zombie: it still answers a signal)
    holds nothing: a plain rerun is not told to --join it, takes its unit at once (the lease
    timeout is an hour) and leaves none of its temporary files."""
    inp, ref = mixed
    out = tmp_path / "out"
    args = ["augment", inp, "-o", out, *ARGS, "--lease-timeout", "3600"]
    victim = _start(*args, log=tmp_path / "victim.log", env_extra={"DDAUG_STOP_AT": "tar-write:1"})
    assert _wait(lambda: _stopped(victim.pid)), (tmp_path / "victim.log").read_text()
    assert _leases_of(out, victim.pid)
    victim.kill()  # not waited for yet: a zombie
    assert _wait(lambda: open(f"/proc/{victim.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z")
    rerun = _start(*args, log=tmp_path / "rerun.log")
    assert rerun.wait(timeout=300) == 0, (tmp_path / "rerun.log").read_text()
    victim.wait()
    _assert_like_one_worker(out, ref)


def test_caption_openai_workers_killed_and_joining(tmp_path, business):
    answer = lambda image, text, n: Reply(f"A picture {image.width} pixels wide.")  # noqa: E731
    with ChatServer(answer, model="m", parallel=True) as srv:
        common = ["caption", business, "--backend", "openai", "--api-base", srv.url, "--vlm", "m", "-q",
                  "--shard-size", "1", "--concurrency", "2", "--workers", "1"]
        ref = tmp_path / "ref"
        invoke(*common[:2], "-o", ref, *common[2:])
        out = tmp_path / "out"
        args = [*common, "-o", out, "--join", "--lease-timeout", "60"]
        procs = [_start(*args, log=tmp_path / f"w{i}.log") for i in range(3)]
        _wait(lambda: _leases_of(out, procs[1].pid) or procs[1].poll() is not None)
        # Not reaped until the end (a zombie, as under a launcher that waits for its other
        # children first): the others must see it gone at once, its lease and its files too.
        procs[1].kill()
        late = _start(*args, log=tmp_path / "late.log")
        for i, p in enumerate([procs[0], procs[2], late]):
            assert p.wait(timeout=600) == 0, (tmp_path / f"w{i}.log").read_text()
        procs[1].wait()
    _assert_captions_like_one_worker(out, ref)


def test_caption_transformers_two_workers(tmp_path, business):
    from ddaug.captioning import save_tiny_vlm

    vlm = save_tiny_vlm(str(tmp_path / "vlm"))
    four = tmp_path / "four"
    four.mkdir()
    for p in sorted(business.iterdir())[:4]:
        os.link(p, four / p.name)
    common = ["caption", four, "--vlm", vlm, "--device", "cpu", "--max-new-tokens", "4", "-q", "--shard-size", "1",
              "--workers", "1"]
    ref = tmp_path / "ref"
    assert _start(*common[:2], "-o", ref, *common[2:], log=tmp_path / "ref.log").wait(timeout=600) == 0
    out = tmp_path / "out"
    procs = [_start(*common, "-o", out, "--join", log=tmp_path / f"w{i}.log") for i in range(2)]
    for i, p in enumerate(procs):
        assert p.wait(timeout=600) == 0, (tmp_path / f"w{i}.log").read_text()
    _assert_captions_like_one_worker(out, ref)


# -- the plan: --plan-only, changed inputs, new inputs, --retry-failures, --overwrite ----------------------
FAST = ["--model", "tiny-random", "--device", "cpu", "-q", "--shard-size", "2"]


def test_plan_rounds_retry_overwrite(tmp_path, photo_dir):
    out = tmp_path / "out"
    (photo_dir / "broken.png").write_bytes(b"not an image")
    r = invoke("augment", photo_dir, "-o", out, *FAST, "--plan-only")
    assert "plan of 3 unit(s) for 5 inputs, 3 to do" in r.output and not glob.glob(str(out / "*.tar"))
    plan = json.load(open(out / "plan-000.json"))
    assert [n for n, _ in plan["units"]] == [2, 2, 1] and "keys" not in plan  # counts and hashes only
    (photo_dir / "extra.png").write_bytes((photo_dir / "astronaut.png").read_bytes())
    r = invoke("augment", photo_dir, "-o", out, *FAST, "--join", expect_ok=False)
    assert r.exit_code == 1 and "inputs changed since the plan was written" in r.output
    os.remove(photo_dir / "extra.png")
    r = invoke("augment", photo_dir, "-o", out, *FAST, "--join")
    assert "done 4" in r.output and "failed 1" in r.output
    # Inputs added since a finished job: a plain rerun plans a round for them alone.
    (photo_dir / "extra.png").write_bytes((photo_dir / "astronaut.png").read_bytes())
    r = invoke("augment", photo_dir, "-o", out, *FAST)
    assert "done 1, skipped 5" in r.output
    assert json.load(open(out / "plan-001.json"))["kind"] == "new"
    # --retry-failures: the failed keys become a round of their own; their shard is new, no other changes.
    before = _tars(out)
    (photo_dir / "broken.png").write_bytes((photo_dir / "chelsea.png").read_bytes())
    r = invoke("augment", photo_dir, "-o", out, *FAST, "--retry-failures")
    assert "done 1, skipped 5" in r.output
    retry = json.load(open(out / "plan-002.json"))
    assert retry["kind"] == "retry" and len(retry["keys"]) == 1
    assert {k: v for k, v in _tars(out).items() if k in before} == before
    assert sorted(set(_tars(out)) - set(before)) == ["shard-002-000000.tar"]
    assert open(out / "failures.jsonl").read() == "" and len(read_samples(out)) == 6
    # --overwrite: never beside joining workers; once, with --plan-only, before they start.
    r = invoke("augment", photo_dir, "-o", out, *FAST, "--overwrite", "--join", expect_ok=False)
    assert r.exit_code == 1 and "--plan-only" in r.output
    r = invoke("augment", photo_dir, "-o", out, *FAST, "--overwrite", "--plan-only")
    assert "plan of 3 unit(s) for 6 inputs, 3 to do" in r.output
    assert not glob.glob(str(out / "*.tar")) and not os.path.exists(out / "plan-001.json")


def test_ray_tasks_are_workers(tmp_path, mixed):
    """ddaug.pipeline.ray_workers on a local Ray instance: two tasks join and write one worker's shards."""
    ray = pytest.importorskip("ray")
    from ddaug.pipeline.ray_workers import run_workers

    inp, ref = mixed
    out = tmp_path / "out"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        results = run_workers(["augment", inp, "-o", out, *ARGS], workers=2,
                              env={**ENV, "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    finally:
        ray.shutdown()
    assert [r.returncode for r in results] == [0, 0], results
    assert all(r.summary.startswith("augment: done") for r in results), results
    _assert_like_one_worker(out, ref)


def test_inspect_shows_progress_per_unit_and_per_worker(tmp_path, photo_dir):
    from ddaug.shards.units import Worker

    out = tmp_path / "out"
    invoke("augment", photo_dir, "-o", out, *FAST, "--shard-size", "1", "--plan-only")
    worker = Worker(str(out), timeout=30, label="rank 3")
    worker.start()
    try:
        assert worker.try_take("000-000001", worker.now())
        # A lease of a worker on another host that stopped beating five minutes ago: expired.
        (out / ".lease-000-000002").write_text(json.dumps({"worker": "77.0badc0de", "host": "elsewhere",
                                                           "pid": 77, "token": "t", "timeout": 30}))
        old = time.time() - 300
        os.utime(out / ".lease-000-000002", (old, old))
        r = invoke("inspect", out)
    finally:
        worker.stop()
    assert "4 unit(s) in 1 plan round(s): 0 committed, 1 leased, 1 expired, 2 pending" in r.output, r.output
    assert f"leased   unit 000-000001 by worker {worker.id} (host" in r.output
    assert "expired  unit 000-000002 by worker 77.0badc0de (host elsewhere, pid 77), heartbeat 30" in r.output
    assert "pending  000-000000, 000-000003" in r.output
    assert f"worker   {worker.id} host" in r.output and "running: 0 unit(s) committed, current 000-000001" in r.output


def test_a_live_worker_of_another_machine_with_the_same_hostname_is_not_taken_for_dead(tmp_path, photo_dir):
    """Cloned VMs and containers often share a hostname: a pid that is free here may be running
    there. Its lease must wait out the timeout, and its unfinished shard must stay."""
    import socket

    out = tmp_path / "out"
    invoke("augment", photo_dir, "-o", out, *FAST, "--shard-size", "1", "--plan-only")
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout.strip()
    there = {"host": socket.gethostname(), "pid": int(dead_pid), "pid_space": "another machine", "timeout": 120}
    token = f"{dead_pid}.0badc0de"
    (out / f".worker-{token}.json").write_text(json.dumps({**there, "worker": token, "state": "running"}))
    (out / ".lease-000-000000").write_text(json.dumps({**there, "worker": token, "token": "t"}))
    partial = out / f"shard-000-000000.tar.tmp-{token}"
    partial.write_bytes(b"half a shard")

    r = invoke("inspect", out, "--json")
    (progress,) = json.loads(r.output)["progress"].values()
    assert [u["unit"] for u in progress["leased"]] == ["000-000000"] and not progress["expired"], progress
    assert [w["state"] for w in progress["workers"]] == ["running"], progress
    r = invoke("augment", photo_dir, "-o", out, *FAST, "--shard-size", "1", expect_ok=False)
    assert "being written by 1 other worker(s)" in r.output, r.output
    assert partial.exists()


def test_an_unreadable_lease_is_aged_like_any_other_and_its_unit_done(tmp_path, photo_dir):
    """An empty or garbled lease (touched by hand, a file server's crash) must not hold its unit
    forever: every worker would wait for it without end."""
    out = tmp_path / "out"
    invoke("augment", photo_dir, "-o", out, *FAST, "--shard-size", "1", "--plan-only")
    (out / ".lease-000-000000").write_bytes(b"")
    old = time.time() - 60
    os.utime(out / ".lease-000-000000", (old, old))
    done = subprocess.run([sys.executable, "-m", "ddaug", "augment", str(photo_dir), "-o", str(out), *FAST,
                           "--shard-size", "1", "--lease-timeout", "30", "--join"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **ENV})
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "shard-000-000000.stats.json").exists()
