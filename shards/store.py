"""The output folder of a run: shards, their done markers, manifest, failure ledger, run.json.

Layout (see README "Output folder"):
  {prefix}-{rank:03d}-{index:06d}.tar          finished shard (renamed into place when complete)
  {prefix}-{rank:03d}-{index:06d}.stats.json   written last: the shard's done marker
  manifest.json, failures.jsonl                 derived from the stats files, rewritten atomically
  run.json                                      the run's config and package versions
  .lock-{rank:03d}                              held while a process of that rank runs

Every stats file records the input keys its chunk covered (written and failed), so a rerun
skips them; manifest and ledger are rebuilt from stats, so they always agree with the disk.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
from dataclasses import dataclass
from typing import Any

from .writer import TMP_SUFFIX, ShardWriter, atomic_write_bytes, atomic_write_json, check_plain_name

STATS_SUFFIX = ".stats.json"
MANIFEST = "manifest.json"
FAILURES = "failures.jsonl"
RUN_FILE = "run.json"
# The only names a run makes (and so the only ones it may delete): {prefix}-{rank}-{index} plus
# .tar, .tar.tmp (a shard being written), .stats.json, .stats.json.tmp-{pid}; and the summary
# files with their .tmp-{pid} copies. Anything else in the folder is the user's.
_SHARD_FILE = r"-(?P<rank>\d{3})-(?P<index>\d{6})(?P<ext>\.tar|\.tar\.tmp|\.stats\.json|\.stats\.json\.tmp-\d+)"
_SUMMARY_TMP_RE = re.compile(rf"^(?:{re.escape(MANIFEST)}|{re.escape(FAILURES)}|{re.escape(RUN_FILE)})"
                             rf"{re.escape(TMP_SUFFIX)}-(?P<pid>\d+)$")


_ANY_STATS_RE = re.compile(r"^.+-\d{3}-\d{6}" + re.escape(STATS_SUFFIX) + "$")


def _shard_file_re(prefix: str) -> re.Pattern:
    return re.compile(f"^{re.escape(prefix)}{_SHARD_FILE}$")


class StoreError(Exception):
    """The output folder cannot be used as asked (config clash, locked, not writable)."""


@dataclass
class Failure:
    key: str
    source: str
    stage: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"key": self.key, "source": self.source, "stage": self.stage, "reason": self.reason}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def shard_stem(prefix: str, rank: int, index: int) -> str:
    return f"{prefix}-{rank:03d}-{index:06d}"


def _config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


_STATS_FIELDS = ("shard", "rank", "index", "samples", "bytes", "sha256", "failures")


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class _Summary:
    """manifest.json and failures.jsonl, kept up to date one done marker at a time.

    Rebuilding them from every done marker at every shard commit made a run quadratic in its
    number of shards; here each marker is read once (a changed or vanished one restarts from
    scratch). Each key's latest outcome, in (rank, index) order, wins: a failure retried later
    (--retry-failures) and written is no longer a failure."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}                       # stats file name -> inode
        self.shards: dict[tuple[int, int], dict[str, Any]] = {}  # (rank, index) -> manifest entry
        self.samples = 0
        self.text_only = 0                                     # of the samples, those with no image
        self.latest: dict[str, tuple[int, int]] = {}         # key -> (rank, index) of its last outcome
        self.failing: dict[str, tuple[tuple[int, int], int, dict[str, Any]]] = {}

    def add(self, stats: dict[str, Any]) -> None:
        order = (stats["rank"], stats["index"])
        self.shards[order] = {"name": stats["shard"], "samples": stats["samples"], "bytes": stats["bytes"],
                              "sha256": stats["sha256"]}
        self.samples += stats["samples"]
        self.text_only += stats.get("text_only", 0)
        for key in stats.get("sample_keys", []):
            if self.latest.get(key, order) <= order:
                self.latest[key] = order
                self.failing.pop(key, None)
        for pos, failure in enumerate(stats["failures"]):
            key = failure["key"]
            if self.latest.get(key, order) <= order:
                self.latest[key] = order
                self.failing[key] = (order, pos, failure)

    def manifest(self, command: str, prefix: str) -> dict[str, Any]:
        shards = [self.shards[o] for o in sorted(self.shards) if self.shards[o]["name"]]
        return {"command": command, "prefix": prefix, "shards": shards, "samples": self.samples,
                "text_only": self.text_only, "failed": len(self.failing)}

    def failures(self) -> list[dict[str, Any]]:
        return [f for _, _, f in sorted(self.failing.values(), key=lambda t: (t[0], t[1]))]


