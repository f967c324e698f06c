"""The simulator's virtual clock and event queue.

Events fire in time order; events due at the same instant fire in the order they were scheduled (a sequence
number breaks the tie), so a run is a pure function of its inputs and seed.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

Handler = Callable[..., None]


class VirtualClock:
    """Simulated time in epoch seconds; it only moves forward, and only when the queue says so."""

    __slots__ = ("_now",)

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def __call__(self) -> float:
        return self._now

    @property
    def now(self) -> float:
        return self._now

    def advance_to(self, when: float) -> None:
        if when < self._now:
            raise ValueError(f"the clock cannot go back from {self._now} to {when}")
        self._now = when


class EventQueue:
    """A heap of ``(time, sequence, handler, args)``; :meth:`run` pops and calls each until none is left."""

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self._heap: list[tuple[float, int, Handler, tuple[Any, ...]]] = []
        self._sequence = 0
        self.fired = 0

    def __len__(self) -> int:
        return len(self._heap)

    def at(self, when: float, handler: Handler, *args: Any) -> None:
        """Schedule ``handler(*args)`` at ``when`` (never before now)."""
        if when < self.clock.now:
            raise ValueError(f"an event at {when} is in the past (now {self.clock.now})")
        self._sequence += 1
        heapq.heappush(self._heap, (when, self._sequence, handler, args))

    def after(self, delay: float, handler: Handler, *args: Any) -> None:
        self.at(self.clock.now + max(0.0, delay), handler, *args)

    def run(self, until: float | None = None) -> None:
        heap = self._heap
        pop = heapq.heappop
        clock = self.clock
        while heap:
            if until is not None and heap[0][0] > until:
                return
            when, _, handler, args = pop(heap)
            clock.advance_to(when)
            self.fired += 1
            handler(*args)
