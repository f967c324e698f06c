"""EC2 instance state changes: keep the fleet table and the pools' capacity counters true.

When a runner instance is terminated (it powered off after its last build, was reaped, or lost its spot
capacity), its GitLab runner and any unread token are deleted and its capacity lease goes back to the pool, so a
waiting job can launch. EventBridge may deliver an event twice or late; the lease is returned at most once.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from chalicelib.errors import PayloadError
from chalicelib.gitlab_api import GitLabApi
from chalicelib.observability import count, logger
from chalicelib.runner_tokens import RunnerTokens
from chalicelib.store import ScaleStore, runner_key

STATE_CHANGE = "EC2 Instance State-change Notification"


class _StateDetail(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    instance_id: str = Field(alias="instance-id")
    state: str


class InstanceStateChange(BaseModel):
    """``aws.ec2`` "EC2 Instance State-change Notification" (pending, running, stopping, stopped, ...)."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    detail_type: str = Field(alias="detail-type")
    detail: _StateDetail

    @property
    def instance_id(self) -> str:
        return self.detail.instance_id

    @property
    def state(self) -> str:
        return self.detail.state


def parse_state_change(event: Any) -> InstanceStateChange:
    try:
        change = InstanceStateChange.model_validate(event)
    except ValidationError as exc:
        raise PayloadError(f"not an instance state-change event: {exc.error_count()} problem(s)") from None
    if change.detail_type != STATE_CHANGE:
        raise PayloadError(f"not an instance state-change event: {change.detail_type!r}")
    return change


class InstanceEvents:
    def __init__(self, store: ScaleStore, gitlab: GitLabApi, tokens: RunnerTokens) -> None:
        self._store = store
        self._gitlab = gitlab
        self._tokens = tokens

    def handle(self, change: InstanceStateChange) -> str:
        if change.state != "terminated":
            return "ignored"
        record = self._store.get(runner_key(change.instance_id))
        if record is None:
            return "unknown instance"
        if record.get("state") == "terminated":
            return "already terminated"
        # GitLab first: if it fails, the event is retried and the lease is still there to give back then.
        runner_id = record.get("gitlab_runner_id")
        if runner_id is not None:
            self._gitlab.delete_runner(int(runner_id))
        self._tokens.delete(change.instance_id)
        if self._store.terminate_runner(change.instance_id, reason="instance terminated") is None:
            return "already terminated"
        count("RunnersTerminated")
        logger.info(
            "runner terminated; lease returned",
            extra={"instance_id": change.instance_id, "pool": record.get("pool"), "gitlab_runner_id": runner_id},
        )
        return "terminated"
