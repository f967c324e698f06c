"""Reconcile's rules: pure decisions from :class:`~chalicelib.lifecycle.facts.Facts` to actions.

Every rule reads the facts and the configuration only (no I/O, no clock: ``facts.now`` is the time), and every
action carries the reason and the facts that led to it, for its log line. What each rule catches:

* **never contacted**: a runner whose boot deadline passed while GitLab lists its runner as ``never_contacted``,
  or that never got a GitLab runner at all: its instance is terminated and its runner and token deleted;
* **untracked instance**: an instance tagged as the fleet's that no record knows, older than the launch
  staleness window and not part of a launch still at work: terminated (its launch gives its lease back);
* **lost instance**: a record whose instance no longer exists (its terminated event was lost): cleaned up as the
  instance-state handler would have, lease back;
* **cleanup left**: a terminated record whose token or GitLab runner could not be deleted then;
* **GitLab runner**: a runner of the fleet's with neither a live instance nor a live record (deleted only once its
  maintenance note says it is this fleet's and a consistent read finds no live record of its instance);
* **expired token**: a runner token past its boot deadline, which nothing reads any more;
* **stale launch**: a launch still holding leases past the staleness window: its unrecorded instances are
  terminated and its leases given back;
* **image roll-out**: a launch template whose default is not the version the pool's counter item names (an image
  promotion stopped after recording it) gets it as default; a candidate image past its scan deadline is reported;
* **retire**: a runner of a drained pool (``fleetctl drain``), past its lifetime's retirement point, launched from
  a template version that is no longer its pool's (an image promotion made a new one), kept warm after its
  window closed, or kept warm beyond the pool's warm size and idle longer than its idle wait (a warm runner does not
  stop for idleness by itself): paused (busy or idle) in one run, then, a grace later and running nothing, deleted and
  terminated;
* **lost webhook**: a pending job the table does not know is queued: queued now; and a pending job whose launch
  ended long ago (past the boot deadline) without any runner taking it (its runner was reaped): its claim is
  released and it is queued again, for a launch of its own;
* **taken launch**: a pending job whose launch finished a while ago while its pool has fewer runners on the way
  (booting, or idle) than such jobs: the runner launched for it took another job (GitLab hands a runner the oldest
  job it may run, which may be another pool's when the pool's tags cover that job's), so nothing will take it; its
  claim is released and it is queued again, a minute after its claim rather than past the boot deadline;
* **warm**: a pool short of idle runners inside its warm window gets them, within ``max_runners``, unless it is
  drained.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from chalicelib.config import FleetConfig, PoolConfig
from chalicelib.intake.job_hooks import JobStatus
from chalicelib.lifecycle.facts import Facts, ours
from chalicelib.lifecycle.windows import warm_size
from chalicelib.naming import described_instance
from chalicelib.scaling.launches import FINISHED, UNFINISHED, LaunchState
from chalicelib.scaling.store.records import LAUNCH_POOL_ATTRIBUTE, LaunchRecord, RunnerRecord
from chalicelib.store import QUEUE_CLAIM_SECONDS, RETIRING, RunnerState, is_unqueued_pending

# How long a launch may work before it counts as stopped (a Lambda cannot run longer): the same window scale-up
# uses before it takes over a launch whose owner went silent.
STALE_LAUNCH_SECONDS = 120.0
# EC2's DescribeInstances is eventually consistent: a record younger than this whose instance is not listed yet
# is left alone.
INSTANCE_VISIBILITY_SECONDS = 120.0
# A job GitLab lists as pending for less than this may have its Job Hook on the way.
LOST_WEBHOOK_SECONDS = 120.0
# GitLab statuses of a runner that has contacted it: a paused one that has is listed ``paused``
# (Ci::Runner#deprecated_rest_status), one that never has ``never_contacted``.
CONTACTED = frozenset({"online", "offline", "stale", "paused"})
# A GitLab runner of the fleet's made less than this long ago (its maintenance note says when) is never deleted as
# an orphan: longer than a scale-up invocation may run (.chalice/config.json), so the one making it has finished.
RUNNER_GRACE_SECONDS = 300.0
# GitLab runners a run checks and deletes at most (two GitLab calls each); the rest wait for the next runs.
MAX_RUNNER_DELETIONS = 50
# Expired runner tokens a run deletes at most (one DeleteItem each).
MAX_TOKEN_DELETIONS = 200
# How long after its pause a retiring runner is re-checked and retired (see :func:`retirements`).
RETIRE_GRACE_SECONDS = 30.0
NEVER_CONTACTED = "never_contacted"
# A pending job whose launch claimed it this long ago and finished is counted against its pool's runners on the way
# (see :func:`taken_launches`): one reconcile period, longer than a launch takes to record its instances.
TAKEN_LAUNCH_SECONDS = 60.0


class Kind(str, Enum):
    """What an orphan was; the metric is ``OrphansReaped.<kind>``."""

    NEVER_CONTACTED = "NeverContacted"
    UNTRACKED_INSTANCE = "UntrackedInstance"
    LOST_INSTANCE = "LostInstance"
    CLEANUP_LEFT = "CleanupLeft"
    GITLAB_RUNNER = "GitLabRunner"
    STALE_LAUNCH = "StaleLaunch"


@dataclass(frozen=True)
class Action:
    reason: str
    facts: Mapping[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Reap(Action):
    """Terminate an instance, then clean up its record, lease, token and GitLab runner."""

    instance_id: str = ""
    kind: Kind = Kind.NEVER_CONTACTED


@dataclass(frozen=True)
class CleanUp(Action):
    """The instance is gone: finish what its terminated event would have (record, lease, token, GitLab runner)."""

    instance_id: str = ""
    kind: Kind = Kind.LOST_INSTANCE


@dataclass(frozen=True)
class DeleteRunner(Action):
    """Delete a GitLab runner of the fleet's that nothing runs on."""

    runner_id: int = 0
    instance_id: str = ""


