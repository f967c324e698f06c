"""A pytest plugin that records every AWS call chalicelib makes, per Lambda function, and checks it against IAM.

Each botocore API call is attributed to a Lambda function by the chalicelib module on the calling stack that is that
function's entry point (``intake/webhook.py`` and ``intake/secrets.py``: the webhook; ``scaling/scale_up.py``:
scale-up; ``lifecycle/instances.py``: instance-state; ``lifecycle/interruptions.py``: instance-interruption;
``images/handler.py``: images; ``lifecycle/reconcile.py``: reconcile; the outermost one when several are). Calls
with none of them on the stack come from fleetctl, the sandbox or a test; they are an operator's or the test's own,
not a function's, and are not checked.

A call becomes the IAM requests AWS would authorize for it (action, resource ARN, condition context): the
DynamoDB key's partition for ``dynamodb:LeadingKeys``, each item of a transaction as its own action, the queue
ARN from a queue URL, the launch template, subnets, security groups, image and request tags of a CreateFleet.
At the end of the session each request is evaluated against the policy ``fleetctl.lambda_policies`` generates
for the function from the stage file the call ran under. A request this recorder cannot translate, or whose
condition keys it cannot fill, is denied, never waved through.

Results: ``.pytest_cache/iam-calls.json`` (every recorded request and the verdict). The session fails on a
denied call. With ``RUNNER_FLEET_IAM_FULL=1`` it also fails on a statement no call used that has no
``without_call`` reason, which only means something when the whole suite ran in that process; ``make test``
runs the suite in two processes and checks that over both reports at the end
(``python -m tests.iam_recorder REPORT...``).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import sys
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from botocore.client import BaseClient

PROJECT_DIR = Path(__file__).resolve().parents[1]
FULL_SUITE_ENV = "RUNNER_FLEET_IAM_FULL"
# make test runs the slow scenarios in a second pytest process beside the rest: each writes its own report.
REPORT = Path(os.environ.get("RUNNER_FLEET_IAM_REPORT") or PROJECT_DIR / ".pytest_cache" / "iam-calls.json")
SNAPSHOTS = PROJECT_DIR / ".pytest_cache" / "iam-stage-files"
PLACEHOLDER_ACCOUNT = "123456789012"

# Entry modules of each Lambda function; the innermost one on the stack names the caller.
_ENTRY_MODULES = {
    str(PROJECT_DIR / "chalicelib" / "intake" / "webhook.py"): "webhook",
    str(PROJECT_DIR / "chalicelib" / "intake" / "secrets.py"): "webhook",
    str(PROJECT_DIR / "chalicelib" / "scaling" / "scale_up.py"): "scale-up",
    str(PROJECT_DIR / "chalicelib" / "lifecycle" / "instances.py"): "instance-state",
    str(PROJECT_DIR / "chalicelib" / "lifecycle" / "reconcile.py"): "reconcile",
    str(PROJECT_DIR / "chalicelib" / "lifecycle" / "interruptions.py"): "instance-interruption",
    str(PROJECT_DIR / "chalicelib" / "images" / "handler.py"): "images",
}

Context = tuple[tuple[str, tuple[str, ...]], ...]


@dataclass(frozen=True)
class Request:
    """One authorization AWS makes for a call: an action on a resource, with the condition keys it knows."""

    function: str
    config: str
    call: str  # the API operation, for the report
    action: str
    resource: str
    context: Context = ()
    problem: str = ""  # why the recorder could not translate the call; such a request is always denied


class Recorder:
    def __init__(self) -> None:
        self.requests: set[Request] = set()
        self.calls = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        self._templates: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._iam_clients: dict[tuple[str, str], Any] = {}
        self._config_versions: dict[tuple[str, int, int], str] = {}
        self._original: Any = None
        self._original_submit: Any = None

    # -- hooking botocore --------------------------------------------------------------------------------

    def install(self) -> None:
        original = BaseClient._make_api_call
        recorder = self

        def _make_api_call(client: BaseClient, operation_name: str, api_params: dict[str, Any]) -> Any:
            if not getattr(recorder._local, "busy", False):
                function = _calling_function()
                if function is not None:
                    recorder._record(client, function, operation_name, api_params)
            return original(client, operation_name, api_params)

        self._original = original
        BaseClient._make_api_call = _make_api_call  # type: ignore[method-assign]
        self._original_submit = _install_thread_pool_inheritance()

    def uninstall(self) -> None:
        if self._original is not None:
            BaseClient._make_api_call = self._original  # type: ignore[method-assign]
            ThreadPoolExecutor.submit = self._original_submit  # type: ignore[method-assign]

    def _record(self, client: BaseClient, function: str, operation: str, params: dict[str, Any]) -> None:
        self._local.busy = True
        try:
            config = self._config_snapshot()
            try:
                found = list(self._translate(client, operation, params))
            except Exception as exc:
                found = [(f"?:{operation}", "?", (), f"translation failed: {exc!r}")]
            with self._lock:
                self.calls += 1
                for action, resource, context, problem in found:
                    self.requests.add(Request(function, config, operation, action, resource, context, problem))
        finally:
            self._local.busy = False

    def _config_snapshot(self) -> str:
        """The stage file the call ran under, as it was then: the sandbox rewrites one file on every reset."""
        path = os.environ.get("RUNNER_FLEET_CONFIG", "")
        try:
            stat = os.stat(path)
        except OSError:
            return path
        key = (path, stat.st_mtime_ns, stat.st_size)
        found = self._config_versions.get(key)
        if found is None:
            source = Path(path)
            snapshot = SNAPSHOTS / str(os.getpid()) / f"{len(self._config_versions)}{source.suffix}"
            snapshot.parent.mkdir(parents=True, exist_ok=True)
            snapshot.write_bytes(source.read_bytes())
            found = self._config_versions[key] = str(snapshot)
        return found

    # -- calls to IAM requests ---------------------------------------------------------------------------

    def _translate(
        self, client: BaseClient, operation: str, params: Mapping[str, Any]
    ) -> Iterable[tuple[str, str, Context, str]]:
        model = client.meta.service_model
        prefix = model.signing_name
        region = client.meta.region_name or "us-east-1"
        action = f"{prefix}:{operation}"
        if prefix == "dynamodb":
            yield from _dynamodb(region, operation, params)
        elif prefix == "sqs":
            yield from _sqs(region, action, operation, params)
        elif prefix == "ssm":
            yield from _ssm(region, action, operation, params)
        elif prefix == "ec2" and operation.startswith("Describe"):
            yield action, "*", (), ""
        elif prefix == "ec2" and operation == "CreateFleet":
            yield from self._create_fleet(client, region, params)
        elif prefix == "ec2" and operation == "TerminateInstances":
            yield from self._terminate(client, region, params)
        elif prefix == "ec2" and operation in ("CreateLaunchTemplateVersion", "ModifyLaunchTemplate"):
            # Authorized on the launch template, with its tags (an image promotion, reconcile finishing one).
            template = self._template(client, params)
            if template is None:
                yield action, "?", (), f"launch template {params.get('LaunchTemplateName')} not found"
                return
            tags = tuple((f"aws:ResourceTag/{k}", (v,)) for k, v in sorted(template["tags"].items()))
            yield action, _arn_maker("ec2", region)(f"launch-template/{template['id']}"), tags, ""
        elif prefix == "ecr" and operation == "DescribeImages":
            # Authorized on the repository, in the registry the call names (its own account's when none).
            account = params.get("registryId") or PLACEHOLDER_ACCOUNT
            yield action, f"arn:aws:ecr:{region}:{account}:repository/{params['repositoryName']}", (), ""
        elif prefix == "sts" and operation == "GetCallerIdentity":
            # No permission is needed to ask who you are (STS API reference, GetCallerIdentity): nothing to judge.
            return
        elif prefix == "iam" and operation == "GetRole":
            # Authorized on the role's ARN, which holds its path (IAM User Guide, "IAM identifiers"): looked up with
            # a client of the recorder's own, which no fault injected into the caller's client reaches. A role that
            # does not exist has no path to add.
            try:
                role_arn = self._iam(client).get_role(RoleName=params["RoleName"])["Role"]["Arn"]
            except Exception:
                role_arn = f"arn:aws:iam::{PLACEHOLDER_ACCOUNT}:role/{params['RoleName']}"
            yield action, role_arn, (), ""
        else:
            yield action, "?", (), f"no translation of {action} into IAM resources"

    def _create_fleet(self, client: BaseClient, region: str, params: Mapping[str, Any]) -> Iterable[Any]:
        arn = _arn_maker("ec2", region)
        tags: dict[str, dict[str, str]] = {
            spec["ResourceType"]: {t["Key"]: t["Value"] for t in spec.get("Tags", [])}
            for spec in params.get("TagSpecifications", [])
        }

        def request_tags(kind: str) -> Context:
            return tuple((f"aws:RequestTag/{k}", (v,)) for k, v in sorted(tags.get(kind, {}).items()))

        fleet = "ec2:CreateFleet"
        yield fleet, arn("fleet/*"), request_tags("fleet"), ""
        yield "ec2:CreateTags", arn("fleet/*"), (("ec2:CreateAction", ("CreateFleet",)),), ""
        for config in params.get("LaunchTemplateConfigs", []):
            spec = config["LaunchTemplateSpecification"]
            template = self._template(client, spec)
            if template is None:
                yield fleet, "?", (), f"launch template {spec} not found"
                continue
            template_arn = arn(f"launch-template/{template['id']}")
            template_tags = tuple((f"aws:ResourceTag/{k}", (v,)) for k, v in sorted(template["tags"].items()))
            from_template = (("ec2:LaunchTemplate", (template_arn,)),)
            data = template["data"]
            subnets = sorted({o["SubnetId"] for o in config.get("Overrides", []) if o.get("SubnetId")})
            if not subnets:
                yield fleet, "?", (), "CreateFleet without subnet overrides: the subnets are not derived"
            image = data.get("ImageId")
            if any(o.get("ImageId") for o in config.get("Overrides", [])):
                yield "ec2:RunInstances", "?", (), "an image override: not derived"
            image_arn = f"arn:aws:ec2:{region}::image/{image}"
            # CreateFleet's own authorization, then the RunInstances an instant fleet makes with the caller's role.
            for action in (fleet, "ec2:RunInstances"):
                for kind in ("instance", "volume"):
                    yield action, arn(f"{kind}/*"), request_tags(kind) + from_template, ""
                yield action, template_arn, template_tags + from_template, ""
                for subnet in subnets:
                    yield action, arn(f"subnet/{subnet}"), from_template, ""
            yield fleet, image_arn, (), ""
            yield (
                "ec2:RunInstances",
                image_arn,
                (("ec2:IsLaunchTemplateResource", ("true",)), *from_template),
                "",
            )
            for group in data.get("SecurityGroupIds", []):
                yield "ec2:RunInstances", arn(f"security-group/{group}"), from_template, ""
            for subnet in subnets:
                yield (
                    "ec2:RunInstances",
                    arn("network-interface/*"),
                    (("ec2:Subnet", (arn(f"subnet/{subnet}"),)), *from_template),
                    "",
                )
            for kind in ("instance", "volume"):
                yield "ec2:CreateTags", arn(f"{kind}/*"), (("ec2:CreateAction", ("CreateFleet",)),), ""
            profile = data.get("IamInstanceProfile") or {}
            if profile:
                # PassRole is authorized on the ARN of the role the template's instance profile holds.
                for role_arn, problem in self._profile_roles(client, profile):
                    yield "iam:PassRole", role_arn, (("iam:PassedToService", ("ec2.amazonaws.com",)),), problem

    def _terminate(self, client: BaseClient, region: str, params: Mapping[str, Any]) -> Iterable[Any]:
        """TerminateInstances is authorized per instance, with the instance's tags as ``aws:ResourceTag/*``."""
        arn = _arn_maker("ec2", region)
        for instance_id in params.get("InstanceIds", []):
            try:
                tags = client.describe_tags(  # type: ignore[attr-defined]
                    Filters=[{"Name": "resource-id", "Values": [instance_id]}]
                )["Tags"]
            except Exception as exc:
                yield "ec2:TerminateInstances", "?", (), f"tags of {instance_id} unreadable: {exc!r}"
                continue
            context = tuple(
                (f"aws:ResourceTag/{t['Key']}", (t["Value"],)) for t in sorted(tags, key=lambda t: t["Key"])
            )
            yield "ec2:TerminateInstances", arn(f"instance/{instance_id}"), context, ""

    def _iam(self, client: BaseClient) -> Any:
        """An IAM client of the recorder's own, on the endpoint ``client`` calls (the local AWS)."""
        import boto3

        key = (str(client.meta.endpoint_url), str(client.meta.region_name))
        found = self._iam_clients.get(key)
        if found is None:
            found = self._iam_clients[key] = boto3.client("iam", region_name=key[1], endpoint_url=key[0])
        return found

    def _profile_roles(self, client: BaseClient, profile: Mapping[str, str]) -> list[tuple[str, str]]:
        """(role ARN, problem) for each role of the instance profile a template names (by name or ARN)."""
        name = profile.get("Name") or profile.get("Arn", "").rsplit("/", 1)[-1]
        try:
            roles = self._iam(client).get_instance_profile(InstanceProfileName=name)["InstanceProfile"]["Roles"]
        except Exception as exc:  # reported as an untranslatable call, and so denied
            return [("?", f"instance profile {name} unreadable: {exc!r}")]
        return [(role["Arn"], "") for role in roles]

    def _template(self, client: BaseClient, spec: Mapping[str, Any]) -> dict[str, Any] | None:
        """The launch template's id, tags and named (or default) version's data (the template is looked up on every
        launch, since the sandbox makes it anew on each reset; its version's data and tags once per id and
        version)."""
        name = spec.get("LaunchTemplateName") or spec.get("LaunchTemplateId") or ""
        by = {"LaunchTemplateNames": [name]} if spec.get("LaunchTemplateName") else {"LaunchTemplateIds": [name]}
        try:
            found = client.describe_launch_templates(**by)["LaunchTemplates"][0]  # type: ignore[attr-defined]
            template_id = found["LaunchTemplateId"]
            # The version the call names (scale-up names its pool's), else the default.
            named = str(spec.get("Version", ""))
            version = named if named.isdigit() else str(found["DefaultVersionNumber"])
            key = (str(client.meta.endpoint_url), template_id, version)
            if key not in self._templates:
                data = client.describe_launch_template_versions(  # type: ignore[attr-defined]
                    LaunchTemplateId=template_id, Versions=[version]
                )["LaunchTemplateVersions"][0]["LaunchTemplateData"]
                tags = client.describe_tags(  # type: ignore[attr-defined]
                    Filters=[{"Name": "resource-id", "Values": [template_id]}]
                )["Tags"]
                self._templates[key] = {"id": template_id, "data": data, "tags": {t["Key"]: t["Value"] for t in tags}}
        except Exception:  # reported as an untranslatable call, and so denied
            return None
        return self._templates[key]


