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


def instance_profile_name(fleet: str) -> str:
    """The runner instances' IAM instance profile, and the role inside it, which has the same name."""
    return f"{fleet}-runner"
