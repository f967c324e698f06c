"""EC2 launches as EC2 refuses them, where moto launches anyway.

* :class:`FleetConfigRule`: CreateFleet whose overrides name one instance pool (an instance type in an
  Availability Zone) twice fails as a whole with ``InvalidFleetConfig``, "The fleet configuration contains
  duplicate instance pools." It is what two subnets of one zone crossed with the same instance types produce.
  moto launches such a fleet.
* :class:`SpotServiceLinkedRoleRule`: an account without the ``AWSServiceRoleForEC2Spot`` service-linked role
  launches no spot instance unless the caller may create that role (``iam:CreateServiceLinkedRole``), which the
  scale-up Lambda deliberately may not. RunInstances (and RequestSpotInstances) with spot market options fail with
  ``AuthFailure.ServiceLinkedRoleCreationNotPermitted``; an instant CreateFleet answers HTTP 200 with no instance
  and that code in ``Errors`` for every override. moto launches spot without any role.

Both rules read moto's own state in this process (the subnets' zones, the IAM roles, the launch templates), as
EC2 reads its own.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape

from fleetctl.sandbox.aws_rules.support import moto_account
from fleetctl.sandbox.aws_shim import AwsRequest, AwsResponse, Forward, Rule, aws_error

__all__ = [
    "DUPLICATE_POOLS_MESSAGE",
    "SPOT_ROLE_MESSAGE",
    "SPOT_ROLE_PATH",
    "FleetConfigRule",
    "SpotServiceLinkedRoleRule",
]

DUPLICATE_POOLS_MESSAGE = "The fleet configuration contains duplicate instance pools."
SPOT_ROLE_CODE = "AuthFailure.ServiceLinkedRoleCreationNotPermitted"
SPOT_ROLE_MESSAGE = (
    "The provided credentials do not have permission to create the service-linked role for EC2 Spot Instances."
)
# AWSServiceRoleForEC2Spot lives under this path; moto names the role it creates differently, so the path is
# what identifies it.
SPOT_ROLE_PATH = "/aws-service-role/spot.amazonaws.com/"

_EC2_NAMESPACE = "http://ec2.amazonaws.com/doc/2016-11-15/"
_CONFIG_KEY = re.compile(r"LaunchTemplateConfigs\.(\d+)\.LaunchTemplateSpecification\.(\w+)$")
_OVERRIDE_KEY = re.compile(r"LaunchTemplateConfigs\.(\d+)\.Overrides\.(\d+)\.([\w.]+)$")


@dataclass
class _LaunchTemplateConfig:
    spec: dict[str, str] = field(default_factory=dict)
    overrides: dict[int, dict[str, str]] = field(default_factory=dict)

    def ordered_overrides(self) -> list[dict[str, str]]:
        return [self.overrides[index] for index in sorted(self.overrides)]


def _launch_template_configs(pairs: Iterable[tuple[str, str]]) -> list[_LaunchTemplateConfig]:
    """CreateFleet's ``LaunchTemplateConfigs`` from the query pairs, in request order."""
    configs: dict[int, _LaunchTemplateConfig] = {}
    for key, value in pairs:
        if found := _CONFIG_KEY.match(key):
            configs.setdefault(int(found[1]), _LaunchTemplateConfig()).spec[found[2]] = value
        elif found := _OVERRIDE_KEY.match(key):
            config = configs.setdefault(int(found[1]), _LaunchTemplateConfig())
            config.overrides.setdefault(int(found[2]), {})[found[3]] = value
    return [configs[index] for index in sorted(configs)]


# ---- moto's state, read in-process -----------------------------------------------------------------------


def _ec2_backend(request: AwsRequest) -> Any:
    from moto.ec2.models import ec2_backends

    return ec2_backends[moto_account(request)][request.region]


