"""Simulated runner agents: what runs on each runner instance, played in the sandbox.

A real runner instance boots the runner AMI: cloud-init writes the files of the pool's ``#cloud-config`` user data
and starts the boot script, which finds the instance's token, runs ``gitlab-runner run-single`` and powers the
instance off when it exits (the boot steps of runner_ami/README.md). moto starts no machine, so the
sandbox plays one: an :class:`AgentManager` watches the local EC2 for running instances of the fleet and starts
one :class:`RunnerAgent` thread per new instance, which performs the same steps against the same peers:

1. a trap powers the instance off when the boot ends, however it ends (shutdown behaviour terminate: the
   instance is terminated, and the sandbox sends EC2's state-change event, see ``ec2_events``);
2. the lifetime backstop: power off after ``RUNNER_MAX_LIFETIME_MINUTES`` whatever happens;
3. cloud-init: read the instance's user data (``DescribeInstanceAttribute userData``, the bytes IMDS serves at
   ``/latest/user-data``), parse the ``#cloud-config`` and keep the files ``write_files`` writes in the agent's
   own file system; then read the settings file as ``source`` would;
4. the instance id and region (IMDS): the agent knows both;
5. ``aws:userid``: ``<its pool's runner role id>:<instance id>`` (see :func:`instance_user_id` for why the agent
   does not ask STS);
6. poll the token item (consistent ``GetItem``) until it exists or the boot deadline passed, and take from it the
   token and, when the item has one, ``idle_wait_seconds`` (scale-up writes 0 for a warm runner);
7. delete it;
8. write ``/run/runner-fleet/config.toml`` (0600): the settings config.toml with the token line inserted after
   ``[[runners]]``;
9. pre-pull the CI image: there is no Docker in the sandbox, so nothing is pulled;
10. ``POST /api/v4/runners/verify``;
11. ``run-single`` (gitlab-runner commands/single.go): poll ``POST /api/v4/jobs/request``, run each job, report it
    through ``PUT /api/v4/jobs/:id``; stop after ``--max-builds`` builds, or when no job came for
    ``--wait-timeout`` seconds since the last build (or the start), the token item's ``idle_wait_seconds`` if it
    had one, else ``RUNNER_IDLE_WAIT_SECONDS``; with 0 it never stops for idleness (a warm runner waits for
    reconcile to retire it);
12. run-single exits: the trap of step 1 powers off.

A job's "execution" interprets its script (``steps[].script`` of the ``/jobs/request`` answer): ``sleep N``
waits N seconds, ``exit N`` ends the script (non-zero: the job fails with ``script_failure``), anything else
succeeds at once.

An instance's operating system may also shut down under the agent (:meth:`AgentManager.shut_down`: EC2
interrupting a spot instance, see ``ec2_events.interrupt_spot_instance``). systemd then stops gitlab-runner, whose
stop signal reaches the running build as a system interrupt: the build fails with ``runner_system_failure``
(gitlab-runner common/build.go, ``Build.run``'s ``SystemInterrupt`` case), reported by ``PUT /jobs/:id`` with the
log line "ERROR: Job failed (system failure): aborted: terminated". The agent does the same, and powers nothing
off itself: EC2 terminates the instance.

Fault switches (:class:`FaultSwitches`), set before an instance boots, make one agent misbehave the way a real
instance can: hang at boot (never contacts GitLab, the instance stays running with its token unread), crash
mid-job (the runner dies while its job runs: the job stays running in GitLab, the instance powers off), or fail
its job as ``runner_system_failure`` and exit.

The boot delay (``AgentOptions.boot_delay_seconds``) runs from the moment the manager sees the instance running,
and the agent reads its user data and looks its role up within it, as a real instance's boot includes cloud-init
and its identity costs one STS call: the delay is the time from launch to the token read of step 6.

Sandbox only: ``AgentOptions.wait_timeout_seconds`` replaces the pool's ``RUNNER_IDLE_WAIT_SECONDS`` (at least 30
in the stage config) so that runners idle out in seconds, but not a token item's ``idle_wait_seconds``, which wins
over both as on an instance; ``job_speed`` shortens every ``sleep``.
"""

from __future__ import annotations

import base64
import logging
import re
import secrets
import shlex
import threading
import time
import tomllib
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import requests
import yaml
from botocore.exceptions import BotoCoreError, ClientError

from chalicelib.aws import AwsClients, error_code
from chalicelib.naming import FLEET_TAG, POOL_TAG, launch_template_name
from chalicelib.scaling.userdata import BOOT_SERVICE, CLOUD_CONFIG_HEADER, SETTINGS_FILE
from chalicelib.scaling.userdata import RUNNER_CONFIG_FILE as CONFIG_FILE

logger = logging.getLogger(__name__)

