"""Turning "N runners for pool P" into EC2 instances, with one CreateFleet call per launch.

CreateFleet of type ``instant`` is the one EC2 call that takes many instance types and subnets at once, lets
EC2 pick the spot pools least likely to be interrupted, and answers synchronously with the instances it made.
Its answers need care, which is why they are read in one place:

* partial success (some instances and some errors) and total failure (no instance, only errors) are both
  ordinary HTTP 200 answers, so an empty ``Instances`` is not an exception;
* a retried call must not make a second set of instances: the ``ClientToken`` is derived from the launch id,
  so AWS answers a repeat with the first call's fleet, provided the repeat sends the very same parameters
  (otherwise it is refused with ``IdempotentParameterMismatch``): a launch's requests are planned once
  (:class:`LaunchPlan`), kept with the launch, and sent again unchanged;
* a call that got no answer may have launched instances: it is reported as such
  (:class:`LaunchOutcomeUnknownError`), for the launch to be resumed with its plan, never made anew;
* a caller that dies between CreateFleet and recording its instances can find them by the launch-id
  tag (:meth:`FleetLauncher.find_launched`), because every instance is tagged at creation.

Building the request and reading the answer are pure functions over plain data; :class:`FleetLauncher` is the
thin layer that performs the calls with an injected EC2 client.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from chalicelib.aws import error_code
from chalicelib.config import Market, PoolConfig
from chalicelib.errors import RetryableError, RunnerFleetError
from chalicelib.naming import FLEET_TAG, LAUNCH_TAG, POOL_TAG

__all__ = [
    "CAPACITY_ERROR_CODES",
    "TAG_FLEET",
    "TAG_LAUNCH",
    "TAG_POOL",
    "THROTTLING_ERROR_CODES",
    "FleetError",
    "FleetLauncher",
    "FleetOutcome",
    "LaunchOutcomeUnknownError",
    "LaunchPlan",
    "LaunchRefusedError",
    "LaunchResult",
    "LaunchTemplateRef",
    "LaunchedInstance",
    "Lifecycle",
    "build_fleet_request",
    "classify_fleet_result",
    "client_token",
    "fallback_request",
    "plan_launch",
    "shared_zones",
]

TAG_FLEET = FLEET_TAG
TAG_POOL = POOL_TAG
TAG_LAUNCH = LAUNCH_TAG

# Error codes meaning "EC2 has no capacity for this request right now": another pool, another lifecycle or a
# later attempt may succeed, so they lead to the on-demand fallback or a retry, never to a dead letter.
CAPACITY_ERROR_CODES = frozenset(
    {
        # The chosen type has no capacity in that zone (spot or on-demand), or EC2 cannot place any instance
        # of the request at all. UnfulfillableCapacity is often a filler listed next to the real cause.
        "InsufficientInstanceCapacity",
        "InsufficientCapacity",
        "UnfulfillableCapacity",
        # Spot-specific: the account's spot vCPU limit is reached, or the spot price is above our max price.
        "MaxSpotInstanceCountExceeded",
        "SpotMaxPriceTooLow",
        # The type is not offered in that zone (new families roll out zone by zone); another override may be.
        "Unsupported",
        # Dedicated hosts or capacity reservations backing the request are full.
        "InsufficientHostCapacity",
        "InsufficientReservedInstanceCapacity",
        # The subnet ran out of IP addresses; another subnet may have some.
        "InsufficientFreeAddressesInSubnet",
    }
)

# "Unsupported" as the error of the whole call (not of one override in ``Errors``) means the request itself is
# one EC2 will not take (a lifecycle or option the account or region does not offer): no later attempt succeeds.
_CALL_CAPACITY_ERROR_CODES = CAPACITY_ERROR_CODES - {"Unsupported"}

# botocore's standard retry mode already retried these with backoff; if they still surface, the launch should
# be retried later (with the same launch id) rather than failed.
THROTTLING_ERROR_CODES = frozenset(
    {
        "RequestLimitExceeded",  # EC2's throttling code, sent with HTTP 503
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "RequestThrottledException",
        "EC2ThrottledException",
        "TooManyRequestsException",
        "PriorRequestNotComplete",
    }
)

# Codes EC2 sends for its own transient failures; they normally come with a 5xx status, named here too in
# case a proxy rewrites the status.
_TRANSIENT_ERROR_CODES = frozenset({"InternalError", "InternalFailure", "ServiceUnavailable", "Unavailable"})


class LaunchRefusedError(RunnerFleetError):
    """EC2 refused a launch for a reason no retry fixes (permissions, a missing template, a bad parameter).

    ``code`` is the AWS error code, which scale-up dead-letters the jobs with.
    """

    def __init__(self, code: str, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(reason)


class LaunchOutcomeUnknownError(RetryableError):
    """CreateFleet got no answer (a timeout, a dropped connection) or AWS's own 5xx: instances may exist or not.

    The launch must not be given up and made again under another launch id, which would leave whatever the
    first call made to nobody: it is resumed, and the same request, with the same ``ClientToken``, is sent
    again, which EC2 answers with the first call's fleet if it made one.
    """


class Lifecycle(str, Enum):
    """How an instance is bought; the values are the ones EC2 uses in CreateFleet answers."""

    SPOT = "spot"
    ON_DEMAND = "on-demand"


@dataclass(frozen=True)
class LaunchTemplateRef:
    """The launch template a pool launches from.

    ``$Default`` rather than ``$Latest``: the default version is the one an operator promoted on purpose, and
    moto answers HTTP 500 to ``$Latest`` once a template has a second version.
    """

    name: str
    version: str = "$Default"


@dataclass(frozen=True)
class LaunchedInstance:
    """One instance EC2 made for a launch. ``subnet_id`` is None only when EC2 could not say which."""

    instance_id: str
    instance_type: str
    subnet_id: str | None
    lifecycle: Lifecycle


@dataclass(frozen=True)
class FleetError:
    """One entry of CreateFleet's ``Errors``: a pool (type, subnet, lifecycle) EC2 could not launch in.

    A record of what EC2 answered, not an exception: CreateFleet reports these inside a successful answer.
    """

    code: str
    message: str
    instance_type: str | None
    subnet_id: str | None
    lifecycle: Lifecycle | None

    @property
    def capacity(self) -> bool:
        """True when another pool, the on-demand fallback or a later attempt may succeed."""
        return self.code in CAPACITY_ERROR_CODES


@dataclass(frozen=True)
class FleetOutcome:
    """What one CreateFleet answer says: the instances made and the pools that failed."""

    instances: tuple[LaunchedInstance, ...]
    errors: tuple[FleetError, ...]

    @property
    def capacity_errors(self) -> tuple[FleetError, ...]:
        return tuple(error for error in self.errors if error.capacity)

    @property
    def other_errors(self) -> tuple[FleetError, ...]:
        return tuple(error for error in self.errors if not error.capacity)


@dataclass(frozen=True)
class LaunchResult(FleetOutcome):
    """Everything one :meth:`FleetLauncher.launch` made and met, over all its CreateFleet calls."""

    fallback_used: bool
    calls: int
    # The on-demand fallback got no answer: it may have made instances that are not in ``instances``.
    fallback_unknown: bool = False


# ---- pure: request and answer ----------------------------------------------------------------------------


def client_token(launch_id: str, lifecycle: Lifecycle) -> str:
    """The CreateFleet ``ClientToken`` of one attempt of a launch.

    Deterministic, so a retried call with the same launch id is answered with the first call's fleet instead of
    making new instances. The spot attempt and its on-demand fallback get different tokens: they are different
    requests, and reusing a token with other parameters fails with ``IdempotentParameterMismatch``. Hashed,
    because launch ids have no length limit and the token must fit in 64 ASCII characters.
    """
    # At most 3 + 9 + 1 + 40 = 53 characters; 160 bits of the hash keep distinct launches apart.
    digest = hashlib.sha256(launch_id.encode("utf-8")).hexdigest()[:40]
    return f"rf-{lifecycle.value}-{digest}"


def build_fleet_request(
    pool: PoolConfig,
    template: LaunchTemplateRef,
    *,
    fleet: str,
    launch_id: str,
    count: int,
    lifecycle: Lifecycle,
) -> dict[str, Any]:
    """Keyword arguments for ``ec2.create_fleet`` launching ``count`` instances of ``pool`` as ``lifecycle``."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    # One override per type and subnet: each is a separate capacity pool to EC2, and the more pools a spot
    # request names, the likelier it is filled and the less likely it is interrupted. The order is the
    # config's, so the same pool always produces the same request (and the same idempotent retry).
    # A capacity pool is a type in a zone, not in a subnet: two subnets of one zone would name each pool twice,
    # which EC2 refuses for the whole fleet (InvalidFleetConfig). Bootstrap and `fleetctl validate --aws`
    # refuse such a pool (see shared_zones); a launch EC2 refuses anyway is dead-lettered with that code.
    overrides = [
        {"InstanceType": instance_type, "SubnetId": subnet}
        for instance_type in pool.instance_types
        for subnet in pool.subnets
    ]
    capacity: dict[str, Any] = {"TotalTargetCapacity": count, "DefaultTargetCapacityType": lifecycle.value}
    tags = [
        {"Key": "Name", "Value": f"{fleet}-{pool.name}"},
        {"Key": TAG_FLEET, "Value": fleet},
        {"Key": TAG_POOL, "Value": pool.name},
        {"Key": TAG_LAUNCH, "Value": launch_id},
    ]
    request: dict[str, Any] = {
        "Type": "instant",
        "LaunchTemplateConfigs": [
            {
                "LaunchTemplateSpecification": {
                    "LaunchTemplateName": template.name,
                    "Version": template.version,
                },
                "Overrides": overrides,
            }
        ],
        "TargetCapacitySpecification": capacity,
        "ClientToken": client_token(launch_id, lifecycle),
        # Tagging at creation (not with a later CreateTags) means no instance ever exists untagged:
        # find_launched recognises ours even if this Lambda dies right after the call.
        "TagSpecifications": [{"ResourceType": resource, "Tags": tags} for resource in ("instance", "volume", "fleet")],
    }
    if lifecycle is Lifecycle.SPOT:
        capacity["SpotTargetCapacity"] = count
        # price-capacity-optimized picks the pools with the most spare capacity and then the lowest price:
        # fewer interruptions than lowest-price, which matters for CI jobs that cannot resume.
        request["SpotOptions"] = {"AllocationStrategy": "price-capacity-optimized"}
    else:
        capacity["OnDemandTargetCapacity"] = count
        request["OnDemandOptions"] = {"AllocationStrategy": "lowest-price"}
    return request


