"""A pool's launch: its leases, its CreateFleet plan, what EC2 answered, and resuming one that stopped part way.

Crash safety. A job is claimed for a launch id before anything is launched; the launch id derives CreateFleet's
ClientToken and is tagged on every instance, and the launch record keeps the exact CreateFleet requests (its
plan) from the moment it takes its leases. If the Lambda dies anywhere after that, the redelivered message
finds its job claimed by a launch that never finished and completes that launch: it adopts the instances
tagged with the launch id (or, when they are fewer than planned, sends the plan again unchanged, which EC2
answers with the first call's fleet through the ClientToken), records them, and creates their GitLab runners,
finding one whose creation answer was lost by its description.

Failures. A launch EC2 refuses for good (permissions, a missing template, a bad parameter) gives its leases
back, releases its jobs' claims and dead-letters them with the AWS error code; a dead-lettered job is never
claimed again. A throttled or short launch gives back what it did not use and re-queues its jobs. A CreateFleet
that got no answer (a timeout, AWS's 5xx) may have made instances: the launch keeps its leases and claims, and
its jobs come back to resume it with the same plan, never to launch again under a new launch id. An AWS error
once the instances exist is handled where their runners are made (:mod:`chalicelib.scaling.recording`).

Draining. A pool the operator drained (``fleetctl drain``; the mark is on the pool's counter item, read once per
launch for its template version anyway) launches nothing: its jobs wait as for capacity, spending no attempt, and
warm launches make nothing. A launch that stopped part way is still resumed: its instances may exist already.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from chalicelib.config import FleetConfig, PoolConfig
from chalicelib.errors import RetryableError
from chalicelib.naming import launch_template_name
from chalicelib.observability import count, logger
from chalicelib.scaling.batch import BatchReport, Matched
from chalicelib.scaling.fleet import (
    FleetLauncher,
    LaunchedInstance,
    LaunchOutcomeUnknownError,
    LaunchPlan,
    LaunchRefusedError,
    LaunchResult,
    LaunchTemplateRef,
)
from chalicelib.scaling.giving_back import GiveBack
from chalicelib.scaling.recording import RunnerRecorder
from chalicelib.scaling.store import ScaleStore
from chalicelib.scaling.store.records import LaunchRecord, PoolCounter
from chalicelib.scaling.tokens import RunnerTokens

# A launch record younger than this may still be in the hands of a live invocation; only an older one is
# resumed by another. Twice the scale-up Lambda's timeout.
STALE_LAUNCH_SECONDS = 120.0


class PoolLauncher:
    """Launches a pool's claimed jobs (or warm runners) under one launch id, and resumes a launch left unfinished."""

    def __init__(
        self,
        config: FleetConfig,
        store: ScaleStore,
        launcher: FleetLauncher,
        tokens: RunnerTokens,
        recorder: RunnerRecorder,
        give_back: GiveBack,
        *,
        clock: Callable[[], float] = time.time,
        new_launch_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        self._config = config
        self._store = store
        self._launcher = launcher
        self._tokens = tokens
        self._recorder = recorder
        self._give_back = give_back
        self._clock = clock
        self._new_launch_id = new_launch_id

    def take_over(self, launch_id: str) -> bool:
        return self._store.launches.take_over_launch(launch_id, stale_before=self._clock() - STALE_LAUNCH_SECONDS)

    def launch(self, pool: PoolConfig, launch_id: str, items: list[Matched], report: BatchReport) -> None:
        counter = self._store.capacity.pool_counter(pool.name)
        if counter.drained:
            self._wait_for_undrain(pool, launch_id, items, report)
            return
        template = self._template_of(pool, counter)
        granted = self._store.capacity.acquire_leases(
            pool.name,
            len(items),
            pool.max_runners,
            launch_id,
            plan=lambda take: self._plan(pool, template, launch_id, take).to_json(),
        )
        running, waiting = items[:granted], items[granted:]
        for item in waiting:
            self._store.claims.release_claim(item.job.project_id, item.job.job_id, launch_id, waiting_for=pool.name)
            self._give_back.wait(item, report)
        if not running:
            return
        log = {"pool": pool.name, "launch_id": launch_id, "count": len(running)}
        try:
            result = self._launcher.execute(self._plan(pool, template, launch_id, len(running)))
        except LaunchOutcomeUnknownError as exc:
            self._give_back.keep_for_resume(pool, launch_id, running, exc.reason, report, finished=True)
            return
        except RetryableError as exc:
            self._store.capacity.give_back_launch_leases(
                launch_id, pool.name, len(running), len(running), finished=True, reason=exc.reason
            )
            count("LaunchErrors")
            logger.warning("launch failed; jobs re-queued", extra={**log, "reason": exc.reason})
            for item in running:
                self._store.claims.release_claim(item.job.project_id, item.job.job_id, launch_id)
                self._give_back.retry(item.job, pool, exc.reason, report)
            return
        except LaunchRefusedError as exc:
            self._store.capacity.give_back_launch_leases(
                launch_id, pool.name, len(running), len(running), finished=True, reason=exc.code
            )
            self._give_back.refuse(pool, launch_id, running, exc.code, exc.reason, report)
            return
        for error in result.errors:
            count(f"LaunchError.{error.code}")
        if result.fallback_used:
            count("OnDemandFallbacks")
        instances = list(result.instances)
        missing = running[len(instances) :]
        unknown = missing if result.fallback_unknown else []
        if missing and not unknown:
            self._short(pool, launch_id, result, len(running), missing, report, log)
        if instances:
            self._recorder.complete(
                pool, launch_id, instances, running[: len(instances)], report, adopting=False, held=len(instances)
            )
        if unknown:
            # The on-demand fallback got no answer: its instances may exist. Their leases and jobs stay with
            # this launch, which the jobs resume, sending the same fallback request again.
            reason = "on-demand fallback did not answer"
            self._give_back.keep_for_resume(pool, launch_id, unknown, reason, report, finished=not instances)

    def _wait_for_undrain(self, pool: PoolConfig, launch_id: str, items: list[Matched], report: BatchReport) -> None:
        """The operator drained the pool: its jobs wait, as for capacity, until it is undrained."""
        logger.info(
            "pool drained; its jobs wait", extra={"pool": pool.name, "launch_id": launch_id, "count": len(items)}
        )
        for item in items:
            self._store.claims.release_claim(item.job.project_id, item.job.job_id, launch_id, waiting_for=pool.name)
            self._give_back.wait(item, report, drained=True)

    def _short(
        self,
        pool: PoolConfig,
        launch_id: str,
        result: LaunchResult,
        held: int,
        missing: list[Matched],
        report: BatchReport,
        log: dict[str, Any],
    ) -> None:
        """EC2 made fewer instances than asked, and said why: the missing leases go back, their jobs are retried
        (capacity) or dead-lettered (refused for good)."""
        made = len(result.instances)
        codes = sorted({e.code for e in result.errors})
        refused = not made and bool(result.errors) and not result.capacity_errors
        reason = ("refused: " if refused else "capacity: ") + (", ".join(codes) or "no instances")
        self._store.capacity.give_back_launch_leases(
            launch_id, pool.name, held, len(missing), finished=not made, reason=reason
        )
        if refused:
            # EC2 answered 200 but refused every override for a reason no retry fixes.
            self._give_back.refuse(pool, launch_id, missing, codes[0], reason, report, counted=True)
            return
        logger.warning("launch short of capacity", extra={**log, "made": made, "reason": reason})
        for item in missing:
            self._store.claims.release_claim(item.job.project_id, item.job.job_id, launch_id)
            self._give_back.retry(item.job, pool, reason, report)

    def resume(self, pool: PoolConfig, launch: LaunchRecord, items: list[Matched], report: BatchReport) -> None:
        """Finish a launch that stopped part way, now that this invocation owns it.

        The instances tagged with its launch id are adopted. When they are fewer than it planned and it still
        holds leases, its requests are sent again exactly as first sent (the plan on its record): EC2 answers
        the calls that completed with their first answers, and launches only what was never launched.
        """
        launch_id, held = launch.launch_id, launch.leases
        logger.warning("resuming an unfinished launch", extra={"pool": pool.name, "launch_id": launch_id})
        count("LaunchesResumed")
        # A launch recorded without its plan made no CreateFleet call yet: planning it now sends nothing different.
        plan = (
            LaunchPlan.from_json(launch.plan) if launch.plan else self._plan(pool, self.template(pool), launch_id, held)
        )
        instances = self._launcher.find_launched(launch_id)
        if held and len(instances) < plan.count:
            relaunched = self._relaunch(pool, launch_id, plan, items, held, instances, report)
            if relaunched is None:
                return
            instances = relaunched
        self._recorder.complete(pool, launch_id, instances, items, report, adopting=True, held=held)

    def _relaunch(
        self,
        pool: PoolConfig,
        launch_id: str,
        plan: LaunchPlan,
        items: list[Matched],
        held: int,
        found: list[LaunchedInstance],
        report: BatchReport,
    ) -> list[LaunchedInstance] | None:
        """Send an interrupted launch's plan again; the instances it has (``found`` and what EC2 answers), or None
        when the jobs were handled here."""
        last_attempt = any(item.job.attempt >= pool.max_launch_attempts for item in items)
        try:
            result = self._launcher.execute(plan)
        except RetryableError as exc:
            if last_attempt and found:
                # Nobody would resume it again: run with the instances there are; the other leases go back.
                return found
            if last_attempt:
                # A job is about to be dead-lettered: nobody would resume this launch, so it gives all back.
                self._store.capacity.give_back_launch_leases(
                    launch_id, pool.name, held, held, finished=True, reason=exc.reason
                )
                for item in items:
                    self._store.claims.release_claim(item.job.project_id, item.job.job_id, launch_id)
            else:
                self._store.launches.mark_launch_incomplete(launch_id, exc.reason)
            for item in items:
                self._give_back.retry(item.job, pool, exc.reason, report)
            return None
        except LaunchRefusedError as exc:
            if found:
                return found
            self._store.capacity.give_back_launch_leases(
                launch_id, pool.name, held, held, finished=True, reason=exc.code
            )
            self._give_back.refuse(pool, launch_id, items, exc.code, exc.reason, report)
            return None
        if result.fallback_unknown and not last_attempt:
            self._store.launches.mark_launch_incomplete(launch_id, "on-demand fallback did not answer")
            for item in items:
                self._give_back.retry(item.job, pool, "on-demand fallback did not answer", report)
            return None
        merged = {instance.instance_id: instance for instance in result.instances}
        merged.update({instance.instance_id: instance for instance in found})
        return sorted(merged.values(), key=lambda instance: instance.instance_id)

    def launch_warm(self, pool: PoolConfig, wanted: int) -> list[str]:
        """Launch up to ``wanted`` idle runners for ``pool`` (reconcile keeps warm pools topped up), through the
        same capacity leases as jobs, so a pool never exceeds max_runners. Returns the instances made ready.

        No job waits on them: what EC2 did not make goes back at once, and a launch that stops part way is left
        ``incomplete`` for reconcile to settle once it is stale.
        """
        counter = self._store.capacity.pool_counter(pool.name)
        if counter.drained:
            return []  # a drained pool is never kept warm
        self._tokens.learn_roles([pool.name])
        launch_id = self._new_launch_id()
        template = self._template_of(pool, counter)
        granted = self._store.capacity.acquire_leases(
            pool.name,
            wanted,
            pool.max_runners,
            launch_id,
            plan=lambda take: self._plan(pool, template, launch_id, take).to_json(),
        )
        if not granted:
            return []
        try:
            result = self._launcher.execute(self._plan(pool, template, launch_id, granted))
        except LaunchOutcomeUnknownError as exc:
            self._store.launches.mark_launch_incomplete(launch_id, exc.reason)
            count("LaunchErrors")
            return []
        except (RetryableError, LaunchRefusedError) as exc:
            reason = exc.code if isinstance(exc, LaunchRefusedError) else exc.reason
            self._store.capacity.give_back_launch_leases(
                launch_id, pool.name, granted, granted, finished=True, reason=reason
            )
            count("LaunchErrors")
            logger.warning("warm launch failed", extra={"pool": pool.name, "launch_id": launch_id, "reason": reason})
            return []
        instances = list(result.instances)
        if len(instances) < granted:
            # Also when the on-demand fallback got no answer: an instance it made anyway has no record, and
            # reconcile reaps it as untracked once it is stale.
            missing = granted - len(instances)
            self._store.capacity.give_back_launch_leases(
                launch_id, pool.name, granted, missing, finished=not instances, reason="capacity"
            )
        if not instances:
            return []
        report = BatchReport()
        self._recorder.complete(pool, launch_id, instances, [], report, adopting=False, held=len(instances), warm=True)
        return list(report.instances)

    def template(self, pool: PoolConfig) -> LaunchTemplateRef:
        """The launch template version the pool's counter item names (image rotation writes it with each
        promotion, :mod:`chalicelib.images.store`), read once per launch so that its plan names one version; the
        template's default before any promotion."""
        return self._template_of(pool, self._store.capacity.pool_counter(pool.name))

    def _template_of(self, pool: PoolConfig, counter: PoolCounter) -> LaunchTemplateRef:
        """The template ``counter`` (the pool's counter item, read once per launch with its drain mark) names."""
        name = launch_template_name(self._config.fleet, pool.name)
        version = counter.template_version
        return LaunchTemplateRef(name, str(version)) if version is not None else LaunchTemplateRef(name)

    def _plan(self, pool: PoolConfig, template: LaunchTemplateRef, launch_id: str, count: int) -> LaunchPlan:
        return self._launcher.plan(pool, template, launch_id, count)
