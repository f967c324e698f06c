"""What reconcile knows about the fleet at one moment, read from the table, EC2 and GitLab.

Typed and frozen, so the rules (:mod:`chalicelib.lifecycle.rules`) and the invariants
(:mod:`chalicelib.lifecycle.invariants`) are pure functions of them. :class:`FactSource` gathers them with
filtered, paginated calls whose number grows with the pages of the fleet, never one call per runner:

* GitLab: one listing of the fleet's runner scope (100 a page, each with its status);
* the table: one Query per kind of the sparse ``fleet-records`` index (runners, launches, pools, jobs, hooks), and
  one of the keys-only ``token-deadlines`` index for the tokens past their boot deadline;
* EC2: one DescribeInstances filtered by the fleet's tag and the live states (1,000 a page), and one
  DescribeLaunchTemplates for every pool's template.

Order matters. GitLab is read first, the table second and EC2 last: scale-up makes an instance, then its record,
then its GitLab runner, so anything seen in an earlier read has what it depends on in the later ones, and a
runner or record made meanwhile is never taken for an orphan.

The sweep for lost Job Hooks (:meth:`FactSource.sweep`) is separate and bounded: reconcile runs it after it acted
on everything else, over at most ``SWEEP_PROJECTS`` of the recently active projects a run (one page of pending jobs
each), taken in turn across runs (round robin by the run's minute, so no state is kept), within the time the run
has left; a project GitLab refuses or fails for is that project's problem alone. The connected hooks are read back
from GitLab the same way (:meth:`FactSource.hook_states`): at most ``HOOK_CHECKS`` a run, in turn, so that a hook
GitLab disabled is reported within ``ceil(hooks / HOOK_CHECKS)`` runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from botocore.exceptions import ClientError

from chalicelib.config import FleetConfig
from chalicelib.errors import RetryableError
from chalicelib.gitlab_api import GitLabApi, GitLabRunner
from chalicelib.naming import FLEET_TAG, LAUNCH_TAG, POOL_TAG, described_instance, launch_template_name
from chalicelib.observability import count, logger
from chalicelib.scaling.store import ScaleStore
from chalicelib.scaling.store.records import LaunchRecord, PoolCounter, RunnerRecord

# EC2 states of an instance that exists (or is on its way out); a terminated one is gone.
LIVE_INSTANCE_STATES = ("pending", "running", "shutting-down", "stopping", "stopped")
# EC2 adds this tag to an instance launched from a launch template: the version it was launched from.
TEMPLATE_VERSION_TAG = "aws:ec2launchtemplate:version"
# Projects whose pending jobs one run lists at most (one page of 100 each), and how often the round robin turns.
SWEEP_PROJECTS = 20
SWEEP_PERIOD_SECONDS = 60.0
# Connected hooks one run reads back from GitLab at most (one GET each), in turn like the sweep.
HOOK_CHECKS = 20


@dataclass(frozen=True)
class InstanceFact:
    """A live EC2 instance tagged as this fleet's."""

    instance_id: str
    pool: str
    launch_id: str
    state: str
    launched_at: float
    template_version: str = ""


