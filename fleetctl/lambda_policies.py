"""The Lambda functions' IAM policies, generated from the stage file and written by hand here: least privilege.

``fleetctl policies`` writes them into ``.chalice/`` under the names ``.chalice/config.json`` gives each function
(``iam_policy_file``); ``fleetctl policies --check`` and ``fleetctl validate`` report a committed file that no
longer matches. Each statement says why it exists. A statement that no call of the function's code needs (the
Lambda service uses it on the function's behalf, or the call happens only on a path the test suite cannot
reach) carries ``without_call``, the reason it is there anyway; the test suite records every AWS call each
function makes and fails on a call no statement allows and on a statement no call used that has no such reason.

Regions and accounts in ARNs are ``*``: a Lambda role reaches only resources of its own account unless another
account's resource policy lets it in, and the names below are unique to the fleet. The partition follows the
stage's region (``aws-cn`` for China, ``aws-us-gov`` for GovCloud, else ``aws``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

from chalicelib.config import FleetConfig
from chalicelib.images.store import image_key
from chalicelib.naming import FLEET_TAG, events_dead_letter_queue_name, runner_role_arn
from chalicelib.store import (
    FLEET_RECORDS_INDEX,
    IDLE_RUNNERS_INDEX,
    TOKEN_DEADLINES_INDEX,
    job_key,
    launch_key,
    pool_key,
    runner_key,
    token_key,
)
from fleetctl.iam_policies import repository_arn

POLICY_VERSION = "2012-10-17"
CHALICE_DIR = Path(__file__).resolve().parents[1] / ".chalice"
CHALICE_CONFIG = CHALICE_DIR / "config.json"

Policy = dict[str, Any]


class LambdaFunction(str, Enum):
    """The Lambda functions of a stage; the value names their policy file, ``policy-<stage>-<value>.json``."""

    WEBHOOK = "webhook"
    SCALE_UP = "scale-up"
    INSTANCE_STATE = "instance-state"
    RECONCILE = "reconcile"
    INSTANCE_INTERRUPTION = "instance-interruption"
    IMAGES = "images"

    @property
    def chalice_name(self) -> str:
        """The function's key under ``lambda_functions`` in ``.chalice/config.json``."""
        return _CHALICE_NAMES[self]


_CHALICE_NAMES = {
    LambdaFunction.WEBHOOK: "api_handler",
    LambdaFunction.SCALE_UP: "scale_up",
    LambdaFunction.INSTANCE_STATE: "instance_state",
    LambdaFunction.RECONCILE: "reconcile",
    LambdaFunction.INSTANCE_INTERRUPTION: "instance_interruption",
    LambdaFunction.IMAGES: "images",
}


@dataclass(frozen=True)
class Grant:
    """One policy statement, with what the JSON cannot hold: why it may go unused by the function's code."""

    sid: str
    actions: tuple[str, ...]
    resources: tuple[str, ...]
    condition: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    without_call: str = ""

    def statement(self) -> dict[str, Any]:
        statement: dict[str, Any] = {
            "Sid": self.sid,
            "Effect": "Allow",
            "Action": list(self.actions),
            "Resource": list(self.resources),
        }
        if self.condition:
            statement["Condition"] = {op: dict(values) for op, values in self.condition.items()}
        return statement


def policy_document(grants: list[Grant]) -> Policy:
    return {"Version": POLICY_VERSION, "Statement": [grant.statement() for grant in grants]}


def render(policy: Policy) -> str:
    """The stable text of a policy file: two-space indent, keys in the order written, newline at the end."""
    return json.dumps(policy, indent=2) + "\n"


# ---- ARNs ------------------------------------------------------------------------------------------------


def _table_arn(config: FleetConfig) -> str:
    return f"arn:aws:dynamodb:*:*:table/{config.state.table}"


def _queue_arn(name: str) -> str:
    return f"arn:aws:sqs:*:*:{name}"


def _parameter_arn(name: str) -> str:
    # SSM parameter ARNs hold the name without its leading slash after "parameter/".
    return f"arn:aws:ssm:*:*:parameter/{name.lstrip('/')}"


def _ec2_arn(kind: str, name: str = "*") -> str:
    return f"arn:aws:ec2:*:*:{kind}/{name}"


