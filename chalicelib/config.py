"""The fleet configuration: one file per stage, parsed once into frozen, typed models.

Handlers and ``fleetctl validate`` read the fleet through :func:`get_config` or :func:`load_config`, so a bad
value fails at deploy time or cold start with the field's path and a readable reason, never halfway through a
scale-up. Problems are reported together, one line each, as ``<field path>: <reason>``:

* nested fields are joined with dots and list items are indexed: ``webhook.token_parameter``,
  ``state.jobs_queue``, ``pools[0].warm.windows[1].timezone``;
* a list item that has a string ``name`` (that is, a pool) carries it after its index, so the line still says
  which pool is meant: ``pools[1](build).max_runners``, ``pools[0](docker).warm.windows[0].timezone``;
* problems with the file itself (missing, unreadable, syntax, not a mapping) are a bare reason, no field path.

Checks that compare fields (``warm.size`` against ``max_runners``, duplicate pool names, shared secret
parameters) run once the fields they compare are valid, so fixing one round of problems may reveal another.

This module is imported on Lambda cold start, so croniter, zoneinfo and yaml are imported only where needed.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Self
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, ValidationError, model_validator
from pydantic_core import ErrorDetails, PydanticCustomError

from chalicelib.errors import ConfigError

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

__all__ = [
    "CONFIG_ENV_VAR",
    "AccessLevel",
    "FleetConfig",
    "GitLabConfig",
    "ImageConfig",
    "Market",
    "PoolConfig",
    "RunnerType",
    "ScanGate",
    "ScheduleWindow",
    "Severity",
    "StateConfig",
    "WarmConfig",
    "WebhookConfig",
    "get_config",
    "load_config",
    "parse_config",
    "reset_config_cache",
]

CONFIG_ENV_VAR = "RUNNER_FLEET_CONFIG"

# Relative config paths resolve against the directory holding app.py, which is also the root of the Lambda
# bundle, so one RUNNER_FLEET_CONFIG value works under pytest, `chalice local` and in Lambda alike.
_APP_DIR = Path(__file__).resolve().parent.parent

_Loc = tuple[str | int, ...]

# Our validators raise this one error type. Its context carries (relative loc, reason) pairs, so one validator
# can report several problems, each on its own line under its own field path, instead of the first only.
_PROBLEMS = "fleet_problems"


# ---- raising problems from validators --------------------------------------------------------------------


def _problems_error(items: Sequence[tuple[_Loc, str]]) -> PydanticCustomError:
    summary = "; ".join(f"{_format_loc(loc)}: {reason}" if loc else reason for loc, reason in items)
    return PydanticCustomError(_PROBLEMS, "{summary}", {"summary": summary, "problems": tuple(items)})


def _invalid(reason: str, loc: _Loc = ()) -> PydanticCustomError:
    return _problems_error([(loc, reason)])


class _Problems:
    """Collects the problems one validator finds, to raise them together."""

    def __init__(self) -> None:
        self._items: list[tuple[_Loc, str]] = []

    def add(self, loc: _Loc, reason: str) -> None:
        self._items.append((loc, reason))

    def raise_any(self) -> None:
        if self._items:
            raise _problems_error(self._items)


def _show(value: object) -> str:
    """Renders an input value the way the user wrote it in YAML or JSON."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    text = repr(value)
    return text if len(text) <= 100 else f"{text[:97]}..."


# ---- field checks ----------------------------------------------------------------------------------------


def _between(low: int, high: int) -> AfterValidator:
    def check(value: int) -> int:
        if not low <= value <= high:
            raise _invalid(f"must be between {low} and {high}, got {value}")
        return value

    return AfterValidator(check)


def _matching(pattern: str, description: str) -> AfterValidator:
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise _invalid(f"must be {description}, got {_show(value)}")
        return value

    return AfterValidator(check)


def _distinct(what: str, *, required: bool = True) -> AfterValidator:
    # Emptiness is checked here, after the items, not with Field(min_length): pydantic counts only the items
    # that validated, so a list holding one bad item would be reported as empty as well.
    def check(values: tuple[str, ...]) -> tuple[str, ...]:
        if required and not values:
            raise _invalid("must not be empty")
        problems = _Problems()
        seen: set[str] = set()
        for index, value in enumerate(values):
            if value in seen:
                problems.add((index,), f"duplicate {what} {_show(value)}")
            seen.add(value)
        problems.raise_any()
        return values

    return AfterValidator(check)


def _check_ssm_name(value: str) -> str:
    """an SSM parameter name: '/'-separated parts of letters, digits, '_', '.' or '-'"""
    if not value.startswith("/"):
        raise _invalid(f"must be an SSM parameter name starting with '/', got {_show(value)}")
    if not re.fullmatch(r"(/[A-Za-z0-9_.-]+)+", value):
        raise _invalid(
            "must be an SSM parameter name: '/'-separated parts of letters, digits, '_', '.' or '-', "
            f"got {_show(value)}"
        )
    return value