_inherited = threading.local()
_TESTS_DIR = str(PROJECT_DIR / "tests") + os.sep
# The recorder's own frames (the thread pool wrapper that carries a function into its workers) are no test's.
_RECORDER_FILE = str(Path(__file__).resolve())


def _calling_function() -> str | None:
    """The outermost entry module on the stack: reconcile cleans up through the instance-state handler's code
    and launches warm runners through scale-up's, and those calls are reconcile's, made with its role."""
    frame = sys._getframe(2)
    found: str | None = None
    while frame is not None:
        filename = frame.f_code.co_filename
        function = _ENTRY_MODULES.get(filename)
        if function is not None:
            found = function
        elif filename.startswith(_TESTS_DIR) and filename != _RECORDER_FILE:
            # A test's own call, even one a fault hook makes in the middle of a function's call (a race staged
            # with WireFaults.run_after): the test's, not the function's.
            return found
        frame = frame.f_back  # type: ignore[assignment]
    # Work a function hands to a thread pool runs on a stack of its own: it belongs to whoever submitted it.
    return found or getattr(_inherited, "function", None)


def _install_thread_pool_inheritance() -> Any:
    original = ThreadPoolExecutor.submit

    def submit(self: ThreadPoolExecutor, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        function = _calling_function()
        if function is None:
            return original(self, fn, *args, **kwargs)

        def run(*inner_args: Any, **inner_kwargs: Any) -> Any:
            before = getattr(_inherited, "function", None)
            _inherited.function = function
            try:
                return fn(*inner_args, **inner_kwargs)
            finally:
                _inherited.function = before

        return original(self, run, *args, **kwargs)

    ThreadPoolExecutor.submit = submit  # type: ignore[method-assign]
    return original


def _arn_maker(service: str, region: str) -> Any:
    return lambda rest: f"arn:aws:{service}:{region}:{PLACEHOLDER_ACCOUNT}:{rest}"


def _leading(keys: Iterable[Mapping[str, Any]]) -> Context:
    values = []
    for key in keys:
        pk = key.get("pk")
        if not isinstance(pk, Mapping) or "S" not in pk:
            return ()
        values.append(pk["S"])
    return (("dynamodb:LeadingKeys", tuple(sorted(set(values)))),)


_TRANSACT_WRITE = {
    "Put": "PutItem",
    "Update": "UpdateItem",
    "Delete": "DeleteItem",
    "ConditionCheck": "ConditionCheckItem",
}


def _dynamodb(region: str, operation: str, params: Mapping[str, Any]) -> Iterable[tuple[str, str, Context, str]]:
    table = _arn_maker("dynamodb", region)

    def item(action: str, name: str, key: Mapping[str, Any]) -> tuple[str, str, Context, str]:
        return f"dynamodb:{action}", table(f"table/{name}"), _leading([key]), ""

    if operation in ("GetItem", "UpdateItem", "DeleteItem"):
        yield item(operation, params["TableName"], params["Key"])
    elif operation == "PutItem":
        yield item(operation, params["TableName"], params["Item"])
    elif operation == "TransactWriteItems":
        # No IAM action of its own: each item is authorized as the write it makes (DynamoDB developer guide,
        # "Using IAM with DynamoDB transactions").
        for entry in params["TransactItems"]:
            [(kind, body)] = entry.items()
            yield item(_TRANSACT_WRITE[kind], body["TableName"], body.get("Key") or body.get("Item") or {})
    elif operation == "TransactGetItems":
        for entry in params["TransactItems"]:
            yield item("GetItem", entry["Get"]["TableName"], entry["Get"]["Key"])
    elif operation in ("BatchGetItem", "BatchWriteItem"):
        for name, body in params["RequestItems"].items():
            keys = body["Keys"] if operation == "BatchGetItem" else [_write_key(w) for w in body]
            yield f"dynamodb:{operation}", table(f"table/{name}"), _leading(keys), ""
    elif "TableName" in params:
        # Scan, Query, DescribeTable...: the table, without the leading keys (a LeadingKeys condition denies). A
        # Query or Scan of an index is authorized on the index's own ARN, table/<table>/index/<index> (Service
        # Authorization Reference, "Actions, resources, and condition keys for Amazon DynamoDB").
        resource = f"table/{params['TableName']}"
        if params.get("IndexName"):
            resource += f"/index/{params['IndexName']}"
        yield f"dynamodb:{operation}", table(resource), (), ""
    else:
        yield f"dynamodb:{operation}", "?", (), "no table in the call"


def _write_key(write: Mapping[str, Any]) -> Mapping[str, Any]:
    if "PutRequest" in write:
        return dict(write["PutRequest"]["Item"])
    return dict(write["DeleteRequest"]["Key"])


def _sqs(
    region: str, action: str, operation: str, params: Mapping[str, Any]
) -> Iterable[tuple[str, str, Context, str]]:
    queue = _arn_maker("sqs", region)
    if operation == "GetQueueUrl":
        yield action, queue(params["QueueName"]), (), ""
    elif "QueueUrl" in params:
        # https://sqs.<region>.amazonaws.com/<account>/<name>, or moto's http://host:port/<account>/<name>
        account, name = urlsplit(params["QueueUrl"]).path.strip("/").split("/")[-2:]
        yield action, f"arn:aws:sqs:{region}:{account}:{name}", (), ""
    else:
        yield action, "?", (), "no queue in the call"


def _ssm(
    region: str, action: str, operation: str, params: Mapping[str, Any]
) -> Iterable[tuple[str, str, Context, str]]:
    parameter = _arn_maker("ssm", region)

    def arn(name: str) -> str:
        return parameter("parameter/" + name.lstrip("/"))

    if operation in ("GetParameters", "DeleteParameters"):
        for name in params["Names"]:
            yield action, arn(name), (), ""
    elif operation == "GetParametersByPath":
        yield action, arn(params["Path"]), (), ""
    elif "Name" in params:
        yield action, arn(params["Name"]), (), ""
        if operation == "PutParameter" and params.get("Tags"):
            # Tags on PutParameter are authorized as AddTagsToResource as well.
            yield "ssm:AddTagsToResource", arn(params["Name"]), (), ""
    else:
        yield action, "?", (), "no parameter in the call"


# ---- evaluating -----------------------------------------------------------------------------------------


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _matches(pattern: str, value: str) -> bool:
    # IAM's wildcards: * any run of characters, ? one character; case-sensitive for ARNs and values.
    return fnmatch.fnmatchcase(value, pattern)


class UnknownCondition(Exception):
    """A condition operator or key this evaluator cannot judge: the statement does not allow the request."""


_POLICY_VARIABLE = re.compile(r"\$\{([^}]+)\}")


def _resolve_variables(value: str, context: Mapping[str, tuple[str, ...]]) -> str:
    """A policy variable (``${aws:userid}``) replaced by the request's single value for that key."""

    def value_of(match: re.Match[str]) -> str:
        found = context.get(match.group(1))
        if not found or len(found) != 1:
            raise UnknownCondition(f"policy variable {match.group(0)} has no single value in the request")
        return found[0]

    return _POLICY_VARIABLE.sub(value_of, value)


def _condition_holds(operator: str, key: str, wanted: list[Any], context: Mapping[str, tuple[str, ...]]) -> bool:
    if key not in context:
        raise UnknownCondition(f"condition key {key} is not derived from the call")
    have = context[key]
    wanted_text = [_resolve_variables(str(w).lower() if isinstance(w, bool) else str(w), context) for w in wanted]
    quantifier, _, base = operator.rpartition(":")
    compare = {
        "StringEquals": lambda p, v: p == v,
        "StringLike": _matches,
        "ArnLike": _matches,
        "ArnEquals": lambda p, v: p == v,
        "Bool": lambda p, v: p.lower() == v.lower(),
    }.get(base)
    if compare is None:
        raise UnknownCondition(f"condition operator {operator} is not evaluated here")
    if quantifier == "ForAllValues":
        return all(any(compare(p, v) for p in wanted_text) for v in have)
    if quantifier in ("", "ForAnyValue"):
        return any(compare(p, v) for p in wanted_text for v in have)
    raise UnknownCondition(f"condition operator {operator} is not evaluated here")


def allowing_statements(policy: Mapping[str, Any], request: Request) -> tuple[list[str], str]:
    """The Sids of the statements allowing ``request``, and why the last candidate did not (for the report)."""
    if request.problem:
        return [], request.problem
    context = dict(request.context)
    allowed: list[str] = []
    why = "no statement has the action and resource"
    for statement in policy["Statement"]:
        if statement["Effect"] != "Allow":
            continue
        if not any(_matches(a, request.action) for a in _as_list(statement["Action"])):
            continue
        if not any(_matches(r, request.resource) for r in _as_list(statement["Resource"])):
            continue
        try:
            holds = all(
                _condition_holds(operator, key, _as_list(wanted), context)
                for operator, pairs in statement.get("Condition", {}).items()
                for key, wanted in pairs.items()
            )
        except UnknownCondition as exc:
            why = f"{statement['Sid']}: {exc}"
            continue
        if holds:
            allowed.append(statement["Sid"])
        else:
            why = f"{statement['Sid']}: condition not met"
    return allowed, why


# ---- the session --------------------------------------------------------------------------------------


def judge(requests: Iterable[Request]) -> dict[str, Any]:
    """Every request with its verdict, the denied ones, and per function the statements no request used."""
    from chalicelib.config import load_config
    from fleetctl.lambda_policies import LambdaFunction, function_grants, policy_document

    app_name, stage = "runner-fleet", "dev"
    policies: dict[tuple[str, str], Any] = {}
    used: dict[str, set[str]] = {function.value: set() for function in LambdaFunction}
    rows: list[dict[str, Any]] = []
    denied: list[dict[str, Any]] = []
    for request in sorted(requests, key=lambda r: (r.function, r.action, r.resource, r.context, r.config)):
        key = (request.function, request.config)
        if key not in policies:
            grants = function_grants(load_config(request.config), LambdaFunction(request.function), app_name, stage)
            policies[key] = policy_document(grants)
        sids, why = allowing_statements(policies[key], request)
        used[request.function].update(sids)
        row = {
            "function": request.function,
            "call": request.call,
            "action": request.action,
            "resource": request.resource,
            "context": {k: list(v) for k, v in request.context},
            "allowed_by": sids,
        }
        rows.append(row)
        if not sids:
            denied.append({**row, "config": request.config, "why": why})
    recorded: dict[str, set[str]] = {}
    for row in rows:
        recorded.setdefault(row["function"], set()).add(f"{row['action']} {row['resource']}")
    return {
        "recorded": {function: sorted(pairs) for function, pairs in sorted(recorded.items())},
        "used": {k: sorted(v) for k, v in used.items()},
        "denied": denied,
        "requests": rows,
    }


def unused_unjustified(used: Mapping[str, Iterable[str]], recorded: Iterable[str]) -> list[str]:
    """Statements no recorded call used that have no ``without_call`` reason, and functions never called.

    Meaningful only for a whole-suite run: a subset of the tests leaves statements unused that the rest use.
    """
    from chalicelib.config import load_config
    from fleetctl.lambda_policies import LambdaFunction, function_grants

    config = load_config(PROJECT_DIR / "chalicelib" / "stages" / "dev.yaml")
    seen = set(recorded)
    problems = []
    for function in LambdaFunction:
        if function.value not in seen:
            problems.append(f"{function.value}: no call recorded; the suite does not exercise this function")
            continue
        for grant in function_grants(config, function, "runner-fleet", "dev"):
            if grant.sid not in set(used.get(function.value, ())) and not grant.without_call:
                problems.append(
                    f"{function.value}: statement {grant.sid} was used by no call; remove it or give it a "
                    "without_call reason in fleetctl/lambda_policies.py"
                )
    return problems


_recorder = Recorder()


def pytest_configure(config: pytest.Config) -> None:
    _recorder.install()


def pytest_unconfigure(config: pytest.Config) -> None:
    _recorder.uninstall()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _recorder.requests:
        return
    try:
        verdict = judge(_recorder.requests)
    finally:
        shutil.rmtree(SNAPSHOTS / str(os.getpid()), ignore_errors=True)
    full = os.environ.get(FULL_SUITE_ENV) == "1"
    unused = unused_unjustified(verdict["used"], verdict["recorded"]) if full else []
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps({**verdict, "unused_without_reason": unused, "calls": _recorder.calls}, indent=1))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [
        f"DENIED {d['function']} {d['call']}: {d['action']} on {d['resource']} {d['context']} ({d['why']})"
        for d in verdict["denied"]
    ] + unused
    if lines:
        if reporter is not None:
            reporter.write_sep("=", "IAM check failed (tests/iam_recorder.py)")
            for line in lines:
                reporter.write_line(line)
            reporter.write_line(f"details: {REPORT}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def check_reports(paths: Iterable[Path]) -> list[str]:
    """The unused-statement check over the reports of several pytest processes that together ran the whole suite
    (``make test`` runs the slow scenarios beside the rest): a statement is used when any of them used it."""
    used: dict[str, set[str]] = {}
    recorded: set[str] = set()
    for path in paths:
        if not path.exists():
            continue  # a process whose tests made no call of a function's writes no report
        report = json.loads(path.read_text())
        recorded |= set(report["recorded"])
        for function, sids in report["used"].items():
            used.setdefault(function, set()).update(sids)
    return unused_unjustified(used, recorded)


if __name__ == "__main__":
    problems = check_reports(Path(arg) for arg in sys.argv[1:])
    for problem in problems:
        print(problem)
    if problems:
        print("IAM check failed (tests/iam_recorder.py): unused statements over", " and ".join(sys.argv[1:]))
    sys.exit(1 if problems else 0)