def function_name(app_name: str, stage: str, function: LambdaFunction) -> str:
    """Chalice's name for a deployed function: the API handler is ``<app>-<stage>``, the others add their name."""
    if function is LambdaFunction.WEBHOOK:
        return f"{app_name}-{stage}"
    return f"{app_name}-{stage}-{function.chalice_name}"


def _logs(app_name: str, stage: str, function: LambdaFunction | None) -> Grant:
    # Without a function, the stage's default role: Chalice names it in config.json even though every function
    # has a policy of its own, so it gets logging only.
    group = (
        f"/aws/lambda/{function_name(app_name, stage, function)}" if function else f"/aws/lambda/{app_name}-{stage}*"
    )
    return Grant(
        "OwnLogs",
        ("logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"),
        (f"arn:aws:logs:*:*:log-group:{group}", f"arn:aws:logs:*:*:log-group:{group}:*"),
        without_call="the Lambda service writes the function's logs with the function's role",
    )


def _failed_events(config: FleetConfig) -> Grant:
    # An EventBridge-invoked function's on-failure destination (the deployment stack's events dead-letter queue):
    # Lambda sends an event whose invocation failed after its retries there, with the function's own role.
    return Grant(
        "DeadLetterFailedEvents",
        ("sqs:SendMessage",),
        (_queue_arn(events_dead_letter_queue_name(config.fleet)),),
        without_call="Lambda sends an event whose invocation failed after its retries to the function's on-failure "
        "destination with the function's role; the function's code never does",
    )


# ---- per function ------------------------------------------------------------------------------------------


def webhook_grants(config: FleetConfig) -> list[Grant]:
    secrets = [config.webhook.token_parameter]
    if config.webhook.signing_secret_parameter:
        secrets.append(config.webhook.signing_secret_parameter)
    # Every item the webhook writes or reads is a job item; its key starts with the job prefix.
    job_items = {"ForAllValues:StringLike": {"dynamodb:LeadingKeys": [job_key_pattern()]}}
    return [
        # The token (and signing secret) authenticate each request; both are read in one GetParameters call.
        # SecureStrings under the AWS-managed aws/ssm key decrypt through SSM without a KMS grant of ours.
        Grant("ReadWebhookSecrets", ("ssm:GetParameters",), tuple(_parameter_arn(name) for name in secrets)),
        # A delivery is recorded on its job's item in one conditional UpdateItem (de-duplication and ordering).
        Grant("RecordJobEvents", ("dynamodb:UpdateItem",), (_table_arn(config),), job_items),
        Grant(
            # When DynamoDB refuses that write without returning the old item, the item is read to say why.
            "ReadRefusedJobItems",
            ("dynamodb:GetItem",),
            (_table_arn(config),),
            job_items,
            without_call="DynamoDB (and moto) return the refused item with the conditional failure, so the read "
            "runs only when an answer lacks it",
        ),
        # A pending job goes to scale-up through the jobs queue; the URL is resolved from the name once.
        Grant("QueuePendingJobs", ("sqs:GetQueueUrl", "sqs:SendMessage"), (_queue_arn(config.state.jobs_queue),)),
        # A running or finished job moves its runner's record between busy and idle (conditional UpdateItems).
        Grant(
            "TrackRunnerActivity",
            ("dynamodb:UpdateItem",),
            (_table_arn(config),),
            {"ForAllValues:StringLike": {"dynamodb:LeadingKeys": [_key_pattern(runner_key)]}},
        ),
    ]


def job_key_pattern() -> str:
    """``JOB#*``: the partition keys of job items, derived from the store's own key function."""
    return _key_pattern(lambda _: job_key(1, 2))


def _token_items() -> dict[str, dict[str, list[str]]]:
    """Only runner token items (``TOKEN#*``)."""
    return {"ForAllValues:StringLike": {"dynamodb:LeadingKeys": [_key_pattern(token_key)]}}


def _key_pattern(key: Callable[[str], str]) -> str:
    """``KIND#*`` for one of the store's key functions: the prefix it puts before the item's own name."""
    built = key("x")
    return built[: built.index("#") + 1] + "*"