def shared_zones(subnets: Sequence[str], zone_of: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
    """The Availability Zones holding more than one of ``subnets`` (in config order), by zone.

    CreateFleet fails as a whole, with ``InvalidFleetConfig`` ("The fleet configuration contains duplicate
    instance pools."), when two overrides name the same instance type in one zone: the request
    :func:`build_fleet_request` makes for a pool with two subnets in one zone. Subnets whose zone is unknown
    are left out.
    """
    by_zone: dict[str, list[str]] = {}
    for subnet in subnets:
        if subnet in zone_of:
            by_zone.setdefault(zone_of[subnet], []).append(subnet)
    return {zone: tuple(found) for zone, found in by_zone.items() if len(found) > 1}


@dataclass(frozen=True)
class LaunchPlan:
    """Every CreateFleet request of one launch, fixed once: kept on the launch record when its leases are taken,
    so a resumed launch sends EC2 exactly what the first attempt sent (same overrides, count, template version
    and ``ClientToken``) whatever changed in the configuration meanwhile. EC2 then answers a call that already
    completed with its first answer, and launches only what was never launched.

    ``request`` is the first CreateFleet's keyword arguments; ``fallback`` says whether a spot shortfall is made up
    on demand, with :func:`fallback_request`.
    """

    launch_id: str
    request: Mapping[str, Any]
    fallback: bool

    @property
    def count(self) -> int:
        return int(self.request["TargetCapacitySpecification"]["TotalTargetCapacity"])

    @property
    def lifecycle(self) -> Lifecycle:
        return Lifecycle(self.request["TargetCapacitySpecification"]["DefaultTargetCapacityType"])

    def to_json(self) -> str:
        return json.dumps(
            {"launch_id": self.launch_id, "request": self.request, "fallback": self.fallback},
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> LaunchPlan:
        data = json.loads(text)
        return cls(launch_id=str(data["launch_id"]), request=data["request"], fallback=bool(data["fallback"]))


def plan_launch(pool: PoolConfig, template: LaunchTemplateRef, *, fleet: str, launch_id: str, count: int) -> LaunchPlan:
    """The plan of a launch of ``count`` instances of ``pool``: its market first, on demand for a spot shortfall
    when the pool allows."""
    primary = Lifecycle.SPOT if pool.market is Market.SPOT else Lifecycle.ON_DEMAND
    request = build_fleet_request(pool, template, fleet=fleet, launch_id=launch_id, count=count, lifecycle=primary)
    return LaunchPlan(
        launch_id=launch_id, request=request, fallback=primary is Lifecycle.SPOT and pool.on_demand_fallback
    )


def fallback_request(plan: LaunchPlan, missing: int) -> dict[str, Any]:
    """The on-demand CreateFleet for the ``missing`` instances of a spot launch: the plan's request with the
    other lifecycle, count and token, so the same shortfall always makes the same request."""
    if missing < 1:
        raise ValueError(f"missing must be at least 1, got {missing}")
    request = copy.deepcopy(dict(plan.request))
    request.pop("SpotOptions", None)
    request["TargetCapacitySpecification"] = {
        "TotalTargetCapacity": missing,
        "DefaultTargetCapacityType": Lifecycle.ON_DEMAND.value,
        "OnDemandTargetCapacity": missing,
    }
    request["OnDemandOptions"] = {"AllocationStrategy": "lowest-price"}
    request["ClientToken"] = client_token(plan.launch_id, Lifecycle.ON_DEMAND)
    return request


def _lifecycle(value: object) -> Lifecycle | None:
    try:
        return Lifecycle(value)
    except ValueError:
        return None


def _overrides_of(entry: Mapping[str, Any]) -> Mapping[str, Any]:
    found = (entry.get("LaunchTemplateAndOverrides") or {}).get("Overrides") or {}
    return found if isinstance(found, Mapping) else {}


def classify_fleet_result(response: Mapping[str, Any]) -> FleetOutcome:
    """Reads a CreateFleet (instant) answer into the instances it made and the errors it reported."""
    instances: list[LaunchedInstance] = []
    for entry in response.get("Instances") or ():
        overrides = _overrides_of(entry)
        # Newer API versions also put SubnetId on the entry itself; older answers (and moto) only in the
        # overrides EC2 chose for these instances.
        subnet = overrides.get("SubnetId") or entry.get("SubnetId")
        instance_type = entry.get("InstanceType") or overrides.get("InstanceType") or ""
        # Every instant-fleet entry names its lifecycle; an instance without one is on-demand, as in
        # DescribeInstances where only spot (and scheduled) instances carry InstanceLifecycle.
        lifecycle = _lifecycle(entry.get("Lifecycle")) or Lifecycle.ON_DEMAND
        instances.extend(
            LaunchedInstance(
                instance_id=instance_id,
                instance_type=instance_type,
                subnet_id=subnet,
                lifecycle=lifecycle,
            )
            for instance_id in entry.get("InstanceIds") or ()
        )
    errors = []
    for entry in response.get("Errors") or ():
        overrides = _overrides_of(entry)
        errors.append(
            FleetError(
                code=str(entry.get("ErrorCode") or ""),
                message=str(entry.get("ErrorMessage") or ""),
                instance_type=overrides.get("InstanceType"),
                subnet_id=overrides.get("SubnetId"),
                lifecycle=_lifecycle(entry.get("Lifecycle")),
            )
        )
    return FleetOutcome(instances=tuple(instances), errors=tuple(errors))


def _is_retryable(exc: Any) -> bool:
    code = error_code(exc)
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return (
        code in THROTTLING_ERROR_CODES
        or code in _CALL_CAPACITY_ERROR_CODES
        or code in _TRANSIENT_ERROR_CODES
        or (isinstance(status, int) and status >= 500)
    )


def _outcome_unknown(exc: Any) -> bool:
    """AWS's own failure (a 5xx that is not throttling): the call may have been carried out."""
    code = error_code(exc)
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if code in THROTTLING_ERROR_CODES or code in _CALL_CAPACITY_ERROR_CODES:
        return False
    return code in _TRANSIENT_ERROR_CODES or (isinstance(status, int) and status >= 500)


# ---- I/O: performing launches ----------------------------------------------------------------------------


class FleetLauncher:
    """Launches a pool's instances through an injected EC2 client (built with botocore's standard retries)."""

    def __init__(self, ec2_client: Any, fleet: str) -> None:
        self._ec2 = ec2_client
        self._fleet = fleet

    def plan(self, pool: PoolConfig, template: LaunchTemplateRef, launch_id: str, count: int) -> LaunchPlan:
        return plan_launch(pool, template, fleet=self._fleet, launch_id=launch_id, count=count)

    def launch(self, pool: PoolConfig, template: LaunchTemplateRef, launch_id: str, count: int) -> LaunchResult:
        """Launches up to ``count`` instances of ``pool``, tagged with ``launch_id`` (see :meth:`execute`)."""
        return self.execute(self.plan(pool, template, launch_id, count))

    def execute(self, plan: LaunchPlan) -> LaunchResult:
        """Sends a launch plan's CreateFleet requests; the same plan always sends the same requests.

        One CreateFleet in the pool's market; when spot capacity falls short and the plan allows it, one more
        on-demand CreateFleet for the missing count only, so a launch never asks for more than its count.
        Raises LaunchOutcomeUnknownError when the first call got no answer or a 5xx (instances may exist),
        RetryableError when it is throttled or refused for capacity as a whole; raises LaunchRefusedError for
        any other error EC2 answers the call with (bad template, permissions, an unsupported request), which no
        retry fixes.
        """
        first = self._create_fleet(plan.request, plan.lifecycle)
        instances = list(first.instances)
        errors = list(first.errors)
        calls = 1
        fallback_used = fallback_unknown = False
        missing = plan.count - len(instances)
        if missing > 0 and first.capacity_errors and plan.fallback:
            fallback_used = True
            calls += 1
            try:
                second = self._create_fleet(fallback_request(plan, missing), Lifecycle.ON_DEMAND)
            except (RetryableError, LaunchRefusedError) as exc:
                # The spot instances exist already: raising would drop them from the result and leave them
                # to the reaper. Report the failed fallback like any other fleet error instead; the caller
                # sees the shortfall (and whether the fallback may have made instances anyway).
                errors.append(_call_failure(exc, Lifecycle.ON_DEMAND))
                fallback_unknown = isinstance(exc, LaunchOutcomeUnknownError)
            else:
                instances.extend(second.instances)
                errors.extend(second.errors)
        return LaunchResult(
            instances=tuple(self._fill_subnets(instances)),
            errors=tuple(errors),
            fallback_used=fallback_used,
            calls=calls,
            fallback_unknown=fallback_unknown,
        )

    def find_launched(self, launch_id: str) -> list[LaunchedInstance]:
        """The live instances of this fleet tagged with ``launch_id``.

        Adopts what a CreateFleet made when its caller died before recording the answer, without a call that
        could launch anything.
        """
        # Filtering on instance-lifecycle would be cheaper, but moto answers that filter with HTTP 500; the
        # lifecycle is read from each instance instead.
        filters = [
            {"Name": f"tag:{TAG_LAUNCH}", "Values": [launch_id]},
            {"Name": f"tag:{TAG_FLEET}", "Values": [self._fleet]},
            {"Name": "instance-state-name", "Values": ["pending", "running"]},
        ]
        found: list[LaunchedInstance] = []
        for page in self._ec2.get_paginator("describe_instances").paginate(Filters=filters):
            for reservation in page.get("Reservations", ()):
                found.extend(_described(instance) for instance in reservation.get("Instances", ()))
        return sorted(found, key=lambda instance: instance.instance_id)

    def _create_fleet(self, request: Mapping[str, Any], lifecycle: Lifecycle) -> FleetOutcome:
        try:
            response = self._ec2.create_fleet(**request)
        except ClientError as exc:
            if _outcome_unknown(exc):
                raise LaunchOutcomeUnknownError(_describe_failure(exc, lifecycle)) from exc
            if _is_retryable(exc):
                raise RetryableError(_describe_failure(exc, lifecycle)) from exc
            raise LaunchRefusedError(error_code(exc) or "UnknownError", _describe_failure(exc, lifecycle)) from exc
        except (BotoConnectionError, HTTPClientError) as exc:
            # A timed-out call may still have launched instances (botocore's own retries already sent it again
            # with the same token): the launch is resumed with the same plan, never made anew.
            raise LaunchOutcomeUnknownError(f"CreateFleet ({lifecycle.value}) did not answer: {exc}") from exc
        return classify_fleet_result(response)

    def _fill_subnets(self, instances: Sequence[LaunchedInstance]) -> list[LaunchedInstance]:
        unknown = [instance.instance_id for instance in instances if instance.subnet_id is None]
        if not unknown:
            return list(instances)
        try:
            response = self._ec2.describe_instances(InstanceIds=unknown)
        except ClientError:
            # Right after a launch, DescribeInstances may not know the ids yet (EC2 is eventually
            # consistent). The instances exist and must be reported; their subnet stays unknown.
            return list(instances)
        subnets = {
            instance["InstanceId"]: instance.get("SubnetId")
            for reservation in response.get("Reservations", ())
            for instance in reservation.get("Instances", ())
        }
        return [
            replace(instance, subnet_id=subnets.get(instance.instance_id)) if instance.subnet_id is None else instance
            for instance in instances
        ]


def _described(instance: Mapping[str, Any]) -> LaunchedInstance:
    # DescribeInstances names InstanceLifecycle only for spot (and scheduled) instances; absent = on-demand.
    lifecycle = Lifecycle.SPOT if instance.get("InstanceLifecycle") == "spot" else Lifecycle.ON_DEMAND
    return LaunchedInstance(
        instance_id=instance["InstanceId"],
        instance_type=instance.get("InstanceType", ""),
        subnet_id=instance.get("SubnetId"),
        lifecycle=lifecycle,
    )


def _describe_failure(exc: Any, lifecycle: Lifecycle) -> str:
    message = exc.response.get("Error", {}).get("Message", "")
    return f"CreateFleet ({lifecycle.value}) failed with {error_code(exc) or 'an unknown error'}: {message}"


def _call_failure(exc: BaseException, lifecycle: Lifecycle) -> FleetError:
    if isinstance(exc, LaunchRefusedError):
        return FleetError(code=exc.code, message=exc.reason, instance_type=None, subnet_id=None, lifecycle=lifecycle)
    cause = exc.__cause__ if isinstance(exc, RetryableError) and exc.__cause__ is not None else exc
    code = error_code(cause) or type(cause).__name__
    return FleetError(code=code, message=str(exc), instance_type=None, subnet_id=None, lifecycle=lifecycle)
