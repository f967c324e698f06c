"""Scaling policy: which pool takes a job, and how long a re-queued job waits. Pure functions, no I/O.

Pool choice: a pool can take a job when the job's tags are a subset of the pool's tags (an untagged job only
goes to pools with ``run_untagged``), which is GitLab's own rule for which runner may pick a job. When several
pools can, the one with the fewest tags wins (the tightest fit, which keeps specialised pools such as
privileged ``dind`` ones free for the jobs that need them); on a tie, the pool listed first in the stage
configuration. The choice is deterministic and can be steered by ordering the pools.

Idle runners: a runner with builds left takes the next matching job by itself, so a job its pool has an idle
runner for is given a short grace before anything is launched for it, and launched only if it is still pending
after that (see :func:`leave_to_idle_runners`).

Held jobs: a job delivered again while another launch holds its claim is a duplicate once that launch is done,
waits while a live invocation works on it, is claimed afresh when that launch failed or never took leases, and
resumes that launch when it stopped part way (see :func:`decide_held_job`).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from chalicelib.config import PoolConfig
from chalicelib.scaling.launches import LaunchState

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
    # Long enough for an idle gitlab-runner to ask for a job (it asks every 3 seconds by default) and for GitLab
    # to say so; short enough that a job nobody took still launches without a noticeable wait.
    idle_grace: int = 5

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


def leave_to_idle_runners(waiting: Sequence[tuple[int, bool]], idle: int) -> set[int]:
    """The jobs (of ``(job id, graced already)``, all pending and matched to one pool) to leave to the pool's
    ``idle`` runners for a grace: as many as runners are idle, oldest first, since GitLab hands a runner the oldest
    pending job it may run. A job that had its grace is never deferred again: it launches."""
    candidates = sorted(job_id for job_id, graced in waiting if not graced)
    return set(candidates[: max(0, idle)])


class HeldJob(str, Enum):
    """What to do with a job whose claim another launch holds."""

    DONE = "done"  # that launch made its runner: this copy is a duplicate
    IN_PROGRESS = "in_progress"  # a live invocation is at it: come back a little later
    RECLAIM = "reclaim"  # that launch failed or never took leases: release and claim afresh, in this batch
    RESUME = "resume"  # that launch stopped part way: take it over and finish it


def decide_held_job(
    state: LaunchState | None, *, claimed_at: float, started_at: float, now: float, stale_after: float
) -> HeldJob:
    """The decision for a held job, from its holding launch's state (None: no launch record yet).

    ``claimed_at`` is when the launch claimed the job, ``started_at`` when the launch record's current owner
    started on it; either is stale once older than ``stale_after`` seconds (the owner may still be alive until
    then: a Lambda cannot run longer).
    """
    stale_before = now - stale_after
    if state is LaunchState.LAUNCHED:
        return HeldJob.DONE
    if state is None:
        # Claimed, and no leases taken: a live invocation between its claim and its leases, or a dead one.
        return HeldJob.IN_PROGRESS if claimed_at > stale_before else HeldJob.RECLAIM
    if state is LaunchState.FAILED:
        return HeldJob.RECLAIM
    if state is LaunchState.INCOMPLETE:
        return HeldJob.RESUME
    # Launching or resuming: owned by an invocation until it goes silent.
    return HeldJob.IN_PROGRESS if started_at >= stale_before else HeldJob.RESUME