def scale_up_grants(config: FleetConfig) -> list[Grant]:
    fleet_tag = {f"aws:RequestTag/{FLEET_TAG}": config.fleet}
    from_a_template = {"ec2:LaunchTemplate": _ec2_arn("launch-template")}
    subnets = tuple(sorted({_ec2_arn("subnet", s) for pool in config.pools for s in pool.subnets}))
    groups = tuple(sorted({_ec2_arn("security-group", g) for pool in config.pools for g in pool.security_groups}))
    pool_roles = tuple(sorted(runner_role_arn(config.fleet, pool.name) for pool in config.pools))
    return [
        Grant(
            # The event source mapping polls the jobs queue and deletes what the function took, with its role.
            "ReceiveJobs",
            ("sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"),
            (_queue_arn(config.state.jobs_queue),),
            without_call="the Lambda event source mapping receives and deletes the jobs queue's messages",
        ),
        # A job that waits for capacity or a retry is sent back to the jobs queue with a delay.
        Grant("RequeueJobs", ("sqs:GetQueueUrl", "sqs:SendMessage"), (_queue_arn(config.state.jobs_queue),)),
        # A job out of attempts, or a message that is not a job, goes to the dead-letter queue.
        Grant("DeadLetterJobs", ("sqs:GetQueueUrl", "sqs:SendMessage"), (_queue_arn(config.state.dead_letter_queue),)),
        # Claims, leases, launches and runner records. Transactions are authorized per item as these actions.
        # Never the token items: scale-up writes runner tokens but has no need to read one back.
        Grant(
            "FleetTable",
            ("dynamodb:BatchGetItem", "dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem"),
            (_table_arn(config),),
            {
                "ForAllValues:StringLike": {
                    "dynamodb:LeadingKeys": [job_key_pattern()]
                    + [_key_pattern(k) for k in (launch_key, pool_key, runner_key)]
                }
            },
        ),
        # A pool's idle runners are counted in the table's sparse index (keys only) before launching for a job.
        Grant("CountIdleRunners", ("dynamodb:Query",), (f"{_table_arn(config)}/index/{IDLE_RUNNERS_INDEX}",)),
        # The GitLab API token that creates runners.
        Grant("ReadGitLabToken", ("ssm:GetParameter",), (_parameter_arn(config.gitlab.token_parameter),)),
        # Each instance's runner token, handed over in its own item (chalicelib/scaling/tokens.py); deleted again
        # when the instance terminated while its runner was being made.
        Grant(
            "HandOverRunnerTokens", ("dynamodb:DeleteItem", "dynamodb:PutItem"), (_table_arn(config),), _token_items()
        ),
        # A token item's key holds the unique id of its pool's runner role (the instance's aws:userid is "<role
        # id>:<instance id>"), which exists only once bootstrap made the role; each read once per cold start.
        Grant("ReadRunnerRoleIds", ("iam:GetRole",), pool_roles),
        # Launching: scoped per the Service Authorization Reference ("Actions, resources, and condition keys for
        # Amazon EC2": the resource types and condition keys of CreateFleet and RunInstances) and the EC2 User
        # Guide's example policies for launching only from a launch template (ec2:LaunchTemplate with
        # ec2:IsLaunchTemplateResource). CreateFleet is authorized on the fleet, the instances, volumes, the
        # launch template, subnets and the image; an instant fleet's instances are launched with the caller's
        # permissions, so RunInstances is authorized as well ("Permissions for EC2 Fleet users", EC2 Fleet
        # prerequisites), on the instance, its volumes, network interface, security groups, subnet and image.
        Grant("CreateFleetsOfThisFleet", ("ec2:CreateFleet",), (_ec2_arn("fleet"),), {"StringEquals": fleet_tag}),
        Grant(
            # Instances and volumes must carry the fleet's tag in the request (CreateFleet's TagSpecifications).
            "LaunchTaggedInstancesAndVolumes",
            ("ec2:CreateFleet", "ec2:RunInstances"),
            (_ec2_arn("instance"), _ec2_arn("volume")),
            {"StringEquals": fleet_tag},
        ),
        Grant(
            # Only the launch templates bootstrap made and tagged for this fleet: they fix the AMI, user data,
            # instance profile and metadata options, which is what makes a launch safe.
            "LaunchFromFleetTemplates",
            ("ec2:CreateFleet", "ec2:RunInstances"),
            (_ec2_arn("launch-template"),),
            {"StringEquals": {f"aws:ResourceTag/{FLEET_TAG}": config.fleet}},
        ),
        # The pools' subnets (CreateFleet overrides name them) and security groups (from the template).
        Grant("LaunchIntoPoolSubnets", ("ec2:CreateFleet", "ec2:RunInstances"), subnets),
        Grant("LaunchWithPoolSecurityGroups", ("ec2:RunInstances",), groups),
        Grant(
            # CreateFleet has no launch-template condition key for the image, so it is open there; RunInstances
            # then allows only the image the template names (an override in the request would not be).
            "LaunchTemplateImageForFleet",
            ("ec2:CreateFleet",),
            ("arn:aws:ec2:*::image/*",),
        ),
        Grant(
            "LaunchTemplateImageOnly",
            ("ec2:RunInstances",),
            ("arn:aws:ec2:*::image/*",),
            {"Bool": {"ec2:IsLaunchTemplateResource": "true"}, "ArnLike": from_a_template},
        ),
        Grant(
            # Instances and volumes of RunInstances come from a launch template (which one is decided above).
            "RunFromTemplatesOnly",
            ("ec2:RunInstances",),
            (_ec2_arn("instance"), _ec2_arn("volume")),
            {"ArnLike": from_a_template},
        ),
        Grant(
            # The network interface EC2 creates for each instance, only in the pools' subnets.
            "NetworkInterfacesInPoolSubnets",
            ("ec2:RunInstances",),
            (_ec2_arn("network-interface"),),
            {"ArnLike": {"ec2:Subnet": list(subnets), **from_a_template}},
        ),
        Grant(
            # Tags travel with the launch (TagSpecifications): never CreateTags on an existing resource.
            "TagOnlyAtLaunch",
            ("ec2:CreateTags",),
            (_ec2_arn("fleet"), _ec2_arn("instance"), _ec2_arn("volume")),
            {"StringEquals": {"ec2:CreateAction": ["CreateFleet", "RunInstances"]}},
        ),
        Grant(
            # Each pool's template names its instance profile, which holds the pool's role; EC2 needs PassRole for
            # it. Exactly the fleet's pool roles, nothing else.
            "PassOnlyThePoolRoles",
            ("iam:PassRole",),
            pool_roles,
            {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}},
        ),
        # Finding the instances a launch made when its answer was lost; Describe calls take no resource ARN.
        Grant("FindLaunchedInstances", ("ec2:DescribeInstances",), ("*",)),
    ]