def _template_version(request: AwsRequest, spec: dict[str, str]) -> Any | None:
    """The launch template version a specification names, or None when moto does not know it."""
    from moto.ec2.exceptions import EC2ClientError

    backend = _ec2_backend(request)
    try:
        if spec.get("LaunchTemplateId"):
            template = backend.get_launch_template(spec["LaunchTemplateId"])
        else:
            template = backend.get_launch_template_by_name(spec.get("LaunchTemplateName", ""))
        return template.get_version(spec.get("Version", "$Default"))
    except EC2ClientError:  # an unknown template or version is moto's to refuse, with its own error
        return None


def _zone_of(request: AwsRequest, override: dict[str, str]) -> str | None:
    zone = override.get("AvailabilityZone") or override.get("Placement.AvailabilityZone")
    if zone:
        return zone
    subnet = override.get("SubnetId")
    if not subnet:
        return None
    from moto.ec2.exceptions import EC2ClientError

    try:
        return str(_ec2_backend(request).get_subnet(subnet).availability_zone)
    except EC2ClientError:  # an unknown subnet is moto's to refuse, with its own error
        return None


def spot_role_exists(request: AwsRequest) -> bool:
    from moto.iam.models import iam_backends
    from moto.utilities.utils import get_partition

    roles = iam_backends[moto_account(request)][get_partition(request.region or "us-east-1")].roles
    return any(role.path == SPOT_ROLE_PATH for role in list(roles.values()))


# ---- the rules --------------------------------------------------------------------------------------------


class FleetConfigRule(Rule):
    """CreateFleet naming one instance pool (instance type x Availability Zone) twice: ``InvalidFleetConfig``."""

    name = "ec2-fleet-config"

    def handle(self, request: AwsRequest, forward: Forward) -> AwsResponse:
        if request.service != "ec2" or request.operation != "CreateFleet":
            return forward(request)
        seen: set[tuple[str, str]] = set()
        for config in _launch_template_configs(request.pairs):
            version = _template_version(request, config.spec)
            template_type = str(version.instance_type) if version is not None else ""
            for override in config.ordered_overrides():
                instance_type = override.get("InstanceType") or template_type
                zone = _zone_of(request, override)
                if not instance_type or zone is None:
                    continue
                if (instance_type, zone) in seen:
                    return aws_error(request, "InvalidFleetConfig", DUPLICATE_POOLS_MESSAGE, 400)
                seen.add((instance_type, zone))
        return forward(request)


class SpotServiceLinkedRoleRule(Rule):
    """Spot launches in an account without ``AWSServiceRoleForEC2Spot``: refused with
    ``AuthFailure.ServiceLinkedRoleCreationNotPermitted`` (the callers here never may create the role)."""

    name = "ec2-spot-role"

    def handle(self, request: AwsRequest, forward: Forward) -> AwsResponse:
        if request.service != "ec2":
            return forward(request)
        if request.operation == "CreateFleet":
            wants_spot = _fleet_wants_spot(request)
        elif request.operation in ("RunInstances", "RequestSpotInstances"):
            wants_spot = _instances_want_spot(request)
        else:
            return forward(request)
        if not wants_spot or spot_role_exists(request):
            return forward(request)
        if request.operation == "CreateFleet":
            return _fleet_refused(request)
        return aws_error(request, SPOT_ROLE_CODE, SPOT_ROLE_MESSAGE, 403)


def _fleet_wants_spot(request: AwsRequest) -> bool:
    params = request.params
    default = params.get("TargetCapacitySpecification.DefaultTargetCapacityType", "")
    spot = params.get("TargetCapacitySpecification.SpotTargetCapacity", "0")
    return default == "spot" or (spot.isdigit() and int(spot) > 0)


def _instances_want_spot(request: AwsRequest) -> bool:
    if request.operation == "RequestSpotInstances":
        return True
    if request.params.get("InstanceMarketOptions.MarketType") == "spot":
        return True
    # A launch template may ask for spot itself.
    spec = {
        key.removeprefix("LaunchTemplate."): value
        for key, value in request.params.items()
        if key.startswith("LaunchTemplate.")
    }
    if not spec:
        return False
    version = _template_version(request, spec)
    data = version.data if version is not None else {}
    return bool((data.get("InstanceMarketOptions") or {}).get("MarketType") == "spot")