@dataclass(frozen=True)
class DeleteToken(Action):
    """Delete a runner token its instance never read by its boot deadline (the instance gave up on it then)."""

    key: str = ""
    instance_id: str = ""


@dataclass(frozen=True)
class SettleLaunch(Action):
    """Give back what a stopped launch still holds: terminate its unrecorded instances, return its leases."""

    launch_id: str = ""
    pool: str = ""
    state: LaunchState = LaunchState.LAUNCHING
    leases: int = 0


@dataclass(frozen=True)
class Unmark(Action):
    """A launch that holds nothing leaves the live index (no metric: housekeeping)."""

    launch_id: str = ""


@dataclass(frozen=True)
class Pause(Action):
    """Begin a runner's retirement: mark its record retiring and pause it in GitLab, so it takes no new job."""

    instance_id: str = ""
    runner_id: int = 0
    pool: str = ""


@dataclass(frozen=True)
class Retire(Action):
    """Finish a paused runner's retirement: re-check its jobs, then delete it and terminate its instance."""

    instance_id: str = ""
    runner_id: int = 0
    pool: str = ""


@dataclass(frozen=True)
class RecoverJob(Action):
    """Queue a pending job the table does not know is queued (its webhook was lost or never sent)."""

    project_id: int = 0
    job_id: int = 0
    known: bool = False  # the table has its item (recorded but never queued)
    # The launch whose claim it holds though no runner took it (that runner was reaped, or never came): the
    # claim is released and the job queued again, for a launch of its own.
    relaunch_from: str = ""


@dataclass(frozen=True)
class SetDefaultVersion(Action):
    """Make the version the pool's counter item names its launch template's default (an image promotion that
    stopped after recording it)."""

    pool: str = ""
    version: str = ""


@dataclass(frozen=True)
class ExpireScan(Action):
    """Report a candidate image whose scan did not come by its deadline (``scan_timeout``)."""

    pool: str = ""


@dataclass(frozen=True)
class WarmLaunch(Action):
    """Launch idle runners for a pool inside its warm window."""

    pool: str = ""
    count: int = 0