@dataclass(frozen=True)
class JobFact:
    """An unfinished job item of the table."""

    project_id: int
    job_id: int
    status: str
    updated_at: float
    item: Mapping[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class PendingJob:
    """A job GitLab lists as pending in a recently active project."""

    project_id: int
    job_id: int
    created_at: float


@dataclass(frozen=True)
class HookFact:
    """A project hook ``fleetctl gitlab connect`` made and recorded (``HOOK#<project id>``)."""

    project_id: int
    hook_id: int


@dataclass(frozen=True)
class HookState:
    """A connected hook as GitLab showed it: its ``alert_status`` (``executable``, ``temporarily_disabled``,
    ``disabled``), or ``missing`` when GitLab no longer knows it (deleted, or out of the token's sight)."""

    hook: HookFact
    alert_status: str
    disabled_until: str | None = None

    @property
    def delivering(self) -> bool:
        return self.alert_status == "executable"


@dataclass(frozen=True)
class TokenFact:
    """A runner token item (its value is never read): whose it is and when its boot deadline passes."""

    key: str
    instance_id: str
    deadline_at: float


@dataclass(frozen=True)
class Facts:
    """One reconcile run's view. ``gitlab_runners`` is None when GitLab could not be read, ``pending_jobs`` until a
    sweep listed them: the rules that need them then decide nothing. ``tokens`` are the runner tokens past their
    boot deadline."""

    now: float
    records: Mapping[str, RunnerRecord]  # live runner records (and terminated ones with cleanup left), by instance
    launches: Sequence[LaunchRecord]
    leases: Mapping[str, int]  # each pool's lease counter
    instances: Mapping[str, InstanceFact]  # live instances tagged as the fleet's, by id
    template_versions: Mapping[str, str]  # each pool's launch template default version
    # The version each pool's counter item names (the last image promotion's): what scale-up launches from.
    pool_versions: Mapping[str, str] = field(default_factory=dict)
    # The pools the operator drained (``fleetctl drain``), from their counter items: when each was drained.
    drained: Mapping[str, float] = field(default_factory=dict)
    # Candidate images awaiting their scan: (pool, deadline), from the image records that are live.
    scan_deadlines: Sequence[tuple[str, float]] = ()
    jobs: Sequence[JobFact] = ()
    active_projects: tuple[int, ...] = ()
    gitlab_runners: Sequence[GitLabRunner] | None = None  # the fleet's own runners (by description)
    pending_jobs: Sequence[PendingJob] | None = None
    tokens: Sequence[TokenFact] | None = None
    hooks: Sequence[HookFact] = ()  # the connected hooks, by project

    @property
    def gitlab_known(self) -> bool:
        return self.gitlab_runners is not None

    def pool_version(self, pool: str) -> str:
        """The launch template version the pool's runners should run: its counter item's, once an image was
        promoted, else the template's default."""
        return self.pool_versions.get(pool) or self.template_versions.get(pool, "")


def ours(runner: GitLabRunner, fleet: str) -> bool:
    """A runner this fleet created: its description names one of the fleet's instances."""
    return (
        runner.description.startswith(f"runner-fleet {fleet}/") and described_instance(runner.description) is not None
    )


def _timestamp(value: Any) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str) and value:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return 0.0