def _fleet_refused(request: AwsRequest) -> AwsResponse:
    """An instant fleet's answer when no spot instance may launch: HTTP 200, no instance, one error per override.

    A request that also asks for on-demand capacity is refused whole here (AWS would launch the on-demand part);
    runner-fleet never mixes the two in one call.
    """
    items = []
    for config in _launch_template_configs(request.pairs):
        version = _template_version(request, config.spec)
        template_id = str(version.template.id) if version is not None else config.spec.get("LaunchTemplateId", "")
        template_name = str(version.template.name) if version is not None else config.spec.get("LaunchTemplateName")
        spec = _xml_members(
            {
                "launchTemplateId": template_id,
                "launchTemplateName": template_name,
                "version": config.spec.get("Version"),
            }
        )
        for override in config.ordered_overrides() or [{}]:
            members = _xml_members(
                {
                    "instanceType": override.get("InstanceType"),
                    "subnetId": override.get("SubnetId"),
                    "availabilityZone": _zone_of(request, override),
                }
            )
            items.append(
                "<item><launchTemplateAndOverrides>"
                f"<launchTemplateSpecification>{spec}</launchTemplateSpecification>"
                f"<overrides>{members}</overrides>"
                "</launchTemplateAndOverrides>"
                "<lifecycle>spot</lifecycle>"
                f"<errorCode>{SPOT_ROLE_CODE}</errorCode><errorMessage>{escape(SPOT_ROLE_MESSAGE)}</errorMessage>"
                "</item>"
            )
    request_id = str(uuid.uuid4())
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<CreateFleetResponse xmlns="{_EC2_NAMESPACE}"><requestId>{request_id}</requestId>'
        f"<fleetId>fleet-{uuid.uuid4()}</fleetId>"
        f"<errorSet>{''.join(items)}</errorSet><fleetInstanceSet/></CreateFleetResponse>"
    )
    headers = [("Content-Type", "text/xml;charset=UTF-8"), ("x-amzn-RequestId", request_id)]
    return AwsResponse(200, headers, body.encode())


def _xml_members(values: dict[str, str | None]) -> str:
    return "".join(f"<{key}>{escape(value)}</{key}>" for key, value in values.items() if value)


class LaunchTemplateTags(Rule):
    """An instance launched from a launch template carries ``aws:ec2launchtemplate:id`` and
    ``aws:ec2launchtemplate:version``, the version it was launched from (``$Default`` resolved at launch).

    Source: the EC2 User Guide, "Launch an instance from a launch template" ("Amazon EC2 ... adds the following
    tags to the instance: aws:ec2launchtemplate:id, aws:ec2launchtemplate:version"), for instances an EC2 Fleet
    launches from the template too. moto adds them on RunInstances only, not on CreateFleet's instances, which
    would leave reconcile unable to tell a runner launched before an image promotion from one launched after.
    The version is resolved before the launch, as EC2 resolves it when it launches; all the fleet's instances get
    the first launch template configuration's (runner-fleet sends one).
    """

    name = "ec2-launch-template-tags"

    def handle(self, request: AwsRequest, forward: Forward) -> AwsResponse:
        if request.service != "ec2" or request.operation != "CreateFleet":
            return forward(request)
        configs = _launch_template_configs(request.pairs)
        version = _template_version(request, configs[0].spec) if configs else None
        response = forward(request)
        if version is None or response.status != 200:
            return response
        from fleetctl.sandbox.aws_rules.ec2_state_events import launched_instances

        instance_ids = launched_instances(response.body)
        if instance_ids:
            tags = {
                "aws:ec2launchtemplate:id": version.template.id,
                "aws:ec2launchtemplate:version": str(version.number),
            }
            # Each instance's tags replaced by a new dict, never added to in place: moto serves requests on threads
            # and a DescribeInstances iterating the old dict meanwhile would fail ("dictionary changed size").
            backend_tags = _ec2_backend(request).tags
            for instance_id in instance_ids:
                backend_tags[instance_id] = {**backend_tags.get(instance_id, {}), **tags}
        return response