def decide(facts: Facts, config: FleetConfig) -> list[Action]:
    """Every action the facts call for, cleanup first and launches last."""
    actions: list[Action] = []
    actions += orphan_instances(facts, config)
    actions += lost_instances(facts)
    actions += orphan_gitlab_runners(facts, config)
    # A token whose instance this run reaps or cleans up goes with that cleanup: not deleted twice.
    cleaned = {a.instance_id for a in actions if isinstance(a, (Reap, CleanUp))}
    actions += [a for a in expired_tokens(facts) if not (isinstance(a, DeleteToken) and a.instance_id in cleaned)]
    actions += stale_launches(facts)
    actions += image_rollouts(facts, config)
    actions += retirements(facts, config)
    actions += lost_webhooks(facts, config)
    recovering = {(a.project_id, a.job_id) for a in actions if isinstance(a, RecoverJob)}
    actions += [a for a in taken_launches(facts) if (a.project_id, a.job_id) not in recovering]
    actions += warm_launches(facts, config)
    return actions


def _live(record: RunnerRecord) -> bool:
    return not record.terminated


def _gitlab_status(facts: Facts) -> dict[int, str]:
    return {runner.runner_id: runner.status for runner in facts.gitlab_runners or ()}


def orphan_instances(facts: Facts, config: FleetConfig) -> list[Action]:
    """Never-contacted runners past their boot deadline, and live instances no record knows."""
    actions: list[Action] = []
    status = _gitlab_status(facts)
    for record in facts.records.values():
        if not _live(record) or record.instance_id not in facts.instances or facts.now < record.boot_deadline_at:
            continue
        seen = {"pool": record.pool, "boot_deadline_at": record.boot_deadline_at, "state": record.state.value}
        if record.gitlab_runner_id is None:
            actions.append(Reap("no GitLab runner by its boot deadline", seen, instance_id=record.instance_id))
        elif facts.gitlab_known and status.get(record.gitlab_runner_id) == NEVER_CONTACTED:
            actions.append(
                Reap(
                    "never contacted GitLab by its boot deadline",
                    {**seen, "gitlab_runner_id": record.gitlab_runner_id},
                    instance_id=record.instance_id,
                )
            )
    working = {
        launch.launch_id
        for launch in facts.launches
        if launch.state in (LaunchState.LAUNCHING, LaunchState.RESUMING)
        and launch.started_at >= facts.now - STALE_LAUNCH_SECONDS
    }
    for instance in facts.instances.values():
        if instance.instance_id in facts.records or instance.state in ("shutting-down",):
            continue
        if instance.launched_at >= facts.now - STALE_LAUNCH_SECONDS or instance.launch_id in working:
            continue
        actions.append(
            Reap(
                "instance tagged as the fleet's that no record knows",
                {"pool": instance.pool, "launch_id": instance.launch_id, "launched_at": instance.launched_at},
                instance_id=instance.instance_id,
                kind=Kind.UNTRACKED_INSTANCE,
            )
        )
    return actions


def lost_instances(facts: Facts) -> list[Action]:
    """Records whose instance is gone, and terminated records with cleanup left."""
    actions: list[Action] = []
    for record in facts.records.values():
        if record.terminated:
            if record.token_cleanup or record.gitlab_cleanup:
                actions.append(
                    CleanUp(
                        "terminated runner with its cleanup unfinished",
                        {"gitlab_runner_id": record.gitlab_runner_id, "reason": record.reason},
                        instance_id=record.instance_id,
                        kind=Kind.CLEANUP_LEFT,
                    )
                )
            continue
        if record.instance_id in facts.instances or record.launched_at >= facts.now - INSTANCE_VISIBILITY_SECONDS:
            continue
        actions.append(
            CleanUp(
                "record whose instance no longer exists",
                {"pool": record.pool, "state": record.state.value, "launched_at": record.launched_at},
                instance_id=record.instance_id,
            )
        )
    return actions


def orphan_gitlab_runners(facts: Facts, config: FleetConfig) -> list[Action]:
    """The fleet's GitLab runners with neither a live instance nor a record that will clean them up, at most
    ``MAX_RUNNER_DELETIONS`` a run; the executor deletes one only once its note says it is this fleet's and a
    consistent read finds no live record of its instance."""
    if facts.gitlab_runners is None:
        return []
    named = {r.gitlab_runner_id for r in facts.records.values() if r.gitlab_runner_id is not None}
    actions: list[Action] = []
    for runner in facts.gitlab_runners:
        instance_id = described_instance(runner.description) or ""
        if not ours(runner, config.fleet) or instance_id in facts.instances or runner.runner_id in named:
            continue
        record = facts.records.get(instance_id)
        if record is not None and _live(record):
            continue  # its record was written first: the instance is new, or its record's own rule handles it
        actions.append(
            DeleteRunner(
                "GitLab runner of the fleet's with no live instance",
                {"status": runner.status, "description": runner.description},
                runner_id=runner.runner_id,
                instance_id=instance_id,
            )
        )
    return actions[:MAX_RUNNER_DELETIONS]


