"""Scale-up: every waiting job gets a runner, exactly once, within its pool's limits.

One SQS batch is handled as a whole: each job is read from GitLab (still pending? which tags?), matched to a
pool and claimed for a launch; then, per pool, capacity leases are taken and one CreateFleet call launches an
instance per claimed job; finally each instance gets its own GitLab runner and token. Every job ends in one of:
launched, not pending any more, matched to no pool, waiting for capacity, re-queued for a retry, or
dead-lettered with its reason; each is logged and counted.

:class:`ScaleUp` is the entry point: it takes a batch, claims each pool's jobs for a launch and hands them on.
Each further step of a job's walk has its module: which jobs go on (:mod:`chalicelib.scaling.admission`), the
launch (:mod:`chalicelib.scaling.launching`: crash safety, failures), the runners for its instances
(:mod:`chalicelib.scaling.recording`: the order of writes, and why), and the jobs that go back to the queue
(:mod:`chalicelib.scaling.giving_back`); what they share is in :mod:`chalicelib.scaling.batch`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

from botocore.exceptions import ClientError

from chalicelib.aws import AwsClients, error_code
from chalicelib.config import FleetConfig, PoolConfig
from chalicelib.errors import RetryableError
from chalicelib.gitlab_api import GitLabApi, JobNotRetryableError
from chalicelib.jobs_queue import JobQueue, QueuedJob
from chalicelib.lifecycle.interruptions import RetryDecision, decide_retry, still_retryable
from chalicelib.naming import FleetOwner, runner_role_name
from chalicelib.observability import count, logger
from chalicelib.scaling.admission import Admission
from chalicelib.scaling.batch import WRITE_WORKERS, BatchReport, Matched, Outcome, job_log
from chalicelib.scaling.fleet import FleetLauncher
from chalicelib.scaling.giving_back import GiveBack
from chalicelib.scaling.launching import STALE_LAUNCH_SECONDS, PoolLauncher
from chalicelib.scaling.policy import HeldJob, RetryPolicy, decide_held_job
from chalicelib.scaling.recording import RunnerRecorder
from chalicelib.scaling.store import ScaleStore
from chalicelib.scaling.store.records import Claim, ClaimOutcome
from chalicelib.scaling.tokens import RunnerRoles, RunnerTokens


class ScaleUp:
    """One scale-up batch, from queue messages to launched runners; also reconcile's warm launches."""

    def __init__(
        self,
        config: FleetConfig,
        store: ScaleStore,
        gitlab: GitLabApi,
        launcher: FleetLauncher,
        tokens: RunnerTokens,
        queue: JobQueue,
        dead_letters: JobQueue,
        *,
        policy: RetryPolicy | None = None,
        clock: Callable[[], float] = time.time,
        new_launch_id: Callable[[], str] = lambda: uuid.uuid4().hex,
        owner: FleetOwner | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._gitlab = gitlab
        self._tokens = tokens
        self._dead_letters = dead_letters
        self._policy = policy or RetryPolicy()
        self._clock = clock
        self._new_launch_id = new_launch_id
        self._owner = owner
        self._give_back = GiveBack(store, queue, dead_letters, self._policy)
        self._admission = Admission(config, store, gitlab, self._give_back, self._policy)
        self._recorder = RunnerRecorder(config, store, gitlab, tokens, self._give_back, clock=clock, owner=owner)
        self._launching = PoolLauncher(
            config,
            store,
            launcher,
            tokens,
            self._recorder,
            self._give_back,
            clock=clock,
            new_launch_id=new_launch_id,
        )

    def handle_messages(self, bodies: Iterable[str]) -> BatchReport:
        """One SQS batch. A body that is not a job goes to the dead-letter queue with the reason, not lost."""
        jobs, bad = parse_records(bodies)
        for body, reason in bad:
            self._dead_letters.send_raw(json.dumps({"body": body[:200_000], "last_error": reason}))
            logger.error("malformed jobs message dead-lettered", extra={"reason": reason})
            count("JobsDeadLettered")
        report = self.handle(jobs)
        if bad:
            report.add(Outcome.DEAD_LETTERED, len(bad))
        return report

    def handle(self, jobs: Sequence[QueuedJob]) -> BatchReport:
        report = BatchReport()
        for job in jobs:
            if job.retry_interrupted:
                self._retry_interrupted(job, report)
        jobs = [job for job in jobs if not job.retry_interrupted]
        if jobs and not self._knows_runner_roles(jobs, report):
            return report
        pools = {pool.name for pool in self._config.pools}
        waiting = [job for job in jobs if job.pool in pools]
        fresh = [job for job in jobs if job.pool not in pools]
        fresh_matched = self._admission.defer_to_idle_runners(self._admission.read_and_match(fresh, report), report)
        matched = fresh_matched + self._admission.admit_waiting(waiting, report)
        by_pool: dict[str, list[Matched]] = defaultdict(list)
        for item in matched:
            by_pool[item.pool.name].append(item)
        for pool_name, items in by_pool.items():
            self._scale_pool(self._config.pool(pool_name), items, report)
        logger.info("scale-up batch done", extra={"outcomes": report.as_dict(), "jobs": len(jobs)})
        return report

    def _knows_runner_roles(self, jobs: Sequence[QueuedJob], report: BatchReport) -> bool:
        """Every token's key needs its pool's runner role id; without them nothing is launched (an instance whose
        token could not be handed over would only hold a lease), and the jobs come back later. Read once per
        process, for every pool."""
        try:
            self._tokens.learn_roles()
            if self._owner is not None:
                self._owner.mark()
        except ClientError as exc:
            reason = f"reading the runner roles failed with {error_code(exc) or 'UnknownError'}"
            logger.error("runner roles unreadable; batch re-queued", extra={"reason": reason})
            for job in jobs:
                self._give_back.retry(job, None, reason, report)
            return False
        return True

    def _retry_interrupted(self, job: QueuedJob, report: BatchReport) -> None:
        """Retry, once, a job a runner lost when EC2 interrupted its spot instance, if the runner's pool allows it.

        The job's record takes the retry first (a conditional write naming the message's delivery), so another
        message for the same job (a second hook's delivery of the failure) does nothing, while this message, back
        after a failed GitLab call, tries again. GitLab answers with a new pending job, whose Job Hook is queued
        and launched for like any other.
        """
        pool = next((p for p in self._config.pools if p.name == job.retry_interrupted), None)
        log = {**job_log(job), "pool": job.retry_interrupted}
        decision = decide_retry(pool, job.retries)
        if decision is not RetryDecision.RETRY:
            logger.info("job lost to an interruption not retried", extra={**log, "reason": decision.value})
            report.add(Outcome.NOT_RETRIED)
            return
        claim = job.delivery or f"{job.project_id}:{job.job_id}"
        if not self._store.claims.claim_interruption_retry(job.project_id, job.job_id, claim):
            logger.info("job lost to an interruption retried already", extra=log)
            report.add(Outcome.DUPLICATE)
            return
        try:
            # GitLab's view first: a job someone cancelled or retried meanwhile is theirs.
            current = self._gitlab.job(job.project_id, job.job_id)
            if current is not None and not still_retryable(current.status, current.failure_reason):
                self._store.claims.record_interruption_retry(job.project_id, job.job_id, None)
                logger.info(
                    "job lost to an interruption not retried",
                    extra={**log, "reason": RetryDecision.NOT_FAILED.value, "gitlab_status": current.status},
                )
                report.add(Outcome.NOT_RETRIED)
                return
            new_job = None if current is None else self._gitlab.retry_job(job.project_id, job.job_id)
        except RetryableError as exc:
            self._give_back.retry(job, pool, exc.reason, report)
            return
        except JobNotRetryableError:
            # Retried already: our own earlier attempt whose answer was lost, or someone else. Done either way.
            self._store.claims.record_interruption_retry(job.project_id, job.job_id, None)
            logger.info("job lost to an interruption was retried already", extra=log)
            report.add(Outcome.DUPLICATE)
            return
        self._store.claims.record_interruption_retry(job.project_id, job.job_id, new_job)
        if new_job is None:
            logger.warning("job lost to an interruption is gone from GitLab", extra=log)
            report.add(Outcome.NOT_PENDING)
            return
        count("JobsRetriedAfterInterruption")
        logger.info("job lost to an interruption retried", extra={**log, "new_job_id": new_job})
        report.add(Outcome.RETRIED_AFTER_INTERRUPTION)

    def _scale_pool(self, pool: PoolConfig, items: list[Matched], report: BatchReport) -> None:
        launch_id = self._new_launch_id()
        claimed: list[Matched] = []
        held: dict[str, list[Matched]] = defaultdict(list)
        claimed_at: dict[str, float] = {}
        # One conditional write per job, independent of each other: made together, so a batch's claims cost one
        # round trip's time rather than one per job.
        with ThreadPoolExecutor(max_workers=min(WRITE_WORKERS, len(items))) as workers:
            claims = list(
                workers.map(
                    lambda i: self._store.claims.claim_job(i.job.project_id, i.job.job_id, launch_id, pool.name),
                    items,
                )
            )
        for item, made in zip(items, claims, strict=True):
            claim = self._admission.judge_claim(item, made, report)
            if claim is None:
                continue
            if claim.outcome is ClaimOutcome.CLAIMED:
                claimed.append(item)
            else:
                held[claim.launch_id].append(item)
                claimed_at[claim.launch_id] = max(claimed_at.get(claim.launch_id, 0.0), claim.claimed_at)
        for holder, group in held.items():
            claimed += self._held(pool, holder, group, claimed_at[holder], launch_id, report)
        if claimed:
            self._launching.launch(pool, launch_id, claimed, report)

    def _claim(self, item: Matched, launch_id: str, report: BatchReport) -> Claim | None:
        """Claim a job for ``launch_id``: the claim (ours or another launch's), or None when it needs no launch."""
        return self._admission.judge_claim(
            item, self._store.claims.claim_job(item.job.project_id, item.job.job_id, launch_id, item.pool.name), report
        )

    def _held(
        self,
        pool: PoolConfig,
        holder: str,
        items: list[Matched],
        claimed_at: float,
        launch_id: str,
        report: BatchReport,
    ) -> list[Matched]:
        """Jobs the launch ``holder`` holds; returns those claimed afresh for ``launch_id``, to launch with it."""
        launch = self._store.launches.get_launch(holder)
        decision = decide_held_job(
            launch.state if launch else None,
            claimed_at=claimed_at,
            started_at=launch.started_at if launch else 0.0,
            now=self._clock(),
            stale_after=STALE_LAUNCH_SECONDS,
        )
        if decision is HeldJob.DONE:
            report.add(Outcome.DUPLICATE, len(items))
            return []
        if decision is HeldJob.RECLAIM:
            reclaimed: list[Matched] = []
            for item in items:
                self._store.claims.release_claim(item.job.project_id, item.job.job_id, holder)
                claim = self._claim(item, launch_id, report)
                if claim is not None and claim.outcome is ClaimOutcome.CLAIMED:
                    reclaimed.append(item)
                elif claim is not None:
                    # Another invocation reclaimed it first.
                    self._give_back.requeue(item.job, self._policy.lease_wait_delay(0), report, Outcome.DUPLICATE)
            return reclaimed
        if decision is HeldJob.RESUME and launch is not None and self._launching.take_over(holder):
            self._launching.resume(pool, launch, items, report)
            return []
        # A live invocation is at it (a copy delivered twice at once): come back once it is done.
        for item in items:
            self._give_back.requeue(item.job, self._policy.lease_wait_delay(0), report, Outcome.DUPLICATE)
        return []

    def launch_warm(self, pool: PoolConfig, wanted: int) -> list[str]:
        """Launch up to ``wanted`` idle runners for ``pool`` (see :meth:`PoolLauncher.launch_warm`); returns the
        instances made ready."""
        return self._launching.launch_warm(pool, wanted)


def build_scale_up(
    config: FleetConfig,
    aws: AwsClients,
    gitlab: GitLabApi,
    *,
    policy: RetryPolicy | None = None,
    clock: Callable[[], float] = time.time,
) -> ScaleUp:
    """Scale-up wired to the fleet's table, queues, EC2 and the runner role through ``aws``: the Lambda's and the
    tests' one way to build it."""
    return ScaleUp(
        config,
        ScaleStore(config.state.table, aws.dynamodb),
        gitlab,
        FleetLauncher(aws.ec2, config.fleet),
        RunnerTokens(
            aws.dynamodb,
            config.state.table,
            RunnerRoles(
                aws.client("iam"), {pool.name: runner_role_name(config.fleet, pool.name) for pool in config.pools}
            ),
        ),
        JobQueue(aws.sqs, config.state.jobs_queue),
        JobQueue(aws.sqs, config.state.dead_letter_queue),
        policy=policy,
        clock=clock,
        owner=FleetOwner(config.fleet, config.state.table, lambda: aws.client("sts")),
    )


def parse_records(bodies: Iterable[str]) -> tuple[list[QueuedJob], list[tuple[str, str]]]:
    """Queue message bodies as jobs, and the ones that are not (with why), for the dead-letter queue."""
    jobs: list[QueuedJob] = []
    bad: list[tuple[str, str]] = []
    for body in bodies:
        try:
            jobs.append(QueuedJob.from_json(body))
        except ValueError as exc:
            bad.append((body, f"malformed message: {exc}"))
    return jobs, bad
