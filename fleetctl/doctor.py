"""``fleetctl doctor``: a pre-flight of a deployed stage, each check a pass or a failure with the fix to run.

A fleet that is missing one piece fails only when the first job arrives, inside a Lambda, far from whoever can
mend it. So doctor reads every piece a job's path needs, from the live account and GitLab, and compares it with
what the stage file says it should be: the resources bootstrap makes (judged by bootstrap's own planner, so the
two never disagree on what "right" is; the table and queues by the same settings when the stack owns them), each
pool's launch template as runners launch from it, its AMI and CI image, the roles' policies, the GitLab token and
hook, and the deployed Lambdas' environment.

Checks read only; none changes anything. They are independent and run side by side; one that cannot read what
it needs (AWS or GitLab refusing) fails with the reason, and the others go on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from chalicelib.aws import AwsClients, error_code
from chalicelib.config import FleetConfig, Market, PoolConfig, RunnerType, StateOwner
from chalicelib.errors import GitLabUnavailableError
from chalicelib.naming import FLEET_TAG, launch_template_name, runner_role_name
from chalicelib.scaling.templates import metadata_hop_limit, template_data
from chalicelib.store import FLEET_RECORDS_INDEX, LIVE_ATTRIBUTE, HookRecord, pool_key
from fleetctl.state_resources import dead_letter_queue_attributes, jobs_queue_attributes

# What a pool's GitLab token user must be, by runner type: creating group runners takes the group's Owner,
# project runners the project's Maintainer (GitLab's runner permissions; Gitlab::Access levels).
OWNER_ACCESS = 50
MAINTAINER_ACCESS = 40
ACCESS_NAMES = {0: "no access", 5: "Minimal access", 10: "Guest", 20: "Reporter", 30: "Developer", 40: "Maintainer"}
ACCESS_NAMES[50] = "Owner"
# The ECR actions a pull takes besides the authorization token (docker pull: the manifest, then each layer).
PULL_ACTIONS = ("ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer")
# How many of a hook's most recent deliveries are read for refusals.
RECENT_DELIVERIES = 20
CONFIG_VARIABLE = "RUNNER_FLEET_CONFIG"


@dataclass(frozen=True)
class Finding:
    """One line of the report: ``check`` passed or failed, what was found, and on failure the fix."""

    check: str
    ok: bool
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.check, "ok": self.ok, "detail": self.detail, "fix": self.fix}


@dataclass
class Doctor:
    """The checks of one stage. ``drift`` is ``fleetctl validate``'s comparison of the stage file with
    ``.chalice/config.json``; ``stage`` the Chalice stage whose Lambdas are checked (None when no stage names the
    file); ``webhook_url`` the deployed webhook's URL; ``gitlab_token`` the token to read hooks with (else the
    fleet's own)."""

    config: FleetConfig
    config_path: Path
    clients: AwsClients
    drift: Callable[[], list[str]]
    chalice_config: Path
    stage: str | None = None
    webhook_url: str | None = None
    gitlab_token: str | None = None
    _fleet_token: list[str] = field(default_factory=list)

    @property
    def bootstrap_fix(self) -> str:
        return f"fleetctl bootstrap --config {self.config_path}"

    def checks(self) -> list[tuple[str, Callable[[], list[Finding]]]]:
        return [
            ("config", self.check_config),
            ("table", self.check_table),
            ("queues", self.check_queues),
            ("parameters", self.check_parameters),
            ("ami", self.check_ami),
            ("launch templates", self.check_templates),
            ("pool roles", self.check_roles),
            ("spot role", self.check_spot_role),
            ("cache bucket", self.check_bucket),
            ("ci images", self.check_ci_images),
            ("image pull access", self.check_pull_access),
            ("gitlab token", self.check_gitlab_token),
            ("webhook", self.check_webhook),
            ("lambdas", self.check_lambdas),
        ]

    def run(self, workers: int = 6) -> list[Finding]:
        """Every check, side by side; the findings in the order of :meth:`checks`."""
        checks = self.checks()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [(name, pool.submit(check)) for name, check in checks]
            findings: list[Finding] = []
            for name, future in futures:
                try:
                    findings += future.result()
                except Exception as exc:
                    # A check that could not read what it needs fails with the reason; the others stand. What
                    # explain() does not know is a bug of the check, and is raised.
                    from fleetctl.errors import explain

                    line = explain(exc)
                    if line is None:
                        raise
                    findings.append(Finding(name, False, line))
        return findings

    # -- the stage file ----------------------------------------------------------------------------------------

    def check_config(self) -> list[Finding]:
        problems = self.drift()
        pools = ", ".join(pool.name for pool in self.config.pools)
        if not problems:
            return [Finding("config", True, f"{self.config_path} valid ({self.config.fleet}: {pools})")]
        return [
            Finding("config", False, problem, _drift_fix(problem, self.config_path))
            for problem in (problems[1:] or problems)
        ]

    # -- what bootstrap makes, judged by bootstrap's planner -------------------------------------------------

    def _bootstrapper(self) -> Any:
        from fleetctl.bootstrap import Bootstrapper

        return Bootstrapper(self.config, self.clients)

    def _judged(
        self, check: str, changes: Sequence[Any], *, kinds: bool = False, stack_owned: bool = False
    ) -> list[Finding]:
        """Bootstrap's planned changes as findings: what it would keep passes, anything it would do fails, with
        bootstrap (and what it would do) as the fix. ``kinds`` names each change's kind (role, profile);
        ``stack_owned`` resources (``state.owner: stack``) are the stack's to create and set, so its deployment is
        the fix."""
        from fleetctl.bootstrap import Verb

        findings = []
        for change in changes:
            name = f"{change.kind} {change.name}" if kinds else change.name
            detail = f" ({change.detail})" if change.detail else ""
            if change.verb is Verb.KEEP:
                owner = " (owned by the stack)" if stack_owned else ""
                findings.append(Finding(check, True, f"{name}{detail}{owner}"))
                continue
            state = {Verb.CREATE: "missing", Verb.UPDATE: "differs"}.get(change.verb, change.verb.value)
            if stack_owned:
                findings.append(Finding(check, False, f"{name}: {state}{detail}", self.stack_fix))
                continue
            fix = f"{self.bootstrap_fix} (it would {change.verb.value} {change.kind} {change.name})"
            findings.append(Finding(check, False, f"{name}: {state}{detail}", fix))
        return findings

    @property
    def _stack_owned(self) -> bool:
        return self.config.state.owner is StateOwner.STACK

    @property
    def stack_fix(self) -> str:
        stage = self.stage or "<stage>"
        return f"state.owner is stack: make package STAGE={stage}, then deploy the stack (docs/deploy.md)"

    def check_table(self) -> list[Finding]:
        table = self._bootstrapper()._plan_table(self.config.state.table)
        return self._judged("table", [table], stack_owned=self._stack_owned)

    def check_queues(self) -> list[Finding]:
        bootstrapper = self._bootstrapper()
        state = self.config.state
        fix = self.stack_fix if self._stack_owned else self.bootstrap_fix
        dlq = bootstrapper._plan_queue(state.dead_letter_queue, dead_letter_queue_attributes())
        findings = self._judged("queues", [dlq], stack_owned=self._stack_owned)
        try:
            jobs = bootstrapper._plan_queue(state.jobs_queue, jobs_queue_attributes())
        except ClientError as exc:
            # The jobs queue exists but its dead-letter queue does not: the redrive policy cannot be compared.
            if error_code(exc) not in ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"):
                raise
            return [*findings, Finding("queues", False, f"{state.jobs_queue}: its dead-letter queue is missing", fix)]
        return findings + self._judged("queues", [jobs], stack_owned=self._stack_owned)

    def check_bucket(self) -> list[Finding]:
        return self._judged("cache bucket", [self._bootstrapper()._plan_bucket()])

    def check_spot_role(self) -> list[Finding]:
        from fleetctl.bootstrap import SPOT_ROLE_NAME, SPOT_SERVICE, spot_role_exists

        spot = [pool.name for pool in self.config.pools if pool.market is Market.SPOT]
        if not spot:
            return [Finding("spot role", True, "no spot pool: not needed")]
        if spot_role_exists(self.clients.client("iam")):
            return [Finding("spot role", True, f"{SPOT_ROLE_NAME} exists")]
        return [
            Finding(
                "spot role",
                False,
                f"{SPOT_ROLE_NAME} is missing: every spot launch ({', '.join(spot)}) fails with "
                "AuthFailure.ServiceLinkedRoleCreationNotPermitted",
                f"{self.bootstrap_fix}, or aws iam create-service-linked-role --aws-service-name {SPOT_SERVICE}",
            )
        ]

    # -- secrets and the AMI in SSM -----------------------------------------------------------------------------

    def check_parameters(self) -> list[Finding]:
        webhook = self.config.webhook
        connect = f"fleetctl gitlab connect --config {self.config_path} --project <project> --url <webhook URL>"
        wanted = [
            (webhook.token_parameter, "webhook token", f"{self.bootstrap_fix} (generates it), then {connect}"),
            (
                self.config.gitlab.token_parameter,
                "GitLab API token",
                f"GITLAB_TOKEN=glpat-... {self.bootstrap_fix}",
            ),
        ]
        if webhook.signing_secret_parameter:
            wanted.append((webhook.signing_secret_parameter, "webhook signing secret", connect))
        findings = []
        for name, what, fix in wanted:
            try:
                found = self.clients.ssm.get_parameter(Name=name, WithDecryption=True)["Parameter"]
            except ClientError as exc:
                if error_code(exc) != "ParameterNotFound":
                    raise
                findings.append(Finding("parameters", False, f"{name} ({what}) does not exist", fix))
                continue
            if not str(found.get("Value", "")).strip():
                findings.append(Finding("parameters", False, f"{name} ({what}) is blank", fix))
            elif found.get("Type") != "SecureString":
                findings.append(
                    Finding(
                        "parameters",
                        False,
                        f"{name} ({what}) is a {found.get('Type')}, not a SecureString",
                        f"aws ssm delete-parameter --name {name}, then {fix}",
                    )
                )
            else:
                findings.append(Finding("parameters", True, f"{name} ({what})"))
        return findings

    def check_ami(self) -> list[Finding]:
        from fleetctl.bootstrap import pool_images

        findings = []
        for image in pool_images(self.config, self.clients):
            if image.problem is None:
                assert image.facts is not None
                source = (
                    "the pool's ami" if image.pool.ami else f"{self.config.ami_parameter}/{image.facts.architecture}"
                )
                detail = f"{image.pool.name}: {image.facts.image_id} ({image.facts.architecture}, from {source})"
                findings.append(Finding("ami", True, detail))
            else:
                fix = (
                    f"fleetctl ami publish manifest.json --config {self.config_path} (the Packer build of runner_ami/ "
                    "for the pool's architecture), or set the pool's ami"
                )
                findings.append(Finding("ami", False, f"{image.problem.field}: {image.problem.detail}", fix))
        return findings

    # -- launch templates -------------------------------------------------------------------------------------

    def check_templates(self) -> list[Finding]:
        from fleetctl.bootstrap import pool_images

        images = {image.pool.name: image for image in pool_images(self.config, self.clients)}
        return [finding for pool in self.config.pools for finding in self._check_template(pool, images[pool.name])]

    def _check_template(self, pool: PoolConfig, image: Any) -> list[Finding]:
        from fleetctl.bootstrap import _contains

        ec2 = self.clients.ec2
        name = launch_template_name(self.config.fleet, pool.name)
        try:
            found = ec2.describe_launch_templates(LaunchTemplateNames=[name])["LaunchTemplates"][0]
        except ClientError as exc:
            if error_code(exc) != "InvalidLaunchTemplateName.NotFoundException":
                raise
            return [Finding("launch templates", False, f"{name} (pool {pool.name}) does not exist", self.bootstrap_fix)]
        template_id = found["LaunchTemplateId"]
        default = int(found["DefaultVersionNumber"])
        launched = self._pool_template_version(pool.name)
        findings = []
        tags = ec2.describe_tags(
            Filters=[{"Name": "resource-id", "Values": [template_id]}, {"Name": "key", "Values": [FLEET_TAG]}]
        )["Tags"]
        if not any(tag.get("Value") == self.config.fleet for tag in tags):
            findings.append(
                Finding(
                    "launch templates",
                    False,
                    f"{name}: not tagged {FLEET_TAG}={self.config.fleet}: scale-up may not launch from it",
                    self.bootstrap_fix,
                )
            )
        if launched is not None and launched != default:
            findings.append(
                Finding(
                    "launch templates",
                    False,
                    f"{name}: the default version is {default}, but pool {pool.name} launches from version {launched} "
                    "(its POOL# item): an image promotion stopped half way",
                    f"fleetctl reconcile --once --config {self.config_path} (makes version {launched} the default)",
                )
            )
        expected = self._expected_template(pool, image)
        versions = sorted({default, *([launched] if launched is not None else [])})
        described = ec2.describe_launch_template_versions(
            LaunchTemplateId=template_id, Versions=[str(version) for version in versions]
        )["LaunchTemplateVersions"]
        for version in described:
            number = int(version["VersionNumber"])
            role = "default" if number == default else "the pool's"
            if number == default and number == launched:
                role = "default, the pool's"
            problems = template_problems(version["LaunchTemplateData"], pool, self.config.fleet)
            if not problems and expected is not None:
                data = version["LaunchTemplateData"]
                drift = [key for key, value in expected.items() if not _contains(data.get(key), value)]
                drift += sorted(key for key in data if key not in expected)
                problems = [f"{key} differs from what bootstrap renders" for key in drift]
            if problems:
                findings.append(
                    Finding(
                        "launch templates",
                        False,
                        f"{name} version {number} ({role}): " + "; ".join(problems),
                        f"{self.bootstrap_fix} (writes a new default version with the expected settings)",
                    )
                )
            else:
                summary = f"{name} version {number} ({role}): IMDSv2 required, volumes encrypted, profile "
                findings.append(
                    Finding("launch templates", True, summary + runner_role_name(self.config.fleet, pool.name))
                )
        return findings

    def _pool_template_version(self, pool: str) -> int | None:
        """The template version the pool's counter item names (the one scale-up launches from), if any."""
        try:
            item = self.clients.dynamodb.get_item(
                TableName=self.config.state.table, Key={"pk": {"S": pool_key(pool)}}, ConsistentRead=True
            ).get("Item", {})
        except ClientError as exc:
            if error_code(exc) != "ResourceNotFoundException":
                raise
            return None
        version = item.get("template_version", {}).get("N")
        return int(version) if version is not None else None

    def _expected_template(self, pool: PoolConfig, image: Any) -> dict[str, Any] | None:
        """The data bootstrap would write for the pool now; None without an AMI (the ami check says why)."""
        if image.problem is not None or image.facts is None:
            return None
        from chalicelib.images.store import ImageStore

        bootstrapper = self._bootstrapper()
        try:
            record = ImageStore(self.config.state.table, self.clients.dynamodb).read_many([pool.name]).get(pool.name)
        except ClientError as exc:
            if error_code(exc) != "ResourceNotFoundException":
                raise
            record = None
        pinned = bootstrapper._pinned_image(pool, record)
        return template_data(self.config, pool, image.facts.image_id, image.facts.root_device, pinned.reference)

    # -- roles --------------------------------------------------------------------------------------------------

    def check_roles(self) -> list[Finding]:
        findings = []
        bootstrapper = self._bootstrapper()
        for pool in self.config.pools:
            role, _policy, profile = bootstrapper._plan_runner_identity(pool)
            findings += self._judged("pool roles", [role, profile], kinds=True)
            findings += self._role_grants(pool)
        return findings

    def _role_grants(self, pool: PoolConfig) -> list[Finding]:
        """The pool's role holds the runner policy for its pool and nothing else."""
        from fleetctl.iam_policies import RUNNER_POLICY_NAME, runner_instance_policy

        iam = self.clients.client("iam")
        role = runner_role_name(self.config.fleet, pool.name)
        try:
            inline = iam.list_role_policies(RoleName=role)["PolicyNames"]
            attached = iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"]
        except ClientError as exc:
            if error_code(exc) != "NoSuchEntity":
                raise
            return []  # the role itself is reported missing
        findings = []
        for name in inline:
            if name != RUNNER_POLICY_NAME:
                findings.append(
                    Finding(
                        "pool roles",
                        False,
                        f"{role} also has inline policy {name}: more than pool {pool.name} needs",
                        f"aws iam delete-role-policy --role-name {role} --policy-name {name}",
                    )
                )
        for policy in attached:
            findings.append(
                Finding(
                    "pool roles",
                    False,
                    f"{role} has managed policy {policy['PolicyArn']} attached: more than pool {pool.name} needs",
                    f"aws iam detach-role-policy --role-name {role} --policy-arn {policy['PolicyArn']}",
                )
            )
        if RUNNER_POLICY_NAME not in inline:
            findings.append(
                Finding("pool roles", False, f"{role} has no {RUNNER_POLICY_NAME} policy", self.bootstrap_fix)
            )
            return findings
        document = iam.get_role_policy(RoleName=role, PolicyName=RUNNER_POLICY_NAME)["PolicyDocument"]
        extra, lacking = policy_difference(document, runner_instance_policy(self.config, pool))
        if extra or lacking:
            parts = []
            if extra:
                parts.append("grants more: " + "; ".join(extra))
            if lacking:
                parts.append("lacks: " + "; ".join(lacking))
            findings.append(
                Finding("pool roles", False, f"{role}/{RUNNER_POLICY_NAME} " + ", ".join(parts), self.bootstrap_fix)
            )
        elif not findings:
            findings.append(
                Finding("pool roles", True, f"{role}/{RUNNER_POLICY_NAME}: what pool {pool.name} needs, no more")
            )
        return findings

    # -- CI images in ECR --------------------------------------------------------------------------------------

    def check_ci_images(self) -> list[Finding]:
        from chalicelib.images.store import ImageStore
        from fleetctl.images import ecr_client, registry_id

        try:
            records = ImageStore(self.config.state.table, self.clients.dynamodb).read_many(
                [pool.name for pool in self.config.pools]
            )
        except ClientError as exc:
            if error_code(exc) != "ResourceNotFoundException":
                raise
            records = {}
        findings = []
        for pool in self.config.pools:
            repository, tag = pool.image.repository, pool.image.tag
            ecr = ecr_client(self.clients, pool)
            registry = registry_id(pool)
            try:
                found = ecr.describe_images(repositoryName=repository, imageIds=[{"imageTag": tag}], **registry)
            except ClientError as exc:
                code = error_code(exc)
                if code == "RepositoryNotFoundException":
                    findings.append(
                        Finding(
                            "ci images",
                            False,
                            f"{pool.name}: no ECR repository {repository}",
                            f"aws ecr create-repository --repository-name {repository}, push {repository}:{tag}, "
                            f"then {self.bootstrap_fix}",
                        )
                    )
                    continue
                if code != "ImageNotFoundException":
                    raise
                findings.append(
                    Finding(
                        "ci images",
                        False,
                        f"{pool.name}: {repository}:{tag} is not in ECR",
                        f"docker push <registry>/{repository}:{tag}, then {self.bootstrap_fix}",
                    )
                )
                continue
            digest = found["imageDetails"][0]["imageDigest"]
            record = records.get(pool.name)
            current = record.current.digest if record is not None and record.current is not None else None
            if current is not None and current != digest:
                try:
                    ecr.describe_images(repositoryName=repository, imageIds=[{"imageDigest": current}], **registry)
                except ClientError as exc:
                    if error_code(exc) != "ImageNotFoundException":
                        raise
                    findings.append(
                        Finding(
                            "ci images",
                            False,
                            f"{pool.name}: runs {repository}@{current}, which ECR no longer has: new runners "
                            "cannot pull it",
                            f"fleetctl image rollback {pool.name} --config {self.config_path}, or fleetctl image pin "
                            f"{pool.name} {digest} --config {self.config_path}",
                        )
                    )
                    continue
            runs = f"; runs {current}" if current is not None and current != digest else ""
            findings.append(Finding("ci images", True, f"{pool.name}: {repository}:{tag} -> {digest}{runs}"))
        return findings

    def check_pull_access(self) -> list[Finding]:
        from fleetctl.images import ecr_client, fleet_account

        others = [pool for pool in self.config.pools if pool.image.account]
        if not others:
            return [Finding("image pull access", True, "every pool's image is in this account's registry")]
        account = fleet_account(self.clients)
        findings = []
        for pool in others:
            owner = str(pool.image.account)
            if owner == account:
                findings.append(Finding("image pull access", True, f"{pool.name}: image in this account"))
                continue
            role_arn = self._role_arn(pool)
            repository = pool.image.repository
            fix = (
                f"in account {owner}: aws ecr set-repository-policy --repository-name {repository} --policy-text "
                f"'{json.dumps(pull_statement_policy(role_arn))}' (merged with any statements it has)"
            )
            try:
                text = ecr_client(self.clients, pool).get_repository_policy(
                    registryId=owner, repositoryName=repository
                )["policyText"]
            except ClientError as exc:
                if error_code(exc) != "RepositoryPolicyNotFoundException":
                    raise
                detail = f"{pool.name}: {owner}'s repository {repository} has no policy: the pool's role cannot pull"
                findings.append(Finding("image pull access", False, detail, fix))
                continue
            if policy_allows_pull(json.loads(text), role_arn, account):
                findings.append(
                    Finding("image pull access", True, f"{pool.name}: {owner}/{repository} lets {role_arn} pull")
                )
            else:
                detail = (
                    f"{pool.name}: the policy of {owner}'s repository {repository} does not let {role_arn} "
                    f"{' and '.join(PULL_ACTIONS)}"
                )
                findings.append(Finding("image pull access", False, detail, fix))
        return findings

    def _role_arn(self, pool: PoolConfig) -> str:
        role = runner_role_name(self.config.fleet, pool.name)
        try:
            return str(self.clients.client("iam").get_role(RoleName=role)["Role"]["Arn"])
        except ClientError as exc:
            if error_code(exc) != "NoSuchEntity":
                raise
            from chalicelib.naming import runner_role_arn
            from fleetctl.images import fleet_account

            return runner_role_arn(self.config.fleet, pool.name, fleet_account(self.clients))

    # -- GitLab -------------------------------------------------------------------------------------------------

    def _read_fleet_token(self) -> str | None:
        if not self._fleet_token:
            try:
                value = self.clients.ssm.get_parameter(Name=self.config.gitlab.token_parameter, WithDecryption=True)
            except ClientError as exc:
                if error_code(exc) != "ParameterNotFound":
                    raise
                return None
            self._fleet_token.append(str(value["Parameter"]["Value"]))
        return self._fleet_token[0]

    def check_gitlab_token(self) -> list[Finding]:
        import gitlab
        import requests

        from fleetctl.bootstrap import check_fleet_token
        from fleetctl.gitlab_token import GitLabTokenError

        gitlab_config = self.config.gitlab
        token = self._read_fleet_token()
        store = f"GITLAB_TOKEN=glpat-... {self.bootstrap_fix}"
        if token is None:
            return [Finding("gitlab token", False, f"{gitlab_config.token_parameter} does not exist", store)]
        try:
            check_fleet_token(self.config, token)
        except GitLabTokenError as exc:
            scopes = "read_api, create_runner, manage_runner" + (
                ", api" if any(pool.retry_interrupted_jobs for pool in self.config.pools) else ""
            )
            fix = f"make a token with scopes {scopes} (or api) and store it: {store}"
            return [Finding("gitlab token", False, str(exc), fix)]
        if gitlab_config.runner_type is RunnerType.INSTANCE:
            return [Finding("gitlab token", True, "scopes and administrator: instance runners can be made")]
        kind = "groups" if gitlab_config.runner_type is RunnerType.GROUP else "projects"
        needed = OWNER_ACCESS if kind == "groups" else MAINTAINER_ACCESS
        owner = gitlab_config.runner_owner_id
        client = gitlab.Gitlab(gitlab_config.url, private_token=token, timeout=10)
        try:
            user_id = int(_json_object(client.http_get("/personal_access_tokens/self"))["user_id"])
            member = _json_object(client.http_get(f"/{kind}/{owner}/members/all/{user_id}"))
        except gitlab.exceptions.GitlabError as exc:
            if exc.response_code != 404:
                detail = f"cannot read the token's membership: GitLab answered {exc.response_code}"
                return [Finding("gitlab token", False, detail, "check gitlab.url and the token")]
            member = {"access_level": 0}  # GitLab's answer for a user who is no member
        except requests.RequestException as exc:
            detail = f"cannot read the token's membership: GitLab unreachable ({type(exc).__name__})"
            return [Finding("gitlab token", False, detail, "check gitlab.url and the network")]
        level = int(member.get("access_level", 0))
        where = f"{kind[:-1]} {owner}"
        if level < needed:
            return [
                Finding(
                    "gitlab token",
                    False,
                    f"the token's user is {ACCESS_NAMES.get(level, level)} of {where}; "
                    f"{gitlab_config.runner_type.value} runners need {ACCESS_NAMES[needed]}",
                    f"give the token's user the {ACCESS_NAMES[needed]} role of {where} (Manage > Members), or store "
                    f"another user's token: {store}",
                )
            ]
        return [Finding("gitlab token", True, f"scopes, and {ACCESS_NAMES.get(level, level)} of {where}")]

    def _hooks(self) -> list[HookRecord]:
        query: dict[str, Any] = {
            "TableName": self.config.state.table,
            "IndexName": FLEET_RECORDS_INDEX,
            "KeyConditionExpression": "#live = :hook",
            "ExpressionAttributeNames": {"#live": LIVE_ATTRIBUTE},
            "ExpressionAttributeValues": {":hook": {"S": "hook"}},
        }
        from boto3.dynamodb.types import TypeDeserializer

        plain = TypeDeserializer()
        hooks = []
        for page in self.clients.dynamodb.get_paginator("query").paginate(**query):
            for item in page["Items"]:
                hooks.append(HookRecord.from_item({key: plain.deserialize(value) for key, value in item.items()}))
        return hooks

    def check_webhook(self) -> list[Finding]:
        import gitlab
        import requests

        connect = "fleetctl gitlab connect --config {config} --project {project} --url {url}"
        url = self.webhook_url or deployed_webhook_url(self.chalice_config, self.stage)
        try:
            hooks = self._hooks()
        except ClientError as exc:
            if error_code(exc) != "ResourceNotFoundException":
                raise
            hooks = []
        if not hooks:
            fix = connect.format(config=self.config_path, project="<project>", url=url or "<webhook URL>")
            return [Finding("webhook", False, "no project hook connected: no job event reaches the fleet", fix)]
        token = self.gitlab_token or self._read_fleet_token()
        if token is None:
            return [Finding("webhook", False, "no GitLab token to read the hooks with", "pass --gitlab-token")]
        findings = []
        for hook in hooks:
            fix = connect.format(config=self.config_path, project=hook.project_id, url=url or hook.webhook_url)
            client = gitlab.Gitlab(hook.gitlab_url or self.config.gitlab.url, private_token=token, timeout=10)
            where = f"hook {hook.hook_id} of project {hook.project_id}"
            try:
                answer = _json_object(client.http_get(f"/projects/{hook.project_id}/hooks/{hook.hook_id}"))
                deliveries = client.http_get(
                    f"/projects/{hook.project_id}/hooks/{hook.hook_id}/events",
                    query_data={"per_page": RECENT_DELIVERIES},
                )
            except gitlab.exceptions.GitlabError as exc:
                if exc.response_code == 404:
                    findings.append(Finding("webhook", False, f"{where} no longer exists in GitLab", fix))
                    continue
                findings.append(Finding("webhook", False, f"{where}: GitLab answered {exc.response_code}", fix))
                continue
            except requests.RequestException as exc:
                findings.append(Finding("webhook", False, f"{where}: GitLab unreachable ({type(exc).__name__})", fix))
                continue
            problems = hook_problems(answer, deliveries, url)
            if problems:
                findings.append(Finding("webhook", False, f"{where}: " + "; ".join(problems), fix))
            else:
                secret = "secret token set" if answer.get("token_present") else "no delivery refused"
                findings.append(
                    Finding(
                        "webhook",
                        True,
                        f"{where} -> {answer.get('url')}: job events, {secret}, {answer.get('alert_status')}",
                    )
                )
        return findings

    # -- the deployed Lambdas -----------------------------------------------------------------------------------

    def check_lambdas(self) -> list[Finding]:
        from fleetctl.lambda_policies import LambdaFunction, chalice_stages, function_name

        if self.stage is None:
            return [
                Finding(
                    "lambdas",
                    False,
                    f"no Chalice stage of {self.chalice_config} names {self.config_path}: cannot tell which functions",
                    "pass --stage STAGE",
                )
            ]
        document = json.loads(self.chalice_config.read_text())
        app_name = str(document["app_name"])
        stage = chalice_stages(self.chalice_config)[self.stage]
        base = {**document.get("environment_variables", {}), **stage.get("environment_variables", {})}
        lambda_client = self.clients.client("lambda")
        deploy = f"chalice deploy --stage {self.stage}"
        findings = []
        for function in LambdaFunction:
            name = function_name(app_name, self.stage, function)
            settings = stage.get("lambda_functions", {}).get(function.chalice_name, {})
            expected = {**base, **settings.get("environment_variables", {})}
            try:
                found = lambda_client.get_function_configuration(FunctionName=name)
            except ClientError as exc:
                if error_code(exc) != "ResourceNotFoundException":
                    raise
                findings.append(Finding("lambdas", False, f"{name} is not deployed", deploy))
                continue
            deployed = found.get("Environment", {}).get("Variables", {})
            problems = environment_problems(deployed, expected, self.config_path, self.chalice_config)
            if problems:
                findings.append(Finding("lambdas", False, f"{name}: " + "; ".join(problems), deploy))
            else:
                findings.append(Finding("lambdas", True, f"{name}: environment of stage {self.stage}"))
        return findings