def expired_tokens(facts: Facts) -> list[Action]:
    """Runner tokens past their boot deadline: their instance stopped waiting for them then (boot step 6), so
    nothing reads them any more; whatever became of the instance, the token goes (at most ``MAX_TOKEN_DELETIONS``
    a run)."""
    return [
        DeleteToken(
            "runner token past its boot deadline",
            {"deadline_at": token.deadline_at},
            key=token.key,
            instance_id=token.instance_id,
        )
        for token in (facts.tokens or ())[:MAX_TOKEN_DELETIONS]
        if token.deadline_at < facts.now
    ]


def stale_launches(facts: Facts) -> list[Action]:
    """Launches still holding leases after the staleness window (or failed), settled; finished launches holding
    nothing leave the index. A launched one still holding leases stopped between its writes: settled too."""
    actions: list[Action] = []
    stale_before = facts.now - STALE_LAUNCH_SECONDS
    for launch in facts.launches:
        if launch.state in FINISHED and launch.leases <= 0:
            actions.append(Unmark("launch holds nothing", launch_id=launch.launch_id))
            continue
        if launch.state is not LaunchState.FAILED and launch.started_at >= stale_before:
            continue
        actions.append(
            SettleLaunch(
                f"launch {launch.state.value} past its staleness window",
                {"started_at": launch.started_at, "requested": launch.requested, "reason": launch.reason},
                launch_id=launch.launch_id,
                pool=launch.pool,
                state=launch.state,
                leases=launch.leases,
            )
        )
    return actions


def retire_at(record: RunnerRecord, pool: PoolConfig) -> float:
    """When a runner is retired for its age: one job timeout before its lifetime ends, so that a job it starts
    just before can finish before the instance powers itself off at its max lifetime. Config validation keeps the
    job timeout at most half the lifetime, so this is never before half of it."""
    return record.launched_at + pool.max_lifetime_minutes * 60 - pool.job_timeout_seconds


def idle(record: RunnerRecord, status: str | None) -> bool:
    """A runner that runs nothing and has booted: idle after a job, or booted and never given one."""
    if not _live(record) or record.busy or record.draining or record.gitlab_runner_id is None:
        return False
    if record.state is RunnerState.IDLE:
        return True
    return record.state is RunnerState.BOOTING and status in CONTACTED


def booted(record: RunnerRecord, status: str | None) -> bool:
    """A runner GitLab has heard from or the Job Hooks have: idle or busy, whatever its record says."""
    if not _live(record) or record.gitlab_runner_id is None:
        return False
    return record.state in (RunnerState.IDLE, RunnerState.BUSY) or (
        record.state is RunnerState.BOOTING and status in CONTACTED
    )


def retiring(record: RunnerRecord) -> bool:
    """Paused in GitLab for retirement (its draining reason says so), as opposed to an interruption's pause."""
    return record.draining.startswith(RETIRING)


def _retire_reason(record: RunnerRecord, pool: PoolConfig, facts: Facts, now_utc: datetime) -> str:
    instance = facts.instances.get(record.instance_id)
    current = facts.pool_version(pool.name)
    if pool.name in facts.drained:
        return "its pool is drained"
    if facts.now >= retire_at(record, pool):
        return "past its lifetime's retirement point"
    if instance is not None and current and instance.template_version and instance.template_version != current:
        return f"launched from template version {instance.template_version}, the pool's is {current}"
    if record.warm and warm_size(pool.warm, now_utc) == 0:
        return "kept warm, and its warm window is closed"
    return ""