RUNTIME_CONFIG_FILE = "/run/runner-fleet/config.toml"
TOKEN_PATTERN = re.compile(r"^glrt-[A-Za-z0-9_-]+$")
RUNNERS_LINE = "[[runners]]"
# What gitlab-runner says of itself in every runner API request (network/gitlab.go, common.VersionInfo).
RUNNER_VERSION = "17.9.0"
HTTP_TIMEOUT = 10
_WAIT_SLICE_SECONDS = 0.05


# ---------------------------------------------------------------------------------------------------------
# What an instance is given: cloud-config files, settings, the runner's config
# ---------------------------------------------------------------------------------------------------------


class BootError(Exception):
    """A boot step failed: on an instance, ``set -e`` ends the boot script and its trap powers off."""


@dataclass(frozen=True)
class HandOff:
    """What the instance takes from its token item: the runner token, and the idle wait scale-up gave it (present
    for a warm runner only, 0: never stop for idleness; None: the pool's ``RUNNER_IDLE_WAIT_SECONDS`` applies)."""

    token: str = field(repr=False)  # a glrt- token: never in a log line or a traceback's locals
    idle_wait_seconds: int | None = None


@dataclass(frozen=True)
class WrittenFile:
    path: str
    content: str
    permissions: str = "0644"
    owner: str = "root:root"


@dataclass(frozen=True)
class CloudConfig:
    """The parts of a ``#cloud-config`` document the instance acts on."""

    files: Mapping[str, WrittenFile]
    runcmd: tuple[Any, ...]

    def starts_boot_service(self) -> bool:
        """Whether ``runcmd`` starts the AMI's boot service (the contract's command does, when the AMI has it)."""
        return any(BOOT_SERVICE in (" ".join(c) if isinstance(c, list) else str(c)) for c in self.runcmd)


def parse_cloud_config(user_data: str) -> CloudConfig:
    """Parse user data as cloud-init does for a ``#cloud-config`` document (first line exactly the header, then
    YAML) and apply ``write_files`` in order (``append`` adds to a file written earlier)."""
    first, _, _ = user_data.partition("\n")
    if first.rstrip("\r") != CLOUD_CONFIG_HEADER:
        raise BootError(f"user data is not a cloud-config document (first line {first[:40]!r})")
    try:
        document = yaml.safe_load(user_data)
    except yaml.YAMLError as exc:
        raise BootError(f"cloud-config is not YAML: {exc}") from None
    if not isinstance(document, dict):
        raise BootError("cloud-config is not a mapping")
    files: dict[str, WrittenFile] = {}
    for entry in document.get("write_files") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise BootError(f"write_files entry without a path: {entry!r}")
        content = _decoded(entry.get("content") or "", str(entry.get("encoding") or "text/plain"))
        path = entry["path"]
        if entry.get("append") and path in files:
            content = files[path].content + content
        files[path] = WrittenFile(
            path=path,
            content=content,
            permissions=str(entry.get("permissions") or "0644"),
            owner=str(entry.get("owner") or "root:root"),
        )
    runcmd = document.get("runcmd") or []
    if not isinstance(runcmd, list):
        raise BootError("runcmd is not a list")
    return CloudConfig(files=files, runcmd=tuple(runcmd))


def _decoded(content: Any, encoding: str) -> str:
    """``write_files`` content in one of cloud-init's encodings (b64, gzip, gz+b64, or plain text)."""
    if not isinstance(content, str | bytes):
        raise BootError(f"write_files content is not text: {type(content).__name__}")
    raw = content.encode() if isinstance(content, str) else content
    if encoding in ("b64", "base64"):
        raw = base64.b64decode(raw)
    elif encoding in ("gz", "gzip"):
        raw = zlib.decompress(raw, 16 + zlib.MAX_WBITS)
    elif encoding in ("gz+b64", "gzip+base64", "gz+base64", "gzip+b64"):
        raw = zlib.decompress(base64.b64decode(raw), 16 + zlib.MAX_WBITS)
    elif encoding != "text/plain":
        raise BootError(f"write_files encoding {encoding!r} is not one cloud-init knows")
    return raw.decode()


def parse_settings(text: str) -> dict[str, str]:
    """The variables ``source runner.env`` sets: one ``NAME=value`` a line, the value shell-quoted."""
    found: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        name, sep, rest = stripped.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise BootError(f"{SETTINGS_FILE} line {number} is not NAME=value")
        try:
            words = shlex.split(rest, comments=True)
        except ValueError as exc:
            raise BootError(f"{SETTINGS_FILE} line {number}: {exc}") from None
        if len(words) > 1:
            # bash would run the second word as a command with NAME in its environment, not set NAME.
            raise BootError(f"{SETTINGS_FILE} line {number}: {name}'s value is not quoted")
        found[name] = words[0] if words else ""
    return found