def instance_state_grants(config: FleetConfig) -> list[Grant]:
    return [
        # Runner records and the pools' capacity counters, and nothing else in the table: a termination gives
        # the lease back in a transaction authorized per item, and an instance terminated before scale-up
        # recorded it gets a tombstone (PutItem) so that the late record write is refused.
        Grant(
            "RunnerRecordsAndPoolCounters",
            ("dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem"),
            (_table_arn(config),),
            {"ForAllValues:StringLike": {"dynamodb:LeadingKeys": [_key_pattern(runner_key), _key_pattern(pool_key)]}},
        ),
        # The GitLab API token that deletes the terminated instance's runner.
        Grant(
            "ReadGitLabToken",
            ("ssm:GetParameter",),
            (_parameter_arn(config.gitlab.token_parameter),),
            without_call="the test process serves every function with one cached token, which scale-up reads "
            "first; a Lambda container of instance-state reads it on its first termination",
        ),
        # A terminated instance's token, if it never read (and deleted) it itself.
        Grant("DeleteUnreadRunnerTokens", ("dynamodb:DeleteItem",), (_table_arn(config),), _token_items()),
        _failed_events(config),
    ]


def reconcile_grants(config: FleetConfig) -> list[Grant]:
    # Warm runners are launched exactly as scale-up launches for jobs, so reconcile holds scale-up's launch
    # grants; it never receives from the jobs queue nor dead-letters a job.
    skipped = {"ReceiveJobs", "RequeueJobs", "DeadLetterJobs", "FleetTable", "HandOverRunnerTokens", "CountIdleRunners"}
    launching = [
        replace(
            grant,
            without_call="the test process serves every function with one set of runner role ids, which scale-up "
            "reads first; a reconcile container reads a pool's on its first warm launch of that pool",
        )
        if grant.sid == "ReadRunnerRoleIds"
        else grant
        for grant in scale_up_grants(config)
        if grant.sid not in skipped
    ]
    fleet_items = [job_key_pattern()] + [_key_pattern(k) for k in (launch_key, pool_key, runner_key, image_key)]
    return [
        # One run at a time: the run's lease item (LEASE#reconcile), taken and given back conditionally.
        Grant(
            "RunLease",
            ("dynamodb:PutItem", "dynamodb:DeleteItem"),
            (_table_arn(config),),
            {"ForAllValues:StringLike": {"dynamodb:LeadingKeys": ["LEASE#*"]}},
        ),
        # The live records (runners, launches, pools, unfinished jobs, hooks) are read from the sparse index.
        Grant("ReadLiveRecords", ("dynamodb:Query",), (f"{_table_arn(config)}/index/{FLEET_RECORDS_INDEX}",)),
        # The runner tokens past their boot deadline, from the keys-only token index: their keys, never a value.
        Grant("FindExpiredTokens", ("dynamodb:Query",), (f"{_table_arn(config)}/index/{TOKEN_DEADLINES_INDEX}",)),
        # Settling launches, terminating records and returning leases, recovering lost jobs, warm launches.
        Grant(
            "FleetTable",
            ("dynamodb:BatchGetItem", "dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem"),
            (_table_arn(config),),
            {"ForAllValues:StringLike": {"dynamodb:LeadingKeys": fleet_items}},
        ),
        # A reaped runner's unread token, a token past its boot deadline; a warm runner's token is handed over as
        # scale-up does.
        Grant("RunnerTokens", ("dynamodb:DeleteItem", "dynamodb:PutItem"), (_table_arn(config),), _token_items()),
        # A lost job is queued for scale-up, as the webhook would have.
        Grant("QueueRecoveredJobs", ("sqs:GetQueueUrl", "sqs:SendMessage"), (_queue_arn(config.state.jobs_queue),)),
        # The pools' launch templates' default versions (a runner launched from an older one is retired).
        Grant("ReadLaunchTemplates", ("ec2:DescribeLaunchTemplates",), ("*",)),
        # The version an image promotion recorded becomes its template's default, when the promotion stopped
        # before: only on the templates bootstrap made for this fleet.
        Grant(
            "DefaultToPromotedVersion",
            ("ec2:ModifyLaunchTemplate",),
            (_ec2_arn("launch-template"),),
            {"StringEquals": {f"aws:ResourceTag/{FLEET_TAG}": config.fleet}},
        ),
        # Only the fleet's own instances may be terminated: reaped orphans and retired runners.
        Grant(
            "TerminateFleetInstances",
            ("ec2:TerminateInstances",),
            (_ec2_arn("instance"),),
            {"StringEquals": {f"aws:ResourceTag/{FLEET_TAG}": config.fleet}},
        ),
        *launching,
    ]


