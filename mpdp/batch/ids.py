"""A compact set of request ids, for duplicate checks and resume on inputs of millions of lines.

A Python set of a million id strings costs ~100 MB; this keeps each id as its 64-bit hash in
one of 256 ``array('q')`` buckets (8 bytes an id), sorted once filled, and answers membership
by bisection. Two different ids can share a hash (about one chance in 10^7 for a million ids
against a million): callers that must be sure (duplicate ids) confirm on the real ids.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left

_BUCKETS = 256


class IdSet:
    def __init__(self) -> None:
        self._buckets = [array("q") for _ in range(_BUCKETS)]
        self._frozen = False
        self._len = 0

    def add(self, key: int) -> None:
        if self._frozen:
            raise RuntimeError("IdSet is frozen")
        self._buckets[key % _BUCKETS].append(key)
        self._len += 1

    def freeze(self) -> set[int]:
        """Sort the buckets (so lookups work); returns the keys that were added more than once."""
        repeated: set[int] = set()
        for i, bucket in enumerate(self._buckets):
            ordered = sorted(bucket)          # one bucket's Python ints at a time: ~1/256 of the ids
            for a, b in zip(ordered, ordered[1:]):
                if a == b:
                    repeated.add(a)
            self._buckets[i] = array("q", ordered)
        self._frozen = True
        return repeated

    def __contains__(self, key: int) -> bool:
        if not self._frozen:
            raise RuntimeError("freeze() the IdSet before lookups")
        bucket = self._buckets[key % _BUCKETS]
        i = bisect_left(bucket, key)
        return i < len(bucket) and bucket[i] == key

    def __len__(self) -> int:
        return self._len
