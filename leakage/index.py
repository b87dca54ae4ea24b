"""Near-neighbour search over 64-bit hashes by Hamming distance, without comparing all pairs.

Multi-index hashing: each hash is cut into bands (four of 16 bits, or three of 21-22 bits for
large indexes), and each band has its own table from band value to the hashes holding it. Two
hashes within distance r differ in at most r // (number of bands) bits of some band
(pigeonhole), so probing every band value within that many bits of the query's band finds
every neighbour; the candidates are then checked at full length. A query costs one table
lookup per probe plus its candidates, not one comparison per indexed hash.
"""

from __future__ import annotations

import itertools

import numpy as np

# Four bands probe few values (137 per band at radius 10) but hold N / 65,536 hashes each;
# three probe more (1,562-1,794 per band) but hold N / 2-4 million. Measured on random
# hashes, three bands win from about half a million indexed hashes (bench/RESULTS.md).
FOUR_BANDS = ((0, 16), (16, 16), (32, 16), (48, 16))
THREE_BANDS = ((0, 21), (21, 21), (42, 22))
THREE_BANDS_FROM = 1 << 19


def _flip_masks(bits: int, radius: int) -> np.ndarray:
    """Every value of `bits` bits with at most `radius` bits set: XOR masks for the probes."""
    masks = [0]
    for r in range(1, radius + 1):
        masks.extend(sum(1 << b for b in combo) for combo in itertools.combinations(range(bits), r))
    return np.array(masks, dtype=np.int64)


def _band(hashes: np.ndarray, shift: int, width: int) -> np.ndarray:
    return ((hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int64)


class HashIndex:
    """Per band: the hashes' positions sorted by band value, and where each value's run starts
    (CSR)."""

    def __init__(self, hashes: np.ndarray, bands: tuple[tuple[int, int], ...] | None = None):
        """bands: (shift, width) of each band, covering the 64 bits; None chooses by size."""
        self.hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
        self.bands = bands or (THREE_BANDS if len(self.hashes) >= THREE_BANDS_FROM else FOUR_BANDS)
        self._order, self._starts = [], []
        for shift, width in self.bands:
            values = _band(self.hashes, shift, width)
            order = np.argsort(values, kind="stable")
            self._order.append(order.astype(np.int32 if len(values) < 2**31 else np.int64))
            self._starts.append(np.concatenate([[0], np.cumsum(np.bincount(values, minlength=1 << width))]))

    def __len__(self) -> int:
        return len(self.hashes)

    def query(self, queries: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every (query position, indexed position, distance) with distance <= radius, sorted
        by query then distance then indexed position."""
        queries = np.ascontiguousarray(queries, dtype=np.uint64)
        empty = np.zeros(0, dtype=np.int64)
        if not len(queries) or not len(self.hashes):
            return empty, empty, empty
        found_q, found_i = [], []
        for (shift, width), order, starts in zip(self.bands, self._order, self._starts):
            masks = _flip_masks(width, radius // len(self.bands))
            probes = (_band(queries, shift, width)[:, None] ^ masks[None, :]).ravel()
            lo = starts[probes]
            counts = starts[probes + 1] - lo
            total = int(counts.sum())
            if not total:
                continue
            # The positions lo..lo+count-1 of every probe, flattened without a Python loop.
            i = order[np.repeat(lo - (np.cumsum(counts) - counts), counts) + np.arange(total)].astype(np.int64)
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
