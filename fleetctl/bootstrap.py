"""``fleetctl bootstrap``: create or update what ``chalice deploy`` does not, idempotently.

Like Chalice's own deployer, it first computes a plan (frozen ``Change`` values, from describing what already
exists) and then executes it, so ``--dry-run`` prints exactly the plan that would run. Secrets are generated
here and stored as SecureStrings; their values are never printed.

The state side is the table, the queues and the secret parameters; the runner side is each pool's role and
instance profile (policy in ``fleetctl/iam_policies.py``; the roles of pools no longer configured are deleted once
no instance runs with them), the EC2 Spot service-linked role, one launch template per pool (tagged with the
fleet: scale-up may launch from no other) and the cache bucket. None of it is created by the deployment stack
(``make package``), which owns the functions and what watches them (``docs/deploy.md``, "What owns what"); except
that with ``state.owner: stack`` the stack owns the table and both queues (described once, in
:mod:`fleetctl.state_resources`), and bootstrap only looks them up: one missing is reported, the stack's to create.

Before any of it, each pool's subnets are looked up: a pool with two subnets in one Availability Zone would make
every launch fail (:func:`chalicelib.scaling.fleet.shared_zones`), so such a plan is refused as a whole and nothing is
changed. So is a plan with a pool whose AMI cannot boot on all its instance types (:func:`pool_images`): each
pool's template boots the runner AMI published for the architecture its types share (``fleetctl.ami``), or the
pool's own ``ami`` when it names one.

Each template names the pool's CI image by digest: the digest the pool's image record names as current
(:mod:`chalicelib.images`), so a rerun after a promotion or rollback renders exactly the version image rotation
made and finds no drift; a pool with no record yet (a first bootstrap, or the table still to be created) gets the
digest ECR has for its tag now. Once the templates are applied, each pinned digest is recorded in the pool's image
record with the template's default version (:meth:`ImageRotation.adopt`: nothing changes on a rerun), so image
rotation starts from the version bootstrap wrote.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from botocore.exceptions import ClientError

from chalicelib.aws import AwsClients, error_code
from chalicelib.config import FleetConfig, Market, PoolConfig, RunnerType, StateOwner
from chalicelib.errors import RunnerFleetError
from chalicelib.images.decisions import Verdict
from chalicelib.images.record import ImageRecord, Version
from chalicelib.images.rotation import registry_host
from chalicelib.images.store import ImageStore
from chalicelib.naming import FLEET_TAG, POOL_TAG, launch_template_name, runner_role_name, runner_role_path
from chalicelib.scaling.fleet import shared_zones
from chalicelib.scaling.templates import template_data
from chalicelib.scaling.userdata import image_reference
from fleetctl.ami import (
    AMI_ID,
    ImageFacts,
    ami_parameter_name,
    describe_image,
    instance_type_architectures,
    pool_architecture,
)
from fleetctl.iam_policies import RUNNER_POLICY_NAME, ec2_trust_policy, runner_instance_policy
from fleetctl.images import EcrImage, ecr_client, fleet_account, image_rotation, registry_id
from fleetctl.state_resources import (
    INDEXES,
    TTL_ATTRIBUTE,
    create_table_arguments,
    dead_letter_queue_attributes,
    fleet_tags,
    jobs_queue_attributes,
    redrive_policy,
    ttl_specification,
)

CACHE_EXPIRY_DAYS = 14
CACHE_LIFECYCLE_RULE_ID = "runner-fleet-cache-expiry"
SPOT_SERVICE = "spot.amazonaws.com"
SPOT_ROLE_NAME = "AWSServiceRoleForEC2Spot"
SPOT_ROLE_PATH = f"/aws-service-role/{SPOT_SERVICE}/"
# The one runner role every pool shared before each pool had its own; bootstrap deletes it once unused.
SHARED_RUNNER_ROLE = "{fleet}-runner"


class Verb(str, Enum):
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"
    KEEP = "exists"
    MISSING = "missing"
    # Something in the account makes the configuration unusable: the plan is not executed at all.
    INVALID = "invalid"


@dataclass(frozen=True)
class Change:
    kind: str
    name: str
    verb: Verb
    detail: str = ""
    params: dict[str, Any] = field(default_factory=dict, compare=False)

    def describe(self) -> str:
        suffix = f" ({self.detail})" if self.detail else ""
        return f"{self.verb.value:<8} {self.kind:<10} {self.name}{suffix}"


class PlanRefusedError(RunnerFleetError):
    """The plan holds :attr:`Verb.INVALID` changes; nothing was executed."""

    def __init__(self, invalid: list[Change]) -> None:
        self.invalid = invalid
        super().__init__("; ".join(change.describe() for change in invalid))


def generate_webhook_token() -> str:
    return secrets.token_urlsafe(32)


def check_fleet_token(config: FleetConfig, token: str, *, ssl_verify: bool = True) -> None:
    """Refuse a GitLab token the fleet cannot work with, before it is stored: ``GitLabTokenError`` naming each
    missing scope (``read_api``, ``create_runner``, ``manage_runner``, or ``api`` for all three; ``api`` itself
    while a pool retries jobs lost to spot interruptions), an expired or revoked token, or, for instance runners,
    a user who is no administrator."""
    from fleetctl.gitlab_token import FLEET_NEEDS, RETRY_NEED, check_token

    admin_needed = config.gitlab.runner_type is RunnerType.INSTANCE
    needs = FLEET_NEEDS + ((RETRY_NEED,) if any(pool.retry_interrupted_jobs for pool in config.pools) else ())
    check_token(config.gitlab.url, token, needs, admin_needed=admin_needed, ssl_verify=ssl_verify)


class Bootstrapper:
    def __init__(
        self,
        config: FleetConfig,
        clients: AwsClients,
        *,
        gitlab_token: str | None = None,
        token_factory: Callable[[], str] = generate_webhook_token,
    ) -> None:
        self._config = config
        self._aws = clients
        self._gitlab_token = gitlab_token
        self._token_factory = token_factory
        self._account: str | None = None
        # The default version each template has once applied, by template name.
        self._applied_versions: dict[str, int] = {}

    def plan(self) -> list[Change]:
        images = pool_images(self._config, self._aws)
        return [
            *self._plan_subnets(),
            *[
                Change("arch", image.problem.field, Verb.INVALID, image.problem.detail)
                for image in images
                if image.problem is not None and image.problem.verb is Verb.INVALID
            ],
            *self._plan_state(),
            *self._plan_parameters(),
            *(change for pool in self._config.pools for change in self._plan_runner_identity(pool)),
            self._plan_spot_role(),
            *self._plan_templates(images),
            *self._plan_retired_roles(),
            self._plan_bucket(),
        ]

    def execute(self, changes: list[Change]) -> list[str]:
        """Apply ``changes``, then record each template's pinned digest in its pool's image record; returns what
        the recording did, a line per pool it changed or could not. Raises PlanRefusedError, changing nothing,
        when any change is :attr:`Verb.INVALID`."""
        invalid = [change for change in changes if change.verb is Verb.INVALID]
        if invalid:
            raise PlanRefusedError(invalid)
        for change in changes:
            if change.verb in (Verb.KEEP, Verb.MISSING):
                continue
            getattr(self, f"_apply_{change.kind}")(change)
        return self._record_images(changes)

    # -- the pools' subnets (checked, never changed) -------------------------------------------------------

    def _plan_subnets(self) -> list[Change]:
        return [
            Change("subnets", problem.pool, problem.verb, problem.detail)
            for problem in subnet_problems(self._config, self._aws.ec2)
        ]

    # -- the fleet's state: the table and the queues, bootstrap's or the stack's ------------------------------

    def _plan_state(self) -> list[Change]:
        """The table, the dead-letter queue and the jobs queue: created or updated when bootstrap owns them; with
        ``state.owner: stack`` only looked up, each one missing said to be the stack's to create."""
        state = self._config.state
        if state.owner is StateOwner.STACK:
            return [
                self._stack_owned("table", state.table, self._table_exists(state.table)),
                *(
                    self._stack_owned("queue", name, self._queue_url(name) is not None)
                    for name in (state.dead_letter_queue, state.jobs_queue)
                ),
            ]
        return [
            self._plan_table(state.table),
            self._plan_queue(state.dead_letter_queue, dead_letter_queue_attributes()),
            self._plan_queue(state.jobs_queue, jobs_queue_attributes()),
        ]

    def _stack_owned(self, kind: str, name: str, exists: bool) -> Change:
        if exists:
            return Change(kind, name, Verb.KEEP, "owned by the stack")
        detail = "owned by the stack (state.owner: stack), not created here: deploy the stack make package builds"
        return Change(kind, name, Verb.MISSING, detail)

    def _table_exists(self, name: str) -> bool:
        try:
            self._aws.dynamodb.describe_table(TableName=name)
        except ClientError as exc:
            if error_code(exc) != "ResourceNotFoundException":
                raise
            return False
        return True

    def _queue_url(self, name: str) -> str | None:
        try:
            return str(self._aws.sqs.get_queue_url(QueueName=name)["QueueUrl"])
        except ClientError as exc:
            if error_code(exc) not in ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"):
                raise
            return None

    # -- DynamoDB -------------------------------------------------------------------------------------------

    def _plan_table(self, name: str) -> Change:
        if not self._table_exists(name):
            indexes = ", ".join(INDEXES)
            detail = f"on-demand, encrypted, TTL on {TTL_ATTRIBUTE}, indexes {indexes}"
            return Change("table", name, Verb.CREATE, detail)
        table = self._aws.dynamodb.describe_table(TableName=name)["Table"]
        present = {i["IndexName"] for i in table.get("GlobalSecondaryIndexes", [])}
        absent = [index for index in INDEXES if index not in present]
        missing = [f"add index {index}" for index in absent]
        ttl = self._aws.dynamodb.describe_time_to_live(TableName=name)["TimeToLiveDescription"]
        enable_ttl = ttl.get("TimeToLiveStatus") not in ("ENABLED", "ENABLING")
        if enable_ttl:
            missing.append(f"enable TTL on {TTL_ATTRIBUTE}")
        if missing:
            params = {"add_indexes": absent, "enable_ttl": enable_ttl}
            return Change("table", name, Verb.UPDATE, ", ".join(missing), params)
        return Change("table", name, Verb.KEEP)

    def _apply_table(self, change: Change) -> None:
        ddb = self._aws.dynamodb
        if change.verb is Verb.CREATE:
            ddb.create_table(**create_table_arguments(change.name, self._config.fleet))
            ddb.get_waiter("table_exists").wait(TableName=change.name, WaiterConfig={"Delay": 1})
        else:
            for name in change.params.get("add_indexes", ()):
                # DynamoDB creates one index per UpdateTable, and refuses another while one is being created.
                self._wait_for_indexes(change.name)
                attributes, index = INDEXES[name]
                ddb.update_table(
                    TableName=change.name,
                    AttributeDefinitions=list(attributes),
                    GlobalSecondaryIndexUpdates=[{"Create": index}],
                )
        if change.verb is Verb.CREATE or change.params.get("enable_ttl"):
            ddb.update_time_to_live(TableName=change.name, TimeToLiveSpecification=ttl_specification())

    def _wait_for_indexes(self, table: str, timeout: float = 600.0) -> None:
        """Until no index of ``table`` is being created (a new index backfills for minutes on a large table)."""
        deadline = time.monotonic() + timeout
        while True:
            indexes = self._aws.dynamodb.describe_table(TableName=table)["Table"].get("GlobalSecondaryIndexes", [])
            if all(index.get("IndexStatus", "ACTIVE") != "CREATING" for index in indexes):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"an index of table {table} is still being created after {timeout:.0f} s")
            time.sleep(5)

    # -- SQS ------------------------------------------------------------------------------------------------

    def _plan_queue(self, name: str, attributes: dict[str, str]) -> Change:
        wanted = dict(attributes)
        sqs = self._aws.sqs
        url = self._queue_url(name)
        if url is None:
            return Change("queue", name, Verb.CREATE, params={"attributes": wanted})
        current = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        if name == self._config.state.jobs_queue:
            wanted["RedrivePolicy"] = self._redrive_policy()
        drift = sorted(k for k, v in wanted.items() if not _same_attribute(current.get(k), v))
        if drift:
            return Change("queue", name, Verb.UPDATE, "set " + ", ".join(drift), {"url": url, "attributes": wanted})
        return Change("queue", name, Verb.KEEP)

    def _redrive_policy(self) -> str:
        sqs = self._aws.sqs
        dlq_url = sqs.get_queue_url(QueueName=self._config.state.dead_letter_queue)["QueueUrl"]
        dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        return json.dumps(redrive_policy(dlq_arn))

    def _apply_queue(self, change: Change) -> None:
        sqs = self._aws.sqs
        attributes = dict(change.params["attributes"])
        if change.name == self._config.state.jobs_queue:
            # Resolved at execution: on a first run the dead-letter queue is created earlier in the same plan.
            attributes["RedrivePolicy"] = self._redrive_policy()
        if change.verb is Verb.CREATE:
            sqs.create_queue(QueueName=change.name, Attributes=attributes, tags=self._tags())
        else:
            sqs.set_queue_attributes(QueueUrl=change.params["url"], Attributes=attributes)

    # -- SSM ------------------------------------------------------------------------------------------------

    def _plan_parameters(self) -> list[Change]:
        # The signing secret is not made here: `fleetctl gitlab connect` writes it once GitLab confirms that it
        # signs the hook's deliveries, since the webhook requires signatures as soon as the parameter exists.
        return [self._plan_generated(self._config.webhook.token_parameter, "webhook token"), self._plan_gitlab_token()]

    def _current_value(self, name: str) -> str | None:
        try:
            found = self._aws.ssm.get_parameter(Name=name, WithDecryption=True)
        except ClientError as exc:
            if error_code(exc) != "ParameterNotFound":
                raise
            return None
        return str(found["Parameter"]["Value"])

    def _plan_generated(self, name: str, what: str) -> Change:
        if self._current_value(name) is None:
            return Change("parameter", name, Verb.CREATE, f"generated {what}", {"generate": what})
        return Change("parameter", name, Verb.KEEP, what)

    def _plan_gitlab_token(self) -> Change:
        name = self._config.gitlab.token_parameter
        current = self._current_value(name)
        if self._gitlab_token is None:
            if current is None:
                return Change("parameter", name, Verb.MISSING, "GitLab API token: set GITLAB_TOKEN and re-run")
            return Change("parameter", name, Verb.KEEP, "GitLab API token")
        if current is None:
            return Change("parameter", name, Verb.CREATE, "GitLab API token from GITLAB_TOKEN")
        if current != self._gitlab_token:
            return Change("parameter", name, Verb.UPDATE, "GitLab API token from GITLAB_TOKEN")
        return Change("parameter", name, Verb.KEEP, "GitLab API token")

    def _apply_parameter(self, change: Change) -> None:
        generate = change.params.get("generate")
        value = self._token_factory() if generate == "webhook token" else self._gitlab_token or ""
        self._aws.ssm.put_parameter(
            Name=change.name,
            Value=value,
            Type="SecureString",
            Overwrite=change.verb is Verb.UPDATE,
            Description=f"runner-fleet {self._config.fleet}",
        )

    # -- IAM: each pool's runner role and instance profile ---------------------------------------------------

    def _plan_runner_identity(self, pool: PoolConfig) -> list[Change]:
        """The pool's role (assumed by EC2 only), its inline policy, and the instance profile holding it, all
        named :func:`runner_role_name` under the fleet's IAM path."""
        return [self._plan_role(pool), self._plan_role_policy(pool), self._plan_profile(pool)]

    def _plan_role(self, pool: PoolConfig) -> Change:
        name = runner_role_name(self._config.fleet, pool.name)
        path = runner_role_path(self._config.fleet)
        params = {"pool": pool.name}
        try:
            role = self._aws.client("iam").get_role(RoleName=name)["Role"]
        except ClientError as exc:
            if error_code(exc) != "NoSuchEntity":
                raise
            return Change("role", name, Verb.CREATE, f"pool {pool.name}, assumed by EC2, path {path}", params)
        if role.get("Path") != path:
            # IAM cannot move a role to another path, and one outside the fleet's path is not bootstrap's.
            detail = f"a role of this name exists at path {role.get('Path')}, not {path}: rename or delete it"
            return Change("role", name, Verb.INVALID, detail)
        if not _same_policy(role.get("AssumeRolePolicyDocument"), ec2_trust_policy()):
            return Change("role", name, Verb.UPDATE, "trust policy: assumed by EC2 only", params)
        return Change("role", name, Verb.KEEP, f"pool {pool.name}, assumed by EC2")

    def _apply_role(self, change: Change) -> None:
        iam = self._aws.client("iam")
        if change.verb is Verb.DELETE:
            self._delete_runner_identity(change.name)
            return
        trust = json.dumps(ec2_trust_policy())
        if change.verb is Verb.CREATE:
            iam.create_role(
                RoleName=change.name,
                Path=runner_role_path(self._config.fleet),
                AssumeRolePolicyDocument=trust,
                Description=f"runner-fleet {self._config.fleet}: runner instances of pool {change.params['pool']}",
                Tags=self._pool_tags(change.params["pool"]),
            )
        else:
            iam.update_assume_role_policy(RoleName=change.name, PolicyDocument=trust)

    def _plan_role_policy(self, pool: PoolConfig) -> Change:
        role = runner_role_name(self._config.fleet, pool.name)
        name = f"{role}/{RUNNER_POLICY_NAME}"
        wanted = runner_instance_policy(self._config, pool)
        params = {"role": role, "document": wanted}
        summary = f"inline, {len(wanted['Statement'])} statements"
        try:
            found = self._aws.client("iam").get_role_policy(RoleName=role, PolicyName=RUNNER_POLICY_NAME)
        except ClientError as exc:
            # Also the answer while the role itself does not exist yet; it is created earlier in the plan.
            if error_code(exc) != "NoSuchEntity":
                raise
            return Change("policy", name, Verb.CREATE, summary, params)
        if not _same_policy(found["PolicyDocument"], wanted):
            return Change("policy", name, Verb.UPDATE, f"{summary}, changed", params)
        return Change("policy", name, Verb.KEEP, summary)

    def _apply_policy(self, change: Change) -> None:
        self._aws.client("iam").put_role_policy(
            RoleName=change.params["role"],
            PolicyName=RUNNER_POLICY_NAME,
            PolicyDocument=json.dumps(change.params["document"]),
        )

    def _plan_profile(self, pool: PoolConfig) -> Change:
        name = runner_role_name(self._config.fleet, pool.name)
        params: dict[str, Any] = {"pool": pool.name}
        try:
            profile = self._aws.client("iam").get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
        except ClientError as exc:
            if error_code(exc) != "NoSuchEntity":
                raise
            return Change("profile", name, Verb.CREATE, f"role {name}", params)
        roles = [role["RoleName"] for role in profile.get("Roles", [])]
        if roles == [name]:
            return Change("profile", name, Verb.KEEP, f"role {name}")
        # A profile holds at most one role, so a stranger has to leave before ours goes in.
        others = [role for role in roles if role != name]
        params |= {"remove": others, "add": name not in roles}
        return Change("profile", name, Verb.UPDATE, f"set role {name}", params)

    def _apply_profile(self, change: Change) -> None:
        iam = self._aws.client("iam")
        if change.verb is Verb.CREATE:
            iam.create_instance_profile(
                InstanceProfileName=change.name,
                Path=runner_role_path(self._config.fleet),
                Tags=self._pool_tags(change.params["pool"]),
            )
        for role in change.params.get("remove", []):
            iam.remove_role_from_instance_profile(InstanceProfileName=change.name, RoleName=role)
        if change.params.get("add", True):
            iam.add_role_to_instance_profile(InstanceProfileName=change.name, RoleName=change.name)

    def _plan_retired_roles(self) -> list[Change]:
        """Roles and instance profiles bootstrap made for pools the config no longer has, under the fleet's path,
        and the one role all pools shared before each pool had its own (``<fleet>-runner``, tagged with the
        fleet). Each is deleted once no live instance of the fleet runs with it; until then the plan says which
        instances still do, and a later bootstrap deletes it."""
        iam = self._aws.client("iam")
        path = runner_role_path(self._config.fleet)
        wanted = {runner_role_name(self._config.fleet, pool.name) for pool in self._config.pools}
        # Filtered by path here too: moto's ListInstanceProfiles ignores PathPrefix.
        names = {
            role["RoleName"]
            for page in iam.get_paginator("list_roles").paginate(PathPrefix=path)
            for role in page["Roles"]
            if role["Path"].startswith(path)
        }
        names |= {
            profile["InstanceProfileName"]
            for page in iam.get_paginator("list_instance_profiles").paginate(PathPrefix=path)
            for profile in page["InstanceProfiles"]
            if profile["Path"].startswith(path)
        }
        shared = SHARED_RUNNER_ROLE.format(fleet=self._config.fleet)
        if self._is_shared_runner_role(shared):
            names.add(shared)
        retired = sorted(names - wanted)
        if not retired:
            return []
        users = self._instance_profile_users()
        changes = []
        for name in retired:
            if users.get(name):
                detail = f"retired, kept while {', '.join(sorted(users[name]))} run with it; bootstrap again later"
                changes.append(Change("role", name, Verb.KEEP, detail))
            else:
                changes.append(Change("role", name, Verb.DELETE, "no pool uses it, nor any live instance"))
        return changes

    def _is_shared_runner_role(self, name: str) -> bool:
        try:
            role = self._aws.client("iam").get_role(RoleName=name)["Role"]
        except ClientError as exc:
            if error_code(exc) != "NoSuchEntity":
                raise
            return False
        return {"Key": "runner-fleet", "Value": self._config.fleet} in role.get("Tags", [])

    def _instance_profile_users(self) -> dict[str, set[str]]:
        """Instance profile name -> the fleet's live instances launched with it."""
        users: dict[str, set[str]] = {}
        filters = [
            {"Name": f"tag:{FLEET_TAG}", "Values": [self._config.fleet]},
            {"Name": "instance-state-name", "Values": ["pending", "running", "shutting-down", "stopping", "stopped"]},
        ]
        for page in self._aws.ec2.get_paginator("describe_instances").paginate(Filters=filters):
            for reservation in page["Reservations"]:
                for instance in reservation["Instances"]:
                    arn = instance.get("IamInstanceProfile", {}).get("Arn", "")
                    if arn:
                        users.setdefault(arn.rsplit("/", 1)[-1], set()).add(instance["InstanceId"])
        return users

    def _delete_runner_identity(self, name: str) -> None:
        """Delete the instance profile and role called ``name``, and what holds them together; what is already
        gone counts as deleted."""
        iam = self._aws.client("iam")
        profile = _unless_gone(iam.get_instance_profile, InstanceProfileName=name)
        if profile is not None:
            for role in profile["InstanceProfile"].get("Roles", []):
                _unless_gone(iam.remove_role_from_instance_profile, InstanceProfileName=name, RoleName=role["RoleName"])
            _unless_gone(iam.delete_instance_profile, InstanceProfileName=name)
        holders = _unless_gone(iam.list_instance_profiles_for_role, RoleName=name)
        if holders is None:
            return
        for holder in holders["InstanceProfiles"]:
            _unless_gone(
                iam.remove_role_from_instance_profile, InstanceProfileName=holder["InstanceProfileName"], RoleName=name
            )
        for policy in iam.list_role_policies(RoleName=name)["PolicyNames"]:
            _unless_gone(iam.delete_role_policy, RoleName=name, PolicyName=policy)
        for attached in iam.list_attached_role_policies(RoleName=name)["AttachedPolicies"]:
            _unless_gone(iam.detach_role_policy, RoleName=name, PolicyArn=attached["PolicyArn"])
        _unless_gone(iam.delete_role, RoleName=name)

    # -- the EC2 Spot service-linked role ---------------------------------------------------------------------

    def _plan_spot_role(self) -> Change:
        # EC2 launches spot instances only once the account has this role; the console creates it on first use,
        # the API does not, so a fresh account's first CreateFleet would fail without it. It is found by its
        # service path (moto names the role differently from AWS).
        if spot_role_exists(self._aws.client("iam")):
            return Change("spot_role", SPOT_ROLE_NAME, Verb.KEEP, "service-linked, spot.amazonaws.com")
        return Change("spot_role", SPOT_ROLE_NAME, Verb.CREATE, "service-linked, spot.amazonaws.com")

    def _apply_spot_role(self, change: Change) -> None:
        try:
            self._aws.client("iam").create_service_linked_role(AWSServiceName=SPOT_SERVICE)
        except ClientError as exc:
            # Created in between (by the console or a concurrent bootstrap): what the plan wanted exists.
            if error_code(exc) not in ("InvalidInput", "EntityAlreadyExists"):
                raise

    # -- EC2 launch templates, one per pool ----------------------------------------------------------------

    def _plan_templates(self, images: list[PoolImage]) -> list[Change]:
        changes = []
        records = self._image_records([image.pool.name for image in images if image.problem is None])
        for image in images:
            name = launch_template_name(self._config.fleet, image.pool.name)
            if image.problem is not None:
                # An invalid pool is listed with the checks at the top of the plan; the plan will not run.
                if image.problem.verb is Verb.MISSING:
                    changes.append(Change("template", name, Verb.MISSING, image.problem.detail))
                continue
            assert image.facts is not None
            pinned = self._pinned_image(image.pool, records.get(image.pool.name))
            data = self._template_data(image.pool, image.facts.image_id, image.facts.root_device, pinned.reference)
            # The pool and its pinned digest go with the change, for the image record once it is applied.
            recorded = {"pool": image.pool.name, "pinned": pinned.version} if pinned.version is not None else {}
            changes.append(self._plan_template(name, data, image.facts.architecture, pinned.note, recorded))
        return changes

    def _image_records(self, pools: list[str]) -> dict[str, ImageRecord]:
        """The pools' image records; none while the table does not exist (it is created in the same plan)."""
        if not pools:
            return {}
        try:
            return ImageStore(self._config.state.table, self._aws.dynamodb).read_many(pools)
        except ClientError as exc:
            if error_code(exc) != "ResourceNotFoundException":
                raise
            return {}

    def _pinned_image(self, pool: PoolConfig, record: ImageRecord | None) -> PinnedImage:
        """The pool's CI image reference for user data and what the plan says about it: the digest the pool's
        image record names as current, else the digest ECR has for the tag now, else the tag, unpinned."""
        repository, tag = pool.image.repository, pool.image.tag
        registry = registry_host(pool, self._fleet_account(), self._aws.ec2.meta.region_name)
        if record is not None and record.current is not None:
            current = record.current
            by = f", promoted by {current.by.value}" if current.by else ""
            note = f"image {repository}@{current.digest} (tag {current.tag}; the pool's image record{by})"
            return PinnedImage(image_reference(pool, registry, current.digest), note, current)
        try:
            found = ecr_client(self._aws, pool).describe_images(
                repositoryName=repository, imageIds=[{"imageTag": tag}], **registry_id(pool)
            )["imageDetails"]
        except ClientError as exc:
            code = error_code(exc)
            if code == "RepositoryNotFoundException":
                unpinned = f"image {repository}:{tag}, not pinned: no repository {repository} in ECR"
                return PinnedImage(image_reference(pool, registry), unpinned)
            if code != "ImageNotFoundException":
                raise
            found = []
        if not found:
            unpinned = f"image {repository}:{tag}, not pinned: no such tag in ECR"
            return PinnedImage(image_reference(pool, registry), unpinned)
        pushed = EcrImage.from_detail(found[0])
        version = Version(pushed.digest, tag, pushed.pushed_at)
        return PinnedImage(
            image_reference(pool, registry, pushed.digest), f"image {repository}@{pushed.digest} (tag {tag})", version
        )

    def _template_data(self, pool: PoolConfig, image_id: str, root_device: str, image: str) -> dict[str, Any]:
        return template_data(self._config, pool, image_id, root_device, image)

    def _fleet_account(self) -> str:
        """The account bootstrap runs in, whose ECR registry holds the pools' CI images unless a pool names
        another."""
        if self._account is None:
            self._account = fleet_account(self._aws)
        return self._account

    def _record_images(self, changes: list[Change]) -> list[str]:
        """Record each applied template's pinned digest, with the template's default version, in the pool's image
        record. A record that moved to another digest since the plan read it (a push promoted meanwhile) is left
        as it is: image rotation made its own version, which reconcile makes the default."""
        pinned = [
            change
            for change in changes
            if change.kind == "template"
            and change.verb in (Verb.CREATE, Verb.UPDATE, Verb.KEEP)
            and change.params.get("pinned") is not None
        ]
        if not pinned:
            return []
        table = self._config.state.table
        if any(change.kind == "table" and change.name == table and change.verb is Verb.MISSING for change in changes):
            # The stack owns the table and has not made it yet: the records are written by the next bootstrap.
            return [
                f"image records not written: table {table} does not exist yet; bootstrap again once the stack is"
                " deployed"
            ]
        rotation = image_rotation(self._config, self._aws)
        lines = []
        for change in pinned:
            pool, version = change.params["pool"], change.params["pinned"]
            template_version = self._applied_versions.get(change.name, change.params.get("version"))
            if template_version is None:
                continue
            current = rotation.history(pool).current
            if current is not None and current.digest != version.digest:
                lines.append(
                    f"image record of pool {pool} not changed: it names {current.digest} since the plan was made"
                )
                continue
            outcome = rotation.adopt(pool, version, int(template_version))
            if outcome.verdict is not Verdict.ALREADY_CURRENT:
                lines.append(
                    f"recorded image {version.digest} for pool {pool}, launch template version {template_version}"
                )
        return lines

    def _plan_template(
        self,
        name: str,
        data: dict[str, Any],
        architecture: str,
        image_note: str,
        recorded: dict[str, Any] | None = None,
    ) -> Change:
        recorded = recorded or {}
        ec2 = self._aws.ec2
        image_id = data["ImageId"]
        try:
            found = ec2.describe_launch_templates(LaunchTemplateNames=[name])["LaunchTemplates"][0]
        except ClientError as exc:
            if error_code(exc) != "InvalidLaunchTemplateName.NotFoundException":
                raise
            return Change(
                "template",
                name,
                Verb.CREATE,
                f"{image_id} ({architecture}), 1 version; {image_note}",
                {"data": data, **recorded},
            )
        default = int(found["DefaultVersionNumber"])
        # Always an explicit version number: a template updated by an earlier bootstrap has several versions, and
        # moto answers $Latest with HTTP 500 once it has more than one.
        current = ec2.describe_launch_template_versions(
            LaunchTemplateId=found["LaunchTemplateId"], Versions=[str(default)]
        )["LaunchTemplateVersions"][0]["LaunchTemplateData"]
        drift = [key for key, value in data.items() if not _contains(current.get(key), value)]
        # Anything else set on the default version (a KeyName, say) is drift too.
        drift += sorted(key for key in current if key not in data)
        if drift:
            version = int(found["LatestVersionNumber"]) + 1
            return Change(
                "template",
                name,
                Verb.UPDATE,
                f"new default version {version}: " + ", ".join(drift) + f"; {image_note}",
                {"data": data, "id": found["LaunchTemplateId"], **recorded},
            )
        if not self._template_tagged(found["LaunchTemplateId"]):
            params = {"id": found["LaunchTemplateId"], "version": default, **recorded}
            return Change("template", name, Verb.UPDATE, f"tag {FLEET_TAG}", params)
        return Change(
            "template",
            name,
            Verb.KEEP,
            f"{image_id} ({architecture}), version {default}; {image_note}",
            {"version": default, **recorded},
        )

    def _template_tagged(self, template_id: str) -> bool:
        # Scale-up may launch only from templates carrying the fleet's tag (fleetctl/lambda_policies.py).
        found = self._aws.ec2.describe_tags(
            Filters=[{"Name": "resource-id", "Values": [template_id]}, {"Name": "key", "Values": [FLEET_TAG]}]
        )["Tags"]
        return any(tag.get("Value") == self._config.fleet for tag in found)

    def _tag_template(self, template_id: str) -> None:
        self._aws.ec2.create_tags(Resources=[template_id], Tags=[{"Key": FLEET_TAG, "Value": self._config.fleet}])

    def _apply_template(self, change: Change) -> None:
        ec2 = self._aws.ec2
        description = f"runner-fleet {self._config.fleet} bootstrap"
        if change.verb is Verb.CREATE:
            # Tagged by a separate CreateTags rather than the request's TagSpecifications: moto copies those into
            # the version's data, which would then never match what is wanted.
            created_template = ec2.create_launch_template(
                LaunchTemplateName=change.name,
                VersionDescription=description,
                LaunchTemplateData=change.params["data"],
            )
            self._tag_template(created_template["LaunchTemplate"]["LaunchTemplateId"])
            self._applied_versions[change.name] = int(created_template["LaunchTemplate"]["DefaultVersionNumber"])
            return
        self._tag_template(change.params["id"])
        if "data" not in change.params:
            return
        created = ec2.create_launch_template_version(
            LaunchTemplateId=change.params["id"],
            VersionDescription=description,
            LaunchTemplateData=change.params["data"],
        )
        version = created["LaunchTemplateVersion"]["VersionNumber"]
        ec2.modify_launch_template(LaunchTemplateId=change.params["id"], DefaultVersion=str(version))
        self._applied_versions[change.name] = int(version)

    # -- S3 cache bucket ------------------------------------------------------------------------------------

    def _plan_bucket(self) -> Change:
        name = self._config.cache_bucket
        summary = f"private, SSE-S3, objects expire after {CACHE_EXPIRY_DAYS} days"
        s3 = self._aws.client("s3")
        try:
            s3.head_bucket(Bucket=name)
        except ClientError as exc:
            code = error_code(exc)
            if code in ("404", "NoSuchBucket"):
                return Change("bucket", name, Verb.CREATE, summary, {"settings": list(_BUCKET_SETTINGS)})
            if code in ("403", "AccessDenied"):
                # Bucket names are global: a 403 is usually another account's bucket.
                return Change("bucket", name, Verb.MISSING, "exists but is not accessible: choose another name")
            raise
        drift = [
            setting
            for setting, present in (
                ("public access block", self._bucket_blocks_public_access(name)),
                ("encryption", self._bucket_encrypted(name)),
                ("lifecycle", self._bucket_expires_cache(name)),
            )
            if not present
        ]
        if drift:
            return Change("bucket", name, Verb.UPDATE, "set " + ", ".join(drift), {"settings": drift})
        return Change("bucket", name, Verb.KEEP, summary)

    def _apply_bucket(self, change: Change) -> None:
        s3 = self._aws.client("s3")
        name = change.name
        if change.verb is Verb.CREATE:
            region = s3.meta.region_name
            # us-east-1 is the one region that refuses an explicit location constraint.
            location = (
                {} if region in (None, "us-east-1") else {"CreateBucketConfiguration": {"LocationConstraint": region}}
            )
            s3.create_bucket(Bucket=name, **location)
            s3.put_bucket_tagging(Bucket=name, Tagging={"TagSet": self._tag_list()})
        settings = change.params["settings"]
        if "public access block" in settings:
            s3.put_public_access_block(
                Bucket=name, PublicAccessBlockConfiguration=dict.fromkeys(_PUBLIC_ACCESS_BLOCK, True)
            )
        if "encryption" in settings:
            s3.put_bucket_encryption(
                Bucket=name,
                ServerSideEncryptionConfiguration={
                    "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
                },
            )
        if "lifecycle" in settings:
            # The call replaces every rule, so rules someone else added are carried over.
            others = [rule for rule in self._lifecycle_rules(name) if rule.get("ID") != CACHE_LIFECYCLE_RULE_ID]
            s3.put_bucket_lifecycle_configuration(
                Bucket=name, LifecycleConfiguration={"Rules": [*others, _cache_lifecycle_rule()]}
            )

    def _bucket_blocks_public_access(self, name: str) -> bool:
        try:
            found = self._aws.client("s3").get_public_access_block(Bucket=name)
        except ClientError as exc:
            if error_code(exc) != "NoSuchPublicAccessBlockConfiguration":
                raise
            return False
        current = found["PublicAccessBlockConfiguration"]
        return all(current.get(key) is True for key in _PUBLIC_ACCESS_BLOCK)

    def _bucket_encrypted(self, name: str) -> bool:
        try:
            found = self._aws.client("s3").get_bucket_encryption(Bucket=name)
        except ClientError as exc:
            if error_code(exc) != "ServerSideEncryptionConfigurationNotFoundError":
                raise
            return False
        # Any default encryption will do: a bucket someone moved to KMS is not downgraded to SSE-S3.
        rules = found["ServerSideEncryptionConfiguration"].get("Rules", [])
        return any(rule.get("ApplyServerSideEncryptionByDefault", {}).get("SSEAlgorithm") for rule in rules)

    def _bucket_expires_cache(self, name: str) -> bool:
        wanted = _cache_lifecycle_rule()
        return any(
            rule.get("ID") == CACHE_LIFECYCLE_RULE_ID and _contains(rule, wanted)
            for rule in self._lifecycle_rules(name)
        )

    def _lifecycle_rules(self, name: str) -> list[dict[str, Any]]:
        try:
            found = self._aws.client("s3").get_bucket_lifecycle_configuration(Bucket=name)
        except ClientError as exc:
            if error_code(exc) != "NoSuchLifecycleConfiguration":
                raise
            return []
        return list(found.get("Rules", []))

    def _tags(self) -> dict[str, str]:
        return fleet_tags(self._config.fleet)

    def _tag_list(self) -> list[dict[str, str]]:
        return [{"Key": key, "Value": value} for key, value in self._tags().items()]

    def _pool_tags(self, pool: str) -> list[dict[str, str]]:
        return [*self._tag_list(), {"Key": POOL_TAG, "Value": pool}]