# -- pure parts ---------------------------------------------------------------------------------------------------


def template_problems(data: dict[str, Any], pool: PoolConfig, fleet: str) -> list[str]:
    """What in a launch template version's data breaks the pool's guarantees, named by setting."""
    problems = []
    metadata = data.get("MetadataOptions", {})
    if metadata.get("HttpTokens") != "required":
        problems.append(f"MetadataOptions.HttpTokens is {metadata.get('HttpTokens')!r}, not 'required' (IMDSv2)")
    hop_limit = metadata.get("HttpPutResponseHopLimit")
    if hop_limit != metadata_hop_limit(pool):
        problems.append(
            f"MetadataOptions.HttpPutResponseHopLimit is {hop_limit!r}, not {metadata_hop_limit(pool)} "
            "(job containers would reach the role's credentials)"
        )
    mappings = data.get("BlockDeviceMappings", [])
    if not mappings:
        problems.append("BlockDeviceMappings is empty (the root volume would not be encrypted)")
    for mapping in mappings:
        if "Ebs" in mapping and mapping["Ebs"].get("Encrypted") is not True:
            problems.append(f"the volume {mapping.get('DeviceName')} is not encrypted")
    profile = data.get("IamInstanceProfile", {})
    wanted = runner_role_name(fleet, pool.name)
    named = profile.get("Name") or str(profile.get("Arn", "")).rsplit("/", 1)[-1] or None
    if named != wanted:
        problems.append(f"IamInstanceProfile is {named!r}, not the pool's {wanted!r}")
    return problems


