"""Pairs of perceptual hashes within a Hamming distance, found by an index instead of comparing every pair.

The data doctor looks for pictures whose 256-bit pHashes differ in at most
`engine.doctor.NEAR_DUPLICATE_DISTANCE` (40) bits. Comparing every pair costs n²/2
distances: 45 million at 10,000 images, 450 million at 30,000. This module finds exactly
the same pairs with multi-index hashing (Norouzi, Punjani and Fleet, "Fast exact search in
Hamming space with multi-index hashing", 2014):

* The 256 bits are cut into `m` blocks (16 by default, of 16 bits each; bit k goes to block
  k mod m, so each block mixes low and high DCT frequencies and no block is nearly constant).
* The pigeonhole principle, in its sharper form: write d = m·q + a with 0 ≤ a < m. Two hashes
  at most d bits apart differ in at most q bits in one of the first a + 1 blocks, or in at
  most q - 1 bits in one of the others (otherwise they would differ in at least
  (a + 1)(q + 1) + (m - a - 1)q = d + 1 bits). With d = 40 and m = 16: at most 2 bits in
  one of the first 9 blocks, or at most 1 in one of the other 7.
* Each block is an exact-match table (a bucket per 16-bit value). For every hash and block,
  the buckets of every value within that block's radius are read (137 values for radius 2,
  17 for radius 1); their members are candidates.
* Every candidate pair is checked on the full 256 bits; only pairs within d are kept, so
  the result is exactly what comparing every pair gives (`all_pairs_within`, kept for the
  tests that say so).

The work is a fixed number of table look-ups per hash plus one full check per candidate;
on real photos few pairs share a block's value within its radius, so the cost grows about
linearly with the number of images (docs/performance.md, `bench/scale.py`). Plain NumPy;
this module never imports TensorFlow.
"""

from __future__ import annotations

from itertools import combinations
from typing import Optional

import numpy as np

# Blocks of the index: 16 blocks of 16 bits make 65,536-entry tables, read with one gather.
DEFAULT_BLOCKS = 16
# Candidate pairs checked per NumPy call; bounds the memory of one step (about 50 MB).
CANDIDATES_PER_STEP = 1_000_000


def hashes_from_hex(hex_hashes: list[str]) -> np.ndarray:
    """Hex perceptual hashes (all the same length) as rows of big-endian 64-bit words.

    Raises:
        ValueError: the hashes differ in length or are not a multiple of 64 bits.
    """
    if not hex_hashes:
        return np.zeros((0, 0), dtype=np.uint64)
    lengths = {len(text) for text in hex_hashes}
    if len(lengths) != 1 or next(iter(lengths)) % 16:
        raise ValueError(f"Hashes must all have the same length, a multiple of 16 hex digits (64 bits); "
                         f"received lengths {sorted(lengths)}.")
    data = bytes.fromhex("".join(hex_hashes))
    words = next(iter(lengths)) // 16
    return np.frombuffer(data, dtype=">u8").astype(np.uint64).reshape(len(hex_hashes), words)


def hamming(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Bit differences between matching rows of two (n, words) uint64 arrays."""
    return np.bitwise_count(left ^ right).sum(axis=-1, dtype=np.int64)


def all_pairs_within(left: np.ndarray, right: Optional[np.ndarray], max_distance: int,
                     block_rows: int = 64) -> np.ndarray:
    """Every pair within `max_distance` bits, by comparing every pair (the reference the index must match).

    Args:
        left: (n, words) uint64 hashes.
        right: (k, words) uint64 hashes, or None to pair `left` with itself (pairs i < j only).
        max_distance: The largest Hamming distance kept.

    Returns:
        (p, 3) int64 rows [i, j, distance], sorted by i then j.
    """
    same = right is None
    right = left if same else right
    found = []
    for start in range(0, len(left), block_rows):
        rows = left[start:start + block_rows]
        offset = start if same else 0
        columns = right[offset:]
        distances = np.bitwise_count(rows[:, None, :] ^ columns[None, :, :]).sum(axis=2, dtype=np.int64)
        close = distances <= max_distance
        if same:
            close &= (offset + np.arange(len(columns)))[None, :] > (start + np.arange(len(rows)))[:, None]
        row_index, column_index = np.nonzero(close)
        if len(row_index):
            found.append(np.stack([row_index + start, column_index + offset,
                                   distances[row_index, column_index]], axis=1))
    return _sorted(np.concatenate(found) if found else np.zeros((0, 3), dtype=np.int64))


def block_plan(bits: int, max_distance: int, blocks: int = DEFAULT_BLOCKS) -> list[tuple[np.ndarray, int]]:
    """The index's blocks: for each, its bit positions and the radius searched in it.

    Bit k goes to block k mod `blocks`. With max_distance = blocks·q + a, the first a + 1
    blocks are searched within q bits and the others within q - 1 (a radius of -1 means
    the block is not searched); see the module docstring for why no pair is missed.

    Raises:
        ValueError: fewer than 1 or more blocks than bits, or a block wider than 24 bits
            (its table would not fit in memory), or a negative distance.
    """
    if max_distance < 0:
        raise ValueError(f"max_distance must be ≥ 0; received {max_distance}.")
    if not 1 <= blocks <= bits:
        raise ValueError(f"blocks must be between 1 and the number of bits ({bits}); received {blocks}.")
    if -(-bits // blocks) > 24:
        raise ValueError(f"{bits} bits in {blocks} blocks makes blocks wider than 24 bits, too large a table; "
                         f"use at least {-(-bits // 24)} blocks.")
    quotient, remainder = divmod(max_distance, blocks)
    return [(np.arange(block, bits, blocks), quotient if block <= remainder else quotient - 1)
            for block in range(blocks)]


def _masks(width: int, radius: int) -> np.ndarray:
    """Every `width`-bit value with at most `radius` bits set (the XOR patterns within a radius)."""
    masks = [0]
    for count in range(1, min(radius, width) + 1):
        masks += [sum(1 << bit for bit in chosen) for chosen in combinations(range(width), count)]
    return np.array(masks, dtype=np.int64)


def _highest_bit(values: np.ndarray) -> np.ndarray:
    """The highest set bit of each value (0 for 0)."""
    highest = np.zeros_like(values)
    positive = values > 0
    highest[positive] = 1 << (np.frexp(values[positive].astype(np.float64))[1] - 1).astype(np.int64)
    return highest


def _block_keys(bits_matrix: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The integer value of each row's bits at `positions` (first position = lowest bit)."""
    weights = (1 << np.arange(len(positions), dtype=np.int64))
    return bits_matrix[:, positions].astype(np.int64) @ weights


def _unpack(hashes: np.ndarray) -> np.ndarray:
    """(n, words) uint64 → (n, 64·words) 0/1 bits, most significant bit of the first word first."""
    as_bytes = hashes.astype(">u8").view(np.uint8).reshape(len(hashes), -1)
    return np.unpackbits(as_bytes, axis=1)


class _Table:
    """One block's exact-match table: members of each value, as start offsets into a sorted order."""

    def __init__(self, keys: np.ndarray, width: int):
        size = 1 << width
        self.order = np.argsort(keys, kind="stable")
        self.counts = np.bincount(keys, minlength=size)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])


