"""Elastic work: a fixed plan of units, taken by lease by any number of workers, committed once.

A job's inputs are cut into units: blocks of --shard-size inputs in input order, each batched
within itself into one shard. A unit's bytes and its file names are functions of the unit
alone, so N workers write what one worker writes. Workers share nothing but the output folder,
and need only exclusive create (a link onto a new name), rename and unlink to be atomic there,
as on NFS and other cluster file systems: no flock, no process group, no coordinator.

- Plan: the first worker writes `plan-000.json` (a temporary file, then `os.link` to the final
  name; if the link finds the name taken, another worker won, and its plan must equal this one).
  Per unit it holds the input count and a hash of the keys. Later rounds (`plan-001.json`, ...)
  add units, listing their keys: the failures to retry (--retry-failures) or inputs added since.
- Lease: a worker takes a unit by creating `.lease-{unit}` exclusively. A background thread
  touches it every timeout/4 and checks that it still holds the worker's token. A lease not
  touched for --lease-timeout seconds (by the folder's own clock), or held by a dead process on
  this host, is stale: a taker renames it away (one rename succeeds), then creates its own.
- Commit: the tar and its done marker are written under worker-unique temporary names; the
  worker checks its lease, then links the marker to its final name. That link is the commit and
  succeeds once. A worker that comes back late (frozen past its lease, or cut off) finds the
  name taken, or its temporary files removed, and discards its work. The marker names its
  temporary tar: the committer links it to the final name next, and whoever finds a marker
  without its tar (the committer died between the two links) makes that link (roll forward).

Guarantees: each unit is committed exactly once; a final name only ever holds a complete file;
a dead worker's unit is redone by another after the lease timeout (at once on the same host);
workers may join or leave at any time, and the job is done when every unit is committed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from .writer import TOKEN_PATTERN, atomic_write_json, crash_point, process_token, write_temporary

log = logging.getLogger(__name__)

DEFAULT_LEASE_TIMEOUT = 120.0
PLAN_RE = re.compile(r"^plan-(?P<round>\d{3})\.json$")
LEASE_PREFIX = ".lease-"
WORKER_PREFIX = ".worker-"
_LEASE_RE = re.compile(rf"^\.lease-(?P<unit>\d{{3}}-\d{{6}})(?:\.stale-{TOKEN_PATTERN})?$")
_WORKER_RE = re.compile(rf"^\.worker-(?P<id>{TOKEN_PATTERN})\.json(?:\.tmp-{TOKEN_PATTERN})?$")
_PLAN_TMP_RE = re.compile(rf"^plan-\d{{3}}\.json\.tmp-{TOKEN_PATTERN}$")
# A process's temporary copies of the job's own files and its probes, named with its token: a
# dead process's are removed by the next sweep (it was killed while writing one).
_PROCESS_TMP_RE = re.compile(rf"^(?:(?:\.lease-\d{{3}}-\d{{6}}|\.worker-{TOKEN_PATTERN}\.json|plan-\d{{3}}\.json)"
                             rf"\.tmp-|\.clock-|\.links-)(?P<token>{TOKEN_PATTERN})(?:\.2)?$")


class PlanError(Exception):
    """The plan on disk does not fit this command (other inputs, shard size or config)."""


def unit_name(round_: int, index: int) -> str:
    return f"{round_:03d}-{index:06d}"


def keys_digest(keys: Iterable[str]) -> str:
    h = hashlib.sha256()
    for key in keys:
        h.update(key.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()[:16]


@dataclass
class Unit:
    round: int
    index: int
    count: int
    digest: str
    items: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return unit_name(self.round, self.index)


def is_own_file(name: str) -> bool:
    """Plan, lease and worker files (and their temporary copies): what --overwrite removes."""
    return bool(PLAN_RE.match(name) or _PLAN_TMP_RE.match(name) or _LEASE_RE.match(name) or _WORKER_RE.match(name)
                or _PROCESS_TMP_RE.match(name))


def temporary_token(name: str) -> str | None:
    """The token of the process that made this temporary job file or probe, else None."""
    m = _PROCESS_TMP_RE.match(name)
    return m["token"] if m else None


def link_exclusive(path: str, data: bytes) -> bool:
    """Create path with data, complete or not at all; False when the name is taken."""
    tmp = write_temporary(path, data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def folder_now(folder: str) -> float:
    """The folder's own clock (its file server's): leases are aged by it, so hosts whose clocks
    disagree still agree on which lease is stale."""
    probe = os.path.join(folder, f".clock-{process_token()}")
    with open(probe, "wb"):
        pass
    try:
        return os.stat(probe).st_mtime
    finally:
        os.unlink(probe)


def _alive(pid: int) -> bool:
    """Whether pid runs on this host. A killed process its parent has not reaped yet (a zombie,
    e.g. under a launcher that waits for its other children first) still answers a signal, but
    will never renew a lease or finish a file: it counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]  # the field after the command name
    except (OSError, IndexError):  # no /proc (macOS) or it just went: the signal's answer stands
        return True
    return state not in (b"Z", b"X")


