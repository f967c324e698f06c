"""EC2 instance state changes: keep the fleet table and the pools' capacity counters true.

When a runner instance is terminated (it powered off after its last build, was reaped, or lost its spot
capacity), its GitLab runner and any unread token are deleted and its capacity lease goes back to the pool, so a
waiting job can launch. EventBridge may deliver an event twice or late; the lease is returned at most once.

Order. What is ours in AWS goes first: the runner record is marked terminated (with ``token_cleanup`` and
``gitlab_cleanup`` marks, both ``pending``) and its lease returned in one transaction, then the token is deleted,
then the GitLab runner, and each mark is cleared once its deletion is done. EventBridge retries a failed
invocation twice and then drops the event, so a GitLab outage can outlast it: the lease is back at once, and the
terminated record still names the GitLab runner with its mark, for a retried event (or reconcile, which
finds it in the live index) to finish.
Every step is idempotent (a missing token or GitLab runner counts as deleted), so a duplicate or retried event
finishes whatever is left and does nothing more.

An instance terminated before scale-up recorded it gets a terminated tombstone record instead: scale-up's record
write is conditioned on no record existing, so it is refused, and scale-up gives that lease back from its launch
(see ``chalicelib.scaling.recording``). Terminating the record before deleting the token also closes the other race: a
token scale-up writes afterwards is followed by its identity write, which a terminated record refuses, and
scale-up then deletes that token and GitLab runner itself.
"""

from __future__ import annotations

from typing import Any

import msgspec

from chalicelib.errors import PayloadError, RetryableError
from chalicelib.gitlab_api import GitLabApi
from chalicelib.observability import count, logger
from chalicelib.scaling.store import ScaleStore
from chalicelib.scaling.tokens import RunnerTokens

STATE_CHANGE = "EC2 Instance State-change Notification"
# EC2's own name of the state (the event's ``detail.state``), not a runner-fleet state.
EC2_TERMINATED = "terminated"


class _StateDetail(msgspec.Struct, frozen=True):
    instance_id: str = msgspec.field(name="instance-id")
    state: str


class InstanceStateChange(msgspec.Struct, frozen=True):
    """``aws.ec2`` "EC2 Instance State-change Notification" (pending, running, stopping, stopped, ...).

    Decoded like the Job Hook: the fields relied on are strict, unknown ones ignored. The state stays a string:
    EC2 may add states, and an event in a state this release does not know is ignored, not refused.
    """

    detail_type: str = msgspec.field(name="detail-type")
    detail: _StateDetail

    @property
    def instance_id(self) -> str:
        return self.detail.instance_id

    @property
    def state(self) -> str:
        return self.detail.state


def parse_state_change(event: Any) -> InstanceStateChange:
    try:
        change = msgspec.convert(event, InstanceStateChange)
    except msgspec.ValidationError as exc:
        raise PayloadError(f"not an instance state-change event: {exc}") from None
    if change.detail_type != STATE_CHANGE:
        raise PayloadError(f"not an instance state-change event: {change.detail_type!r}")
    return change


class InstanceEvents:
    def __init__(self, store: ScaleStore, gitlab: GitLabApi, tokens: RunnerTokens) -> None:
        self._store = store
        self._gitlab = gitlab
        self._tokens = tokens

    def handle(self, change: InstanceStateChange) -> str:
        """Clean up after a terminated instance; raises (so EventBridge retries) only when GitLab or AWS fails."""
        if change.state != EC2_TERMINATED:
            return "ignored"
        return self.clean_up(change.instance_id, reason="instance terminated")

    def clean_up(self, instance_id: str, reason: str, *, pool: str = "") -> str:
        """The instance is gone (or going): terminate its record, give its lease back, delete its token and GitLab
        runner. Idempotent; raises ``RetryableError`` when GitLab fails (the record keeps its cleanup mark).
        ``pool`` (known from the instance's tag) goes on the tombstone of an instance that has no record."""
        termination = self._store.terminations.terminate_runner(instance_id, reason=reason, pool=pool)
        if termination.tombstone:
            if termination.newly:
                logger.info("instance terminated before its runner was recorded", extra={"instance_id": instance_id})
            return "terminated before recorded"
        record = termination.record
        assert record is not None  # only a tombstone has none
        if termination.newly:
            count("RunnersTerminated")
            logger.info("runner terminated; lease returned", extra={"instance_id": instance_id, "pool": record.pool})
        if not record.token_cleanup and not record.gitlab_cleanup:
            return "terminated" if termination.newly else "already terminated"
        # Ours in AWS first (the record and lease above, the token here), GitLab last: a GitLab outage then
        # leaves only the GitLab runner, named on the record, for a retried event or reconcile.
        if record.token_cleanup and record.token_key:
            self._tokens.delete(record.token_key)
        runner_id = record.gitlab_runner_id
        if record.gitlab_cleanup and runner_id is not None:
            try:
                self._gitlab.delete_runner(runner_id)
            except RetryableError as exc:
                self._store.terminations.finish_cleanup(instance_id, gitlab=False)
                logger.warning(
                    "GitLab runner left for cleanup",
                    extra={"instance_id": instance_id, "gitlab_runner_id": runner_id, "reason": exc.reason},
                )
                raise
        self._store.terminations.finish_cleanup(instance_id)
        logger.info("runner cleaned up", extra={"instance_id": instance_id, "gitlab_runner_id": runner_id})
        return "terminated" if termination.newly else "cleaned up"
