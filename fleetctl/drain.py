"""``fleetctl drain`` and ``undrain``: stop a pool's launches and empty it, or let it launch again.

Draining marks the pool's counter item (``POOL#<pool>``, ``drained_at``). From then on scale-up launches nothing for
the pool: its jobs wait as they wait for capacity, spending no attempt, and each carries the pool it waits for
(``fleetctl status`` counts them). Reconcile pauses the pool's runners for retirement, busy or idle, and retires each
once it runs nothing (a busy one finishes its job and takes no other), and keeps the pool from being warm. Undrain
removes the mark: the waiting jobs launch at their next turn in the queue.

The progress is read from the table's index of live records (one Query each of runners and jobs) and the pool's
counter, read consistently: the pool is empty once its counter holds no lease (every live runner and launch holds
one) and no live runner record is left.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from chalicelib.scaling.store import ScaleStore
from chalicelib.store import RunnerState
from fleetctl.status import waiting_for


@dataclass(frozen=True)
class DrainProgress:
    """A drained pool's way to empty: its live runners by state, its leases and the jobs waiting for it."""

    pool: str
    drained: bool
    leases: int
    jobs_waiting: int
    runners: dict[str, int] = field(default_factory=dict)

    @property
    def runners_left(self) -> int:
        return sum(self.runners.values())

    @property
    def empty(self) -> bool:
        return not self.leases and not self.runners_left

    def line(self) -> str:
        states = ", ".join(f"{state} {n}" for state, n in sorted(self.runners.items()))
        return (
            f"{self.pool}: {self.runners_left} runner(s) left ({states or 'none'}), {self.leases} lease(s) held, "
            f"{self.jobs_waiting} job(s) waiting"
        )


def drain_progress(store: ScaleStore, pool: str) -> DrainProgress:
    """Where the pool is now (see the module docstring for what each figure is read from)."""
    counter = store.capacity.pool_counter(pool)
    runners: Counter[str] = Counter(
        str(item.get("state", ""))
        for item in store.live_records("runner")
        if item.get("pool") == pool and item.get("state") != RunnerState.TERMINATED.value
    )
    waiting = sum(1 for item in store.live_records("job") if waiting_for(item) == pool)
    return DrainProgress(pool, counter.drained, counter.leases, waiting, dict(runners))