# Plain http is accepted only where no network sits between fleet and GitLab: the sandbox's emulator.
_LOOPBACK_NAMES = frozenset({"localhost"})


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback  # 127.0.0.0/8 and ::1
    except ValueError:
        return False


def _unsafe_character(value: str) -> str | None:
    """The first control or whitespace character in ``value``, shown as an escape, or None."""
    for char in value:
        if char.isspace() or unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp"):
            return repr(char)
    return None


def _check_url(value: str) -> str:
    """an http or https URL, https unless its host is loopback (localhost, 127.0.0.0/8, ::1), with no whitespace,
    control character, credentials, query or fragment; a trailing '/' is dropped"""
    # urlsplit silently drops tabs and newlines (the WHATWG "unsafe bytes"), so the raw text is checked first:
    # the URL ends up in the runners' user data, where a newline would start a shell command.
    unsafe = _unsafe_character(value)
    if unsafe is not None:
        raise _invalid(f"must not contain whitespace or control characters, found {unsafe} in {_show(value)}")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _invalid(f"must be an http or https URL, got {_show(value)}")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise _invalid(f"must use https (http is allowed only for localhost, 127.0.0.0/8 and ::1), got {_show(value)}")
    if parts.username or parts.password:
        raise _invalid("must not contain credentials; the API token comes from gitlab.token_parameter")
    if parts.query or parts.fragment:
        raise _invalid(f"must not have a query or fragment, got {_show(value)}")
    try:
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        raise _invalid(f"must have a port between 0 and 65535, got {_show(value)}") from None
    # API paths are appended to the base URL; one canonical form avoids '//api/v4'.
    return value.rstrip("/")


def _check_bucket(value: str) -> str:
    """an S3 bucket name: 3-63 lowercase letters, digits, dots or hyphens, starting and ending with a letter or
    digit, no '..', not formatted as an IP address"""
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", value):
        raise _invalid(
            "must be an S3 bucket name: 3-63 lowercase letters, digits, dots or hyphens, "
            f"starting and ending with a letter or digit, got {_show(value)}"
        )
    if ".." in value:
        raise _invalid(f"must not contain '..', got {_show(value)}")
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return value
    raise _invalid(f"must not be formatted as an IP address, got {_show(value)}")


# What GitLab refuses when a runner is created (app/models/ci/runner.rb, app/models/ci/tag.rb in gitlab-org/gitlab):
# more than 50 tags, a tag name over 255 characters; the timeout floor is job_timeout_seconds' lower bound.
GITLAB_MAX_RUNNER_TAGS = 50
GITLAB_MAX_TAG_LENGTH = 255


def _check_tag(value: str) -> str:
    """not empty, no leading or trailing whitespace, no comma, at most 255 characters"""
    if not value:
        raise _invalid("must not be empty")
    if value != value.strip():
        raise _invalid(f"must not have leading or trailing whitespace, got {_show(value)}")
    # GitLab takes a runner's tags as one comma-separated list, so a comma would split the tag in two.
    if "," in value:
        raise _invalid(f"must not contain commas, got {_show(value)}")
    if len(value) > GITLAB_MAX_TAG_LENGTH:
        raise _invalid(f"must be at most {GITLAB_MAX_TAG_LENGTH} characters (GitLab's limit), got {len(value)}")
    return value


# croniter's random ("R") and hashed ("H", "H(0-29)", "H/15") fields.
_CRONITER_ONLY = re.compile(r"^[RH](\(.*\))?(/\d+)?$", re.IGNORECASE)


def _check_cron(value: str) -> str:
    """a 5-field cron expression (minute hour day-of-month month day-of-week), without croniter's R and H"""
    from croniter import croniter

    # croniter also takes 6- and 7-field forms (seconds, years); a schedule window means the classic 5.
    fields = len(value.split())
    if fields != 5:
        raise _invalid(
            f"invalid cron expression {_show(value)}: expected 5 fields "
            f"(minute hour day-of-month month day-of-week), got {fields}"
        )
    if any(_CRONITER_ONLY.match(part) for field in value.split() for part in field.split(",")):
        # croniter's own extensions pick a random or hashed time, so the window would open at a time nobody chose.
        raise _invalid(f"invalid cron expression {_show(value)}: R and H (random, hashed) are not cron")
    if not croniter.is_valid(value):
        raise _invalid(f"invalid cron expression {_show(value)}")
    return value


def _same_schedule(first: str, second: str) -> bool:
    """Two 5-field cron expressions that fire at the same times (``0 08 * * *`` and ``0 8 * * *``)."""
    from croniter import croniter

    return bool(croniter(first).expanded == croniter(second).expanded)