@dataclass(frozen=True)
class PinnedImage:
    """The CI image a pool's template names (``registry/repository@digest``, or ``:tag`` when no digest is known),
    what the plan says about it, and the version to record in the pool's image record (None when unpinned)."""

    reference: str
    note: str
    version: Version | None = None


@dataclass(frozen=True)
class SubnetProblem:
    pool: str
    verb: Verb  # INVALID: no launch can succeed; MISSING: the subnet is not in the account (yet)
    detail: str


def subnet_problems(config: FleetConfig, ec2: Any) -> list[SubnetProblem]:
    """What in the account makes a pool's subnets unusable: a subnet that does not exist, or two subnets of one
    pool in the same Availability Zone (CreateFleet would refuse every launch of that pool with
    ``InvalidFleetConfig``)."""
    wanted = sorted({subnet for pool in config.pools for subnet in pool.subnets})
    if not wanted:
        return []
    zone_of: dict[str, str] = {}
    # A filter, not SubnetIds: one unknown id would fail the whole call instead of leaving that id out.
    for page in ec2.get_paginator("describe_subnets").paginate(Filters=[{"Name": "subnet-id", "Values": wanted}]):
        zone_of.update({subnet["SubnetId"]: subnet["AvailabilityZone"] for subnet in page["Subnets"]})
    region = ec2.meta.region_name
    problems = []
    for pool in config.pools:
        absent = [subnet for subnet in pool.subnets if subnet not in zone_of]
        if absent:
            problems.append(SubnetProblem(pool.name, Verb.MISSING, f"{', '.join(absent)} not found in {region}"))
        for zone, subnets in shared_zones(pool.subnets, zone_of).items():
            problems.append(
                SubnetProblem(
                    pool.name,
                    Verb.INVALID,
                    f"{', '.join(subnets)} are all in {zone}: EC2 refuses a fleet naming an instance type twice in "
                    "one zone (InvalidFleetConfig); keep one subnet per zone",
                )
            )
    return problems


