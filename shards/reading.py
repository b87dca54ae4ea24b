"""Random access into a shard: a header index built once, then member bytes by offset.

The loader uses it so it can shuffle samples inside a shard and resume at an exact position
without reading what comes before.
"""

from __future__ import annotations

import logging
import tarfile
from dataclasses import dataclass
from typing import BinaryIO

from ddaug.sources.readers import index_tar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleIndex:
    key: str
    members: tuple[tuple[str, int, int], ...]  # (suffix, data offset, size)


def index_shard(path: str) -> tuple[list[SampleIndex], str | None]:
    """(samples in tar order, problem or None). A truncated or corrupt tar yields the samples
    before the damage, and the problem says what happened."""
    try:
        groups, problem = index_tar(path)
    except (tarfile.TarError, OSError) as exc:
        return [], f"unreadable tar: {exc}"
    samples = [SampleIndex(g.key, tuple((ext, m.offset, m.size) for ext, m in g.members.items())) for g in groups]
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