class OutputFolder:
    def __init__(self, path: str, *, prefix: str, command: str, config: dict[str, Any],
                 run_info: dict[str, Any], rank: int = 0, overwrite: bool = False):
        try:
            check_plain_name(prefix, "--prefix")
        except ValueError as exc:
            raise StoreError(str(exc)) from None
        self.path = path
        self.prefix = prefix
        self.rank = rank
        self.command = command
        self.config = config
        # Counts of this run that no done marker holds (e.g. text-only records dropped before the
        # run); written to run.json's totals with the others.
        self.run_counts: dict[str, int] = {}
        self._own = _shard_file_re(prefix)
        self._summary = _Summary()
        self._lock_file = None
        try:
            self._open(run_info, overwrite)
        except OSError as exc:  # disk full or permissions while setting up: nothing was done yet
            self.close()
            raise StoreError(f"cannot use output folder {path}: {exc.strerror or exc}") from None
        except BaseException:
            self.close()  # a refused folder must not stay locked
            raise

    # -- setup ---------------------------------------------------------------------------------
    def _open(self, run_info: dict[str, Any], overwrite: bool) -> None:
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create output folder {self.path}: {exc.strerror}") from None
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise StoreError(f"output folder {self.path} is not writable")
        self._lock()
        run_path = os.path.join(self.path, RUN_FILE)
        if overwrite:
            self._remove_outputs()
        elif self._holds_work():
            # Only finished work must stay consistent: a run that did nothing (say its model
            # failed to load) leaves a run.json that the next command simply replaces.
            self._check_previous_run(run_path)
        if overwrite or not self._holds_work():
            atomic_write_json(run_path, {"command": self.command, "config": self.config, **run_info})
        self._clean_leftovers()

    def _previous_run(self, run_path: str) -> dict[str, Any] | None:
        if not os.path.exists(run_path):
            return None
        try:
            previous = _read_json(run_path)
        except (ValueError, UnicodeDecodeError) as exc:
            raise StoreError(f"{run_path} is not readable JSON ({exc}); use another folder or --overwrite") from None
        if not isinstance(previous, dict):
            raise StoreError(f"{run_path} is not a ddaug run file; use another folder or --overwrite")
        return previous

    def _check_previous_run(self, run_path: str) -> None:
        previous = self._previous_run(run_path)
        if previous is None:
            raise StoreError(f"{self.path} holds shards but no {RUN_FILE}; use --overwrite")
        if previous.get("command") != self.command:
            raise StoreError(f"{self.path} holds output of `ddaug {previous.get('command')}`; "
                             f"use another folder or --overwrite")
        old_config = previous.get("config")
        diff = _config_diff(old_config if isinstance(old_config, dict) else {}, self.config)
        if diff:
            raise StoreError(f"{self.path} was made with a different config ({'; '.join(diff)}); "
                             f"use another folder or --overwrite")

    def _lock(self) -> None:
        lock_path = os.path.join(self.path, f".lock-{self.rank:03d}")
        f = open(lock_path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            f.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise StoreError(f"another ddaug process (rank {self.rank}) is writing to "
                                 f"{self.path}; wait for it or use another folder") from None
            raise
        self._lock_file = f

    def close(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _names(self) -> list[str]:
        return sorted(os.listdir(self.path))

    def _remove_outputs(self) -> None:
        """--overwrite: remove what ddaug runs made here (the shards, done markers and temporary
        files of this prefix and of the previous run's, the summary files), nothing else."""
        prefixes = {self.prefix}
        try:
            previous = self._previous_run(os.path.join(self.path, RUN_FILE)) or {}
        except StoreError:
            previous = {}
        old_prefix = (previous.get("config") or {}).get("prefix") if isinstance(previous.get("config"), dict) else None
        if isinstance(old_prefix, str) and old_prefix:
            prefixes.add(old_prefix)
        patterns = [_shard_file_re(p) for p in prefixes]
        for name in self._names():
            if (name in (MANIFEST, FAILURES, RUN_FILE) or _SUMMARY_TMP_RE.match(name)
                    or any(p.match(name) for p in patterns)):
                path = os.path.join(self.path, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    os.remove(path)

    def _clean_leftovers(self) -> None:
        """Remove this rank's unfinished work: its temporary files, and tars whose stats (the
        done marker) was never written because the process died between the two renames."""
        names = set(self._names())
        for name in names:
            m = self._own.match(name)
            if m and int(m["rank"]) == self.rank:
                if m["ext"] in (".tar.tmp",) or m["ext"].startswith(STATS_SUFFIX + TMP_SUFFIX):
                    os.remove(os.path.join(self.path, name))
                elif m["ext"] == ".tar" and name[:-4] + STATS_SUFFIX not in names:
                    os.remove(os.path.join(self.path, name))
            m = _SUMMARY_TMP_RE.match(name)
            if m and name.startswith(RUN_FILE) and not _alive(int(m["pid"])):
                os.remove(os.path.join(self.path, name))

    # -- state ---------------------------------------------------------------------------------
    def _holds_work(self) -> bool:
        """Done markers of any prefix: run.json says which run made them."""
        return any(_ANY_STATS_RE.match(n) for n in self._names())

    def _stats_files(self) -> list[str]:
        """This prefix's done markers; a stats file of another prefix or name is not ours."""
        return [os.path.join(self.path, n) for n in self._names()
                if (m := self._own.match(n)) and m["ext"] == STATS_SUFFIX]

    def _read_stats(self, path: str) -> dict[str, Any]:
        try:
            stats = _read_json(path)
        except (ValueError, UnicodeDecodeError) as exc:
            stats = str(exc)
        if not isinstance(stats, dict) or not all(k in stats for k in _STATS_FIELDS):
            raise StoreError(f"{path} is not a ddaug done marker; remove it (its shard is redone) "
                             f"or use --overwrite")
        return stats

    def finished(self) -> list[dict[str, Any]]:
        return [self._read_stats(p) for p in self._stats_files()]

    def failed_keys(self) -> set[str]:
        self._update_summary()
        return set(self._summary.failing)

    def done_keys(self) -> set[str]:
        keys: set[str] = set()
        for stats in self.finished():
            keys.update(stats.get("keys", []))
        return keys

    def next_index(self) -> int:
        indices = [s["index"] for s in self.finished() if s.get("rank") == self.rank]
        return max(indices) + 1 if indices else 0

    # -- writing -------------------------------------------------------------------------------
    def new_shard(self, index: int) -> ShardWriter:
        return ShardWriter(os.path.join(self.path, shard_stem(self.prefix, self.rank, index) + ".tar"))

    def commit_shard(self, index: int, writer: ShardWriter, *, covered_keys: list[str],
                     failures: list[Failure], seconds: float) -> dict[str, Any]:
        stem = shard_stem(self.prefix, self.rank, index)
        if writer.samples:
            tar_info = writer.commit()
            shard = stem + ".tar"
        else:
            # A chunk whose every input failed leaves no tar; its stats still mark it done.
            writer.abort()
            tar_info, shard = {"bytes": 0, "sha256": None}, None
        stats = {"shard": shard, "rank": self.rank, "index": index, "samples": writer.samples,
                 "text_only": writer.text_only,
                 "failed": len(failures), "seconds": round(seconds, 3), **tar_info,
                 "sample_keys": writer.keys, "keys": covered_keys,
                 "failures": [f.to_json() for f in failures]}
        atomic_write_json(os.path.join(self.path, stem + STATS_SUFFIX), stats)
        self.refresh_summary()
        return stats

    def _update_summary(self) -> None:
        """Read the done markers that appeared since the last call (other ranks' included)."""
        entries = {e.name: e.inode() for e in os.scandir(self.path)
                   if (m := self._own.match(e.name)) and m["ext"] == STATS_SUFFIX}
        if any(entries.get(name) != inode for name, inode in self._summary.seen.items()):
            self._summary = _Summary()  # a marker vanished or was replaced: start over
        for name in sorted(entries.keys() - self._summary.seen.keys()):
            self._summary.add(self._read_stats(os.path.join(self.path, name)))
            self._summary.seen[name] = entries[name]

    def refresh_summary(self) -> None:
        """Bring manifest.json and failures.jsonl up to date with the done markers on disk.

        Ranks share these files: under a folder-wide lock, whoever writes last has read every
        done marker written before it, so a stale summary can never replace a newer one."""
        with open(os.path.join(self.path, ".lock-summary"), "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            # Only the lock holder writes these, so any temporary copy left now is a dead
            # writer's (killed mid-write): drop it.
            for name in self._names():
                if _SUMMARY_TMP_RE.match(name) and not name.startswith(RUN_FILE):
                    os.remove(os.path.join(self.path, name))
            self._update_summary()
            manifest = self._summary.manifest(self.command, self.prefix)
            atomic_write_json(os.path.join(self.path, MANIFEST), manifest)
            self._write_run_totals(manifest)
            lines = [json.dumps(f, ensure_ascii=False) for f in self._summary.failures()]
            atomic_write_bytes(os.path.join(self.path, FAILURES),
                               ("\n".join(lines) + ("\n" if lines else "")).encode("utf-8"))

    def _write_run_totals(self, manifest: dict[str, Any]) -> None:
        """run.json's totals: the manifest's counts and this run's own (e.g. text-only records
        dropped before the run)."""
        run_path = os.path.join(self.path, RUN_FILE)
        if not os.path.exists(run_path):
            return
        with open(run_path, encoding="utf-8") as f:
            run = json.load(f)
        run["totals"] = {**run.get("totals", {}), **self.run_counts,
                         **{k: manifest[k] for k in ("samples", "text_only", "failed")}}
        atomic_write_json(run_path, run)