HOST = socket.gethostname()


def _pid_space() -> str:
    """Which pids this process can see: the kernel's boot and the pid namespace. Cloned VMs and
    containers often share a hostname, and a pid free here may be running there; they never
    share this."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f"{f.read().strip()}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:  # not Linux: the hostname alone tells hosts apart
        return ""


PID_SPACE = _pid_space()


def _dead_here(info: dict) -> bool:
    """A process of this host that is gone: its leases need not wait out the timeout."""
    return (info.get("host") == HOST and info.get("pid_space") == PID_SPACE and isinstance(info.get("pid"), int)
            and not _alive(info["pid"]))


# -- the plan ------------------------------------------------------------------------------------------
def plan_path(folder: str, round_: int) -> str:
    return os.path.join(folder, f"plan-{round_:03d}.json")


def read_rounds(folder: str) -> list[dict[str, Any]]:
    rounds = []
    for name in sorted(os.listdir(folder)):
        if PLAN_RE.match(name):
            try:
                doc = _read_json(os.path.join(folder, name))
                doc["units"]  # noqa: B018 - a plan without units is not ours
            except (ValueError, UnicodeDecodeError, KeyError, TypeError) as exc:
                raise PlanError(f"{os.path.join(folder, name)} is not a ddaug plan ({exc}); use --overwrite") from None
            rounds.append(doc)
    for i, doc in enumerate(rounds):
        if doc.get("round") != i:
            raise PlanError(f"{folder}: plan round {i} is missing; use --overwrite")
    return rounds


def make_round(round_: int, kind: str, chunks: list[list[str]], config_digest: str | None) -> dict[str, Any]:
    doc: dict[str, Any] = {"round": round_, "kind": kind, "inputs": sum(map(len, chunks)),
                           "units": [[len(c), keys_digest(c)] for c in chunks]}
    if config_digest:
        doc["config"] = config_digest
    if kind != "inputs":
        doc["keys"] = chunks  # a later round's keys cannot be recomputed from the inputs
    return doc


def write_round(folder: str, doc: dict[str, Any]) -> dict[str, Any]:
    """Create the round's plan file, or, when another worker was first, check theirs is the same."""
    path = plan_path(folder, doc["round"])
    data = (json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8")
    if link_exclusive(path, data):
        return doc
    theirs = _read_json(path)
    if theirs != doc:
        raise PlanError(_mismatch(path, theirs, doc))
    return theirs


def _mismatch(path: str, theirs: dict, mine: dict) -> str:
    if theirs.get("config") != mine.get("config"):
        return f"{path} was written for a different config; use the same options or --overwrite"
    return (f"inputs changed since the plan was written ({path}: {theirs.get('inputs')} inputs in "
            f"{len(theirs.get('units', []))} units, now {mine.get('inputs')} in {len(mine['units'])}); "
            f"finish the job with the same inputs, or use --overwrite")


def chunk(keys: list[str], size: int) -> list[list[str]]:
    return [keys[i:i + size] for i in range(0, len(keys), size)]


@dataclass
class Work:
    """What this worker may take: the plan's incomplete units (with their inputs), and counts."""
    units: list[Unit]
    total: int       # inputs of the job
    skipped: int     # already done when this worker started
    pending: int     # with --retry-failures: inputs no run has done yet, left for a plain run
    rounds: int      # plan rounds on disk
    unit_count: int  # units of the selected rounds


def plan_work(folder, items: list, shard_size: int, config_digest: str, *, retry: bool) -> Work:
    """Read (or write) the plan and pick the incomplete units this worker may take.

    A plain run finishes every round, and once all are committed adds a round for inputs no
    unit covers (added since). --retry-failures works on the latest retry round, or adds one
    for the keys failures.jsonl lists."""
    path = folder.path
    keys = [it.key for it in items]
    rounds = read_rounds(path)
    if not rounds:
        rounds = [write_round(path, make_round(0, "inputs", chunk(keys, shard_size), config_digest))]
    elif rounds[0].get("config") != config_digest:
        raise PlanError(_mismatch(plan_path(path, 0), rounds[0], {"config": config_digest}))
    committed = folder.committed_units()
    stray = sorted(n for n in committed if int(n[:3]) >= len(rounds))
    if stray:
        raise PlanError(f"{path} holds done markers that no plan round lists ({folder.prefix}-{stray[0]}...), "
                        f"e.g. from an older ddaug that split work by rank; use --overwrite")

    def incomplete(doc: dict) -> list[int]:
        return [i for i in range(len(doc["units"])) if unit_name(doc["round"], i) not in committed]

    def add_round(kind: str, extra: list[str]) -> None:
        if extra:
            rounds.append(write_round(path, make_round(len(rounds), kind, chunk(extra, shard_size), None)))
            log.info("plan round %d: %d %s input(s) in %d unit(s)", len(rounds) - 1, len(extra), kind,
                     len(rounds[-1]["units"]))

    if retry and not (rounds[-1]["kind"] == "retry" and incomplete(rounds[-1])):
        failed = folder.failed_keys()
        add_round("retry", [k for k in keys if k in failed])
    elif not retry and all(not incomplete(doc) for doc in rounds):
        done = folder.done_keys()
        add_round("new", [k for k in keys if k not in done])  # inputs added since the job finished
    selected = [rounds[-1]] if retry and rounds[-1]["kind"] == "retry" else ([] if retry else rounds)
    by_key = {it.key: it for it in items}
    units: list[Unit] = []
    for doc in selected:
        todo = incomplete(doc)
        if not todo:
            continue
        if doc["kind"] == "inputs":
            mine = make_round(doc["round"], "inputs", chunk(keys, shard_size), config_digest)
            if mine["units"] != doc["units"]:
                raise PlanError(_mismatch(plan_path(path, doc["round"]), doc, mine))
            members = chunk(items, shard_size)
        else:
            missing = [k for i in todo for k in doc["keys"][i] if k not in by_key]
            if missing:
                raise PlanError(f"inputs changed since the plan was written: {plan_path(path, doc['round'])} "
                                f"lists {len(missing)} input(s) that are gone (e.g. {missing[0]}); use --overwrite")
            members = [[by_key[k] for k in ks] for ks in doc["keys"]]
        for i in todo:
            count, digest = doc["units"][i]
            units.append(Unit(doc["round"], i, count, digest, members[i]))
    todo_inputs = sum(u.count for u in units)
    pending = 0
    if retry:
        done = folder.done_keys()
        pending = sum(1 for k in keys if k not in done)
    unit_count = sum(len(d["units"]) for d in selected)
    return Work(units=units, total=len(items), skipped=len(items) - todo_inputs - pending, pending=pending,
                rounds=len(rounds), unit_count=unit_count)


# -- leases and workers ------------------------------------------------------------------------------------
def lease_path(folder: str, name: str) -> str:
    return os.path.join(folder, LEASE_PREFIX + name)


def _lease_info(path: str) -> tuple[dict, float] | None:
    """A lease's content and last heartbeat, or None when it is gone (or being replaced). One
    that does not parse is aged by its time alone: no worker beats it, so it goes stale."""
    try:
        mtime = os.stat(path).st_mtime
        info = _read_json(path)
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        info = {}
    return (info if isinstance(info, dict) else {}), mtime


def _stale(info: dict, mtime: float, now: float, timeout: float) -> bool:
    return now - mtime > timeout or _dead_here(info)


def live_workers(folder: str, timeout: float | None = None) -> list[str]:
    """Who is working on the folder now: holders of live leases, and workers whose heartbeat is
    fresh (between two units they hold none). Empty for a finished or crashed job."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    if not any(n.startswith((LEASE_PREFIX, WORKER_PREFIX)) for n in names):
        return []
    now = folder_now(folder)
    live = set()
    for name in names:
        if _LEASE_RE.match(name) and ".stale-" not in name:
            got = _lease_info(os.path.join(folder, name))
            if got and not _stale(got[0], got[1], now, got[0].get("timeout", timeout or DEFAULT_LEASE_TIMEOUT)):
                live.add(str(got[0].get("worker")))
        elif (m := _WORKER_RE.match(name)) and name.endswith(".json"):
            got = _lease_info(os.path.join(folder, name))
            if (got and got[0].get("state") == "running"
                    and not _stale(got[0], got[1], now, got[0].get("timeout", timeout or DEFAULT_LEASE_TIMEOUT))):
                live.add(m["id"])
    return sorted(live)


class Worker:
    """This process as one of a job's workers: its leases, their heartbeat thread, and the
    worker file (`.worker-{id}.json`: host, pid, units committed, current units) that
    `ddaug inspect` reads."""

    def __init__(self, folder: str, *, timeout: float = DEFAULT_LEASE_TIMEOUT, label: str | None = None):
        self.folder = folder
        self.timeout = timeout
        self.id = process_token()
        self.label = label
        self.path = os.path.join(folder, f"{WORKER_PREFIX}{self.id}.json")
        self.held: dict[str, str] = {}   # unit name -> this worker's token in its lease
        self.lost: set[str] = set()      # leases taken over while this worker held them
        self.committed = 0
        self.started = time.time()
        self._lock = threading.Lock()
        self._file_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the worker file and heartbeat -----------------------------------------------------------------
    def _write_file(self, state: str = "running") -> None:
        with self._lock:
            current = sorted(self.held)
        record = {"worker": self.id, "host": HOST, "pid_space": PID_SPACE, "pid": os.getpid(), "label": self.label,
                  "state": state, "started": self.started, "timeout": self.timeout, "committed": self.committed,
                  "current": current}
        with self._file_lock:  # the heartbeat thread and the main thread share the temporary name
            atomic_write_json(self.path, record)

    def start(self) -> None:
        self._write_file()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="lease-heartbeat")
        self._thread.start()

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for name in list(self.held):
            self.release(name)
        try:
            self._write_file("exited")
        except OSError:  # the folder went away (disk full, removed): nothing left to tell
            pass

    def _beat(self) -> None:
        while not self._stop.wait(self.timeout / 4):
            try:
                self.renew()
                self._write_file()
            except OSError as exc:  # a flaky file server: the next beat tries again
                log.warning("lease heartbeat failed: %s", exc)

    def renew(self) -> None:
        for name, token in list(self.held.items()):
            if self._holds(name, token):
                try:
                    os.utime(lease_path(self.folder, name))
                    continue
                except FileNotFoundError:
                    pass
            log.warning("lease on unit %s was taken over by another worker; its work here will be discarded", name)
            with self._lock:
                self.held.pop(name, None)
                self.lost.add(name)

    def now(self) -> float:
        os.utime(self.path)
        return os.stat(self.path).st_mtime

    # -- leases ------------------------------------------------------------------------------------
    def _holds(self, name: str, token: str) -> bool:
        got = _lease_info(lease_path(self.folder, name))
        return got is not None and got[0].get("token") == token

    def still_mine(self, name: str) -> bool:
        token = self.held.get(name)
        return token is not None and self._holds(name, token)

    def try_take(self, name: str, now: float) -> bool:
        """Take the unit's lease: free, or stale and renamed away by this worker."""
        path = lease_path(self.folder, name)
        token = secrets.token_hex(8)
        body = (json.dumps({"worker": self.id, "host": HOST, "pid_space": PID_SPACE, "pid": os.getpid(),
                            "token": token, "timeout": self.timeout, "taken": time.time()}) + "\n").encode()
        if not link_exclusive(path, body):
            got = _lease_info(path)  # aged by its holder's timeout, which sets its heartbeat
            if got is None or not _stale(got[0], got[1], now, got[0].get("timeout", self.timeout)):
                return False
            stale = f"{path}.stale-{self.id}"
            try:
                os.rename(path, stale)
            except FileNotFoundError:
                return False  # another taker was first
            moved = _lease_info(stale)
            if moved is not None and moved[0].get("token") != got[0].get("token"):
                # Between the look and the rename another taker put its fresh lease there: give it back.
                try:
                    os.link(stale, path)
                except FileExistsError:
                    pass
                os.unlink(stale)
                return False
            os.unlink(stale)
            log.info("took over unit %s from worker %s (stale lease)", name, got[0].get("worker"))
            if not link_exclusive(path, body):
                return False
        with self._lock:
            self.held[name] = token
        self._write_file()  # `inspect` shows what each worker is on
        return True

    def release(self, name: str) -> None:
        if self.still_mine(name):
            try:
                os.unlink(lease_path(self.folder, name))
            except FileNotFoundError:
                pass
        with self._lock:
            self.held.pop(name, None)
        if not self._stop.is_set():
            self._write_file()


class UnitQueue:
    """Hands this worker the plan's units by lease, in plan order, until all are committed."""

    def __init__(self, worker: Worker, units: list[Unit], marker_of: Callable[[str], str],
                 max_wait: float = 2.0):
        self.worker = worker
        self.units = list(units)
        self._marker_of = marker_of
        self._done: set[str] = set()
        self.max_wait = max_wait
        self.waited = 0.0

    def remaining(self) -> list[Unit]:
        return [u for u in self.units if u.name not in self._done]

    def take(self, wait: bool) -> Unit | None:
        """The next free (or stale) unit, leased to this worker; with wait, poll with back-off
        while other workers hold the rest; None when every unit is committed (or, without wait,
        none is free now)."""
        delay = 0.05
        while True:
            now = self.worker.now()
            names = set(os.listdir(self.worker.folder))
            leased = 0
            for unit in self.remaining():
                if self._marker_of(unit.name) in names:
                    self._done.add(unit.name)
                    continue
                if unit.name in self.worker.held:
                    continue
                if LEASE_PREFIX + unit.name in names:
                    leased += 1
                if self.worker.try_take(unit.name, now):
                    if os.path.exists(os.path.join(self.worker.folder, self._marker_of(unit.name))):
                        # committed between the look and the lease
                        self.worker.release(unit.name)
                        self._done.add(unit.name)
                        continue
                    self._done.add(unit.name)  # ours now: not offered again
                    return unit
            if not wait or not self.remaining():
                return None
            log.debug("waiting for %d unit(s) leased by other workers", leased)
            t0 = time.monotonic()
            time.sleep(delay)
            self.waited += time.monotonic() - t0
            delay = min(delay * 2, self.max_wait, self.worker.timeout / 4)

    def giveup(self, unit: Unit) -> None:
        """A unit this worker could not finish (its lease was lost): others may commit it; wait for them."""
        self._done.discard(unit.name)


# -- committing a unit ----------------------------------------------------------------------------------------
def commit(folder: str, marker_name: str, stats: dict[str, Any], tar_tmp: str | None,
           still_mine: Callable[[], bool]) -> bool:
    """Commit a unit (the module's protocol): True if this call committed it, False if another
    worker did (this worker's temporary files are then removed)."""
    marker = os.path.join(folder, marker_name)
    marker_tmp = write_temporary(marker, (json.dumps(stats, ensure_ascii=False, indent=1) + "\n").encode("utf-8"))
    committed = False
    if still_mine():
        final = os.path.join(folder, stats["shard"] or "")
        if stats["shard"] and os.path.isfile(final) and not os.path.exists(marker):
            # A tar under this unit's name with no marker is no commit of this protocol's (it only
            # links a tar after its marker): an older ddaug's leftover; replaced while the lease is ours.
            os.unlink(final)
        crash_point("stats-replace")
        try:
            os.link(marker_tmp, marker)
            committed = True
        except (FileExistsError, FileNotFoundError):  # another worker committed; or cleaned our files
            pass
    for path in (marker_tmp, *((tar_tmp,) if tar_tmp and not committed else ())):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    if committed:
        roll_forward(folder, stats)
    return committed


def roll_forward(folder: str, stats: dict[str, Any]) -> None:
    """Put the tar a done marker names under its final name (if the committer did not live to)."""
    if not stats.get("shard") or not stats.get("attempt"):
        return
    final, tmp = os.path.join(folder, stats["shard"]), os.path.join(folder, stats["attempt"])
    if not os.path.exists(final):
        crash_point("tar-rename")
        try:
            os.link(tmp, final)
        except FileExistsError:
            pass
        except FileNotFoundError:  # another worker linked it and removed the temporary name first
            if not os.path.exists(final):
                raise
        crash_point("tar-renamed")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def worker_files(folder: str) -> list[dict[str, Any]]:
    out = []
    for name in sorted(os.listdir(folder)):
        if (m := _WORKER_RE.match(name)) and name.endswith(".json"):
            got = _lease_info(os.path.join(folder, name))
            if got:
                out.append({**got[0], "worker": m["id"], "heartbeat": got[1]})
    return out


def token_is_dead(folder: str, token: str) -> bool:
    """Whether the process that made a temporary file with this token is gone for sure: it ran
    on this host (its worker file says so, or it has none and its pid is free here)."""
    pid = int(token.split(".")[0])
    try:
        info = _read_json(os.path.join(folder, f"{WORKER_PREFIX}{token}.json"))
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        info = {"host": HOST, "pid_space": PID_SPACE, "pid": pid}
    if not isinstance(info, dict):
        return False
    return info.get("state") == "exited" or _dead_here(info)


def progress(folder: str, marker_of: Callable[[str], str]) -> dict[str, Any] | None:
    """Where a job stands, per unit and per worker (for `ddaug inspect`); None without a plan."""
    try:
        rounds = read_rounds(folder)
    except (PlanError, FileNotFoundError):
        return None
    if not rounds:
        return None
    now = folder_now(folder) if os.access(folder, os.W_OK) else time.time()
    units = {"committed": 0, "leased": [], "expired": [], "pending": []}
    names = set(os.listdir(folder))
    for doc in rounds:
        for i in range(len(doc["units"])):
            name = unit_name(doc["round"], i)
            if marker_of(name) in names:
                units["committed"] += 1
                continue
            got = _lease_info(lease_path(folder, name))
            if got is None:
                units["pending"].append(name)
                continue
            info, mtime = got
            entry = {"unit": name, "worker": info.get("worker"), "host": info.get("host"), "pid": info.get("pid"),
                     "heartbeat_age": round(now - mtime, 1)}
            stale = _stale(info, mtime, now, info.get("timeout", DEFAULT_LEASE_TIMEOUT))
            units["expired" if stale else "leased"].append(entry)
    workers = []
    for w in worker_files(folder):
        state = w.get("state")
        if state == "running" and _stale(w, w["heartbeat"], now, w.get("timeout", DEFAULT_LEASE_TIMEOUT)):
            state = "gone (no heartbeat)"
        workers.append({"worker": w["worker"], "host": w.get("host"), "pid": w.get("pid"), "label": w.get("label"),
                        "state": state, "committed": w.get("committed", 0), "current": w.get("current", []),
                        "heartbeat_age": round(now - w["heartbeat"], 1)})
    total = sum(len(d["units"]) for d in rounds)
    return {"rounds": len(rounds), "units": total, **units, "workers": workers}
