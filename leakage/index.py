"""Near-neighbour search over 64-bit hashes by Hamming distance, without comparing all pairs.

Multi-index hashing: each hash is cut into CHUNKS bands of 16 bits, and each band has its own
table from band value to the hashes holding it. Two hashes within distance r differ in at
most r // CHUNKS bits of some band (pigeonhole), so probing every band value within that many
bits of the query's band finds every neighbour; the candidates are then checked with their
full distance. A query costs CHUNKS * (number of probes) table lookups plus its candidates,
not one comparison per indexed hash.
"""

from __future__ import annotations

import itertools

import numpy as np

CHUNKS = 4
CHUNK_BITS = 64 // CHUNKS
_CHUNK_VALUES = 1 << CHUNK_BITS


def _flip_masks(bits: int, radius: int) -> np.ndarray:
    """Every value of `bits` bits with at most `radius` bits set: XOR masks for the probes."""
    masks = [0]
    for r in range(1, radius + 1):
        masks.extend(sum(1 << b for b in combo) for combo in itertools.combinations(range(bits), r))
    return np.array(masks, dtype=np.int64)


def _chunk(hashes: np.ndarray, j: int) -> np.ndarray:
    return ((hashes >> np.uint64(j * CHUNK_BITS)) & np.uint64(_CHUNK_VALUES - 1)).astype(np.int64)


class HashIndex:
    """The hashes' positions by band value, as one sorted table per band (CSR: where each band
    value's run of positions starts)."""

    def __init__(self, hashes: np.ndarray):
        self.hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
        self._order, self._starts = [], []
        for j in range(CHUNKS):
            values = _chunk(self.hashes, j)
            self._order.append(np.argsort(values, kind="stable").astype(np.int32 if len(values) < 2**31 else np.int64))
            self._starts.append(np.concatenate([[0], np.cumsum(np.bincount(values, minlength=_CHUNK_VALUES))]))

    def __len__(self) -> int:
        return len(self.hashes)

    def query(self, queries: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every (query position, indexed position, distance) with distance <= radius, sorted
        by query then distance then indexed position."""
        queries = np.ascontiguousarray(queries, dtype=np.uint64)
        empty = np.zeros(0, dtype=np.int64)
        if not len(queries) or not len(self.hashes):
            return empty, empty, empty
        masks = _flip_masks(CHUNK_BITS, radius // CHUNKS)
        found_q, found_i = [], []
        for j in range(CHUNKS):
            probes = (_chunk(queries, j)[:, None] ^ masks[None, :]).ravel()
            lo, hi = self._starts[j][probes], self._starts[j][probes + 1]
            counts = hi - lo
            total = int(counts.sum())
            if not total:
                continue
            # The positions lo..hi-1 of every probe, flattened without a Python loop.
            run_start = np.repeat(lo - (np.cumsum(counts) - counts), counts)
            i = self._order[j][run_start + np.arange(total)]
            q = np.repeat(np.arange(len(queries)).repeat(len(masks)), counts)
            near = np.bitwise_count(queries[q] ^ self.hashes[i]) <= radius  # before dedup: few survive
            found_q.append(q[near])
            found_i.append(i[near])
        if not found_q:
            return empty, empty, empty
        # A neighbour close in several bands was found once per band.
        pair = np.unique(np.concatenate(found_q) * len(self.hashes) + np.concatenate(found_i))
        q, i = pair // len(self.hashes), pair % len(self.hashes)
        dist = np.bitwise_count(queries[q] ^ self.hashes[i]).astype(np.int64)
        order = np.lexsort((i, dist, q))
        return q[order], i[order], dist[order]