def pairs_within(left: np.ndarray, right: Optional[np.ndarray], max_distance: int,
                 blocks: int = DEFAULT_BLOCKS) -> np.ndarray:
    """Every pair within `max_distance` bits, found with the multi-index (the same pairs as `all_pairs_within`).

    Args:
        left: (n, words) uint64 hashes.
        right: (k, words) uint64 hashes, or None to pair `left` with itself (pairs i < j only).
        max_distance: The largest Hamming distance kept.
        blocks: How many blocks the bits are cut into (see `block_plan`).

    Returns:
        (p, 3) int64 rows [i, j, distance], sorted by i then j; i indexes `left`, j `right`
        (or `left` again).

    Raises:
        ValueError: the two arrays have different widths.
    """
    same = right is None
    right = left if same else right
    if len(left) == 0 or len(right) == 0:
        return np.zeros((0, 3), dtype=np.int64)
    if left.shape[1] != right.shape[1]:
        raise ValueError(f"Both hash arrays need the same number of 64-bit words; received "
                         f"{left.shape[1]} and {right.shape[1]}.")
    bits = 64 * left.shape[1]
    left_bits = _unpack(left)
    right_bits = left_bits if same else _unpack(right)
    found = []
    for positions, radius in block_plan(bits, max_distance, blocks):
        if radius < 0:
            continue
        width = len(positions)
        query_keys = _block_keys(left_bits, positions)
        table_keys = query_keys if same else _block_keys(right_bits, positions)
        table = _Table(table_keys, width)
        masks = _masks(width, radius)
        # Enough masks per step that one step holds about CANDIDATES_PER_STEP look-ups.
        masks_per_step = max(1, CANDIDATES_PER_STEP // max(1, len(query_keys)))
        for first in range(0, len(masks), masks_per_step):
            step_masks = masks[first:first + masks_per_step]
            wanted = (query_keys[None, :] ^ step_masks[:, None]).ravel()
            counts = table.counts[wanted]
            if same:
                # Within one array the values v and v ^ mask meet twice, once from each side: only
                # the side whose value has the mask's highest bit clear asks (for mask 0, both).
                highest = _highest_bit(step_masks)
                counts = np.where((query_keys[None, :] & highest[:, None]).ravel() == 0, counts, 0)
            hit = np.nonzero(counts)[0]
            if not len(hit):
                continue
            counts = counts[hit]
            queries = np.repeat(hit % len(query_keys), counts)
            within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            members = table.order[np.repeat(table.starts[wanted[hit]], counts) + within]
            if same:
                # Mask 0 meets a bucket's members both ways round and each with itself: keep i < j.
                from_zero = np.repeat(step_masks[hit // len(query_keys)] == 0, counts)
                keep = ~from_zero | (queries < members)
                queries, members = queries[keep], members[keep]
                queries, members = np.minimum(queries, members), np.maximum(queries, members)
            for start in range(0, len(queries), CANDIDATES_PER_STEP):
                query_part = queries[start:start + CANDIDATES_PER_STEP]
                member_part = members[start:start + CANDIDATES_PER_STEP]
                distances = hamming(left[query_part], right[member_part])
                close = distances <= max_distance
                if close.any():
                    found.append(np.stack([query_part[close], member_part[close], distances[close]], axis=1))
    if not found:
        return np.zeros((0, 3), dtype=np.int64)
    # A pair close in several blocks was found once per block.
    return _sorted(np.unique(np.concatenate(found).astype(np.int64), axis=0))


def _sorted(pairs: np.ndarray) -> np.ndarray:
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))] if len(pairs) else pairs.reshape(0, 3).astype(np.int64)
