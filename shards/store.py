"""The output folder of a run: shards, their done markers, manifest, failure ledger, run.json.

Layout (see docs/elastic.md):
  plan-000.json                                  the job's units (shards/units.py); plan-001.json... later rounds
  {prefix}-{round:03d}-{unit:06d}.tar            a unit's shard, linked into place complete
  {prefix}-{round:03d}-{unit:06d}.stats.json     the unit's done marker: its link commits the unit
  manifest.json, failures.jsonl                  derived from the done markers, rewritten atomically
  run.json                                       the run's config and package versions
  .lease-{round}-{unit}, .worker-{id}.json       who works on what (shards/units.py)

Every done marker records the input keys its unit covered (written and failed), so a rerun
skips them; manifest and ledger are rebuilt from the markers, so they always agree with the disk.
"""

from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

from . import units as work
from .writer import (TMP_SUFFIX, TOKEN_PATTERN, ShardWriter, atomic_write_bytes, atomic_write_json,
                     check_plain_name, process_token)

STATS_SUFFIX = ".stats.json"
MANIFEST = "manifest.json"
FAILURES = "failures.jsonl"
RUN_FILE = "run.json"
# The only names a run makes (and so the only ones it may delete): {prefix}-{round}-{unit} plus
# .tar, .stats.json and their .tmp-{token} copies; the summary files with theirs; and the plan,
# lease and worker files (shards/units.py). Anything else in the folder is the user's.
_SHARD_FILE = (rf"-(?P<round>\d{{3}})-(?P<index>\d{{6}})"
               rf"(?P<ext>\.tar|\.stats\.json|(?:\.tar|\.stats\.json){re.escape(TMP_SUFFIX)}-(?P<token>{TOKEN_PATTERN}))")
_SUMMARY_TMP_RE = re.compile(rf"^(?:{re.escape(MANIFEST)}|{re.escape(FAILURES)}|{re.escape(RUN_FILE)})"
                             rf"{re.escape(TMP_SUFFIX)}-(?P<token>{TOKEN_PATTERN})$")


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


def shard_stem(prefix: str, unit: str) -> str:
    """A unit's file stem: a function of the unit alone (`{round:03d}-{index:06d}`), whoever makes it."""
    return f"{prefix}-{unit}"


def _config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


