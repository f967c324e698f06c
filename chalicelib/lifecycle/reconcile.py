"""Reconcile: every minute, find what went wrong or is due, and put it right with bounded calls.

One run: take the run lease (so two overlapping runs never both act), gather the facts
(:class:`~chalicelib.lifecycle.facts.FactSource`), decide (:func:`~chalicelib.lifecycle.rules.decide`), then
execute the actions in order, each with a handful of calls. Every action is safe to repeat and to stop half way:
its writes are conditional and its deletions count "already gone" as done, so whatever a run leaves is found
again by the next one from the same facts.

A run that cannot finish stops cleanly. Facts AWS will not give (throttling past botocore's retries) stop it
before any action; GitLab unreadable leaves out the rules that need GitLab and runs the rest; an action that
fails (GitLab down, AWS throttling) ends the run there, and the remaining actions wait for the next one.

Every action is logged with its reason and the facts that led to it, and counted: ``OrphansReaped.<kind>``,
``RunnersPaused``, ``RunnersRetired``, ``JobsRecovered``, ``WarmLaunched``; a run that stops early counts
``ReconcileStopped``, and the invariants it finds broken at its end count ``InvariantViolations``. A connected
hook GitLab no longer executes (its turn of the hooks is read back after the sweep) is logged as an error naming
its project and counted as ``HooksDisabled``: its Job Hooks are lost until someone fixes it, and only the sweep
finds its jobs meanwhile.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from chalicelib.aws import error_code
from chalicelib.config import FleetConfig
from chalicelib.errors import RetryableError
from chalicelib.jobs_queue import JobQueue, QueuedJob
from chalicelib.lifecycle.facts import Facts, FactSource
from chalicelib.lifecycle.invariants import LEASES_HELD, Violation, check, lease_differences
from chalicelib.lifecycle.rules import (
    RUNNER_GRACE_SECONDS,
    STALE_LAUNCH_SECONDS,
    Action,
    CleanUp,
    DeleteRunner,
    DeleteToken,
    ExpireScan,
    Pause,
    Reap,
    RecoverJob,
    Retire,
    SetDefaultVersion,
    SettleLaunch,
    Unmark,
    WarmLaunch,
    decide,
    swept_jobs,
)
from chalicelib.naming import FleetOwner
from chalicelib.observability import count, logger
from chalicelib.scaling.launches import UNFINISHED
from chalicelib.scaling.store import ScaleStore
from chalicelib.scaling.store.records import RunnerRecord

if TYPE_CHECKING:
    from chalicelib.gitlab_api import GitLabApi
    from chalicelib.images.rotation import ImageRotation
    from chalicelib.lifecycle.instances import InstanceEvents
    from chalicelib.scaling.fleet import FleetLauncher
    from chalicelib.scaling.scale_up import ScaleUp
    from chalicelib.scaling.tokens import RunnerTokens

RUN_LEASE = "reconcile"
# How a terminated runner record's ``reason`` begins when reconcile ended it: an orphan reaped (its instance
# terminated), a record whose instance was already gone cleaned up, a runner retired. ``fleetctl status`` counts
# them per pool over the last hour from the records, which stay in the table for a week.
REAPED = "reaped: "
RECONCILED = "reconciled: "
RETIRED = "retired: "
# The longest a run may take: the reconcile Lambda's timeout (.chalice/config.json). The run lease lasts no longer
# than the invocation's time left, so a run stopped at its timeout keeps the next run out until then, at most.
RUN_LEASE_SECONDS = 120.0
# Time kept back from the sweep at the end of a run, for the invariants and the lease's release.
RUN_MARGIN_SECONDS = 10.0
# How long a second reading of the lease counters waits after the first: a write reaches a global secondary index
# "within 1 second" (AWS knowledge center, https://repost.aws/knowledge-center/dynamodb-missing-table-items-gsi),
# longer under load.
INDEX_SETTLE_SECONDS = 2.0


def _subjects(action: Action) -> tuple[str, ...]:
    """What an action puts right, as the invariants name their subjects."""
    found = [str(getattr(action, name, "") or "") for name in ("instance_id", "pool", "key")]
    if isinstance(action, DeleteRunner):
        found.append(str(action.runner_id))
    if isinstance(action, RecoverJob):
        found.append(f"{action.project_id}:{action.job_id}")
    return tuple(subject for subject in found if subject)


def _failure(exc: BaseException) -> str:
    """What stopped a run: GitLab's failure, AWS's error code, or the connection problem botocore gave up on."""
    if isinstance(exc, RetryableError):
        return exc.reason
    if isinstance(exc, ClientError):
        return f"AWS {error_code(exc) or 'error'}"
    return f"AWS {type(exc).__name__}"


def may_retire(running_jobs: list[tuple[int, int]] | None, record: RunnerRecord | None) -> bool:
    """After the pause and its grace: retire only if GitLab lists no running job for the runner and its record
    (read again, consistently) says it runs none. A job it took before the pause shows in one or the other
    (GitLab assigns it before the Job Hook tells the table)."""
    return not running_jobs and (record is None or not record.busy)


@dataclass
class RunReport:
    """What a run did: actions done by kind, and why it stopped early (if it did)."""

    done: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    metrics: Counter[str] = field(default_factory=Counter)  # what the run counted, as emitted
    stopped: str = ""
    ran: bool = True  # False when another run held the lease
    violations: list[str] = field(default_factory=list)  # the invariants the run found broken and left so

    def count(self, name: str, value: int = 1) -> None:
        count(name, value)
        self.metrics[name] += value

    def merge(self, other: RunReport) -> None:
        """Add what a later part of the same run did."""
        self.done.update(other.done)
        self.skipped.update(other.skipped)
        self.metrics.update(other.metrics)
        self.stopped = self.stopped or other.stopped

    def as_dict(self) -> dict[str, Any]:
        return {
            "ran": self.ran,
            "done": dict(self.done),
            "skipped": dict(self.skipped),
            "metrics": dict(self.metrics),
            "stopped": self.stopped,
            "violations": list(self.violations),
        }


class Reconciler:
    def __init__(
        self,
        config: FleetConfig,
        store: ScaleStore,
        ec2: Any,
        gitlab: GitLabApi,
        events: InstanceEvents,
        launcher: FleetLauncher,
        queue: JobQueue,
        scale_up: Callable[[], ScaleUp],
        owner: FleetOwner,
        tokens: RunnerTokens,
        *,
        images: Callable[[], ImageRotation] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._images_source = images
        self._owner = owner
        self._tokens = tokens
        self._store = store
        self._ec2 = ec2
        self._gitlab = gitlab
        self._events = events
        self._launcher = launcher
        self._queue = queue
        self._scale_up = scale_up
        self._clock = clock
        self.facts = FactSource(config, store, ec2, gitlab, clock=clock)

    def run(self, time_left: float = RUN_LEASE_SECONDS) -> RunReport:
        """One run under the run lease, within ``time_left`` seconds (the invocation's remaining time): acting first,
        then the sweep for lost Job Hooks while time remains, then the invariants. The lease lasts no longer than
        the run may, so a run Lambda stopped at its timeout keeps the next one out for that long at most."""
        started = time.monotonic()
        deadline = started + max(0.0, time_left - RUN_MARGIN_SECONDS)
        owner = uuid.uuid4().hex
        if not self._store.take_run_lease(RUN_LEASE, owner, min(time_left, RUN_LEASE_SECONDS)):
            logger.info("another reconcile run holds the lease; this one does nothing")
            return RunReport(ran=False)
        try:
            try:
                facts = self.facts.gather()
            except (ClientError, BotoCoreError) as exc:
                report = RunReport(stopped=f"facts unreadable: {_failure(exc)}")
                logger.warning("reconcile stopped before acting", extra={"reason": report.stopped})
                report.count("ReconcileStopped")
                return report
            actions = decide(facts, self._config)
            report = self.execute(actions, facts)
            if not report.stopped and time.monotonic() < deadline:
                facts = self.facts.sweep(facts, deadline=deadline)
                swept = swept_jobs(facts, self._config)
                actions += swept
                report.merge(self.execute(swept, facts))
            if not report.stopped and time.monotonic() < deadline:
                self._check_hooks(facts, deadline, report)
            self._check_invariants(facts, actions, report, deadline)
            logger.info("reconcile run done", extra=report.as_dict())
            return report
        finally:
            self._store.release_run_lease(RUN_LEASE, owner)

    def _check_hooks(self, facts: Facts, deadline: float, report: RunReport) -> None:
        """This run's turn of the connected hooks, read back from GitLab: each one GitLab does not execute (disabled
        for a while or for good, or gone) is logged as an error and counted (``HooksDisabled``)."""
        disabled = [state for state in self.facts.hook_states(facts, deadline=deadline) if not state.delivering]
        for state in disabled:
            logger.error(
                "GitLab hook not delivering",
                extra={
                    "project_id": state.hook.project_id,
                    "hook_id": state.hook.hook_id,
                    "alert_status": state.alert_status,
                    "disabled_until": state.disabled_until,
                },
            )
        if disabled:
            report.count("HooksDisabled", len(disabled))

    def _check_invariants(self, facts: Facts, actions: list[Action], report: RunReport, deadline: float) -> None:
        """The invariants on this run's facts, for what is older than the grace the rules allow work in flight,
        less what this run acted on: each left is logged as an error and counted (``InvariantViolations``).

        A pool's lease counter and the leases its records and launches hold are three index queries, which a
        launch or a give-back between them makes differ for a moment; such a difference is reported only when a
        second reading, once the index has caught up with the first, finds the same difference."""
        settled = facts.now - STALE_LAUNCH_SECONDS
        acted = {subject for action in actions for subject in _subjects(action)}
        violations = [v for v in check(facts, self._config, settled_before=settled) if v.subject not in acted]
        if any(v.invariant == LEASES_HELD for v in violations):
            violations = self._confirm_lease_differences(facts, violations, deadline)
        for violation in violations:
            logger.error(
                "fleet invariant violated",
                extra={"invariant": violation.invariant, "subject": violation.subject, "detail": violation.detail},
            )
        report.violations = [str(v) for v in violations]
        if violations:
            report.count("InvariantViolations", len(violations))

    def _confirm_lease_differences(self, facts: Facts, violations: list[Violation], deadline: float) -> list[Violation]:
        """``violations`` less the lease differences a second reading does not find again (or, with no time left
        for one, less all of them: the next run reads them afresh)."""
        wait = INDEX_SETTLE_SECONDS - (self._clock() - facts.now)
        if time.monotonic() + max(0.0, wait) > deadline:
            return [v for v in violations if v.invariant != LEASES_HELD]
        if wait > 0:
            time.sleep(wait)
        try:
            again = lease_differences(self.facts.lease_reading(facts), self._config)
        except (ClientError, BotoCoreError) as exc:
            logger.warning("lease counters unreadable a second time", extra={"reason": _failure(exc)})
            return [v for v in violations if v.invariant != LEASES_HELD]
        first = lease_differences(facts, self._config)
        return [
            v
            for v in violations
            if v.invariant != LEASES_HELD or (v.subject in again and again[v.subject] == first.get(v.subject))
        ]

    def execute(self, actions: list[Action], facts: Facts) -> RunReport:
        """Carry out ``actions`` in order; the first that fails (GitLab or AWS) ends the run, and the actions after
        it are left to the next run, which finds them again from its own facts."""
        report = RunReport()
        reaped = [action.instance_id for action in actions if isinstance(action, Reap)]
        for index, action in enumerate(actions):
            name = type(action).__name__
            try:
                if isinstance(action, Reap) and reaped:
                    # Every instance this run reaps is terminated in one call (1,000 at most each), then each is
                    # cleaned up; a run stopped in between leaves records whose instance is gone, for the next.
                    for start in range(0, len(reaped), 1000):
                        self._terminate(reaped[start : start + 1000])
                    reaped = []
                done = self._act(action, report)
            except (RetryableError, ClientError, BotoCoreError) as exc:
                reason = _failure(exc)
                report.stopped = f"{name} failed: {reason}"
                logger.warning(
                    "reconcile stopped; the rest is left to the next run",
                    extra={"action": name, "reason": reason, "left": len(actions) - index},
                )
                report.count("ReconcileStopped")
                break
            (report.done if done else report.skipped)[name] += 1
        logger.info("reconcile actions done", extra={**report.as_dict(), "actions": len(actions)})
        return report

    # -- actions ----------------------------------------------------------------------------------------------

    def _act(self, action: Action, report: RunReport) -> bool:
        log = {"action": type(action).__name__, "reason": action.reason, "facts": dict(action.facts)}
        if isinstance(action, Reap):
            pool = str(action.facts.get("pool") or "")
            self._events.clean_up(action.instance_id, reason=f"{REAPED}{action.reason}", pool=pool)
            report.count(f"OrphansReaped.{action.kind.value}")
            logger.warning("instance reaped", extra={**log, "instance_id": action.instance_id})
            return True
        if isinstance(action, CleanUp):
            self._events.clean_up(action.instance_id, reason=f"{RECONCILED}{action.reason}")
            report.count(f"OrphansReaped.{action.kind.value}")
            logger.warning("runner record reconciled", extra={**log, "instance_id": action.instance_id})
            return True
        if isinstance(action, DeleteRunner):
            return self._delete_runner(action, log, report)
        if isinstance(action, DeleteToken):
            self._tokens.delete(action.key)
            report.count("OrphansReaped.Token")
            logger.warning("expired runner token deleted", extra={**log, "instance_id": action.instance_id})
            return True
        if isinstance(action, SettleLaunch):
            return self._settle(action, log, report)
        if isinstance(action, Unmark):
            self._store.launches.unmark_launch(action.launch_id)
            return True
        if isinstance(action, Pause):
            return self._pause(action, log, report)
        if isinstance(action, Retire):
            return self._retire(action, log, report)
        if isinstance(action, RecoverJob):
            return self._recover(action, log, report)
        if isinstance(action, WarmLaunch):
            return self._warm(action, log, report)
        if isinstance(action, SetDefaultVersion):
            self._images().make_default(action.pool, int(action.version))
            logger.info("launch template default moved to the pool's version", extra=log)
            return True
        if isinstance(action, ExpireScan):
            (outcome,) = self._images().expire_scans([action.pool])
            return outcome.verdict.value == "scan_timeout"
        raise TypeError(f"no executor for {type(action).__name__}")

    def _images(self) -> ImageRotation:
        if self._images_source is None:
            raise TypeError("this reconciler was built without image rotation")
        return self._images_source()

    def _delete_runner(self, action: DeleteRunner, log: dict[str, Any], report: RunReport) -> bool:
        """Delete a GitLab runner that looked orphaned, once three things only this fleet can say agree: its
        maintenance note is this fleet's mark (a same-named fleet elsewhere on the same GitLab scope keeps its
        runners), the note says it was made more than ``RUNNER_GRACE_SECONDS`` ago (a runner scale-up is still
        making is never judged, whatever the index and EC2 lag), and a consistent read finds no live record of its
        instance (scale-up records an instance before it creates its runner)."""
        note = self._gitlab.runner_note(action.runner_id)
        if note is None:
            return False  # gone already
        made_at = self._owner.made_at(note)
        if made_at is None:
            logger.info("runner left alone: not this fleet's", extra={**log, "gitlab_runner_id": action.runner_id})
            return False
        if made_at > self._clock() - RUNNER_GRACE_SECONDS:
            logger.info("runner left alone: made moments ago", extra={**log, "gitlab_runner_id": action.runner_id})
            return False
        record = self._store.runners.runner(action.instance_id) if action.instance_id else None
        if record is not None and not record.terminated:
            logger.info("runner left alone: its instance is recorded", extra={**log, "instance_id": action.instance_id})
            return False
        self._gitlab.delete_runner(action.runner_id)
        report.count("OrphansReaped.GitLabRunner")
        logger.warning("GitLab runner reaped", extra={**log, "gitlab_runner_id": action.runner_id})
        return True

    def _terminate(self, instance_ids: list[str]) -> None:
        try:
            self._ec2.terminate_instances(InstanceIds=instance_ids)
        except ClientError as exc:
            if error_code(exc) != "InvalidInstanceID.NotFound":
                raise

    def _settle(self, action: SettleLaunch, log: dict[str, Any], report: RunReport) -> bool:
        """Terminate the launch's instances no record knows, then give back every lease it still holds."""
        if action.state in UNFINISHED:
            stale_before = self._clock() - STALE_LAUNCH_SECONDS
            if not self._store.launches.take_over_launch(action.launch_id, stale_before=stale_before):
                return False  # its owner came back to life, or a job's message resumed it first
        launched = [i.instance_id for i in self._launcher.find_launched(action.launch_id)]
        recorded = self._store.runners.runners(launched)
        unrecorded = [i for i in launched if i not in recorded]
        if unrecorded:
            self._terminate(unrecorded)
        launch = self._store.launches.get_launch(action.launch_id)
        held = launch.leases if launch else 0
        self._store.capacity.give_back_launch_leases(
            action.launch_id, action.pool, held, held, finished=True, reason=f"settled by reconcile: {action.reason}"
        )
        self._store.launches.unmark_launch(action.launch_id)
        report.count("OrphansReaped.StaleLaunch")
        logger.warning(
            "stale launch settled",
            extra={**log, "launch_id": action.launch_id, "leases_returned": held, "terminated": unrecorded},
        )
        return True

    def _pause(self, action: Pause, log: dict[str, Any], report: RunReport) -> bool:
        """Begin a retirement: the record says retiring first (out of the idle index, and found again by the next
        run however this one ends), then the runner is paused in GitLab, so it takes no new job."""
        if self._store.runners.mark_retiring(action.instance_id, action.reason) is None:
            logger.info("retire skipped: the runner is draining otherwise or gone", extra=log)
            return False
        self._gitlab.set_paused(action.runner_id, True)
        report.count("RunnersPaused")
        logger.info("runner paused for retirement", extra={**log, "instance_id": action.instance_id})
        return True

    def _retire(self, action: Retire, log: dict[str, Any], report: RunReport) -> bool:
        """Finish a retirement a grace after the pause: delete the runner and terminate its instance, unless it
        still runs a job (it is left paused, to finish it, and retired by a later run)."""
        running = self._gitlab.running_jobs(action.runner_id)
        record = self._store.runners.runner(action.instance_id)
        if record is None or record.terminated:
            return False
        if not may_retire(running, record):
            logger.info(
                "retire waits: the runner still runs a job",
                extra={**log, "instance_id": action.instance_id, "running_jobs": running or []},
            )
            return False
        reason = f"{RETIRED}{action.reason}"
        self._gitlab.delete_runner(action.runner_id)
        self._terminate([action.instance_id])
        self._events.clean_up(action.instance_id, reason=reason)
        report.count("RunnersRetired")
        logger.info("runner retired", extra={**log, "instance_id": action.instance_id, "pool": action.pool})
        return True

    def _recover(self, action: RecoverJob, log: dict[str, Any], report: RunReport) -> bool:
        """Queue a pending job under a queue claim, exactly as the webhook would have; or, for a job whose launch
        ended without a runner taking it, release that launch's claim and queue it again."""
        if action.relaunch_from:
            claim = self._store.claims.release_for_relaunch(action.project_id, action.job_id, action.relaunch_from)
            message = "stuck job queued again"
        else:
            claim = self._store.claims.claim_for_sweep(action.project_id, action.job_id)
            message = "lost job recovered"
        if claim is None:
            return False  # known otherwise by now: queued, claimed, launched or settled
        job = QueuedJob(
            project_id=action.project_id,
            job_id=action.job_id,
            received_at=self._clock(),
            delivery=f"reconcile:{claim}",
        )
        try:
            self._queue.send(job)
        except ClientError:
            self._store.release_queue_claim(action.project_id, action.job_id, claim)
            raise
        self._store.mark_queued(action.project_id, action.job_id)
        report.count("JobsRecovered")
        logger.warning(message, extra={**log, "project_id": action.project_id, "job_id": action.job_id})
        return True

    def _warm(self, action: WarmLaunch, log: dict[str, Any], report: RunReport) -> bool:
        launched = self._scale_up().launch_warm(self._config.pool(action.pool), action.count)
        if launched:
            report.count("WarmLaunched", len(launched))
        logger.info("warm runners launched", extra={**log, "pool": action.pool, "instances": launched})
        return bool(launched)