@dataclass(frozen=True)
class PoolProblem:
    field: str  # the pool's field at fault, as config errors name it: pools[0](docker).instance_types
    verb: Verb  # INVALID: no launch of the pool could boot; MISSING: the AMI is not in the region (yet)
    detail: str


@dataclass(frozen=True)
class PoolImage:
    """The AMI a pool's launch template boots, or the problem that leaves the pool without one."""

    pool: PoolConfig
    facts: ImageFacts | None = None
    problem: PoolProblem | None = None


def pool_images(config: FleetConfig, clients: AwsClients) -> list[PoolImage]:
    """Each pool's AMI: its own ``ami``, else the runner AMI published for the architecture its instance types
    share (``<ami_parameter>/<arch>``), checked with EC2: the types' architectures come from one paginated
    DescribeInstanceTypes for every pool, the image's from DescribeImages.

    A pool whose types share no architecture or are unknown in the region, whose AMI has another architecture
    than its types, or that has no ``ami`` and no published AMI for its architecture is INVALID; an AMI the
    region does not have is MISSING, as a subnet is."""
    ec2 = clients.ec2
    region = ec2.meta.region_name
    supported = instance_type_architectures(ec2, [name for pool in config.pools for name in pool.instance_types])
    parameters: dict[str, str | None] = {}
    images: dict[str, ImageFacts | None] = {}
    resolved = []
    for index, pool in enumerate(config.pools):
        at = f"pools[{index}]({pool.name})"
        decided = pool_architecture(pool.instance_types, supported)
        if decided.architecture is None:
            resolved.append(PoolImage(pool, problem=PoolProblem(f"{at}.instance_types", Verb.INVALID, decided.problem)))
            continue
        if pool.ami is not None:
            image_id, source = pool.ami, ""
        else:
            parameter = ami_parameter_name(config.ami_parameter, decided.architecture)
            if parameter not in parameters:
                parameters[parameter] = _parameter_text(clients.ssm, parameter)
            value = parameters[parameter]
            if value is None or not AMI_ID.fullmatch(value):
                found = "does not exist" if value is None else f"holds {value[:40]!r}, not an AMI id"
                detail = (
                    f"no AMI: the pool's instance types are {decided.architecture} and SSM parameter {parameter} "
                    f"{found}: publish the runner AMI with 'fleetctl ami publish', or set the pool's ami"
                )
                resolved.append(PoolImage(pool, problem=PoolProblem(f"{at}.ami", Verb.INVALID, detail)))
                continue
            image_id, source = value, f" (from {parameter})"
        if image_id not in images:
            images[image_id] = describe_image(ec2, image_id)
        facts = images[image_id]
        if facts is None:
            detail = f"no AMI: {image_id}{source} not found in {region}"
            resolved.append(PoolImage(pool, problem=PoolProblem(f"{at}.ami", Verb.MISSING, detail)))
        elif facts.architecture not in decided.candidates:
            detail = (
                f"{image_id}{source} is an {facts.architecture or 'unknown'} image; the instance types "
                f"({', '.join(pool.instance_types)}) run {' or '.join(decided.candidates)}"
            )
            resolved.append(PoolImage(pool, problem=PoolProblem(f"{at}.ami", Verb.INVALID, detail)))
        else:
            resolved.append(PoolImage(pool, facts=facts))
    return resolved