_STATS_FIELDS = ("shard", "round", "index", "samples", "bytes", "sha256", "failures")


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class _Summary:
    """manifest.json and failures.jsonl, kept up to date one done marker at a time.

    Rebuilding them from every done marker at every shard commit made a run quadratic in its
    number of shards; here each marker is read once (a changed or vanished one restarts from
    scratch). Each key's latest outcome, in (round, index) order, wins: a failure retried later
    (--retry-failures) and written is no longer a failure."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}                       # stats file name -> inode
        self.shards: dict[tuple[int, int], dict[str, Any]] = {}  # (round, index) -> manifest entry
        self.samples = 0
        self.text_only = 0                                     # of the samples, those with no image
        self.latest: dict[str, tuple[int, int]] = {}         # key -> (round, index) of its last outcome
        self.failing: dict[str, tuple[tuple[int, int], int, dict[str, Any]]] = {}

    def add(self, stats: dict[str, Any]) -> None:
        order = (stats["round"], stats["index"])
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
    """One run's output folder, shared by every worker of the job (shards/units.py)."""

    def __init__(self, path: str, *, prefix: str, command: str, config: dict[str, Any],
                 run_info: dict[str, Any], overwrite: bool = False, join: bool = False):
        try:
            check_plain_name(prefix, "--prefix")
        except ValueError as exc:
            raise StoreError(str(exc)) from None
        self.path = path
        self.prefix = prefix
        self.command = command
        self.config = config
        # Counts of this run that no done marker holds (e.g. text-only records dropped before the
        # run); written to run.json's totals with the others.
        self.run_counts: dict[str, int] = {}
        self._own = _shard_file_re(prefix)
        self._summary = _Summary()
        try:
            self._open(run_info, overwrite, join)
        except OSError as exc:  # disk full or permissions while setting up: nothing was done yet
            raise StoreError(f"cannot use output folder {path}: {exc.strerror or exc}") from None

    # -- setup ---------------------------------------------------------------------------------
    def _open(self, run_info: dict[str, Any], overwrite: bool, join: bool) -> None:
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create output folder {self.path}: {exc.strerror}") from None
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise StoreError(f"output folder {self.path} is not writable")
        self._check_hard_links()
        live = work.live_workers(self.path)
        if live and overwrite:
            raise StoreError(f"--overwrite: {len(live)} worker(s) are still writing to {self.path}; "
                             f"stop them first")
        if live and not join:
            raise StoreError(f"{self.path} is being written by {len(live)} other worker(s); add --join to "
                             f"help them (or wait for them, or use another folder)")
        run_path = os.path.join(self.path, RUN_FILE)
        if overwrite:
            self._remove_outputs()
        has_plan = any(work.PLAN_RE.match(n) for n in self._names())
        keep = not overwrite and (self._holds_work() or live or (join and has_plan))
        if keep:
            # Only finished work (or a job others are on) must stay consistent: a run that did
            # nothing (say its model failed to load) leaves a run.json the next command replaces.
            self._check_previous_run(run_path)
        elif has_plan and not overwrite:
            self._remove_plan()  # a start that never committed a unit: plan afresh
        if not keep or not os.path.exists(run_path):
            atomic_write_json(run_path, {"command": self.command, "config": self.config, **run_info})
        self.sweep()

    def _check_hard_links(self) -> None:
        """Commits and leases are hard links (shards/units.py): without them no unit could ever
        commit, and the error would name a temporary file and promise a rerun that fails again."""
        probe = os.path.join(self.path, f".links-{process_token()}")
        with open(probe, "wb"):
            pass
        try:
            os.link(probe, probe + ".2")
            os.unlink(probe + ".2")
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            raise StoreError(f"output folder {self.path} is on a file system without hard links, which ddaug "
                             f"needs to commit shards; write to a local disk or NFS/Lustre/GPFS/CephFS") from None
        finally:
            os.unlink(probe)

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
            if self._holds_work():
                raise StoreError(f"{self.path} holds shards but no {RUN_FILE}; use --overwrite")
            return
        if previous.get("command") != self.command:
            raise StoreError(f"{self.path} holds output of `ddaug {previous.get('command')}`; "
                             f"use another folder or --overwrite")
        old_config = previous.get("config")
        diff = _config_diff(old_config if isinstance(old_config, dict) else {}, self.config)
        if diff:
            raise StoreError(f"{self.path} was made with a different config ({'; '.join(diff)}); "
                             f"use another folder or --overwrite")

    def close(self) -> None:
        """Nothing to release: the folder holds no locks (workers coordinate by lease)."""

    def _names(self) -> list[str]:
        return sorted(os.listdir(self.path))

    def _remove(self, name: str) -> None:
        path = os.path.join(self.path, name)
        if os.path.isfile(path) and not os.path.islink(path):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass

    def _remove_plan(self) -> None:
        for name in self._names():
            if work.is_own_file(name):
                self._remove(name)

    def _remove_outputs(self) -> None:
        """--overwrite: remove what ddaug runs made here (the shards, done markers and temporary
        files of this prefix and of the previous run's, the summary, plan, lease and worker
        files), nothing else."""
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
            if (name in (MANIFEST, FAILURES, RUN_FILE) or _SUMMARY_TMP_RE.match(name) or work.is_own_file(name)
                    or any(p.match(name) for p in patterns)):
                self._remove(name)

    def sweep(self) -> None:
        """Remove temporary files no worker will use: those of committed units (after putting the
        unit's tar in place, should its committer have died first), and those of dead processes
        of this host (shards, summaries, leases, worker files, plans, probes). Another host's
        files of an unfinished unit stay: that worker may be alive."""
        names = self._names()
        markers = {m["round"] + "-" + m["index"] for n in names
                   if (m := self._own.match(n)) and m["ext"] == STATS_SUFFIX}
        rolled: set[str] = set()
        for name in names:
            m = self._own.match(name)
            if m and m["token"]:
                unit = m["round"] + "-" + m["index"]
                if unit in markers:
                    if unit not in rolled:
                        self._roll_forward(self._read_stats(self._marker_path(unit)))
                        rolled.add(unit)
                    self._remove(name)
                elif work.token_is_dead(self.path, m["token"]):
                    self._remove(name)
            elif (m := _SUMMARY_TMP_RE.match(name)) and work.token_is_dead(self.path, m["token"]):
                self._remove(name)
            elif (token := work.temporary_token(name)) and work.token_is_dead(self.path, token):
                self._remove(name)  # a lease's, worker file's or plan's copy, or a probe, of a dead process
            elif name.startswith(work.LEASE_PREFIX) and name[len(work.LEASE_PREFIX):] in markers:
                self._remove(name)  # a lease on a committed unit: its holder died before letting go

    def _roll_forward(self, stats: dict[str, Any]) -> None:
        try:
            work.roll_forward(self.path, stats)
        except FileNotFoundError:  # the tar was removed by hand: every later command would stop here
            marker = shard_stem(self.prefix, work.unit_name(stats["round"], stats["index"])) + STATS_SUFFIX
            raise StoreError(f"{os.path.join(self.path, stats['shard'])} is missing, though its done marker "
                             f"{marker} says it was written; remove the marker (its shard is redone) "
                             f"or use --overwrite") from None

    # -- state ---------------------------------------------------------------------------------
    def _holds_work(self) -> bool:
        """Done markers of any prefix: run.json says which run made them."""
        return any(_ANY_STATS_RE.match(n) for n in self._names())

    def marker_name(self, unit: str) -> str:
        return shard_stem(self.prefix, unit) + STATS_SUFFIX

    def _marker_path(self, unit: str) -> str:
        return os.path.join(self.path, self.marker_name(unit))

    def committed_units(self) -> set[str]:
        return {m["round"] + "-" + m["index"] for n in self._names()
                if (m := self._own.match(n)) and m["ext"] == STATS_SUFFIX}

    def _stats_files(self) -> list[str]:
        """This prefix's done markers; a stats file of another prefix or name is not ours."""
        return [os.path.join(self.path, n) for n in self._names()
                if (m := self._own.match(n)) and m["ext"] == STATS_SUFFIX]

    def _read_stats(self, path: str) -> dict[str, Any]:
        try:
            stats = _read_json(path)
        except (ValueError, UnicodeDecodeError) as exc:
            stats = str(exc)
        if isinstance(stats, dict) and "round" not in stats and stats.get("rank") == 0:
            stats["round"] = 0  # an older one-process folder: its rank-0 shards are round 0's units
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

    def manifest_counts(self) -> dict[str, int]:
        """samples, text_only and failed over the done markers read so far."""
        self._update_summary()
        m = self._summary.manifest(self.command, self.prefix)
        return {k: m[k] for k in ("samples", "text_only", "failed")}

    # -- writing -------------------------------------------------------------------------------
    def new_shard(self, unit: str) -> ShardWriter:
        final = os.path.join(self.path, shard_stem(self.prefix, unit) + ".tar")
        return ShardWriter(final, tmp_path=f"{final}{TMP_SUFFIX}-{process_token()}")

    def commit_shard(self, unit: str, writer: ShardWriter, *, covered_keys: list[str],
                     failures: list[Failure], seconds: float,
                     still_mine: Callable[[], bool] = lambda: True) -> dict[str, Any] | None:
        """Commit the unit's shard (shards/units.py `commit`): its done marker, or None when
        another worker committed the unit first (this attempt's files are then discarded)."""
        stem = shard_stem(self.prefix, unit)
        if writer.samples:
            tar_info = writer.finish()
            shard, attempt = stem + ".tar", os.path.basename(writer.tmp_path)
        else:
            # A unit whose every input failed leaves no tar; its marker still marks it done.
            writer.abort()
            tar_info, shard, attempt = {"bytes": 0, "sha256": None}, None, None
        round_, index = (int(x) for x in unit.split("-"))
        stats = {"shard": shard, "round": round_, "index": index, "samples": writer.samples,
                 "text_only": writer.text_only,
                 "failed": len(failures), "seconds": round(seconds, 3), **tar_info, "attempt": attempt,
                 "sample_keys": writer.keys, "keys": covered_keys,
                 "failures": [f.to_json() for f in failures]}
        if not work.commit(self.path, stem + STATS_SUFFIX, stats, writer.tmp_path if shard else None, still_mine):
            return None
        self.refresh_summary()
        return stats

    def _update_summary(self) -> None:
        """Read the done markers that appeared since the last call (other workers' included)."""
        entries = {e.name: e.inode() for e in os.scandir(self.path)
                   if (m := self._own.match(e.name)) and m["ext"] == STATS_SUFFIX}
        if any(entries.get(name) != inode for name, inode in self._summary.seen.items()):
            self._summary = _Summary()  # a marker vanished or was replaced: start over
        for name in sorted(entries.keys() - self._summary.seen.keys()):
            stats = self._read_stats(os.path.join(self.path, name))
            self._roll_forward(stats)  # its committer may have died before placing the tar
            self._summary.add(stats)
            self._summary.seen[name] = entries[name]

    def refresh_summary(self) -> None:
        """Bring manifest.json and failures.jsonl up to date with the done markers on disk.

        Workers write these without a lock: each write is a complete rebuild from the markers,
        renamed into place, and every worker rebuilds once more after it has seen the last unit
        committed, so the last write holds every marker."""
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