def image_rollouts(facts: Facts, config: FleetConfig) -> list[Action]:
    """What an image promotion leaves to reconcile: the template's default moved to the version the pool's counter
    item names (when the promotion stopped before), and scans past their deadline reported. The runners on an
    older version are retired by :func:`retirements`."""
    actions: list[Action] = []
    for pool in config.pools:
        named, default = facts.pool_versions.get(pool.name), facts.template_versions.get(pool.name)
        if named and default and named != default:
            seen = {"named": named, "default": default}
            actions.append(SetDefaultVersion("the pool's version is not the default", seen, pool.name, named))
    for pool_name, deadline in facts.scan_deadlines:
        if facts.now >= deadline:
            actions.append(ExpireScan("its candidate's scan is past its deadline", {"deadline": deadline}, pool_name))
    return actions


def retirements(facts: Facts, config: FleetConfig) -> list[Action]:
    """Retirement in two steps, one run apart at least. First the runner is paused, busy or idle, so that it takes
    no new job (a busy one finishes the job it runs): a runner past its retirement point must not start a job its
    lifetime cannot hold. Then, once ``RETIRE_GRACE_SECONDS`` have passed since the pause and it runs nothing,
    it is deleted and its instance terminated. The grace fences the pause: GitLab checks that a runner is active
    once, at the start of a ``POST /jobs/request``, so a request already past that check when the pause lands may
    still be given a job a moment later (Ci::RegisterJobService); only after the grace do the running-jobs
    listing and the record say for certain that it runs nothing."""
    if facts.gitlab_runners is None:
        return []
    status = _gitlab_status(facts)
    paused = {runner.runner_id for runner in facts.gitlab_runners if runner.paused}
    now_utc = datetime.fromtimestamp(facts.now, UTC)
    pools = {pool.name: pool for pool in config.pools}
    actions: list[Action] = []
    for record in facts.records.values():
        pool = pools.get(record.pool)
        runner_id = record.gitlab_runner_id
        if pool is None or runner_id is None or not _live(record):
            continue
        seen = {"launched_at": record.launched_at, "state": record.state.value, "draining": record.draining}
        if retiring(record):
            if runner_id not in status:
                # Its GitLab runner is gone already (a retirement stopped after the deletion): finish it.
                actions.append(Retire("retiring, and its GitLab runner is gone", seen, **_ids(record, runner_id, pool)))
            elif runner_id not in paused:
                # The pause was never made (GitLab failed after the record was marked): make it again.
                actions.append(Pause(record.draining.removeprefix(RETIRING), seen, **_ids(record, runner_id, pool)))
            elif not record.busy and facts.now >= record.draining_at + RETIRE_GRACE_SECONDS:
                actions.append(Retire(record.draining.removeprefix(RETIRING), seen, **_ids(record, runner_id, pool)))
            continue
        if record.draining or not booted(record, status.get(runner_id)):
            continue
        reason = _retire_reason(record, pool, facts, now_utc)
        if reason:
            actions.append(Pause(reason, seen, **_ids(record, runner_id, pool)))
    pausing = {a.instance_id for a in actions if isinstance(a, Pause | Retire)}
    actions += [a for a in surplus_warm_runners(facts, config) if a.instance_id not in pausing]
    return actions


def surplus_warm_runners(facts: Facts, config: FleetConfig) -> list[Pause]:
    """Warm runners beyond their pool's warm size, idle longer than the pool's idle wait, longest idle first: paused
    for retirement as :func:`retirements` retires any runner. A warm runner does not stop for idleness by itself
    (its token item says so), so that a warm pool keeps its runners rather than launching new ones every idle wait;
    after a burst, the warm runners launched while the others were busy are the surplus this retires."""
    if facts.gitlab_runners is None:
        return []
    status = _gitlab_status(facts)
    now_utc = datetime.fromtimestamp(facts.now, UTC)
    pauses: list[Pause] = []
    for pool in config.pools:
        if pool.name in facts.drained:
            continue  # retired by the drain
        size = warm_size(pool.warm, now_utc)
        if size == 0:
            continue  # a closed window retires every warm runner (see _retire_reason)
        warm = [
            record
            for record in facts.records.values()
            if record.pool == pool.name
            and record.warm
            and record.gitlab_runner_id is not None
            and idle(record, status.get(record.gitlab_runner_id))
        ]
        overdue = sorted(
            (record for record in warm if _idle_since(record) < facts.now - pool.idle_wait_seconds),
            key=_idle_since,
        )
        for record in overdue[: max(0, len(warm) - size)]:
            seen = {"idle_since": _idle_since(record), "warm_runners": len(warm), "size": size}
            reason = "kept warm beyond the pool's warm size, and idle longer than its idle wait"
            pauses.append(Pause(reason, seen, **_ids(record, record.gitlab_runner_id or 0, pool)))
    return pauses