def read_hand_off(item: Mapping[str, Any]) -> HandOff:
    """The token item (as ``GetItem`` answers it) checked as the boot script checks it: the token must look like a
    runner authentication token, and ``idle_wait_seconds``, when present, must be a whole number."""
    token = str((item.get("token") or {}).get("S", ""))
    if not TOKEN_PATTERN.fullmatch(token):
        raise BootError("the token item holds no runner authentication token")
    idle_wait = (item.get("idle_wait_seconds") or {}).get("N")
    if idle_wait is None:
        return HandOff(token)
    if not re.fullmatch(r"[0-9]+", str(idle_wait)):
        raise BootError(f"idle_wait_seconds of the token item must be a whole number, got {idle_wait!r}")
    return HandOff(token, int(idle_wait))


def with_token(config_toml: str, token: str) -> str:
    """The runner's config with ``token = "<token>"`` on the line after the one ``[[runners]]`` line."""
    lines = config_toml.splitlines(keepends=True)
    at = [i for i, line in enumerate(lines) if line.strip() == RUNNERS_LINE]
    if len(at) != 1:
        raise BootError(f"{CONFIG_FILE} has {len(at)} [[runners]] lines, not one")
    lines.insert(at[0] + 1, f'token = "{token}"\n')
    return "".join(lines)


@dataclass(frozen=True)
class RunnerSection:
    """The ``[[runners]]`` entry ``run-single --runner NAME`` takes from the config file."""

    name: str
    url: str
    token: str
    executor: str


def runner_section(config_toml: str, name: str) -> RunnerSection:
    """``RunnerByName``, with the checks ``run-single``'s ``HandleArgs`` makes (URL, token, executor)."""
    try:
        config = tomllib.loads(config_toml)
    except tomllib.TOMLDecodeError as exc:
        raise BootError(f"{RUNTIME_CONFIG_FILE} is not TOML: {exc}") from None
    found = [r for r in config.get("runners") or [] if isinstance(r, dict) and r.get("name") == name]
    if not found:
        raise BootError(f"Error loading runner by name: runner {name!r} not found")
    section = found[0]
    for key, message in (("url", "Missing URL"), ("token", "Missing Token"), ("executor", "Missing Executor")):
        if not section.get(key):
            raise BootError(message)
    return RunnerSection(
        name=name, url=str(section["url"]).rstrip("/"), token=str(section["token"]), executor=str(section["executor"])
    )


def instance_user_id(role_id: str, instance_id: str) -> str:
    """The instance role session's ``aws:userid``, ``<role id>:<instance id>``, which ``sts:GetCallerIdentity``
    answers on an instance as its ``UserId``.

    The agent cannot ask STS: moto's GetCallerIdentity answers as the sandbox's own credentials, never as an EC2
    role session named after the instance. So it computes the same value from the role in the instance profile
    of the instance's launch template (``iam:GetInstanceProfile``, then ``iam:GetRole`` for its ``RoleId``)."""
    return f"{role_id}:{instance_id}"


# ---------------------------------------------------------------------------------------------------------
# run-single's decisions and a job's script
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSingle:
    """``gitlab-runner run-single``'s loop state (commands/single.go): builds left (0: run forever), the wait
    timeout, and when the last build ended (or the runner started)."""

    max_builds: int
    wait_timeout: float
    last_build: float
    run_forever: bool = False

    @classmethod
    def start(cls, max_builds: int, wait_timeout: float, now: float) -> RunSingle:
        return cls(max_builds=max_builds, wait_timeout=wait_timeout, last_build=now, run_forever=max_builds == 0)

    def after_build(self, now: float) -> RunSingle:
        """``postBuild``: one build fewer, and the idle time counts from now."""
        return replace(self, max_builds=self.max_builds - 1 if self.max_builds > 0 else 0, last_build=now)

    def finished(self, now: float) -> str | None:
        """``checkFinishedConditions``: why run-single exits now, or None to ask for another job."""
        if self.max_builds < 1 and not self.run_forever:
            return "max builds"
        if self.wait_timeout > 0 and now - self.last_build > self.wait_timeout:
            return "wait timeout"
        return None


@dataclass(frozen=True)
class ScriptStep:
    line: str
    sleep: float = 0.0
    exit_code: int | None = None


def plan_script(lines: Sequence[str]) -> list[ScriptStep]:
    """What each script line does here: ``sleep N`` (seconds, may be fractional) waits, ``exit N`` ends the
    script with that code, anything else succeeds at once. Lines after an ``exit`` never run."""
    steps: list[ScriptStep] = []
    for line in lines:
        words = line.split()
        if len(words) == 2 and words[0] == "sleep" and re.fullmatch(r"\d+(\.\d+)?", words[1]):
            steps.append(ScriptStep(line, sleep=float(words[1])))
        elif words[:1] == ["exit"] and len(words) <= 2:
            code = words[1] if len(words) == 2 else "0"
            steps.append(ScriptStep(line, exit_code=int(code) if code.isdigit() else 2))
            break
        else:
            steps.append(ScriptStep(line))
    return steps