def instance_interruption_grants(config: FleetConfig) -> list[Grant]:
    return [
        # The interrupted runner's record, and nothing else in the table: it is marked draining and interrupted
        # (UpdateItem), and read back when that mark is refused (a duplicate event, or a runner already gone).
        Grant(
            "RunnerRecords",
            ("dynamodb:GetItem", "dynamodb:UpdateItem"),
            (_table_arn(config),),
            {"ForAllValues:StringLike": {"dynamodb:LeadingKeys": [_key_pattern(runner_key)]}},
        ),
        # The GitLab API token that pauses the interrupted instance's runner.
        Grant(
            "ReadGitLabToken",
            ("ssm:GetParameter",),
            (_parameter_arn(config.gitlab.token_parameter),),
            without_call="the test process serves every function with one cached token, which scale-up reads "
            "first; a Lambda container of instance-interruption reads it on its first event",
        ),
        _failed_events(config),
    ]


def images_grants(config: FleetConfig) -> list[Grant]:
    return [
        # The pools' image records (IMAGE#) and the launch template version on each pool's counter item (POOL#),
        # written together in one transaction, authorized per item as these actions.
        Grant(
            "ImageRecordsAndPoolVersions",
            ("dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem"),
            (_table_arn(config),),
            {"ForAllValues:StringLike": {"dynamodb:LeadingKeys": [_key_pattern(image_key), _key_pattern(pool_key)]}},
        ),
        # The version a promotion starts from; Describe calls take no resource ARN.
        Grant("ReadLaunchTemplateVersions", ("ec2:DescribeLaunchTemplateVersions",), ("*",)),
        # Which digest a pool's tag names now, for two pushes in the same second: the pools' repositories only.
        Grant(
            "ReadPoolImageTags",
            ("ecr:DescribeImages",),
            tuple(
                sorted(
                    {
                        repository_arn(pool.image.repository, pool.image.account, pool.image.region)
                        for pool in config.pools
                    }
                )
            ),
        ),
        # A promotion's new version, made the default: only on the templates bootstrap made for this fleet.
        Grant(
            "PromoteOnFleetTemplates",
            ("ec2:CreateLaunchTemplateVersion", "ec2:ModifyLaunchTemplate"),
            (_ec2_arn("launch-template"),),
            {"StringEquals": {f"aws:ResourceTag/{FLEET_TAG}": config.fleet}},
        ),
        _failed_events(config),
    ]


