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
import glob
import json
import os
import re
from dataclasses import dataclass
from typing import Any

from .writer import TMP_SUFFIX, ShardWriter, atomic_write_bytes, atomic_write_json

STATS_SUFFIX = ".stats.json"
MANIFEST = "manifest.json"
FAILURES = "failures.jsonl"
RUN_FILE = "run.json"
_SHARD_RE = re.compile(r"^(?P<prefix>.+)-(?P<rank>\d{3})-(?P<index>\d{6})$")


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


class OutputFolder:
    def __init__(self, path: str, *, prefix: str, command: str, config: dict[str, Any],
                 run_info: dict[str, Any], rank: int = 0, overwrite: bool = False):
        self.path = path
        self.prefix = prefix
        self.rank = rank
        self.command = command
        self.config = config
        # Counts of this run that no done marker holds (e.g. text-only records dropped before the
        # run); written to run.json's totals with the others.
        self.run_counts: dict[str, int] = {}
        self._lock_file = None
        try:
            self._open(run_info, overwrite)
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
        elif os.path.exists(run_path):
            with open(run_path, encoding="utf-8") as f:
                previous = json.load(f)
            if previous.get("command") != self.command:
                raise StoreError(f"{self.path} holds output of `ddaug {previous.get('command')}`; "
                                 f"use another folder or --overwrite")
            diff = _config_diff(previous.get("config", {}), self.config)
            if diff:
                raise StoreError(f"{self.path} was made with a different config ({'; '.join(diff)}); "
                                 f"use another folder or --overwrite")
        elif self._stats_files():
            raise StoreError(f"{self.path} holds shards but no {RUN_FILE}; use --overwrite")
        if overwrite or not os.path.exists(run_path):
            atomic_write_json(run_path, {"command": self.command, "config": self.config, **run_info})
        self._clean_leftovers()

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

    def _remove_outputs(self) -> None:
        patterns = ["*.tar", "*" + STATS_SUFFIX, "*" + TMP_SUFFIX + "*", MANIFEST, FAILURES, RUN_FILE]
        for pattern in patterns:
            for p in glob.glob(os.path.join(glob.escape(self.path), pattern)):
                if os.path.isfile(p):
                    os.remove(p)

    def _clean_leftovers(self) -> None:
        """Remove this rank's unfinished work: temporary files, and tars whose stats (the done
        marker) was never written because the process died between the two renames."""
        for p in glob.glob(os.path.join(glob.escape(self.path), f"*-{self.rank:03d}-*")):
            name = os.path.basename(p)
            if TMP_SUFFIX in name:
                os.remove(p)
            elif name.endswith(".tar") and not os.path.exists(p[:-4] + STATS_SUFFIX):
                os.remove(p)
        for p in glob.glob(os.path.join(glob.escape(self.path), RUN_FILE + TMP_SUFFIX + "-*")):
            if not _alive(int(p.rsplit("-", 1)[1])):
                os.remove(p)

    # -- state ---------------------------------------------------------------------------------
    def _stats_files(self) -> list[str]:
        return sorted(glob.glob(os.path.join(glob.escape(self.path), "*" + STATS_SUFFIX)))

    def finished(self) -> list[dict[str, Any]]:
        out = []
        for p in self._stats_files():
            with open(p, encoding="utf-8") as f:
                out.append(json.load(f))
        return out

    @staticmethod
    def _final_failures(finished: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each key's latest outcome wins: a failure retried later (--retry-failures) and
        written is no longer a failure."""
        latest: dict[str, dict[str, Any]] = {}
        for s in sorted(finished, key=lambda s: (s["rank"], s["index"])):
            for k in s.get("sample_keys", []):
                latest.pop(k, None)
            for f in s["failures"]:
                latest.pop(f["key"], None)
                latest[f["key"]] = f
        return list(latest.values())

    def failed_keys(self) -> set[str]:
        return {f["key"] for f in self._final_failures(self.finished())}

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

    def refresh_summary(self) -> None:
        """Rebuild manifest.json and failures.jsonl from the done markers on disk.

        Ranks share these files: under a folder-wide lock, whoever writes last has read every
        done marker written before it, so a stale summary can never replace a newer one."""
        with open(os.path.join(self.path, ".lock-summary"), "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            # Only the lock holder writes these, so any temporary copy left now is a dead
            # writer's (killed mid-write): drop it.
            for name in (MANIFEST, FAILURES):
                for p in glob.glob(os.path.join(glob.escape(self.path), name + TMP_SUFFIX + "-*")):
                    os.remove(p)
            self._write_summary()

    def _write_summary(self) -> None:
        finished = sorted(self.finished(), key=lambda s: (s["rank"], s["index"]))
        shards = [{"name": s["shard"], "samples": s["samples"], "bytes": s["bytes"],
                   "sha256": s["sha256"]} for s in finished if s["shard"]]
        failures = self._final_failures(finished)
        manifest = {"command": self.command, "prefix": self.prefix, "shards": shards,
                    "samples": sum(s["samples"] for s in finished),
                    "text_only": sum(s.get("text_only", 0) for s in finished), "failed": len(failures)}
        atomic_write_json(os.path.join(self.path, MANIFEST), manifest)
        run_path = os.path.join(self.path, RUN_FILE)
        if os.path.exists(run_path):
            with open(run_path, encoding="utf-8") as f:
                run = json.load(f)
            run["totals"] = {**run.get("totals", {}), **self.run_counts,
                             **{k: manifest[k] for k in ("samples", "text_only", "failed")}}
            atomic_write_json(run_path, run)
        lines = [json.dumps(f, ensure_ascii=False) for f in failures]
        atomic_write_bytes(os.path.join(self.path, FAILURES),
                           ("\n".join(lines) + ("\n" if lines else "")).encode("utf-8"))