def _check_timezone(value: str) -> str:
    """an IANA time zone name, such as 'Europe/Berlin'"""
    from zoneinfo import ZoneInfo

    try:
        ZoneInfo(value)
    except (KeyError, ValueError):  # ZoneInfoNotFoundError is a KeyError; malformed keys raise ValueError
        raise _invalid(f"unknown time zone {_show(value)}") from None
    return value


def _id_of(prefix: str, what: str) -> AfterValidator:
    # EC2 ids carry 8 hex digits (older resources) or 17 (everything since 2016).
    return _matching(rf"{prefix}-(?:[0-9a-f]{{8}}|[0-9a-f]{{17}})", f"{what} like '{prefix}-0123456789abcdef0'")


_Flag = Annotated[bool, Strict()]
_Text = Annotated[str, Strict()]
_SsmName = Annotated[_Text, AfterValidator(_check_ssm_name)]
_Url = Annotated[_Text, AfterValidator(_check_url)]
_Cron = Annotated[_Text, AfterValidator(_check_cron)]
_TimeZone = Annotated[_Text, AfterValidator(_check_timezone)]
_BucketName = Annotated[_Text, AfterValidator(_check_bucket)]
_Tag = Annotated[_Text, AfterValidator(_check_tag)]
_FleetName = Annotated[_Text, _matching(r"[a-z0-9-]{3,40}", "3-40 lowercase letters, digits or hyphens")]
_PoolName = Annotated[_Text, _matching(r"[a-z0-9-]{1,32}", "1-32 lowercase letters, digits or hyphens")]
_Region = Annotated[_Text, _matching(r"[a-z]{2,4}(?:-[a-z]+)+-[0-9]+", "an AWS region like 'us-east-1'")]
_TableName = Annotated[
    _Text,
    _matching(r"[A-Za-z0-9_.-]{3,255}", "a DynamoDB table name: 3-255 letters, digits, '_', '.' or '-'"),
]
_QueueName = Annotated[_Text, _matching(r"[A-Za-z0-9_-]{1,80}", "an SQS queue name: 1-80 letters, digits, '_' or '-'")]
_InstanceType = Annotated[
    _Text,
    _matching(r"[a-z][a-z0-9-]*[0-9][a-z0-9-]*\.[a-z0-9][a-z0-9-]*", "an EC2 instance type like 'm7i.large'"),
]
_SubnetId = Annotated[_Text, _id_of("subnet", "a subnet id")]
_SecurityGroupId = Annotated[_Text, _id_of("sg", "a security group id")]
_AmiId = Annotated[_Text, _id_of("ami", "an AMI id")]
_AccountId = Annotated[_Text, _matching(r"[0-9]{12}", "a 12-digit AWS account id")]
_EcrRepository = Annotated[
    _Text,
    _matching(
        r"(?=.{2,256}$)(?:[a-z0-9]+(?:[._-][a-z0-9]+)*/)*[a-z0-9]+(?:[._-][a-z0-9]+)*",
        "an ECR repository name like 'ci/build-base'",
    ),
]
_ImageTag = Annotated[_Text, _matching(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", "an image tag like 'latest' or '2024.06'")]


# ---- models ----------------------------------------------------------------------------------------------


class _Model(BaseModel):
    """Every config model is immutable and refuses keys it does not know, so a typo is an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Market(str, Enum):
    """How a pool buys capacity."""

    SPOT = "spot"
    ON_DEMAND = "on-demand"


class Severity(str, Enum):
    """ECR image scan finding severities, lowest first."""

    INFORMATIONAL = "INFORMATIONAL"
    LOW = "LOW"
    MEDIUM = "MEDIUM"
    HIGH = "HIGH"
    CRITICAL = "CRITICAL"

    @property
    def rank(self) -> int:
        """Position in severity order, so a finding can be compared with a threshold."""
        return list(Severity).index(self)


class StateOwner(str, Enum):
    """Who creates and updates the fleet's table and queues (``docs/deploy.md``, "What owns what")."""

    BOOTSTRAP = "bootstrap"
    STACK = "stack"


class RunnerType(str, Enum):
    """Which scope the runners runner-fleet creates in GitLab belong to (``POST /user/runners`` runner_type)."""

    INSTANCE = "instance_type"
    GROUP = "group_type"
    PROJECT = "project_type"


class AccessLevel(str, Enum):
    """Which jobs a pool's runners take (``POST /user/runners`` access_level)."""

    NOT_PROTECTED = "not_protected"
    REF_PROTECTED = "ref_protected"  # only jobs of protected branches and tags


class GitLabConfig(_Model):
    """Where GitLab is, the SSM parameter holding the API token used to manage runners, and the runners' scope.

    Instance runners need an administrator's token; group and project runners need ``runner_owner_id``, the
    group or project they belong to. The token needs the ``read_api``, ``create_runner`` and ``manage_runner``
    scopes, or ``api``.
    """

    url: _Url = Field(description="Base URL of GitLab, to which the API paths are appended.")
    token_parameter: _SsmName = Field(
        description="SSM SecureString holding the fleet's GitLab API token: scopes read_api, create_runner and "
        "manage_runner (GitLab 17.1 and later), or api, which retrying interrupted jobs needs. `fleetctl bootstrap` "
        "checks `$GITLAB_TOKEN` and stores it here. Must differ from the webhook's parameters."
    )
    runner_type: RunnerType = Field(
        default=RunnerType.INSTANCE,
        description="Scope of the GitLab runners the fleet creates: instance_type needs an administrator's token; "
        "group_type and project_type need runner_owner_id and the token of the group's Owner or the project's "
        "Maintainer.",
    )
    runner_owner_id: Annotated[int, Strict(), _between(1, 2**31 - 1)] | None = Field(
        default=None,
        description="Id of the group (group_type) or project (project_type) the runners belong to; required for "
        "those, must be empty for instance_type.",
    )

    @model_validator(mode="after")
    def _check_owner(self) -> Self:
        if self.runner_type is not RunnerType.INSTANCE and self.runner_owner_id is None:
            raise _invalid(f"is required when runner_type is {self.runner_type.value}", ("runner_owner_id",))
        if self.runner_type is RunnerType.INSTANCE and self.runner_owner_id is not None:
            raise _invalid("must be empty for instance_type runners", ("runner_owner_id",))
        return self


class WebhookConfig(_Model):
    """SSM parameters holding the secrets that authenticate incoming GitLab webhooks."""

    token_parameter: _SsmName = Field(
        description="SSM SecureString holding the secret GitLab sends in X-Gitlab-Token; `fleetctl bootstrap` "
        "generates it. While it holds no secret every webhook is refused."
    )
    signing_secret_parameter: _SsmName | None = Field(
        default=None,
        description="SSM SecureString for a Standard Webhooks signing secret. `fleetctl gitlab connect` writes the "
        "secret when GitLab signs the hook (GitLab 19.0 with the webhook_signing_token flag), else `unsigned`; until "
        "it holds one or the other every webhook is refused. Null: the token alone is checked.",
    )


class StateConfig(_Model):
    """The DynamoDB table and SQS queues holding the fleet's state and pending jobs."""

    table: _TableName = Field(
        description="DynamoDB table of the fleet's state: jobs, launches, runners, pool counters, runner tokens, "
        "connected hooks and image records."
    )
    jobs_queue: _QueueName = Field(description="SQS queue that carries pending jobs from the webhook to scale-up.")
    dead_letter_queue: _QueueName = Field(
        description="SQS queue of the jobs scale-up gave up on, each with its reason; must differ from jobs_queue."
    )
    owner: StateOwner = Field(
        default=StateOwner.BOOTSTRAP,
        description="Who creates and updates the table and both queues: `bootstrap` (`fleetctl bootstrap`), or "
        "`stack` (the CloudFormation stack `make package` builds, which keeps them when it is deleted; "
        "`fleetctl bootstrap` then only checks that they exist).",
    )

    @model_validator(mode="after")
    def _check_queues_differ(self) -> Self:
        if self.dead_letter_queue == self.jobs_queue:
            raise _invalid(f"must differ from jobs_queue, got {_show(self.dead_letter_queue)}", ("dead_letter_queue",))
        return self


class ScheduleWindow(_Model):
    """A recurring period of warm capacity: opens when ``start`` fires, closes when ``end`` next fires."""

    start: _Cron = Field(description="Opens the window when it fires.")
    end: _Cron = Field(
        description="Closes the window when it next fires after start; must fire at other times than start."
    )
    timezone: _TimeZone = Field(
        default="UTC", description="Time zone whose wall clock both crons read, daylight saving time included."
    )

    @property
    def zone(self) -> ZoneInfo:
        from zoneinfo import ZoneInfo

        return ZoneInfo(self.timezone)

    @model_validator(mode="after")
    def _check_start_differs_from_end(self) -> Self:
        if _same_schedule(self.start, self.end):
            raise _invalid("must differ from start, or the window never opens", ("end",))
        return self


class WarmConfig(_Model):
    """Idle instances kept ready. With ``size`` > 0 and no windows the pool is warm all the time."""

    size: Annotated[int, Strict(), _between(0, 1000)] = Field(
        default=0,
        description="Idle runners kept ready (0: the pool scales from zero); at most the pool's max_runners. A warm "
        "runner does not power off after idle_wait_seconds: it stays until its window closes, or is retired once "
        "idle longer than idle_wait_seconds while the pool holds more warm runners than this (after a burst).",
    )
    windows: tuple[ScheduleWindow, ...] = Field(
        default=(), description="When the pool is kept warm: while any window is open; with none, all the time."
    )


class ImageConfig(_Model):
    """The CI job image of a pool, from an ECR registry; rotation pins it to a scanned digest.

    The registry is the fleet's own account and region unless ``account`` (and ``region``) name another: many
    teams keep CI images in one central account, whose repository policy must let the pool's role pull, and whose
    push events reach this fleet through a cross-account EventBridge rule (docs/images.md, "Another account's
    registry").

    ``push`` lets the pool's runners push to its repository (a pool that builds its own image). Only a
    repository no other pool runs may be pushed to: otherwise a job of this pool could replace the image
    another pool's jobs run in.
    """

    repository: _EcrRepository = Field(description="ECR repository of the CI image.")
    tag: _ImageTag = Field(
        default="latest",
        description="Tag the pool follows: its runners run the digest the tag named when the image was last promoted.",
    )
    account: _AccountId | None = Field(
        default=None, description="Account of another registry, such as a central one; null: the fleet's own account."
    )
    region: _Region | None = Field(default=None, description="Region of that registry; null: the fleet's region.")
    push: _Flag = Field(
        default=False,
        description="Let the pool's jobs push to its repository. Refused when another pool runs the repository or "
        "image.account is set, and unless the pool is ephemeral and ref_protected.",
    )


class ScanGate(_Model):
    """A new image digest is promoted only if its scan has no finding at or above ``severity_threshold``.

    A scan that has not come ``timeout_minutes`` after the push is reported as ``scan_timeout`` by reconcile (the
    candidate stays, and a scan that comes late still decides it).
    """

    severity_threshold: Severity = Field(
        default=Severity.HIGH, description="A scan finding at or above this severity rejects the digest."
    )
    timeout_minutes: Annotated[int, Strict(), _between(5, 1440)] = Field(
        default=60,
        description="Minutes after the push by which the scan must have come; reconcile then reports the candidate "
        "as scan_timeout (a scan that comes later still decides it).",
    )


class PoolConfig(_Model):
    """One group of identical runner instances, matched to jobs by tags."""

    name: _PoolName = Field(
        description="Unique among the pools; names the pool's launch template, runner role and cache prefix."
    )
    tags: Annotated[tuple[_Tag, ...], _distinct("tag", required=False)] = Field(
        default=(),
        description="Runner tags: the pool can run a job whose tags are all among them. At most 50 (GitLab's "
        "limit); empty only with run_untagged.",
    )
    run_untagged: _Flag = Field(default=False, description="Also run jobs that have no tags.")
    instance_types: Annotated[tuple[_InstanceType, ...], _distinct("instance type")] = Field(
        description="EC2 instance types the pool launches, all of one architecture (bootstrap gives the pool the "
        "runner AMI of it); more types give spot more capacity."
    )
    subnets: Annotated[tuple[_SubnetId, ...], _distinct("subnet")] = Field(
        description="Subnets to launch into, one per Availability Zone: EC2 refuses a fleet naming an instance type "
        "twice in one zone."
    )
    security_groups: Annotated[tuple[_SecurityGroupId, ...], _distinct("security group")] = Field(
        description="Security groups of the runner instances."
    )
    market: Market = Field(default=Market.SPOT, description="How the pool buys capacity.")
    on_demand_fallback: _Flag = Field(
        default=True,
        description="When spot has no capacity for some of a launch's instances, launch them on-demand; otherwise "
        "their jobs are retried later.",
    )
    max_runners: Annotated[int, Strict(), _between(1, 1000)] = Field(
        description="Most runners the pool has at once; a capacity lease per runner keeps it from ever passing this."
    )
    warm: WarmConfig = Field(default=WarmConfig(), description="Idle runners kept ready before jobs arrive.")
    ephemeral: _Flag = Field(
        default=False, description="One job per instance, then it powers off and terminates; max_builds must then be 1."
    )
    # Always present after validation: the before-validator fills 1 (ephemeral) or 10.
    max_builds: Annotated[int, Strict(), _between(1, 1000)] = Field(
        description="Jobs a runner takes before it powers off.",
        json_schema_extra={"default_when_omitted": "10, or 1 when ephemeral"},
    )
    idle_wait_seconds: Annotated[int, Strict(), _between(30, 86400)] = Field(
        default=600,
        description="A runner that gets no job for this long powers off (a warm runner is retired by reconcile "
        "instead: see warm.size); shorter than max_lifetime_minutes.",
    )
    max_lifetime_minutes: Annotated[int, Strict(), _between(20, 10080)] = Field(
        default=720,
        description="The instance powers itself off after this long; reconcile retires its runner one "
        "job_timeout_seconds earlier. Longer than idle_wait_seconds and boot_deadline_seconds, and at least twice "
        "job_timeout_seconds.",
    )
    boot_deadline_seconds: Annotated[int, Strict(), _between(60, 3600)] = Field(
        default=600,
        description="An instance waits this long for its runner token; reconcile terminates one whose runner has "
        "not contacted GitLab by then. Shorter than max_lifetime_minutes.",
    )
    image: ImageConfig = Field(description="The CI job image, from ECR, which runners run pinned by digest.")
    scan: ScanGate | None = Field(
        default=None, description="Promote a pushed image only once its scan passes; null: promote it at once."
    )
    privileged: _Flag = Field(
        default=False,
        description="Run job containers privileged, for docker-in-docker; the pool must then be ephemeral unless "
        "allow_privileged_reuse.",
    )
    # A privileged job is root on its instance and can tamper with whatever the next job on it runs, so a
    # privileged pool is ephemeral unless its config says explicitly that instances may be reused.
    allow_privileged_reuse: _Flag = Field(
        default=False,
        description="Let one privileged instance run several jobs, each able to tamper with the next; only with "
        "privileged.",
    )
    access_level: AccessLevel = Field(
        default=AccessLevel.NOT_PROTECTED,
        description="ref_protected: the pool's runners take only jobs of protected branches and tags.",
    )
    disk_gib: Annotated[int, Strict(), _between(8, 16384)] = Field(
        default=40, description="Size in GiB of the encrypted gp3 root volume."
    )
    max_launch_attempts: Annotated[int, Strict(), _between(1, 50)] = Field(
        default=8, description="Scale-up attempts for a job before it goes to the dead-letter queue."
    )
    job_timeout_seconds: Annotated[int, Strict(), _between(600, 2_592_000)] = Field(
        default=3600,
        description="The runners' maximum job timeout; at most half of max_lifetime_minutes.",
    )
    ami: _AmiId | None = Field(
        default=None,
        description="AMI to boot instead of the one published under ami_parameter; of an architecture the "
        "instance types run.",
    )
    # A job its runner failed as runner_system_failure because the spot instance was interrupted is retried once.
    retry_interrupted_jobs: _Flag = Field(
        default=True,
        description="Retry, once, a job lost when EC2 interrupted its runner's spot instance; the fleet's GitLab "
        "token then needs the api scope.",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_max_builds(cls, data: Any) -> Any:
        # An ephemeral instance runs one job, so the default follows `ephemeral`; explicit values are checked
        # in _check_cross_fields.
        if isinstance(data, Mapping) and "max_builds" not in data:
            return {**data, "max_builds": 1 if data.get("ephemeral") is True else 10}
        return data

    @model_validator(mode="after")
    def _check_cross_fields(self) -> Self:
        problems = _Problems()
        if not self.tags and not self.run_untagged:
            problems.add(("tags",), "must not be empty unless run_untagged is true, or no job can match")
        if len(self.tags) > GITLAB_MAX_RUNNER_TAGS:
            problems.add(
                ("tags",),
                f"must list at most {GITLAB_MAX_RUNNER_TAGS} tags, GitLab's limit for a runner, got {len(self.tags)}",
            )
        if self.warm.size > self.max_runners:
            problems.add(("warm", "size"), f"must not exceed max_runners {self.max_runners}, got {self.warm.size}")
        if self.ephemeral and self.max_builds != 1:
            problems.add(("max_builds",), f"must be 1 when ephemeral is true, got {self.max_builds}")
        if self.privileged and self.max_builds != 1 and not self.allow_privileged_reuse:
            problems.add(
                ("privileged",),
                f"a privileged pool must be ephemeral (max_builds 1), got max_builds {self.max_builds}; "
                "set allow_privileged_reuse: true to let one instance run several privileged jobs",
            )
        if self.allow_privileged_reuse and not self.privileged:
            problems.add(("allow_privileged_reuse",), "must be false unless privileged is true")
        lifetime = self.max_lifetime_minutes * 60
        for field, seconds in (
            ("boot_deadline_seconds", self.boot_deadline_seconds),
            ("idle_wait_seconds", self.idle_wait_seconds),
        ):
            if seconds >= lifetime:
                problems.add(
                    (field,),
                    f"must be shorter than max_lifetime_minutes {self.max_lifetime_minutes} "
                    f"({lifetime} seconds), got {seconds}",
                )
        # A runner is retired (paused, then gone once idle) one job timeout before its lifetime ends, and never
        # before half of it: only a job timeout of at most half the lifetime leaves a job it starts just before
        # its retirement the time to finish before the lifetime backstop powers the instance off.
        if self.job_timeout_seconds * 2 > lifetime:
            problems.add(
                ("job_timeout_seconds",),
                f"must be at most half of max_lifetime_minutes {self.max_lifetime_minutes} ({lifetime // 2} "
                f"seconds), got {self.job_timeout_seconds}: a job could still run when the lifetime ends",
            )
        # Pushing needs the instance role's credentials inside job containers (metadata hop limit 2): only jobs of
        # protected branches and tags get them, one job per instance.
        if self.image.push and self.access_level is not AccessLevel.REF_PROTECTED:
            problems.add(
                ("image", "push"),
                f"a pool that pushes its image must take only protected refs' jobs (access_level: ref_protected), "
                f"got access_level {self.access_level.value}",
            )
        if self.image.push and self.image.account is not None:
            problems.add(
                ("image", "push"),
                "a pool may push only to the fleet's own registry; drop image.account or image.push",
            )
        if self.image.push and self.max_builds != 1:
            problems.add(
                ("image", "push"),
                f"a pool that pushes its image must be ephemeral (max_builds 1), got max_builds {self.max_builds}",
            )
        problems.raise_any()
        return self


def _check_pools(pools: tuple[PoolConfig, ...]) -> tuple[PoolConfig, ...]:
    """at least one pool; pool names distinct"""
    if not pools:
        raise _invalid("must list at least one pool")
    problems = _Problems()
    seen: set[str] = set()
    for index, pool in enumerate(pools):
        if pool.name in seen:
            problems.add((index, "name"), f"duplicate pool name {_show(pool.name)}")
        seen.add(pool.name)
    problems.raise_any()
    return pools


class FleetConfig(_Model):
    """The fleet of one stage: GitLab, secrets, state, shared resources and the runner pools."""

    fleet: _FleetName = Field(
        description="Name of the fleet: it tags every instance and prefixes the resources fleetctl creates, so two "
        "fleets in one account need different names."
    )
    region: _Region | None = Field(
        default=None,
        description="AWS region of the fleet; null: boto3's default (AWS_REGION, AWS_DEFAULT_REGION, the profile).",
    )
    gitlab: GitLabConfig = Field(description="Where GitLab is, the fleet's API token and the runners' scope.")
    webhook: WebhookConfig = Field(description="The secrets that authenticate GitLab's webhooks.")
    state: StateConfig = Field(description="The fleet's DynamoDB table and SQS queues.")
    cache_bucket: _BucketName = Field(
        description="S3 bucket of the runners' shared build cache; each pool's runners use the pool's name as "
        "their path in it."
    )
    ami_parameter: _SsmName = Field(
        description="SSM path of the runner AMIs: `<ami_parameter>/x86_64` and `<ami_parameter>/arm64` hold the AMI "
        "of each architecture (`fleetctl ami publish` writes them)."
    )
    pools: Annotated[tuple[PoolConfig, ...], AfterValidator(_check_pools)] = Field(
        description="The runner pools; a job goes to the pool with the fewest tags among those that can run it, "
        "the one listed first on a tie."
    )

    def pool(self, name: str) -> PoolConfig:
        """The pool called ``name``; raises KeyError naming the pools that exist."""
        for candidate in self.pools:
            if candidate.name == name:
                return candidate
        known = ", ".join(p.name for p in self.pools)
        raise KeyError(f"no pool named {name!r} in fleet {self.fleet!r}; pools are: {known}")

    @model_validator(mode="after")
    def _check_cross_fields(self) -> Self:
        problems = _Problems()
        # The API token and the webhook secrets have different readers and rotate separately; sharing one
        # parameter would hand the webhook verifier a token that can manage runners.
        owners: dict[str, _Loc] = {}
        for loc, name in (
            (("gitlab", "token_parameter"), self.gitlab.token_parameter),
            (("webhook", "token_parameter"), self.webhook.token_parameter),
            (("webhook", "signing_secret_parameter"), self.webhook.signing_secret_parameter),
        ):
            if name is None:
                continue
            if name in owners:
                problems.add(loc, f"must differ from {_format_loc(owners[name])}, got {_show(name)}")
            owners.setdefault(name, loc)
        for index, pool in enumerate(self.pools):
            others = [o.name for o in self.pools if o is not pool and o.image.repository == pool.image.repository]
            if pool.image.push and others:
                problems.add(
                    ("pools", index, "image", "push"),
                    f"pool {pool.name} may not push to {pool.image.repository}, which pool(s) "
                    f"{', '.join(others)} also run; give it a repository of its own",
                )
        problems.raise_any()
        return self


# ---- pydantic errors to one readable line each -----------------------------------------------------------

_FIXED_REASONS = {"missing": "required", "extra_forbidden": "unknown field"}

_EXPECTED = {
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "tuple_type": "a list",
    "list_type": "a list",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "dict_type": "a mapping",
}


def _format_loc(loc: Sequence[object], data: object = None) -> str:
    """``("pools", 1, "max_runners")`` -> ``pools[1](build).max_runners``, the name read from ``data``."""
    path = ""
    node = data
    for key in loc:
        if isinstance(key, int):
            path += f"[{key}]"
            node = node[key] if isinstance(node, list | tuple) and 0 <= key < len(node) else None
            name = node.get("name") if isinstance(node, Mapping) else None
            if isinstance(name, str):
                path += f"({name})"
        else:
            path += f".{key}" if path else str(key)
            node = node.get(key) if isinstance(node, Mapping) else None
    return path


def _reason(detail: ErrorDetails) -> str:
    kind, value = detail["type"], detail["input"]
    ctx = detail.get("ctx", {})
    if kind in _FIXED_REASONS:
        return _FIXED_REASONS[kind]
    if kind == "enum":
        return f"must be {ctx['expected']}, got {_show(value)}"
    expected = _EXPECTED.get(kind)
    if expected is None:
        return detail["msg"]
    # YAML reads unquoted 1.10, 2024 or `on` as numbers and booleans; quoting is the fix users need to hear.
    hint = "; quote it" if kind == "string_type" and isinstance(value, int | float) else ""
    return f"must be {expected}, got {_show(value)}{hint}"


def _problem_lines(error: ValidationError, data: object) -> list[str]:
    found: list[tuple[Sequence[object], str]] = []
    for detail in error.errors():
        loc = detail["loc"]
        if detail["type"] == _PROBLEMS:
            found.extend((loc + sub_loc, reason) for sub_loc, reason in detail.get("ctx", {})["problems"])
        elif detail["type"] == "invalid_key":
            # pydantic puts the offending key itself last in loc; true would then print as [1].
            found.append((loc[:-1], f"key {_show(detail['input'])} must be a string; quote it"))
        else:
            found.append((loc, _reason(detail)))
    return [f"{_format_loc(loc, data)}: {reason}" if loc else reason for loc, reason in found]


# ---- public API ------------------------------------------------------------------------------------------


def parse_config(data: object, source: str = "<config>") -> FleetConfig:
    """Validates parsed YAML or JSON; raises ConfigError with every problem, one ``path: reason`` each."""
    if not isinstance(data, Mapping):
        raise ConfigError(source, [f"top level must be a mapping of settings, got {_show(data)}"])
    try:
        return FleetConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(source, _problem_lines(error, data)) from None


def load_config(path: str | os.PathLike[str]) -> FleetConfig:
    """Reads and validates a ``.yaml``, ``.yml`` or ``.json`` stage file."""
    file = Path(path)
    source = str(file)
    suffix = file.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        kind = f"'{suffix}'" if suffix else "(no extension)"
        raise ConfigError(source, [f"unsupported file type {kind}; use .yaml, .yml or .json"])
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, ["file not found"]) from None
    except UnicodeDecodeError as error:
        raise ConfigError(source, [f"not UTF-8 text: {error.reason} at byte {error.start}"]) from None
    except OSError as error:
        raise ConfigError(source, [f"cannot read file: {error.strerror or error}"]) from None
    data = _parse_json(text, source) if suffix == ".json" else _parse_yaml(text, source)
    if data is None:
        raise ConfigError(source, ["file is empty"])
    return parse_config(data, source)


@functools.cache
def get_config() -> FleetConfig:
    """The configuration of this process, from the file named by ``RUNNER_FLEET_CONFIG``, loaded once.

    A relative path resolves against the directory holding ``app.py``, not the working directory, which
    differs between pytest, ``chalice local`` and Lambda.
    """
    value = os.environ.get(CONFIG_ENV_VAR, "").strip()
    if not value:
        raise ConfigError(
            "environment",
            [f"{CONFIG_ENV_VAR}: not set; point it at a stage file such as chalicelib/stages/dev.yaml"],
        )
    path = Path(value)
    return load_config(path if path.is_absolute() else _APP_DIR / path)


def reset_config_cache() -> None:
    """Forgets what :func:`get_config` loaded, so tests can switch files."""
    get_config.cache_clear()


# ---- file formats ----------------------------------------------------------------------------------------


class _DuplicateKeyError(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _refuse_duplicate_keys(pairs: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    # json and yaml keep the last of two equal keys silently, which hides an edit that did nothing.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(key)
        result[key] = value
    return result


def _parse_json(text: str, source: str) -> object:
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except json.JSONDecodeError as error:
        problem = f"invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        raise ConfigError(source, [problem]) from None
    except _DuplicateKeyError as error:
        raise ConfigError(source, [f"invalid JSON: duplicate key {error.key!r}"]) from None


def _parse_yaml(text: str, source: str) -> object:
    import yaml

    try:
        return yaml.load(text, Loader=_strict_yaml_loader())  # noqa: S506 - the loader is a SafeLoader
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(source, [f"invalid YAML{where}: {error.problem}"]) from None
    except yaml.YAMLError as error:
        raise ConfigError(source, [f"invalid YAML: {error}"]) from None


@functools.cache
def _strict_yaml_loader() -> type[Any]:
    """``yaml.SafeLoader`` that also refuses duplicate keys; keys merged in with ``<<`` may be overridden."""
    import yaml

    class StrictSafeLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> Iterator[dict[Any, Any]]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"duplicate key {key_node.value!r}",
                        key_node.start_mark,
                    )
                seen.add(key)
        data: dict[Any, Any] = {}
        yield data  # as SafeLoader does: yield first, so aliases to this mapping resolve
        data.update(loader.construct_mapping(node))

    StrictSafeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return StrictSafeLoader
