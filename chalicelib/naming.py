"""Names and tag keys that ``fleetctl bootstrap`` creates and the Lambdas later rely on.

Both sides derive them from here, so a renamed resource cannot leave scale-up launching from a template, or
writing a token to a path, that bootstrap never made and the instance role cannot read. Lambdas cannot import
``fleetctl``, hence this lives in ``chalicelib``; it imports nothing, so it costs no cold-start time.
"""

from __future__ import annotations

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