def _idle_since(record: RunnerRecord) -> float:
    """Since when a runner has been idle: its last job's end, or for one never given a job, its launch."""
    return record.idle_since or record.launched_at


def _ids(record: RunnerRecord, runner_id: int, pool: PoolConfig) -> dict[str, Any]:
    return {"instance_id": record.instance_id, "runner_id": runner_id, "pool": pool.name}


def stuck_after(config: FleetConfig) -> float:
    """How long a job may stay pending after its launch claimed it: its runner boots by the pool's boot deadline
    (the longest of the pools', since a job item does not name its pool) and has a launch window besides."""
    return max(pool.boot_deadline_seconds for pool in config.pools) + STALE_LAUNCH_SECONDS


def _before_pending(item: Mapping[str, Any], now: float) -> bool:
    """A job item recorded before pending (created, manual, waiting) that no event changed for a while, nor any
    launch or outcome touched."""
    return (
        int(item.get("status_rank", 0)) < JobStatus.PENDING.rank
        and float(item.get("updated_at", 0)) < now - LOST_WEBHOOK_SECONDS
        and "launch_id" not in item
        and "outcome" not in item
    )


def lost_webhooks(facts: Facts, config: FleetConfig) -> list[Action]:
    """Pending jobs recorded but never queued, and (once a sweep listed GitLab's pending jobs) pending jobs of
    active projects the table does not know or whose launch ended long ago without a runner taking them."""
    return unqueued_jobs(facts) + swept_jobs(facts, config)


def unqueued_jobs(facts: Facts) -> list[Action]:
    """Pending jobs the table recorded but never queued, nobody holding their queue claim."""
    actions: list[Action] = []
    for job in facts.jobs:
        item = job.item
        if not is_unqueued_pending(item):
            continue
        claimed_at = float(item.get("queue_claim_at", 0)) if item.get("queue_claim") else 0.0
        if claimed_at > facts.now - QUEUE_CLAIM_SECONDS:
            continue  # a webhook holds its claim and may be sending right now
        actions.append(
            RecoverJob(
                "pending job recorded but never queued",
                {"pending_at": item.get("pending_at")},
                project_id=job.project_id,
                job_id=job.job_id,
                known=True,
            )
        )
    return actions


def swept_jobs(facts: Facts, config: FleetConfig) -> list[Action]:
    """From the pending jobs a sweep listed (none before one ran): those the table never heard of, those it
    recorded before pending (their pending Job Hook was lost), and those whose launch ended long ago without a
    runner taking them."""
    actions: list[Action] = []
    known = {(job.project_id, job.job_id): dict(job.item) for job in facts.jobs}
    working = _working_launches(facts)
    for pending in facts.pending_jobs or ():
        recorded = known.get((pending.project_id, pending.job_id))
        if recorded is not None and _before_pending(recorded, facts.now):
            # Recorded as created (or waiting): the Job Hook saying it became pending was lost.
            actions.append(
                RecoverJob(
                    "pending in GitLab, and its pending Job Hook never reached the fleet",
                    {"status": recorded.get("status"), "updated_at": recorded.get("updated_at")},
                    project_id=pending.project_id,
                    job_id=pending.job_id,
                    known=True,
                )
            )
            continue
        if recorded is not None:
            launch_id = str(recorded.get("launch_id") or "")
            claimed_at = float(recorded.get("claimed_at", 0))
            if (
                launch_id
                and "outcome" not in recorded
                and launch_id not in working
                and claimed_at < facts.now - stuck_after(config)
            ):
                actions.append(
                    RecoverJob(
                        "pending long after its launch, and no runner took it",
                        {"launch_id": launch_id, "claimed_at": claimed_at},
                        project_id=pending.project_id,
                        job_id=pending.job_id,
                        known=True,
                        relaunch_from=launch_id,
                    )
                )
            continue
        if pending.created_at > facts.now - LOST_WEBHOOK_SECONDS:
            continue
        actions.append(
            RecoverJob(
                "pending in GitLab, and no webhook of it reached the fleet",
                {"created_at": pending.created_at},
                project_id=pending.project_id,
                job_id=pending.job_id,
            )
        )
    return actions


