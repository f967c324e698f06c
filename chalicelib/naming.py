"""Names and tag keys that ``fleetctl bootstrap`` creates and the Lambdas later rely on.

Both sides derive them from here, so a renamed resource cannot leave scale-up launching from a template, or
writing a token to a path, that bootstrap never made and the instance role cannot read. Lambdas cannot import
``fleetctl``, hence this lives in ``chalicelib``; it imports nothing heavy, so it costs no cold-start time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

# Tags on every runner instance and its volumes, set by the launch template.
FLEET_TAG = "runner-fleet:fleet"
POOL_TAG = "runner-fleet:pool"
# Scale-up tags each instance with the launch that made it, so a retried launch can find and adopt it.
LAUNCH_TAG = "runner-fleet:launch-id"


def runner_description(fleet: str, pool: str, instance_id: str) -> str:
    """The GitLab runner's description: names its instance, so a runner whose creation answer was lost is found
    again by it, and an operator sees in GitLab which instance runs a job."""
    return f"runner-fleet {fleet}/{pool} {instance_id}"


def described_instance(description: str | None) -> str | None:
    """The instance id a runner description names (see :func:`runner_description`), or None for another runner's."""
    parts = (description or "").split(" ")
    if len(parts) != 3 or parts[0] != "runner-fleet" or not parts[2].startswith("i-"):
        return None
    return parts[2]


def events_dead_letter_queue_name(fleet: str) -> str:
    """The SQS queue that keeps the EventBridge events an event handler failed on after its retries.

    The deployment stack creates it (``fleetctl/stack_template.py``) and names it the Lambdas' on-failure
    destination; the handlers' policies (``fleetctl/lambda_policies.py``) let Lambda send to it."""
    return f"{fleet}-events-dlq"


def launch_template_name(fleet: str, pool: str) -> str:
    """The EC2 launch template of one pool."""
    return f"{fleet}-{pool}"


# IAM's limit on a role name (and so on the instance profile of the same name).
_ROLE_NAME_MAX = 64


def runner_role_path(fleet: str) -> str:
    """The IAM path of the fleet's pool roles and instance profiles: bootstrap finds the ones it made by it."""
    return f"/runner-fleet/{fleet}/"


def runner_role_name(fleet: str, pool: str) -> str:
    """One pool's runner role, and the instance profile holding it, which has the same name.

    ``<fleet>-<pool>-runner``; when that passes IAM's 64 characters (a long fleet and pool name), it is cut and
    ends with a hash of the fleet and pool instead, so two pools never share a role."""
    name = f"{fleet}-{pool}-runner"
    if len(name) <= _ROLE_NAME_MAX:
        return name
    import hashlib

    digest = hashlib.sha256(f"{fleet}/{pool}".encode()).hexdigest()[:10]
    return f"{name[: _ROLE_NAME_MAX - len(digest) - 1]}-{digest}"


def runner_role_arn(fleet: str, pool: str, account: str = "*") -> str:
    """The ARN of a pool's runner role (its path included), as IAM policies name it."""
    return f"arn:aws:iam::{account}:role{runner_role_path(fleet)}{runner_role_name(fleet, pool)}"


class FleetOwner:
    """The mark this fleet puts on every GitLab runner it creates (the runner's maintenance note), by which
    reconcile tells its runners from those of another fleet of the same name on the same GitLab scope (in another
    account or region, or over another table), and how old one is (GitLab's runner API shows no creation time):
    the fleet's name, account, region and table, which no other fleet shares, then when the runner was made. The
    account is read once per process, with ``sts:GetCallerIdentity`` (which needs no permission); ``sts`` is
    called only then."""

    MADE = "; made "

    def __init__(self, fleet: str, table: str, sts: Callable[[], Any]) -> None:
        self._fleet = fleet
        self._table = table
        self._sts = sts
        self._mark: str | None = None
        self._lock = threading.Lock()

    def mark(self) -> str:
        """What every runner of this fleet's note begins with."""
        if self._mark is None:
            with self._lock:
                if self._mark is None:
                    client = self._sts()
                    account = client.get_caller_identity()["Account"]
                    region = client.meta.region_name
                    self._mark = f"runner-fleet {self._fleet}: account {account}, region {region}, table {self._table}"
        return self._mark

    def note(self, made_at: float) -> str:
        """The maintenance note of a runner made at ``made_at`` (epoch seconds)."""
        return f"{self.mark()}{self.MADE}{datetime.fromtimestamp(made_at, UTC).isoformat(timespec='seconds')}"

    def made_at(self, note: str) -> float | None:
        """When the runner whose maintenance note is ``note`` was made, if it is this fleet's; None otherwise
        (another fleet's, or a note nobody of ours wrote)."""
        mark, separator, made = note.partition(self.MADE)
        if not separator or mark != self.mark():
            return None
        try:
            return datetime.fromisoformat(made).timestamp()
        except ValueError:
            return None
