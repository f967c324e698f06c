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
``RunnersRetired``, ``JobsRecovered``, ``WarmLaunched``; a run that stops early counts ``ReconcileStopped``.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from chalicelib.aws import error_code
from chalicelib.config import FleetConfig
from chalicelib.errors import RetryableError
from chalicelib.jobs_queue import JobQueue, QueuedJob
from chalicelib.lifecycle.facts import Facts, FactSource
from chalicelib.lifecycle.rules import (
    STALE_LAUNCH_SECONDS,
    Action,
    CleanUp,
    DeleteRunner,
    Reap,
    RecoverJob,
    Retire,
    SettleLaunch,
    Unmark,
    WarmLaunch,
    decide,
)
from chalicelib.observability import count, logger
from chalicelib.scale_store import LaunchState, RunnerRecord, ScaleStore

if TYPE_CHECKING:
    from chalicelib.fleet import FleetLauncher
    from chalicelib.gitlab_api import GitLabApi
    from chalicelib.instances import InstanceEvents
    from chalicelib.scale_up import ScaleUp

RUN_LEASE = "reconcile"
# Longer than a run may take (the Lambda's timeout is 120 s); a run that died keeps others out this long at most.
RUN_LEASE_SECONDS = 300.0


def _failure(exc: BaseException) -> str:
    """What stopped a run: GitLab's failure, AWS's error code, or the connection problem botocore gave up on."""
    if isinstance(exc, RetryableError):
        return exc.reason
    if isinstance(exc, ClientError):
        return f"AWS {error_code(exc) or 'error'}"
    return f"AWS {type(exc).__name__}"


class RetireVerdict(str, Enum):
    RETIRE = "retire"
    KEEP = "keep"  # it took a job between the idle decision and the pause: un-pause it and leave it


def retire_verdict(running_jobs: list[tuple[int, int]] | None, record: RunnerRecord | None) -> RetireVerdict:
    """After the pause: retire only if GitLab lists no running job for the runner and its record (read again)
    says it runs none. A paused runner is given no new job, so this answer cannot go stale; a job it took
    before the pause shows in one or the other (GitLab assigns it before the Job Hook tells the table)."""
    if running_jobs or (record is not None and (record.busy or record.terminated)):
        return RetireVerdict.KEEP
    return RetireVerdict.RETIRE


