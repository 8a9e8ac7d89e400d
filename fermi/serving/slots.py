"""The slots of the one KV cache every request shares, and the prefix each keeps.

A finished request's slot keeps its tokens' keys and values. A new request takes
the free slot whose kept tokens it continues (a conversation's next turn, or a
regeneration), or one whose kept tokens it mostly reuses (the same long document,
another question); otherwise the least recently used free slot, whose kept
prefix is lost to it (but for what the two happen to share). A slot idle longer
than the TTL forgets its prefix."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

# A kept prefix is "continued" by a prompt that shares all its tokens but these
# last few: re-tokenizing at a turn boundary may cut one token differently.
SLACK = 2


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Slot:
    index: int
    ids: list[int] = field(default_factory=list)  # the tokens whose keys and values the cache holds
    last_used: float = 0.0
    busy: bool = False  # held by a request (or by the settle after one)


class SlotStore:
    def __init__(self, n: int, ttl_s: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.slots = [Slot(i) for i in range(n)]
        self.ttl, self.clock = ttl_s, clock

    def __len__(self) -> int:
        return len(self.slots)

    def __getitem__(self, i: int) -> Slot:
        return self.slots[i]

    def choose(self, ids: list[int], settling: set[int] = frozenset()) -> Slot | None:
        """The slot for a prompt of `ids`, or None while none is free. A slot still
        settling (the end of a turn being re-rendered) counts as a candidate: the
        prompt that continues it waits for it rather than start over elsewhere."""
        self.expire()
        candidates = [s for s in self.slots if not s.busy or s.index in settling]
        best, shared = None, 0
        for s in sorted(candidates, key=lambda s: s.last_used):  # ties go to the most recent
            n = common_prefix(s.ids, ids)
            if n and n >= shared:
                best, shared = s, n
        if best is not None and (shared >= min(len(best.ids), len(ids)) - SLACK or 2 * shared >= len(best.ids)):
            return None if best.busy else best
        free = [s for s in self.slots if not s.busy]
        return min(free, key=lambda s: s.last_used) if free else None

    def acquire(self, slot: Slot) -> None:
        slot.busy, slot.last_used = True, self.clock()

    def release(self, slot: Slot, ids: list[int]) -> None:
        slot.ids, slot.busy, slot.last_used = list(ids), False, self.clock()

    def expire(self) -> list[Slot]:
        """Free slots idle past the TTL forget their prefix; returns them."""
        if self.ttl is None:
            return []
        now = self.clock()
        old = [s for s in self.slots if not s.busy and s.ids and now - s.last_used > self.ttl]
        for s in old:
            s.ids = []
        return old