# ---------------------------------------------------------------------------------------------------------
# Options, faults, stats
# ---------------------------------------------------------------------------------------------------------


class Fault(StrEnum):
    HANG_AT_BOOT = "hang_at_boot"
    CRASH_MID_JOB = "crash_mid_job"
    RUNNER_SYSTEM_FAILURE = "runner_system_failure"


class JobOutcome(StrEnum):
    SUCCESS = "success"
    SCRIPT_FAILURE = "script_failure"
    RUNNER_SYSTEM_FAILURE = "runner_system_failure"
    # The runner died with the job: GitLab still shows it running.
    ABANDONED = "abandoned"
    # PUT /jobs/:id said the job is no longer the runner's (canceled, or erased) before it ran.
    ABORTED = "aborted"


@dataclass(frozen=True)
class AgentOptions:
    """How the sandbox plays its instances. ``wait_timeout_seconds`` and ``job_speed`` exist only here: the
    first replaces the pool's idle wait (``--wait-timeout``) unless the token item gives one, the second divides
    every ``sleep`` of a script."""

    boot_delay_seconds: float = 1.0
    wait_timeout_seconds: float | None = None
    job_speed: float = 1.0
    # gitlab-runner asks for a job every check_interval (3 s by default); the sandbox asks more often.
    check_interval_seconds: float = 0.5
    token_poll_seconds: float = 0.5
    scan_interval_seconds: float = 0.5


class FaultSwitches:
    """Faults waiting for the agents they are meant for: by instance id, or for the next agents of a pool."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_instance: dict[str, Fault] = {}
        self._by_pool: dict[str, list[Fault]] = {}

    def for_instance(self, instance_id: str, fault: Fault) -> None:
        with self._lock:
            self._by_instance[instance_id] = fault

    def for_next_agent(self, pool: str, fault: Fault) -> None:
        """The next agent to boot in ``pool`` gets ``fault`` (several calls queue for as many agents)."""
        with self._lock:
            self._by_pool.setdefault(pool, []).append(fault)

    def take(self, instance_id: str, pool: str) -> Fault | None:
        with self._lock:
            fault = self._by_instance.pop(instance_id, None)
            if fault is None and self._by_pool.get(pool):
                fault = self._by_pool[pool].pop(0)
            return fault


class Phase(StrEnum):
    BOOTING = "booting"
    RUNNING = "running"  # run-single is polling or running a job
    HUNG = "hung"
    DONE = "done"  # powered off


@dataclass
class AgentRecord:
    """What one agent did, for the demo and tests."""

    instance_id: str
    pool: str
    fault: Fault | None = None
    phase: Phase = Phase.BOOTING
    system_id: str = ""
    runner_id: int | None = None
    jobs: list[tuple[int, JobOutcome]] = field(default_factory=list)
    # Why the instance powered off ("max builds", "wait timeout", "boot failed: ...", "crashed", ...).
    ended: str = ""
    terminated: bool = False


class _Stopping(Exception):
    """The sandbox is stopping: the agent ends without touching anything more."""


class _PowerOff(Exception):
    """The instance powers off now (the lifetime backstop, or a crash); the trap terminates it."""


class _SystemShutdown(Exception):
    """The instance's operating system is shutting down: gitlab-runner gets its stop signal."""


# What gitlab-runner writes to the job's log when a system interrupt aborts it (common/build.go: the build error
# "aborted: <signal>" with failure reason runner_system_failure, logged as a system failure).
SYSTEM_INTERRUPT_LOG = "ERROR: Job failed (system failure): aborted: terminated\n"


# ---------------------------------------------------------------------------------------------------------
# One instance
# ---------------------------------------------------------------------------------------------------------