@dataclass
class RunReport:
    """What a run did: actions done by kind, and why it stopped early (if it did)."""

    done: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    metrics: Counter[str] = field(default_factory=Counter)  # what the run counted, as emitted
    stopped: str = ""
    ran: bool = True  # False when another run held the lease

    def count(self, name: str, value: int = 1) -> None:
        count(name, value)
        self.metrics[name] += value

    def as_dict(self) -> dict[str, Any]:
        return {
            "ran": self.ran,
            "done": dict(self.done),
            "skipped": dict(self.skipped),
            "metrics": dict(self.metrics),
            "stopped": self.stopped,
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
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._store = store
        self._ec2 = ec2
        self._gitlab = gitlab
        self._events = events
        self._launcher = launcher
        self._queue = queue
        self._scale_up = scale_up
        self._clock = clock
        self.facts = FactSource(config, store, ec2, gitlab, clock=clock)

    def run(self) -> RunReport:
        """One run under the run lease."""
        owner = uuid.uuid4().hex
        if not self._store.take_run_lease(RUN_LEASE, owner, RUN_LEASE_SECONDS):
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
            return self.execute(decide(facts, self._config), facts)
        finally:
            self._store.release_run_lease(RUN_LEASE, owner)

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
        logger.info("reconcile run done", extra={**report.as_dict(), "actions": len(actions)})
        return report

    # -- actions ----------------------------------------------------------------------------------------------

    def _act(self, action: Action, report: RunReport) -> bool:
        log = {"action": type(action).__name__, "reason": action.reason, "facts": dict(action.facts)}
        if isinstance(action, Reap):
            self._events.clean_up(action.instance_id, reason=f"reaped: {action.reason}")
            report.count(f"OrphansReaped.{action.kind.value}")
            logger.warning("instance reaped", extra={**log, "instance_id": action.instance_id})
            return True
        if isinstance(action, CleanUp):
            self._events.clean_up(action.instance_id, reason=f"reconciled: {action.reason}")
            report.count(f"OrphansReaped.{action.kind.value}")
            logger.warning("runner record reconciled", extra={**log, "instance_id": action.instance_id})
            return True
        if isinstance(action, DeleteRunner):
            self._gitlab.delete_runner(action.runner_id)
            report.count("OrphansReaped.GitLabRunner")
            logger.warning("GitLab runner reaped", extra={**log, "gitlab_runner_id": action.runner_id})
            return True
        if isinstance(action, SettleLaunch):
            return self._settle(action, log, report)
        if isinstance(action, Unmark):
            self._store.unmark_launch(action.launch_id)
            return True
        if isinstance(action, Retire):
            return self._retire(action, log, report)
        if isinstance(action, RecoverJob):
            return self._recover(action, log, report)
        if isinstance(action, WarmLaunch):
            return self._warm(action, log, report)
        raise TypeError(f"no executor for {type(action).__name__}")

    def _terminate(self, instance_ids: list[str]) -> None:
        try:
            self._ec2.terminate_instances(InstanceIds=instance_ids)
        except ClientError as exc:
            if error_code(exc) != "InvalidInstanceID.NotFound":
                raise

    def _settle(self, action: SettleLaunch, log: dict[str, Any], report: RunReport) -> bool:
        """Terminate the launch's instances no record knows, then give back every lease it still holds."""
        if action.state is not LaunchState.FAILED:
            stale_before = self._clock() - STALE_LAUNCH_SECONDS
            if not self._store.take_over_launch(action.launch_id, stale_before=stale_before):
                return False  # its owner came back to life, or a job's message resumed it first
        launched = [i.instance_id for i in self._launcher.find_launched(action.launch_id)]
        recorded = self._store.runners(launched)
        unrecorded = [i for i in launched if i not in recorded]
        if unrecorded:
            self._terminate(unrecorded)
        launch = self._store.get_launch(action.launch_id)
        held = launch.leases if launch else 0
        self._store.give_back_launch_leases(
            action.launch_id, action.pool, held, held, finished=True, reason=f"settled by reconcile: {action.reason}"
        )
        self._store.unmark_launch(action.launch_id)
        report.count("OrphansReaped.StaleLaunch")
        logger.warning(
            "stale launch settled",
            extra={**log, "launch_id": action.launch_id, "leases_returned": held, "terminated": unrecorded},
        )
        return True

    def _retire(self, action: Retire, log: dict[str, Any], report: RunReport) -> bool:
        """Pause, re-check, then delete and terminate; a runner that took a job meanwhile is left alone."""
        reason = f"retired: {action.reason}"
        if self._store.drain_runner(action.instance_id, reason, only_idle=True) is None:
            logger.info(
                "retire skipped: the runner is no longer idle", extra={**log, "instance_id": action.instance_id}
            )
            return False
        try:
            self._gitlab.set_paused(action.runner_id, True)
            running = self._gitlab.running_jobs(action.runner_id)
        except RetryableError:
            self._store.undrain_runner(action.instance_id, reason)
            raise
        record = self._store.runners([action.instance_id]).get(action.instance_id)
        if retire_verdict(running, record) is RetireVerdict.KEEP:
            self._gitlab.set_paused(action.runner_id, False)
            self._store.undrain_runner(action.instance_id, reason)
            logger.info(
                "retire abandoned: the runner took a job",
                extra={**log, "instance_id": action.instance_id, "running_jobs": running or []},
            )
            return False
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
            self._store.release_claim(action.project_id, action.job_id, action.relaunch_from)
            job = QueuedJob(action.project_id, action.job_id, received_at=self._clock(), delivery="reconcile:relaunch")
            self._queue.send(job)
            report.count("JobsRecovered")
            logger.warning(
                "stuck job queued again", extra={**log, "project_id": action.project_id, "job_id": action.job_id}
            )
            return True
        claim = self._store.claim_for_sweep(action.project_id, action.job_id)
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
        logger.warning("lost job recovered", extra={**log, "project_id": action.project_id, "job_id": action.job_id})
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
    from chalicelib.fleet import FleetLauncher
    from chalicelib.instances import InstanceEvents
    from chalicelib.runner_tokens import RunnerTokens

    store = ScaleStore(config.state.table, aws.dynamodb, clock=clock)
    events = InstanceEvents(store, gitlab, RunnerTokens(aws.dynamodb, config.state.table))
    return Reconciler(
        config,
        store,
        aws.ec2,
        gitlab,
        events,
        FleetLauncher(aws.ec2, config.fleet),
        JobQueue(aws.sqs, config.state.jobs_queue),
        scale_up,
        clock=clock,
    )