def policy_difference(current: object, wanted: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The statements ``current`` has beyond ``wanted``, and those it lacks, as IAM reads them (a string and a
    one-element list alike, order irrelevant)."""
    from urllib.parse import unquote

    from fleetctl.bootstrap import _canonical_policy

    if isinstance(current, str):
        current = json.loads(unquote(current))
    assert isinstance(current, dict)

    def statements(document: dict[str, Any]) -> dict[str, Any]:
        listed = document.get("Statement", [])
        listed = listed if isinstance(listed, list) else [listed]
        return {json.dumps(_canonical_policy(s), sort_keys=True): s for s in listed}

    have, want = statements(current), statements(wanted)
    extra = [_statement_text(have[key]) for key in have if key not in want]
    lacking = [_statement_text(want[key]) for key in want if key not in have]
    return extra, lacking


def _statement_text(statement: dict[str, Any]) -> str:
    actions = statement.get("Action", [])
    actions = actions if isinstance(actions, list) else [actions]
    resources = statement.get("Resource", [])
    resources = resources if isinstance(resources, list) else [resources]
    sid = f"{statement['Sid']}: " if statement.get("Sid") else ""
    return f"{sid}{statement.get('Effect')} {', '.join(actions)} on {', '.join(resources)}"


def _as_list(value: object) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _action_matches(pattern: str, action: str) -> bool:
    import fnmatch

    return fnmatch.fnmatchcase(action.lower(), pattern.lower())


def policy_allows_pull(policy: dict[str, Any], role_arn: str, account: str) -> bool:
    """Whether a repository policy lets ``role_arn`` (of ``account``) pull: an Allow naming the role, its account
    (the id or its root) or everyone for both pull actions, and no Deny of either for it. Conditions are not
    evaluated: a statement with one is not counted as allowing."""
    principals = {role_arn, account, f"arn:aws:iam::{account}:root", "*"}

    def applies(statement: dict[str, Any]) -> bool:
        principal = statement.get("Principal")
        if principal == "*":
            return True
        named = _as_list(principal.get("AWS")) if isinstance(principal, dict) else []
        return any(name in principals for name in named)

    def covers(statement: dict[str, Any], action: str) -> bool:
        return any(_action_matches(pattern, action) for pattern in _as_list(statement.get("Action")))

    statements = policy.get("Statement", [])
    statements = statements if isinstance(statements, list) else [statements]
    for action in PULL_ACTIONS:
        relevant = [s for s in statements if applies(s) and covers(s, action)]
        if any(s.get("Effect") == "Deny" for s in relevant):
            return False
        if not any(s.get("Effect") == "Allow" and not s.get("Condition") for s in relevant):
            return False
    return True


def pull_statement_policy(role_arn: str) -> dict[str, Any]:
    """The repository policy statement that lets one role pull."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "RunnerFleetPull",
                "Effect": "Allow",
                "Principal": {"AWS": role_arn},
                "Action": ["ecr:BatchCheckLayerAvailability", *PULL_ACTIONS],
            }
        ],
    }


