"""Random access into a shard: a header index built once, then member bytes by offset.

The loader uses it so it can shuffle samples inside a shard and resume at an exact position
without reading what comes before.
"""

from __future__ import annotations

import logging
import os
import tarfile
from dataclasses import dataclass
from typing import BinaryIO

from sources.readers import _split_member_name, missing_tar_end

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleIndex:
    key: str
    members: tuple[tuple[str, int, int], ...]  # (suffix, data offset, size)


def index_shard(path: str) -> tuple[list[SampleIndex], str | None]:
    """(samples in tar order, problem or None). A truncated or corrupt tar yields the samples
    before the damage, and the problem says what happened."""
    groups: dict[str, list[tuple[str, int, int]]] = {}
    problem = None
    try:
        size = os.path.getsize(path)
        with tarfile.open(path, mode="r:") as tf:
            try:
                for m in tf:
                    if not m.isfile():
                        continue
                    key, suffix = _split_member_name(m.name)
                    if m.offset_data + m.size > size:
                        problem = f"member {m.name} cut short"
                        break
                    groups.setdefault(key, []).append((suffix, m.offset_data, m.size))
                else:
                    problem = missing_tar_end(tf, path)
            except (tarfile.TarError, OSError, EOFError) as exc:
                problem = f"corrupt after {len(groups)} samples: {exc}"
    except (tarfile.TarError, OSError) as exc:
        return [], f"unreadable tar: {exc}"
    samples = [SampleIndex(k, tuple(v)) for k, v in groups.items()]
    if problem and samples:
        samples.pop()  # the last group may be missing members that sat past the damage
    return samples, problem


def read_members(f: BinaryIO, sample: SampleIndex) -> dict[str, bytes]:
    """The members of one sample, read by offset from an open shard file."""
    out = {}
    for suffix, offset, size in sample.members:
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"member {sample.key}.{suffix} cut short")
        out[suffix] = data
    return out


def count_samples(path: str) -> int:
    return len(index_shard(path)[0])
