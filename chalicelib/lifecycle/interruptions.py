"""Spot interruptions: a runner whose instance EC2 is about to take back takes no new job, and the job it loses is
retried once.

EC2 puts an "EC2 Spot Instance Interruption Warning" on the default event bus two minutes before it interrupts a
spot instance, and an "EC2 Instance Rebalance Recommendation" when the instance is at elevated risk of it
(sooner, or together with the warning; both best effort). On either, the runner record is marked draining (out
of the idle index, so scale-up no longer counts it as capacity) with the interruption recorded on it, and then
its GitLab runner is paused, so GitLab gives it no new job. The record first: when GitLab fails, the handler
raises, EventBridge's retry finds the mark and pauses again; a duplicate event finds the mark and does nothing
new (pausing a paused runner changes nothing), so each interruption is counted once.

When the instance then shuts down mid-job, gitlab-runner aborts the job with ``runner_system_failure`` (the
system interrupt of common/build.go). The webhook sees that failure on a runner whose record says it was
interrupted and asks scale-up, through the jobs queue, to retry the job; scale-up does so once per job, if the
runner's pool allows it (``retry_interrupted_jobs``), through GitLab's API. GitLab then makes a new pending job,
whose Job Hook is queued and launched for like any other. A rebalance recommendation alone kills nothing: the
runner finishes its job, takes no other, and powers off when its idle wait ends.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from chalicelib.errors import PayloadError
from chalicelib.observability import count, logger

if TYPE_CHECKING:
    from chalicelib.config import PoolConfig
    from chalicelib.gitlab_api import GitLabApi
    from chalicelib.intake.job_hooks import JobStatus
    from chalicelib.scaling.store import ScaleStore
    from chalicelib.scaling.store.records import RunnerRecord

SPOT_INTERRUPTION_WARNING = "EC2 Spot Instance Interruption Warning"
REBALANCE_RECOMMENDATION = "EC2 Instance Rebalance Recommendation"
# The failure reason gitlab-runner reports for a job the system interrupted it in (Build.run's SystemInterrupt
# case, gitlab-runner common/build.go); GitLab shows it as "There has been a runner system failure, please try
# again" (app/presenters/commit_status_presenter.rb).
RUNNER_SYSTEM_FAILURE = "runner_system_failure"

_InstanceId = Annotated[str, msgspec.Meta(pattern=r"^i-[0-9a-f]{8,17}$")]


class Interruption(str, Enum):
    """What EC2 said about an instance; the value is the draining reason the runner record gets."""

    SPOT_WARNING = "spot interruption warning"
    REBALANCE = "rebalance recommendation"


_KINDS = {SPOT_INTERRUPTION_WARNING: Interruption.SPOT_WARNING, REBALANCE_RECOMMENDATION: Interruption.REBALANCE}


class _Detail(msgspec.Struct, frozen=True):
    instance_id: _InstanceId = msgspec.field(name="instance-id")
    # hibernate, stop or terminate; the warning always carries it, the rebalance recommendation never.
    instance_action: str | None = msgspec.field(name="instance-action", default=None)


class InstanceInterruption(msgspec.Struct, frozen=True):
    """``aws.ec2`` "EC2 Spot Instance Interruption Warning" or "EC2 Instance Rebalance Recommendation".

    Decoded strictly where relied on (the detail type, an instance id, the warning's action), unknown fields
    ignored. Whatever the action (terminate, stop, hibernate) the runner loses its instance, so all are handled
    alike."""

    detail_type: str = msgspec.field(name="detail-type")
    detail: _Detail
    id: str = ""

    @property
    def kind(self) -> Interruption:
        return _KINDS[self.detail_type]

    @property
    def instance_id(self) -> str:
        return self.detail.instance_id

    @property
    def instance_action(self) -> str:
        return self.detail.instance_action or ""


def parse_interruption(event: Any) -> InstanceInterruption:
    try:
        interruption = msgspec.convert(event, InstanceInterruption)
    except msgspec.ValidationError as exc:
        raise PayloadError(f"not an instance interruption event: {exc}") from None
    if interruption.detail_type not in _KINDS:
        raise PayloadError(f"not an instance interruption event: {interruption.detail_type!r}")
    if interruption.kind is Interruption.SPOT_WARNING and not interruption.detail.instance_action:
        raise PayloadError("spot interruption warning without its instance-action")
    return interruption


# -- the retry decisions (pure) ------------------------------------------------------------------------------


def asks_for_retry(status: JobStatus, failure_reason: str | None, interrupted: bool) -> bool:
    """Whether a finished Job Hook is a job lost to an interruption: failed as ``runner_system_failure`` by a
    runner whose instance EC2 warned about. Any other failure (the script's, a timeout) is the job's own."""
    from chalicelib.intake.job_hooks import JobStatus

    return interrupted and status is JobStatus.FAILED and failure_reason == RUNNER_SYSTEM_FAILURE


# How many retries a job's chain may have had for a job lost to an interruption to be retried: none. A job that is
# itself a retry (of an earlier interruption, or a person's) is not retried by the fleet, so repeated
# interruptions never chain retries.
MAX_RETRIES_BEFORE = 0


class RetryDecision(str, Enum):
    RETRY = "retry"
    POOL_DOES_NOT_RETRY = "pool does not retry interrupted jobs"
    UNKNOWN_POOL = "pool no longer configured"
    RETRIED_BEFORE = "the job is a retry itself"
    NOT_FAILED = "the job is no longer failed as the interruption left it"


def decide_retry(pool: PoolConfig | None, retries_before: int = 0) -> RetryDecision:
    """Whether a job an interrupted runner of ``pool`` lost is retried (once: the claim on the job sees to that),
    from what the Job Hook said: the pool's setting and how many times the job had been retried before."""
    if pool is None:
        return RetryDecision.UNKNOWN_POOL
    if not pool.retry_interrupted_jobs:
        return RetryDecision.POOL_DOES_NOT_RETRY
    if retries_before > MAX_RETRIES_BEFORE:
        return RetryDecision.RETRIED_BEFORE
    return RetryDecision.RETRY


def still_retryable(status: str, failure_reason: str) -> bool:
    """What GitLab says of the job now, just before the retry: still failed as the interruption made it fail. A
    job a person cancelled, retried or played meanwhile is left as they left it."""
    return status == "failed" and failure_reason == RUNNER_SYSTEM_FAILURE


# -- the service ---------------------------------------------------------------------------------------------


class Interruptions:
    def __init__(self, store: ScaleStore, gitlab: GitLabApi) -> None:
        self._store = store
        self._gitlab = gitlab

    def handle(self, event: InstanceInterruption) -> str:
        """Mark the runner draining and interrupted, then pause it in GitLab. Raises (so EventBridge retries)
        only when GitLab or AWS fails; what it did: "handled", "duplicate" or "ignored"."""
        kind = event.kind
        facts = {
            "instance_id": event.instance_id,
            "reason": kind.value,
            "instance_action": event.instance_action,
            "event_id": event.id,
        }
        # A rebalance recommendation alone takes nothing: the runner drains, but is not marked interrupted, so a
        # job it fails for another reason is not taken for one the interruption cost.
        marked = self._store.runners.drain_runner(
            event.instance_id, kind.value, interruption=kind.value, interrupted=kind is Interruption.SPOT_WARNING
        )
        if marked is None:
            found = self._store.runners.runner(event.instance_id)
            if found is None or found.terminated or kind.value not in found.interruptions:
                # Not ours, terminated already, or done with its last build and powering off: nothing to stop.
                state = "none" if found is None else found.state.value
                logger.info("interruption ignored: no live runner", extra={**facts, "runner_state": state})
                return "ignored"
            # A duplicate, or EventBridge's retry after GitLab failed: pausing again is harmless, and needed then.
            self._pause(found, facts)
            logger.info("interruption already handled", extra={**facts, "pool": found.pool})
            return "duplicate"
        count("InterruptionsHandled")
        logger.info(
            "runner interrupted: draining",
            extra={**facts, "pool": marked.pool, "runner_state": marked.state.value, "busy": list(marked.busy)},
        )
        self._pause(marked, facts)
        return "handled"

    def _pause(self, record: RunnerRecord, facts: dict[str, Any]) -> None:
        runner_id = record.gitlab_runner_id
        if runner_id is None:
            # Its GitLab runner is still being made; the instance goes within two minutes either way.
            logger.info("interrupted runner has no GitLab runner yet", extra=facts)
            return
        known = self._gitlab.set_paused(runner_id, True)
        logger.info(
            "interrupted runner paused" if known else "interrupted runner unknown to GitLab",
            extra={**facts, "gitlab_runner_id": runner_id},
        )