def hook_problems(hook: dict[str, Any], deliveries: object, url: str | None) -> list[str]:
    """What keeps a project hook from feeding the fleet: job events off, another URL than the deployed API's, a
    secret GitLab says is unset (GitLab 19.0 and later say ``token_present``), recent deliveries the webhook
    refused with 401 (the secret differs from the stage's), or GitLab no longer executing it."""
    problems = []
    if not hook.get("job_events"):
        problems.append("job events are off")
    if url is None:
        problems.append("the deployed webhook URL is unknown: pass --webhook-url to compare")
    elif hook.get("url") != url:
        problems.append(f"its URL is {hook.get('url')}, not the deployed webhook's {url}")
    if hook.get("token_present") is False:
        problems.append("it has no secret token: the webhook refuses every delivery (401)")
    refused = [
        entry
        for entry in (deliveries if isinstance(deliveries, list) else [])
        if isinstance(entry, dict) and str(entry.get("response_status")) == "401"
    ]
    if refused:
        problems.append(
            f"{len(refused)} of its last {RECENT_DELIVERIES} deliveries were refused with 401: its secret token is not "
            "the stage's webhook token"
        )
    status = hook.get("alert_status", "executable")
    if status != "executable":
        until = f" until {hook.get('disabled_until')}" if status == "temporarily_disabled" else ""
        problems.append(f"GitLab does not execute it: {status}{until}")
    return problems