def taken_launches(facts: Facts) -> list[RecoverJob]:
    """Pending jobs whose launch's runner took another job, so that no runner is coming for them.

    A launch's runner takes the oldest pending job it may run, not necessarily the one it was launched for: within
    a pool another launch's runner then takes that one, but a runner of a pool whose tags cover another pool's
    jobs (``docker, dind`` covers ``docker``) may take the other pool's job, and the job it was launched for waits
    with no runner coming. Per pool, the jobs the table still knows as pending whose claim is older than
    ``TAKEN_LAUNCH_SECONDS`` and whose launch finished are counted against the pool's runners on the way (live,
    not paused, running nothing: booting or idle); each job beyond them is released from its launch and queued
    again, oldest claim first. A job GitLab no longer lists as pending (its ``running`` Job Hook was late) is
    dropped by scale-up when it reads it."""
    working = _working_launches(facts)
    waiting: dict[str, list[tuple[float, int, int, str]]] = {}
    for job in facts.jobs:
        item = job.item
        pool = str(item.get(LAUNCH_POOL_ATTRIBUTE, ""))
        launch_id = str(item.get("launch_id", ""))
        claimed_at = float(item.get("claimed_at", 0))
        if (
            pool
            and launch_id
            and launch_id not in working
            and "outcome" not in item
            and int(item.get("status_rank", 0)) == JobStatus.PENDING.rank
            and claimed_at < facts.now - TAKEN_LAUNCH_SECONDS
        ):
            waiting.setdefault(pool, []).append((claimed_at, job.project_id, job.job_id, launch_id))
    if not waiting:
        return []
    coming: Counter[str] = Counter(
        record.pool
        for record in facts.records.values()
        if _live(record)
        and not record.busy
        and not record.draining
        and record.state in (RunnerState.BOOTING, RunnerState.IDLE)
    )
    actions: list[RecoverJob] = []
    for pool, jobs in sorted(waiting.items()):
        jobs.sort()
        for claimed_at, project_id, job_id, launch_id in jobs[: max(0, len(jobs) - coming[pool])]:
            actions.append(
                RecoverJob(
                    "pending, and the runner launched for it took another job",
                    {"launch_id": launch_id, "claimed_at": claimed_at, "pool": pool, "runners_coming": coming[pool]},
                    project_id=project_id,
                    job_id=job_id,
                    known=True,
                    relaunch_from=launch_id,
                )
            )
    return actions


def _working_launches(facts: Facts) -> set[str]:
    """Launches still making their instances, which may yet give their jobs a runner; a finished one (launched or
    failed) will not."""
    return {launch.launch_id for launch in facts.launches if launch.state in UNFINISHED}


def warm_launches(facts: Facts, config: FleetConfig) -> list[Action]:
    """Top warm pools up to their size inside a window, never past max_runners (the lease says the rest). Not
    while GitLab is unreadable: a runner launched then could get no GitLab runner."""
    if not facts.gitlab_known:
        return []
    status = _gitlab_status(facts)
    now_utc = datetime.fromtimestamp(facts.now, UTC)
    ready: Counter[str] = Counter()
    for record in facts.records.values():
        waiting = record.warm and _live(record) and record.state is RunnerState.BOOTING and not record.draining
        if waiting or idle(record, status.get(record.gitlab_runner_id or 0)):
            ready[record.pool] += 1
    actions: list[Action] = []
    for pool in config.pools:
        if pool.name in facts.drained:
            continue  # a drained pool is never kept warm
        size = warm_size(pool.warm, now_utc)
        room = pool.max_runners - facts.leases.get(pool.name, 0)
        count = min(size - ready[pool.name], room)
        if count > 0:
            actions.append(
                WarmLaunch(
                    "warm pool short of idle runners",
                    {"size": size, "ready": ready[pool.name], "leases": facts.leases.get(pool.name, 0)},
                    pool=pool.name,
                    count=count,
                )
            )
    return actions


def launch_of(facts: Facts, launch_id: str) -> LaunchRecord | None:
    return next((launch for launch in facts.launches if launch.launch_id == launch_id), None)
