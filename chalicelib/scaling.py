"""Scaling policy: which pool takes a job, and how long a re-queued job waits. Pure functions, no I/O.

Pool choice: a pool can take a job when the job's tags are a subset of the pool's tags (an untagged job only
goes to pools with ``run_untagged``), which is GitLab's own rule for which runner may pick a job. When several
pools can, the one with the fewest tags wins (the tightest fit, which keeps specialised pools such as
privileged ``dind`` ones free for the jobs that need them); on a tie, the pool listed first in the stage
configuration. The choice is deterministic and can be steered by ordering the pools.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from chalicelib.config import PoolConfig

# SQS caps DelaySeconds at 15 minutes.
MAX_DELAY_SECONDS = 900


def can_take(pool: PoolConfig, job_tags: Iterable[str]) -> bool:
    tags = set(job_tags)
    if not tags:
        return pool.run_untagged
    return tags <= set(pool.tags)


def match_pool(job_tags: Sequence[str], pools: Sequence[PoolConfig]) -> PoolConfig | None:
    """The pool that should run a job with these tags, or None when no pool can."""
    candidates = [(len(pool.tags), index) for index, pool in enumerate(pools) if can_take(pool, job_tags)]
    if not candidates:
        return None
    return pools[min(candidates)[1]]


@dataclass(frozen=True)
class RetryPolicy:
    """How long re-queued jobs wait. The defaults suit AWS; the sandbox shortens them to keep demos brisk."""

    base_delay: float = 4.0
    lease_wait: float = 20.0

    def backoff_delay(self, attempt: int, rng: random.Random | None = None) -> int:
        """Seconds before attempt ``attempt + 1`` of a failed job: exponential with equal jitter, capped.

        Half of each exponential step is fixed (so retries really back off) and half random (so a burst of
        failures, say a throttled CreateFleet, does not come back as one burst).
        """
        step = min(MAX_DELAY_SECONDS, self.base_delay * 2 ** max(0, attempt - 1))
        jitter = (rng or random).uniform(0, step / 2)
        return int(max(1, min(MAX_DELAY_SECONDS, round(step / 2 + jitter))))

    def lease_wait_delay(self, waits: int, rng: random.Random | None = None) -> int:
        """Seconds a job whose pool is full waits before asking again; capacity frees as runners finish."""
        step = min(MAX_DELAY_SECONDS, self.lease_wait * (1 + min(waits, 5)))
        return int(max(1, min(MAX_DELAY_SECONDS, round(step * (0.75 + (rng or random).uniform(0, 0.5))))))