def environment_problems(
    deployed: dict[str, str], expected: dict[str, str], config_path: Path, chalice_config: Path
) -> list[str]:
    """How a deployed function's environment differs from its Chalice stage's: each variable missing, different
    or extra. ``RUNNER_FLEET_CONFIG`` is compared as the file it names (relative to the project, as in the
    package), which must be the file doctor checks."""
    project = chalice_config.resolve().parents[1]
    problems = []
    for name in sorted(set(expected) | set(deployed)):
        have, want = deployed.get(name), expected.get(name)
        if name == CONFIG_VARIABLE and have is not None:
            named = Path(have) if Path(have).is_absolute() else project / have
            if named.resolve() != config_path.resolve():
                problems.append(f"{name} names {have}, not {config_path}")
            continue
        if want is None:
            problems.append(f"{name} is set ({have!r}) but not in .chalice/config.json")
        elif have is None:
            problems.append(f"{name} is not set (.chalice/config.json says {want!r})")
        elif have != want:
            problems.append(f"{name} is {have!r}, not {want!r}")
    return problems


def deployed_webhook_url(chalice_config: Path, stage: str | None) -> str | None:
    """The webhook URL of the stage's REST API, as ``chalice deploy`` recorded it in ``.chalice/deployed``."""
    if stage is None:
        return None
    deployed = chalice_config.parent / "deployed" / f"{stage}.json"
    if not deployed.is_file():
        return None
    for resource in json.loads(deployed.read_text()).get("resources", []):
        if resource.get("resource_type") == "rest_api" and resource.get("rest_api_url"):
            return str(resource["rest_api_url"]).rstrip("/") + "/webhooks/gitlab"
    return None


def stage_naming(config_path: Path, chalice_config: Path) -> str | None:
    """The Chalice stage whose RUNNER_FLEET_CONFIG names ``config_path``, if one does."""
    from fleetctl.lambda_policies import chalice_stages, stage_config_path

    if not chalice_config.is_file():
        return None
    for stage, settings in chalice_stages(chalice_config).items():
        if CONFIG_VARIABLE in settings.get("environment_variables", {}) and (
            stage_config_path(chalice_config, stage).resolve() == config_path.resolve()
        ):
            return str(stage)
    return None


def _json_object(answer: object) -> dict[str, Any]:
    """GitLab's answer as a JSON object (python-gitlab returns the raw response for anything else)."""
    if not isinstance(answer, dict):
        raise GitLabUnavailableError("GitLab's answer is not a JSON object")
    return answer


def _drift_fix(problem: str, config_path: Path) -> str:
    if "fleetctl policies" in problem:
        return problem.rsplit("run ", 1)[-1].strip("'")
    return f"make .chalice/config.json agree with {config_path} (the stage's environment_variables)"