_GRANTS = {
    LambdaFunction.WEBHOOK: webhook_grants,
    LambdaFunction.SCALE_UP: scale_up_grants,
    LambdaFunction.INSTANCE_STATE: instance_state_grants,
    LambdaFunction.RECONCILE: reconcile_grants,
    LambdaFunction.INSTANCE_INTERRUPTION: instance_interruption_grants,
    LambdaFunction.IMAGES: images_grants,
}


def function_grants(config: FleetConfig, function: LambdaFunction, app_name: str, stage: str) -> list[Grant]:
    """Every statement of one function's policy, logging first, in the stage's partition."""
    grants = [_logs(app_name, stage, function), *_GRANTS[function](config)]
    return [_in_partition(grant, partition_of(config.region)) for grant in grants]


def partition_of(region: str | None) -> str:
    """The AWS partition of a region: ARNs differ between aws, aws-cn and aws-us-gov."""
    if region and region.startswith("cn-"):
        return "aws-cn"
    if region and region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


def _in_partition(grant: Grant, partition: str) -> Grant:
    if partition == "aws":
        return grant

    def move(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace("arn:aws:", f"arn:{partition}:")
        if isinstance(value, list):
            return [move(item) for item in value]
        return value

    condition = {op: {key: move(v) for key, v in pairs.items()} for op, pairs in grant.condition.items()}
    return replace(grant, resources=tuple(move(r) for r in grant.resources), condition=condition)


# ---- the stages of .chalice/config.json ------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyFile:
    """One policy file a stage of ``.chalice/config.json`` names, and what it must contain."""

    stage: str
    function: LambdaFunction | None  # None: the stage's default role
    path: Path
    grants: tuple[Grant, ...]

    @property
    def text(self) -> str:
        return render(policy_document(list(self.grants)))

    def is_current(self) -> bool:
        return self.path.is_file() and self.path.read_text() == self.text


def chalice_stages(chalice_config: Path = CHALICE_CONFIG) -> dict[str, Any]:
    return dict(json.loads(chalice_config.read_text())["stages"])


def stage_config_path(chalice_config: Path, stage: str) -> Path:
    """The stage file a stage's Lambdas load (its ``RUNNER_FLEET_CONFIG``), resolved like the Lambdas do."""
    from chalicelib.config import CONFIG_ENV_VAR

    stages = chalice_stages(chalice_config)
    relative = str(stages[stage]["environment_variables"][CONFIG_ENV_VAR])
    return chalice_config.resolve().parents[1] / relative


def stage_policy_files(config: FleetConfig, stage: str, chalice_config: Path = CHALICE_CONFIG) -> list[PolicyFile]:
    """The policy files of one stage, named as ``.chalice/config.json`` names them."""
    document = json.loads(chalice_config.read_text())
    app_name = str(document["app_name"])
    settings = document["stages"][stage]
    directory = chalice_config.parent
    files = [PolicyFile(stage, None, directory / settings["iam_policy_file"], (_logs(app_name, stage, None),))]
    functions = settings.get("lambda_functions", {})
    for function in LambdaFunction:
        name = functions.get(function.chalice_name, {}).get("iam_policy_file", f"policy-{stage}-{function.value}.json")
        grants = tuple(function_grants(config, function, app_name, stage))
        files.append(PolicyFile(stage, function, directory / name, grants))
    return files


def iter_policy_files(stages: list[str], chalice_config: Path = CHALICE_CONFIG) -> Iterator[PolicyFile]:
    from chalicelib.config import load_config

    for stage in stages:
        config = load_config(stage_config_path(chalice_config, stage))
        yield from stage_policy_files(config, stage, chalice_config)