def build_reconciler(
    config: FleetConfig,
    aws: Any,
    gitlab: GitLabApi,
    scale_up: Callable[[], ScaleUp],
    *,
    clock: Callable[[], float] = time.time,
) -> Reconciler:
    """Reconcile wired to the fleet's table, queue, EC2 and GitLab through ``aws`` (an ``AwsClients``): the
    Lambda's, ``fleetctl reconcile``'s and the tests' one way to build it."""
    from chalicelib.images.rotation import ImageRotation
    from chalicelib.images.store import ImageStore
    from chalicelib.lifecycle.instances import InstanceEvents
    from chalicelib.scaling.fleet import FleetLauncher
    from chalicelib.scaling.tokens import RunnerTokens

    store = ScaleStore(config.state.table, aws.dynamodb, clock=clock)
    tokens = RunnerTokens(aws.dynamodb, config.state.table)
    events = InstanceEvents(store, gitlab, tokens)
    return Reconciler(
        config,
        store,
        aws.ec2,
        gitlab,
        events,
        FleetLauncher(aws.ec2, config.fleet),
        JobQueue(aws.sqs, config.state.jobs_queue),
        scale_up,
        FleetOwner(config.fleet, config.state.table, lambda: aws.client("sts")),
        tokens,
        images=functools.cache(
            lambda: ImageRotation(
                config,
                ImageStore(config.state.table, aws.dynamodb),
                aws.ec2,
                account=lambda: str(aws.client("sts").get_caller_identity()["Account"]),
                region=aws.ec2.meta.region_name,
                clock=clock,
            )
        ),
        clock=clock,
    )
