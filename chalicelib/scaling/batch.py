"""What the steps of one scale-up batch share: a job as matched to its pool, the outcome every job ends in, the
batch's report, and how many calls of a batch are made at once."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from chalicelib.config import PoolConfig
from chalicelib.jobs_queue import QueuedJob

GITLAB_WORKERS = 8
# Independent DynamoDB writes of one batch (claims, tokens, identities) made at once.
WRITE_WORKERS = 8


class Outcome(str, Enum):
    LAUNCHED = "launched"
    NOT_PENDING = "not_pending"
    UNMATCHED = "unmatched"
    WAITING = "waiting"
    DEFERRED = "deferred"  # left to an idle runner of its pool for a grace
    RETRIED = "retried"
    DEAD_LETTERED = "dead_lettered"
    DUPLICATE = "duplicate"
    RETRIED_AFTER_INTERRUPTION = "retried_after_interruption"
    NOT_RETRIED = "not_retried"  # lost to an interruption, in a pool that does not retry such jobs


@dataclass
class BatchReport:
    outcomes: dict[Outcome, int] = field(default_factory=lambda: defaultdict(int))
    instances: list[str] = field(default_factory=list)

    def add(self, outcome: Outcome, n: int = 1) -> None:
        self.outcomes[outcome] += n

    def as_dict(self) -> dict[str, int]:
        return {o.value: n for o, n in self.outcomes.items() if n}


@dataclass(frozen=True)
class Matched:
    job: QueuedJob
    pool: PoolConfig
    tags: tuple[str, ...]


def job_log(job: QueuedJob) -> dict[str, Any]:
    return {"project_id": job.project_id, "job_id": job.job_id, "attempt": job.attempt}