class RunnerAgent:
    def __init__(
        self,
        record: AgentRecord,
        *,
        fleet: str,
        clients: AwsClients,
        options: AgentOptions,
        stopping: threading.Event,
        on_job: Callable[[JobOutcome], None],
        take_fault: Callable[[str, str], Fault | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.record = record
        self._fleet = fleet
        self._clients = clients
        self._options = options
        self._stopping = stopping
        self._on_job = on_job
        self._take_fault = take_fault
        self._clock = clock
        self._http = requests.Session()
        self.shutdown = threading.Event()
        self._started = clock()
        self._lifetime_deadline = float("inf")
        self.files: dict[str, WrittenFile] = {}

    @property
    def instance_id(self) -> str:
        return self.record.instance_id

    def run(self) -> None:
        try:
            # What a real instance does while it boots takes the simulation AWS calls of its own: cloud-init's read
            # of the user data, and the identity that STS would answer with one call (see _role_id). They run
            # within the boot delay, so the delay stays the time from launch to the boot script's token read.
            booting = self._clock()
            early: tuple[str, str] | Exception
            try:
                early = (self._user_data(), self._role_id())
            except (BootError, ClientError, BotoCoreError) as exc:
                early = exc
            self._wait(max(0.0, self._options.boot_delay_seconds - (self._clock() - booting)))
            # A fault switch may be set until the instance boots, by its id once its launch answered.
            self.record.fault = self._take_fault(self.instance_id, self.record.pool)
            if self.record.fault is Fault.HANG_AT_BOOT:
                self._hang("fault: hang at boot")
                return
            try:
                if isinstance(early, Exception):
                    raise early
                self._boot_and_run(*early)
            except (_PowerOff, BootError) as exc:
                self.record.ended = self.record.ended or f"boot failed: {exc}"
            except (ClientError, BotoCoreError, requests.RequestException) as exc:
                self.record.ended = f"boot failed: {type(exc).__name__}: {exc}"
            self._power_off()
        except _Stopping:
            return
        except _SystemShutdown:
            # EC2 terminates the instance; nothing here powers it off.
            self.record.ended = "system shutdown"
            self.record.phase = Phase.DONE
        except Exception:
            logger.exception("runner agent failed", extra={"instance_id": self.instance_id})
            self.record.ended = self.record.ended or "agent error"
        finally:
            self._http.close()

    # -- the boot steps --

    def _boot_and_run(self, user_data: str, role_id: str) -> None:
        cloud_config = parse_cloud_config(user_data)
        if not cloud_config.starts_boot_service():
            # Nothing starts the boot script: the instance would sit there, contacting no one.
            self._hang(f"runcmd does not start {BOOT_SERVICE}")
            raise _Stopping
        self.files = dict(cloud_config.files)
        settings = parse_settings(self._read(SETTINGS_FILE))
        self._lifetime_deadline = self._started + 60 * float(self._setting(settings, "RUNNER_MAX_LIFETIME_MINUTES"))
        user_id = instance_user_id(role_id, self.instance_id)
        key = self._setting(settings, "RUNNER_FLEET_TOKEN_KEY_PREFIX") + user_id
        table = self._setting(settings, "RUNNER_FLEET_TOKEN_TABLE")
        hand_off = self._take_token(table, key, float(self._setting(settings, "RUNNER_BOOT_DEADLINE_SECONDS")))
        self.files[RUNTIME_CONFIG_FILE] = WrittenFile(
            RUNTIME_CONFIG_FILE, with_token(self._read(CONFIG_FILE), hand_off.token), permissions="0600"
        )
        runner = runner_section(self._read(RUNTIME_CONFIG_FILE), self._setting(settings, "RUNNER_NAME"))
        self.record.system_id = "s_" + secrets.token_hex(6)  # gitlab-runner's GenerateUniqueSystemID shape
        self._verify(runner)
        if hand_off.idle_wait_seconds is not None:
            # A warm runner: reconcile retires it, in the sandbox too, whatever the options' stand-in idle wait.
            wait_timeout = float(hand_off.idle_wait_seconds)
        elif self._options.wait_timeout_seconds is not None:
            wait_timeout = self._options.wait_timeout_seconds
        else:
            wait_timeout = float(self._setting(settings, "RUNNER_IDLE_WAIT_SECONDS"))
        self._run_single(runner, int(self._setting(settings, "RUNNER_MAX_BUILDS")), wait_timeout)

    def _user_data(self) -> str:
        """What cloud-init reads from IMDS ``/latest/user-data``: the user data the instance was launched with."""
        answer = self._clients.ec2.describe_instance_attribute(InstanceId=self.instance_id, Attribute="userData")
        value = (answer.get("UserData") or {}).get("Value")
        if not value:
            raise BootError("the instance has no user data")
        return base64.b64decode(value).decode()

    def _read(self, path: str) -> str:
        found = self.files.get(path)
        if found is None:
            raise BootError(f"{path}: No such file or directory")
        return found.content

    @staticmethod
    def _setting(settings: Mapping[str, str], name: str) -> str:
        value = settings.get(name)
        if value is None:  # set -u: an unset variable ends the script
            raise BootError(f"{name}: unbound variable")
        return value

    def _role_id(self) -> str:
        """The id of the role in the instance's profile. moto leaves a launch template's instance profile off the
        instances it launches, so the profile is read from the pool's launch template when the instance lacks one."""
        ec2 = self._clients.ec2
        iam = self._clients.client("iam")
        instance = self._own_description()
        profile = (instance.get("IamInstanceProfile") or {}).get("Arn", "").rsplit("/", 1)[-1]
        if not profile:
            template = launch_template_name(self._fleet, self.record.pool)
            versions = ec2.describe_launch_template_versions(LaunchTemplateName=template, Versions=["$Default"])
            data = versions["LaunchTemplateVersions"][0]["LaunchTemplateData"]
            profile = (data.get("IamInstanceProfile") or {}).get("Name", "")
        if not profile:
            raise BootError("the instance has no instance profile: no role credentials")
        roles = iam.get_instance_profile(InstanceProfileName=profile)["InstanceProfile"]["Roles"]
        if not roles:
            raise BootError(f"instance profile {profile} holds no role")
        return str(iam.get_role(RoleName=roles[0]["RoleName"])["Role"]["RoleId"])

    def _own_description(self) -> dict[str, Any]:
        """The instance as DescribeInstances tells it, standing in for what IMDS tells an instance about itself.
        IMDS knows the instance from its first boot step; DescribeInstances lags a launch (the local AWS says
        ``InvalidInstanceID.NotFound`` for a while, see ``aws_rules.ec2_describe_lag``), so the stand-in waits the
        lag out rather than fail a boot no real instance would fail."""
        while True:
            try:
                found = self._clients.ec2.describe_instances(InstanceIds=[self.instance_id])
                return dict(found["Reservations"][0]["Instances"][0])
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "InvalidInstanceID.NotFound":
                    raise
            self._wait(0.1)

    def _take_token(self, table: str, key: str, deadline_seconds: float) -> HandOff:
        """Steps 6 and 7: wait for the token item (scale-up writes it just after CreateFleet answers), take its
        token and idle wait (a whole number when present, as the boot script checks), then delete it."""
        dynamodb = self._clients.dynamodb
        deadline = self._started + deadline_seconds
        while True:
            item = dynamodb.get_item(TableName=table, Key={"pk": {"S": key}}, ConsistentRead=True).get("Item")
            if item is not None:
                break
            if self._clock() >= deadline:
                raise BootError("no token by the boot deadline")
            self._wait(self._options.token_poll_seconds)
        hand_off = read_hand_off(item)
        dynamodb.delete_item(TableName=table, Key={"pk": {"S": key}})
        return hand_off

    # -- the runner API --

    def _info(self) -> dict[str, Any]:
        """``common.VersionInfo``, which gitlab-runner sends with every request."""
        return {
            "name": "gitlab-runner",
            "version": RUNNER_VERSION,
            "revision": "sandbox",
            "platform": "linux",
            "architecture": "amd64",
            "executor": "docker",
            "shell": "bash",
            "features": {
                "variables": True,
                "image": True,
                "services": True,
                "artifacts": True,
                "cache": True,
                "shared": True,
                "upload_multiple_artifacts": True,
                "session": True,
                "terminal": True,
                "refspecs": True,
                "masking": True,
                "proxy": False,
                "raw_variables": True,
                "artifacts_exclude": True,
                "multi_build_steps": True,
                "trace_reset": True,
                "trace_checksum": True,
                "trace_size": True,
                "cancelable": True,
                "return_exit_code": True,
            },
            "config": {"gpus": ""},
        }

    def _api(self, runner: RunnerSection, method: str, path: str, **kwargs: Any) -> requests.Response:
        if self._stopping.is_set():
            raise _Stopping
        return self._http.request(method, f"{runner.url}/api/v4{path}", timeout=HTTP_TIMEOUT, **kwargs)

    def _verify(self, runner: RunnerSection) -> None:
        """``gitlab-runner verify``: a refused token fails the boot."""
        answer = self._api(
            runner, "POST", "/runners/verify", json={"token": runner.token, "system_id": self.record.system_id}
        )
        if answer.status_code != 200:
            raise BootError(f"verify answered {answer.status_code}")
        self.record.runner_id = int(answer.json().get("id") or 0) or None

    def _run_single(self, runner: RunnerSection, max_builds: int, wait_timeout: float) -> None:
        self.record.phase = Phase.RUNNING
        state = RunSingle.start(max_builds, wait_timeout, self._clock())
        last_update = ""
        while True:
            body: dict[str, Any] = {
                "info": self._info(),
                "token": runner.token,
                "system_id": self.record.system_id,
                "last_update": last_update,
            }
            answer = self._api(runner, "POST", "/jobs/request", json=body)
            if answer.status_code == 201:
                if self._process(runner, answer.json()):
                    state = state.after_build(self._clock())
            else:
                # 204: no job (an unhealthy answer waits too, longer in gitlab-runner; the wait timeout still runs).
                last_update = answer.headers.get("X-GitLab-Last-Update", last_update)
                self._wait(self._options.check_interval_seconds)
            reason = state.finished(self._clock())
            if reason is not None:
                self.record.ended = reason
                return

    def _process(self, runner: RunnerSection, job: Mapping[str, Any]) -> bool:
        """``processBuild``: report the job running, run it, report its result. False when GitLab said to abort
        before it ran (no build counted)."""
        job_id, job_token = int(job["id"]), str(job["token"])
        running = self._update(runner, job_id, job_token, "running")
        if running.status_code != 200:
            self._record_job(JobOutcome.ABORTED, job_id)
            return False
        if self.record.fault is Fault.CRASH_MID_JOB:
            self._record_job(JobOutcome.ABANDONED, job_id)
            self.record.ended = "crashed mid-job"
            raise _PowerOff("crashed mid-job")
        if self.record.fault is Fault.RUNNER_SYSTEM_FAILURE:
            self._finish(runner, job_id, job_token, b"", JobOutcome.RUNNER_SYSTEM_FAILURE, exit_code=None)
            self.record.ended = "runner system failure"
            raise _PowerOff("runner system failure")
        lines = [line for step in job.get("steps") or [] if step.get("name") == "script" for line in step["script"]]
        trace = bytearray()
        outcome, exit_code = JobOutcome.SUCCESS, 0
        for step in plan_script(lines):
            trace += f"$ {step.line}\n".encode()
            if step.sleep:
                try:
                    self._wait(step.sleep / self._options.job_speed)
                except _SystemShutdown:
                    trace += SYSTEM_INTERRUPT_LOG.encode()
                    lost = JobOutcome.RUNNER_SYSTEM_FAILURE
                    self._finish(runner, job_id, job_token, bytes(trace), lost, exit_code=None)
                    raise
            if step.exit_code is not None:
                exit_code = step.exit_code
                if exit_code != 0:
                    outcome = JobOutcome.SCRIPT_FAILURE
                    trace += f"ERROR: Job failed: exit code {exit_code}\n".encode()
                break
        if outcome is JobOutcome.SUCCESS:
            trace += b"Job succeeded\n"
        self._finish(runner, job_id, job_token, bytes(trace), outcome, exit_code=exit_code)
        return True

    def _update(
        self, runner: RunnerSection, job_id: int, job_token: str, state: str, **extra: Any
    ) -> requests.Response:
        body = {"info": self._info(), "token": job_token, "state": state, **extra}
        return self._api(runner, "PUT", f"/jobs/{job_id}", json=body)

    def _finish(
        self,
        runner: RunnerSection,
        job_id: int,
        job_token: str,
        trace: bytes,
        outcome: JobOutcome,
        *,
        exit_code: int | None,
    ) -> None:
        """Send the log (``PATCH /jobs/:id/trace``), then the final state with the log's checksum and size."""
        if trace:
            self._api(
                runner,
                "PATCH",
                f"/jobs/{job_id}/trace",
                data=trace,
                headers={"JOB-TOKEN": job_token, "Content-Range": f"0-{len(trace) - 1}", "Content-Type": "text/plain"},
            )
        extra: dict[str, Any] = {
            "checksum": f"crc32:{zlib.crc32(trace):08x}",
            "output": {"checksum": f"crc32:{zlib.crc32(trace):08x}", "bytesize": len(trace)},
        }
        if outcome is JobOutcome.SUCCESS:
            answer = self._update(runner, job_id, job_token, "success", **extra)
        else:
            if exit_code is not None:
                extra["exit_code"] = exit_code
            answer = self._update(runner, job_id, job_token, "failed", failure_reason=outcome.value, **extra)
        if answer.status_code != 200:
            logger.warning("job update refused", extra={"job_id": job_id, "status": answer.status_code})
        self._record_job(outcome, job_id)

    def _record_job(self, outcome: JobOutcome, job_id: int) -> None:
        self.record.jobs.append((job_id, outcome))
        self._on_job(outcome)

    # -- time and power --

    def _wait(self, seconds: float) -> None:
        """Sleep, unless the sandbox stops (``_Stopping``), the operating system shuts down (``_SystemShutdown``)
        or the lifetime backstop fires first (``_PowerOff``)."""
        until = self._clock() + seconds
        while True:
            if self._stopping.is_set():
                raise _Stopping
            if self.shutdown.is_set():
                raise _SystemShutdown
            now = self._clock()
            if now >= self._lifetime_deadline:
                self.record.ended = "max lifetime"
                raise _PowerOff("max lifetime")
            if now >= until:
                return
            # Short slices, so that either event ends the wait within one.
            self.shutdown.wait(min(until, self._lifetime_deadline, now + _WAIT_SLICE_SECONDS) - now)

    def _hang(self, why: str) -> None:
        """Do nothing more until the sandbox stops or the operating system shuts down."""
        self.record.phase = Phase.HUNG
        self.record.ended = why
        while not self._stopping.is_set() and not self.shutdown.wait(_WAIT_SLICE_SECONDS):
            pass

    def _power_off(self) -> None:
        """The trap's ``systemctl poweroff``: with shutdown behaviour terminate, EC2 terminates the instance and
        sends the state-change event."""
        from fleetctl.sandbox.ec2_events import terminate_instances

        if self._stopping.is_set():
            raise _Stopping
        try:
            terminate_instances(self._clients.ec2, [self.instance_id])
        except ClientError as exc:
            logger.warning("power off failed", extra={"instance_id": self.instance_id, "code": error_code(exc)})
            return
        self.record.terminated = True
        self.record.phase = Phase.DONE


# ---------------------------------------------------------------------------------------------------------
# The manager
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentStats:
    agents_started: int
    jobs: Mapping[str, int]
    instances_terminated: int
    hung: int

    def to_json(self) -> dict[str, Any]:
        return {
            "agents_started": self.agents_started,
            "jobs": dict(sorted(self.jobs.items())),
            "instances_terminated": self.instances_terminated,
            "hung": self.hung,
        }


class AgentManager:
    """Starts one agent per running instance of the fleet, as EC2 would boot each; ``stop`` ends them all."""

    def __init__(
        self,
        fleet: str,
        clients: AwsClients,
        options: AgentOptions | None = None,
        faults: FaultSwitches | None = None,
    ) -> None:
        self.fleet = fleet
        self.options = options or AgentOptions()
        self.faults = faults or FaultSwitches()
        self._clients = clients
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._records: dict[str, AgentRecord] = {}
        self._agents: dict[str, tuple[RunnerAgent, threading.Thread]] = {}
        self._threads: list[threading.Thread] = []
        self._jobs: Counter[str] = Counter()
        self._scanner: threading.Thread | None = None

    def start(self) -> AgentManager:
        self._scanner = threading.Thread(target=self._scan_forever, name="runner-agents", daemon=True)
        self._scanner.start()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self._stopping.set()
        deadline = time.monotonic() + timeout
        if self._scanner is not None:
            self._scanner.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def shut_down(self, instance_id: str, timeout: float = 10.0) -> bool:
        """The instance's operating system shuts down: its agent aborts a running job as gitlab-runner does on a
        system interrupt, and ends. Returns once it ended (False: no agent ran there, or it did not end in time)."""
        with self._lock:
            found = self._agents.get(instance_id)
        if found is None:
            return False
        agent, thread = found
        agent.shutdown.set()
        thread.join(timeout)
        return not thread.is_alive()

    def records(self) -> list[AgentRecord]:
        with self._lock:
            return list(self._records.values())

    def record(self, instance_id: str) -> AgentRecord | None:
        with self._lock:
            return self._records.get(instance_id)

    def stats(self) -> AgentStats:
        with self._lock:
            records = list(self._records.values())
            jobs = dict(self._jobs)
        return AgentStats(
            agents_started=len(records),
            jobs=jobs,
            instances_terminated=sum(1 for r in records if r.terminated),
            hung=sum(1 for r in records if r.phase is Phase.HUNG),
        )

    def scan(self) -> list[str]:
        """Start an agent for each running instance of the fleet that has none yet; returns their ids."""
        started: list[str] = []
        for instance_id, pool in self._running_instances():
            with self._lock:
                if instance_id in self._records or self._stopping.is_set():
                    continue
                record = AgentRecord(instance_id=instance_id, pool=pool)
                self._records[instance_id] = record
            agent = RunnerAgent(
                record,
                fleet=self.fleet,
                clients=self._clients,
                options=self.options,
                stopping=self._stopping,
                on_job=self._count_job,
                take_fault=self.faults.take,
            )
            thread = threading.Thread(target=agent.run, name=f"agent-{instance_id}", daemon=True)
            with self._lock:
                self._threads = [t for t in self._threads if t.is_alive()]
                self._threads.append(thread)
                self._agents = {i: (a, t) for i, (a, t) in self._agents.items() if t.is_alive()}
                self._agents[instance_id] = (agent, thread)
            thread.start()
            started.append(instance_id)
        return started

    def _count_job(self, outcome: JobOutcome) -> None:
        with self._lock:
            self._jobs[outcome.value] += 1

    def _running_instances(self) -> list[tuple[str, str]]:
        pages = self._clients.ec2.get_paginator("describe_instances").paginate(
            Filters=[
                {"Name": f"tag:{FLEET_TAG}", "Values": [self.fleet]},
                {"Name": "instance-state-name", "Values": ["running"]},
            ]
        )
        found = []
        for page in pages:
            for reservation in page["Reservations"]:
                for instance in reservation["Instances"]:
                    tags = {t["Key"]: t["Value"] for t in instance.get("Tags") or []}
                    found.append((str(instance["InstanceId"]), tags.get(POOL_TAG, "")))
        return found

    def _scan_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                self.scan()
            except (ClientError, BotoCoreError) as exc:
                # The local AWS restarting (a sandbox reset) or going away: look again next time.
                logger.debug("agent scan failed: %s", exc)
            self._stopping.wait(self.options.scan_interval_seconds)
