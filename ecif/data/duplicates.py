"""Exact copies of a pair: rows whose image and text embeddings are the same, bit for bit.

Web-scale sets hold the same pair many times (one image and caption scraped from several
pages). An audit treats a pair, not a row, as the unit: its copies are left out of the fit
(they are in no batch, so none is another's false negative and no pair counts twice) and
each copy carries its pair's scores. ``first_copies`` finds them with one pass of integer
hashing over the rows, then checks every match exactly.
"""

from __future__ import annotations

import numpy as np

_CHUNK_ROWS = 16_384


def _row_hashes(arr: np.ndarray, seed: int) -> np.ndarray:
    """A 64-bit hash of each row's bytes: a sum of the row's words times fixed odd numbers,
    wrapping modulo 2**64 (equal rows hash equal; unequal rows collide with probability
    about 2**-64, and ``first_copies`` checks every match anyway)."""
    arr = np.asarray(arr)
    size = arr.dtype.itemsize
    words = np.ascontiguousarray(arr).view(f"u{size}" if size in (1, 2, 4, 8) else np.uint8)
    width = words.shape[1]
    mult = np.random.default_rng(seed).integers(1, 2**63, size=width, dtype=np.uint64) * 2 + 1
    out = np.empty(len(arr), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for start in range(0, len(arr), _CHUNK_ROWS):
            block = words[start : start + _CHUNK_ROWS].astype(np.uint64)
            out[start : start + _CHUNK_ROWS] = (block * mult).sum(axis=1, dtype=np.uint64)
    return out


def first_copies(image: np.ndarray, text: np.ndarray) -> np.ndarray:
    """For every row, the position of the first row with the same image and text embeddings
    (its own position when no earlier row has them). ``first_copies(...)[i] != i`` marks the
    copies; ``values[first]`` gives every copy its pair's value."""
    return first_equal_rows(image, text)


def first_equal_rows(*arrays: np.ndarray) -> np.ndarray:
    """For every row, the position of the first row equal to it, bit for bit, in every one of
    the row-aligned ``arrays`` (one array: the rows that hold the same image, say)."""
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"row-aligned arrays differ in length: {[len(a) for a in arrays]}")
    key = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k, arr in enumerate(arrays):
            key = key * np.uint64(0x9E3779B97F4A7C15) + _row_hashes(arr, k + 1)
    order = np.argsort(key, kind="stable")  # equal keys keep their row order
    first = np.arange(n, dtype=np.int64)
    sorted_key = key[order]
    starts = np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]])
    group_head = order[np.repeat(starts, np.diff(np.r_[starts, n]))]  # first row of each hash
    later = np.flatnonzero(group_head != order)  # sorted positions of the later rows
    rows, heads = order[later], group_head[later]
    same = np.ones(len(rows), dtype=bool)
    for start in range(0, len(rows), _CHUNK_ROWS):  # check every match exactly
        r, h = rows[start : start + _CHUNK_ROWS], heads[start : start + _CHUNK_ROWS]
        for arr in arrays:
            same[start : start + _CHUNK_ROWS] &= _equal_rows(arr, r, h)
    first[rows[same]] = heads[same]
    for r in np.unique(heads[~same]):  # a hash collision (about 2**-64 a pair): slowly
        _resolve(arrays, order[sorted_key == key[r]], first)
    return first


def _equal_rows(arr: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether rows ``a`` and ``b`` of ``arr`` hold the same bits."""
    left, right = np.ascontiguousarray(arr[a]), np.ascontiguousarray(arr[b])
    return (left.view(np.uint8) == right.view(np.uint8)).reshape(len(a), -1).all(axis=1)


def _resolve(arrays, rows: np.ndarray, first: np.ndarray) -> None:
    """Within rows that share a hash, point each at the first row exactly equal to it."""
    left = list(np.sort(rows))
    while left:
        head, rest = left[0], left[1:]
        same = [r for r in rest if all(np.array_equal(a[r], a[head]) for a in arrays)]
        first[same] = head
        taken = set(same)
        left = [r for r in rest if r not in taken]


def image_groups(image: np.ndarray) -> np.ndarray:
    """Each row's image as a group number, 0, 1, ... in the order images first appear (rows
    with the same image embedding, bit for bit, share one: COCO's five captions of a photo).
    A set with one caption per image gets ``0, 1, ..., n-1``, so a split by group is then
    the same as a split by row."""
    return np.unique(first_equal_rows(np.asarray(image)), return_inverse=True)[1].ravel()


def image_halves(image: np.ndarray, seed: int) -> list[np.ndarray]:
    """Two seeded halves of the rows (positions, in order) with all of an image's rows in one
    half, for cross-fitting: where an image has several captions, the other half's proxy
    validation pairs would otherwise hold the same photo. One caption per image gives the
    row split ``default_rng(seed).permutation(n) % 2``. Falls back to that row split when
    keeping images whole leaves a half under a quarter of the rows (a few images hold most)."""
    groups = image_groups(image)
    fold = np.random.default_rng(seed).permutation(groups.max() + 1)[groups] % 2
    if min(np.count_nonzero(fold == 0), np.count_nonzero(fold == 1)) < len(fold) // 4:
        fold = np.random.default_rng(seed).permutation(len(fold)) % 2
    return [np.flatnonzero(fold == k) for k in (0, 1)]


def copy_count(first: np.ndarray) -> int:
    """How many rows are copies of an earlier row."""
    return int(np.count_nonzero(first != np.arange(len(first))))


def distinct_rows(first: np.ndarray) -> np.ndarray:
    """Positions of the rows that are no earlier row's copy, in order."""
    return np.flatnonzero(first == np.arange(len(first)))


class CopiedPairsWarning(UserWarning):
    """Rows that are exact copies of an earlier row: audited once, as one pair."""


COPIES = "exact copies of an earlier row"  # in copies_note's text: what readers match


def copies_note(first: np.ndarray, what: str = "training") -> str | None:
    """What an audit says when the set holds copies (None when it holds none)."""
    count = copy_count(first)
    if not count:
        return None
    n = len(first)
    return (
        f"{count:,} of the {n:,} {what} rows ({count / n:.1%}) are {COPIES} (the same image "
        f"and text embeddings): the {n - count:,} distinct pairs were fit and scored once "
        "each, and every copy carries its pair's scores and flag (duplicates='keep', "
        "`--duplicates keep`, audits every row as it is)"
    )