def _parameter_text(ssm: Any, name: str) -> str | None:
    try:
        return str(ssm.get_parameter(Name=name)["Parameter"]["Value"]).strip()
    except ClientError as exc:
        if error_code(exc) != "ParameterNotFound":
            raise
        return None


def spot_role_exists(iam: Any) -> bool:
    """Whether the account has EC2 Spot's service-linked role, found by its service path (moto names the role
    differently from AWS)."""
    return bool(iam.list_roles(PathPrefix=SPOT_ROLE_PATH)["Roles"])


def account_problems(config: FleetConfig, clients: AwsClients) -> list[str]:
    """What in the live account keeps the pools from launching, one line each (``fleetctl validate --aws``)."""
    index = {pool.name: i for i, pool in enumerate(config.pools)}
    problems = [
        f"pools[{index[problem.pool]}]({problem.pool}).subnets: {problem.detail}"
        for problem in subnet_problems(config, clients.ec2)
    ]
    problems += [
        f"{image.problem.field}: {image.problem.detail}"
        for image in pool_images(config, clients)
        if image.problem is not None
    ]
    spot_pools = [pool.name for pool in config.pools if pool.market is Market.SPOT]
    if spot_pools and not spot_role_exists(clients.client("iam")):
        problems.append(
            f"{SPOT_ROLE_NAME} is missing: every spot launch ({', '.join(spot_pools)}) fails with "
            "AuthFailure.ServiceLinkedRoleCreationNotPermitted; 'fleetctl bootstrap' creates it"
        )
    return problems