class FactSource:
    """Gathers :class:`Facts`; ``active_window`` is how long a project counts as active after a job event."""

    def __init__(
        self,
        config: FleetConfig,
        store: ScaleStore,
        ec2: Any,
        gitlab: GitLabApi,
        *,
        clock: Callable[[], float] = time.time,
        active_window: float = 3600.0,
    ) -> None:
        self._config = config
        self._store = store
        self._ec2 = ec2
        self._gitlab = gitlab
        self._clock = clock
        self._active_window = active_window

    def gather(self, *, tokens: bool = True) -> Facts:
        """Every fact but GitLab's pending jobs (see :meth:`sweep`); raises ``ClientError`` when AWS cannot be read
        (nothing can be decided without it). ``tokens`` is kept for callers that name it: the tokens past their
        deadline are always read (one Query)."""
        now = self._clock()
        runners = self._gitlab_runners()
        records, launches, pools, jobs, hooks = self._table()
        leases = {str(item.get("name", "")): int(item.get("leases", 0)) for item in pools}
        pool_versions = {
            str(item.get("name", "")): str(item["template_version"])
            for item in pools
            if item.get("template_version") is not None
        }
        drained = {
            counter.name: counter.drained_at
            for counter in (PoolCounter.from_item(str(item.get("name", "")), item) for item in pools)
            if counter.drained
        }
        scans = [
            (str(item.get("pool", "")), float(item["candidate"]["deadline"]))
            for item in self._live("image")
            if isinstance(item.get("candidate"), dict) and item["candidate"].get("deadline") is not None
        ]
        instances = self._instances()
        versions = self._template_versions()
        recent = {job.project_id for job in jobs if job.updated_at >= now - self._active_window}
        active = sorted(recent | {hook.project_id for hook in hooks})
        return Facts(
            now=now,
            records=records,
            launches=launches,
            leases=leases,
            instances=instances,
            template_versions=versions,
            pool_versions=pool_versions,
            drained=drained,
            scan_deadlines=scans,
            jobs=jobs,
            active_projects=tuple(active),
            gitlab_runners=runners,
            tokens=self._tokens(now),
            hooks=hooks,
        )

    def lease_reading(self, facts: Facts) -> Facts:
        """``facts`` with the lease counters, the runner records and the launches read again (three Queries)."""
        records, launches, pools, _, _ = self._table(kinds=("runner", "launch", "pool"))
        leases = {str(item.get("name", "")): int(item.get("leases", 0)) for item in pools}
        return replace(facts, now=self._clock(), records=records, launches=launches, leases=leases)

    def _gitlab_runners(self) -> list[GitLabRunner] | None:
        try:
            listed = self._gitlab.runners()
        except RetryableError as exc:
            logger.warning("GitLab unreadable; its rules wait for the next run", extra={"reason": exc.reason})
            return None
        return [runner for runner in listed if ours(runner, self._config.fleet)]

    def sweep(self, facts: Facts, *, deadline: float | None = None) -> Facts:
        """``facts`` with the pending jobs GitLab lists for this run's turn of the active projects: at most
        ``SWEEP_PROJECTS``, taken in turn by the run's minute, until ``deadline`` (``time.monotonic``). A project
        GitLab refuses or fails for is skipped (logged, counted as ``SweepProjectsFailed``); the others are swept.
        No sweep (``pending_jobs`` None) while GitLab's runners were unreadable."""
        if facts.gitlab_runners is None:
            return facts
        found: list[PendingJob] = []
        for project_id in sweep_turn(facts.active_projects, facts.now):
            if deadline is not None and time.monotonic() >= deadline:
                logger.info("sweep stopped: the run's time is up", extra={"project_id": project_id})
                break
            try:
                listed = self._gitlab.pending_jobs(project_id)
            except RetryableError as exc:
                logger.warning("pending jobs unreadable", extra={"project_id": project_id, "reason": exc.reason})
                count("SweepProjectsFailed")
                continue
            found += [PendingJob(project_id, job_id, created_at) for job_id, created_at in listed or ()]
        return replace(facts, pending_jobs=found)

    def hook_states(self, facts: Facts, *, deadline: float | None = None) -> list[HookState]:
        """This run's turn of the connected hooks as GitLab shows them: at most ``HOOK_CHECKS``, taken in turn by
        the run's minute, until ``deadline`` (``time.monotonic``). A hook GitLab cannot be asked about now is left
        out (logged, counted as ``HookChecksFailed``); none is read while GitLab's runners were unreadable."""
        if facts.gitlab_runners is None:
            return []
        by_project = {hook.project_id: hook for hook in facts.hooks}
        states: list[HookState] = []
        for project_id in sweep_turn(list(by_project), facts.now, per_run=HOOK_CHECKS):
            hook = by_project[project_id]
            if deadline is not None and time.monotonic() >= deadline:
                logger.info("hook checks stopped: the run's time is up", extra={"project_id": project_id})
                break
            try:
                status = self._gitlab.hook_status(hook.project_id, hook.hook_id)
            except RetryableError as exc:
                logger.warning(
                    "hook state unreadable",
                    extra={"project_id": hook.project_id, "hook_id": hook.hook_id, "reason": exc.reason},
                )
                count("HookChecksFailed")
                continue
            if status is None:
                states.append(HookState(hook, "missing"))
            else:
                states.append(HookState(hook, status.alert_status, status.disabled_until))
        return states

    def _live(self, kind: str) -> list[dict[str, Any]]:
        return list(self._store.live_records(kind))

    def _table(
        self, kinds: tuple[str, ...] = ("runner", "launch", "pool", "job", "hook")
    ) -> tuple[dict[str, RunnerRecord], list[LaunchRecord], list[dict[str, Any]], list[JobFact], list[HookFact]]:
        def live(kind: str) -> list[dict[str, Any]]:
            return self._live(kind) if kind in kinds else []

        records = {str(item["instance_id"]): RunnerRecord.from_item(item) for item in live("runner")}
        launches = [LaunchRecord.from_item(str(item["pk"]).removeprefix("LAUNCH#"), item) for item in live("launch")]
        pools = live("pool")
        jobs = [
            JobFact(
                project_id=int(item["project_id"]),
                job_id=int(item["job_id"]),
                status=str(item.get("status", "")),
                updated_at=float(item.get("updated_at", 0)),
                item=item,
            )
            for item in live("job")
        ]
        hooks = [HookFact(int(item["project_id"]), int(item["hook_id"])) for item in live("hook")]
        return records, launches, pools, jobs, hooks

    def _instances(self) -> dict[str, InstanceFact]:
        pages = self._ec2.get_paginator("describe_instances").paginate(
            Filters=[
                {"Name": f"tag:{FLEET_TAG}", "Values": [self._config.fleet]},
                {"Name": "instance-state-name", "Values": list(LIVE_INSTANCE_STATES)},
            ],
            PaginationConfig={"PageSize": 1000},
        )
        found: dict[str, InstanceFact] = {}
        for page in pages:
            for reservation in page.get("Reservations", []):
                for instance in reservation.get("Instances", []):
                    tags = {tag["Key"]: tag["Value"] for tag in instance.get("Tags", [])}
                    found[instance["InstanceId"]] = InstanceFact(
                        instance_id=instance["InstanceId"],
                        pool=tags.get(POOL_TAG, ""),
                        launch_id=tags.get(LAUNCH_TAG, ""),
                        state=str(instance.get("State", {}).get("Name", "")),
                        launched_at=_timestamp(instance.get("LaunchTime")),
                        template_version=tags.get(TEMPLATE_VERSION_TAG, ""),
                    )
        return found

    def _template_versions(self) -> dict[str, str]:
        names = {launch_template_name(self._config.fleet, pool.name): pool.name for pool in self._config.pools}
        # A filter, not LaunchTemplateNames: a missing template is then left out rather than failing the call.
        pages = self._ec2.get_paginator("describe_launch_templates").paginate(
            Filters=[{"Name": "launch-template-name", "Values": sorted(names)}]
        )
        versions: dict[str, str] = {}
        for page in pages:
            for template in page.get("LaunchTemplates", []):
                pool = names.get(template["LaunchTemplateName"])
                if pool is not None:
                    versions[pool] = str(template.get("DefaultVersionNumber", ""))
        return versions

    def _tokens(self, now: float) -> list[TokenFact]:
        """Runner tokens past their boot deadline: one Query of the keys-only token index, never a scan."""
        return [
            TokenFact(key=key, instance_id=key.rpartition(":")[2], deadline_at=due)
            for key, due in self._store.tokens_due_before(now)
        ]


def sweep_turn(projects: Sequence[int], now: float, per_run: int = SWEEP_PROJECTS) -> list[int]:
    """The projects this run sweeps: ``per_run`` of ``projects`` (sorted), the window moving on by ``per_run``
    every ``SWEEP_PERIOD_SECONDS``, so that every project comes round in ``ceil(len / per_run)`` runs."""
    ordered = sorted(projects)
    if len(ordered) <= per_run:
        return ordered
    turns = -(-len(ordered) // per_run)
    start = (int(now // SWEEP_PERIOD_SECONDS) % turns) * per_run
    return ordered[start : start + per_run]


def gather_or_none(source: FactSource, *, tokens: bool = False) -> Facts | None:
    """The facts, or None (logged) when AWS could not be read."""
    try:
        return source.gather(tokens=tokens)
    except ClientError as exc:
        logger.warning("fleet facts unreadable", extra={"error": exc.response.get("Error", {}).get("Code", "")})
        return None