def _unless_gone(call: Callable[..., Any], **params: Any) -> Any:
    """``call(**params)``'s answer, or None when IAM says the entity does not exist (NoSuchEntity)."""
    try:
        return call(**params)
    except ClientError as exc:
        if error_code(exc) != "NoSuchEntity":
            raise
        return None


def _same_attribute(current: str | None, wanted: str) -> bool:
    if current is None:
        return False
    if wanted.startswith("{"):
        return bool(json.loads(current) == json.loads(wanted))
    return current.lower() == wanted.lower()


_BUCKET_SETTINGS = ("public access block", "encryption", "lifecycle")
_PUBLIC_ACCESS_BLOCK = ("BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy", "RestrictPublicBuckets")


def _cache_lifecycle_rule() -> dict[str, Any]:
    return {
        "ID": CACHE_LIFECYCLE_RULE_ID,
        "Status": "Enabled",
        "Filter": {"Prefix": ""},
        "Expiration": {"Days": CACHE_EXPIRY_DAYS},
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
    }


def _contains(current: object, wanted: object) -> bool:
    """True when ``current`` has everything ``wanted`` has; AWS may add fields of its own to what it returns."""
    if isinstance(wanted, dict):
        return isinstance(current, dict) and all(_contains(current.get(k), v) for k, v in wanted.items())
    if isinstance(wanted, list):
        return (
            isinstance(current, list)
            and len(current) == len(wanted)
            and all(_contains(c, w) for c, w in zip(current, wanted, strict=True))
        )
    return current == wanted


def _same_policy(current: object, wanted: dict[str, Any]) -> bool:
    if isinstance(current, str):
        # botocore decodes IAM policy documents; a raw one is URL-encoded JSON.
        from urllib.parse import unquote

        current = json.loads(unquote(current))
    return _canonical_policy(current) == _canonical_policy(wanted)


def _canonical_policy(value: object) -> object:
    """IAM treats ``"a"`` and ``["a"]`` alike, and the order of actions, resources and statements as irrelevant."""
    if isinstance(value, dict):
        return {key: _canonical_policy(item) for key, item in value.items()}
    if isinstance(value, list):
        items = [_canonical_policy(item) for item in value]
        if len(items) == 1:
            return items[0]
        return sorted(items, key=lambda item: json.dumps(item, sort_keys=True))
    return value
