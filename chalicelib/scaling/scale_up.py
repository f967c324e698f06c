"""Scale-up: every waiting job gets a runner, exactly once, within its pool's limits.

One SQS batch is handled as a whole: each job is read from GitLab (still pending? which tags?), matched to a
pool and claimed for a launch; then, per pool, capacity leases are taken and one CreateFleet call launches an
instance per claimed job; finally each instance gets its own GitLab runner and token. Every job ends in one of:
launched, not pending any more, matched to no pool, waiting for capacity, re-queued for a retry, or
dead-lettered with its reason; each is logged and counted.

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
after the instances exist cannot give their leases back (the instances hold them): the launch record is left
``incomplete`` (transient, the jobs come back and resume it) or ``failed`` with the reason (for good, the jobs
are dead-lettered), for reconcile to settle once it is stale (chalicelib/lifecycle/rules.py).

Order of writes, and why. An instance can terminate at any moment, and the state-change handler can only clean
up what a record names. So the runner records come first, right after CreateFleet, each taking its lease from
the launch, with no GitLab runner yet; then the GitLab runners are made (in worker threads, GitLab calls only),
then the tokens are put, and last each record gets its GitLab identity in a write conditioned on the record not
being terminated. Each interleaving with the handler ends clean:

* terminated before its record: the handler leaves a terminated tombstone, the record write is refused, and the
  launch gives that lease back and re-queues one job;
* terminated after its record, before its identity: the handler returns the lease and deletes the token if it
  is there yet; the identity write is then refused, and scale-up deletes the token and GitLab runner it just made
  (a GitLab runner it cannot delete is written onto the terminated record with its cleanup mark);
* terminated after its identity: the handler finds everything on the record.

The other order (tokens and GitLab runners before records, as before) leaves a token and a GitLab runner that no
record names whenever the instance terminates in between, and nothing would ever delete them.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from botocore.exceptions import ClientError

from chalicelib.aws import AwsClients, error_code
from chalicelib.config import FleetConfig, PoolConfig
from chalicelib.errors import RetryableError
from chalicelib.gitlab_api import GitLabApi, JobInfo, JobNotRetryableError, RunnerCredentials
from chalicelib.jobs_queue import JobQueue, QueuedJob
from chalicelib.lifecycle.interruptions import RetryDecision, decide_retry, still_retryable
from chalicelib.naming import FleetOwner, launch_template_name, runner_description, runner_role_name
from chalicelib.observability import count, logger
from chalicelib.scaling.fleet import (
    THROTTLING_ERROR_CODES,
    FleetLauncher,
    LaunchedInstance,
    LaunchOutcomeUnknownError,
    LaunchPlan,
    LaunchRefusedError,
    LaunchResult,
    LaunchTemplateRef,
)
from chalicelib.scaling.policy import HeldJob, RetryPolicy, decide_held_job, leave_to_idle_runners, match_pool
from chalicelib.scaling.store import ScaleStore
from chalicelib.scaling.store.records import Claim, ClaimOutcome, LaunchRecord, RunnerRecord
from chalicelib.scaling.store.table import transiently_cancelled
from chalicelib.scaling.tokens import RunnerRoles, RunnerTokens

# A launch record younger than this may still be in the hands of a live invocation; only an older one is
# resumed by another. Twice the scale-up Lambda's timeout.
STALE_LAUNCH_SECONDS = 120.0
DEFAULT_MAX_ATTEMPTS = 8
GITLAB_WORKERS = 8
# Independent DynamoDB writes of one batch (claims, tokens, identities) made at once.
WRITE_WORKERS = 8
# botocore's standard mode retried these already; one that still surfaces is worth another attempt later.
_TRANSIENT_AWS_ERROR_CODES = THROTTLING_ERROR_CODES | {
    "ProvisionedThroughputExceededException",
    "TransactionConflictException",
    "TransactionInProgressException",
    "RequestLimitExceeded",
    "InternalServerError",
    "InternalError",
    "ServiceUnavailable",
}


class Outcome(str, Enum):
    LAUNCHED = "launched"
    NOT_PENDING = "not_pending"
    UNMATCHED = "unmatched"
    WAITING = "waiting"
    DEFERRED = "deferred"  # left to an idle runner of its pool for a grace
    RETRIED = "retried"
    DEAD_LETTERED = "dead_lettered"
    DUPLICATE = "duplicate"
    RETRIED_AFTER_INTERRUPTION = "retried_after_interruption"
    NOT_RETRIED = "not_retried"  # lost to an interruption, in a pool that does not retry such jobs


@dataclass
class BatchReport:
    outcomes: dict[Outcome, int] = field(default_factory=lambda: defaultdict(int))
    instances: list[str] = field(default_factory=list)

    def add(self, outcome: Outcome, n: int = 1) -> None:
        self.outcomes[outcome] += n

    def as_dict(self) -> dict[str, int]:
        return {o.value: n for o, n in self.outcomes.items() if n}


@dataclass(frozen=True)
class _Matched:
    job: QueuedJob
    pool: PoolConfig
    tags: tuple[str, ...]


class ScaleUp:
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
        self._launcher = launcher
        self._tokens = tokens
        self._queue = queue
        self._dead_letters = dead_letters
        self._policy = policy or RetryPolicy()
        self._clock = clock
        self._new_launch_id = new_launch_id
        self._owner = owner

    # -- the batch -------------------------------------------------------------------------------------------

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
        fresh_matched = self._defer_to_idle_runners(self._read_and_match(fresh, report), report)
        matched = fresh_matched + self._admit_waiting(waiting, report)
        by_pool: dict[str, list[_Matched]] = defaultdict(list)
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
                self._retry(job, None, reason, report)
            return False
        return True

    def _read_and_match(self, jobs: Sequence[QueuedJob], report: BatchReport) -> list[_Matched]:
        with ThreadPoolExecutor(max_workers=min(GITLAB_WORKERS, max(1, len(jobs)))) as pool:
            answers = list(pool.map(self._read_job, jobs))
        matched: list[_Matched] = []
        for job, answer in zip(jobs, answers, strict=True):
            if isinstance(answer, RetryableError):
                self._retry(job, None, answer.reason, report)
                continue
            if answer is None or answer.status != "pending":
                status = answer.status if answer else "gone"
                self._store.claims.mark_job(job.project_id, job.job_id, Outcome.NOT_PENDING.value, gitlab_status=status)
                logger.info("job no longer pending", extra={**_job_log(job), "gitlab_status": status})
                count("JobsNotPending")
                report.add(Outcome.NOT_PENDING)
                continue
            pool_config = match_pool(answer.tags, self._config.pools)
            if pool_config is None:
                self._store.claims.mark_job(job.project_id, job.job_id, Outcome.UNMATCHED.value, tags=list(answer.tags))
                logger.warning("no pool can run job", extra={**_job_log(job), "tags": list(answer.tags)})
                count("JobsUnmatched")
                report.add(Outcome.UNMATCHED)
                continue
            count("JobsMatched")
            matched.append(_Matched(job, pool_config, answer.tags))
        return matched

    def _defer_to_idle_runners(self, matched: list[_Matched], report: BatchReport) -> list[_Matched]:
        """Leave jobs to their pools' idle runners for a grace; returns the jobs to launch for now.

        An idle runner with builds left asks GitLab for the next job by itself, so launching for a job it is about
        to take would start an instance with nothing to do. A deferred job comes back after the grace, is read
        from GitLab again, and launches only if it is still pending.
        """
        by_pool: dict[str, list[_Matched]] = defaultdict(list)
        for item in matched:
            by_pool[item.pool.name].append(item)
        launch: list[_Matched] = []
        for pool_name, items in by_pool.items():
            fresh = sum(1 for item in items if not item.job.graced)
            idle = self._count_idle_runners(pool_name, fresh) if fresh else 0
            deferred = leave_to_idle_runners([(item.job.job_id, item.job.graced) for item in items], idle)
            for item in items:
                if item.job.job_id not in deferred:
                    launch.append(item)
                    continue
                count("JobsDeferredToIdleRunners")
                self._requeue(item.job.but(graced=True), self._policy.idle_grace, report, Outcome.DEFERRED)
        return launch

    def _count_idle_runners(self, pool: str, limit: int) -> int:
        """A pool's idle runners, or 0 when the index cannot say: launching as if none were idle is what the fleet
        did before it counted them. DynamoDB refuses reads of an index it is still building (after bootstrap added
        it to an existing table) with a ValidationException, for minutes on a large table."""
        try:
            return self._store.capacity.idle_runners(pool, limit=limit)
        except ClientError as exc:
            logger.warning("idle runners not counted", extra={"pool": pool, "error_code": error_code(exc)})
            count("IdleRunnersUncounted")
            return 0

    def _admit_waiting(self, jobs: Sequence[QueuedJob], report: BatchReport) -> list[_Matched]:
        """Jobs back from waiting for capacity: as many as their pool has room for go on, the rest wait again.

        They were read from GitLab and matched before they waited; asking GitLab again on every turn would spend
        its API rate limit on jobs that cannot launch anyway. Whether a job is still pending is checked by the
        claim itself, against what the webhooks recorded. Those that wait again are first looked up in the table
        (one BatchGetItem per 100): a copy of a job that needs no launch any more (launched by another copy of its
        message, finished, or settled) is dropped, or it would wait for as long as its pool stays full.
        """
        by_pool: dict[str, list[QueuedJob]] = defaultdict(list)
        for job in jobs:
            by_pool[job.pool].append(job)
        admitted: list[_Matched] = []
        for pool_name, group in by_pool.items():
            pool = self._config.pool(pool_name)
            room = max(0, pool.max_runners - self._store.capacity.leases(pool_name))
            admitted += [_Matched(job, pool, job.tags) for job in group[:room]]
            over = group[room:]
            settled = (
                self._store.claims.jobs_needing_no_launch([(job.project_id, job.job_id) for job in over])
                if over
                else set()
            )
            for job in over:
                if (job.project_id, job.job_id) in settled:
                    logger.info("waiting copy of a job that needs no launch dropped", extra=_job_log(job))
                    report.add(Outcome.DUPLICATE)
                    continue
                self._wait(_Matched(job, pool, job.tags), report)
        return admitted

    def _read_job(self, job: QueuedJob) -> JobInfo | RetryableError | None:
        try:
            return self._gitlab.job(job.project_id, job.job_id)
        except RetryableError as exc:
            return exc

    def _retry_interrupted(self, job: QueuedJob, report: BatchReport) -> None:
        """Retry, once, a job a runner lost when EC2 interrupted its spot instance, if the runner's pool allows it.

        The job's record takes the retry first (a conditional write naming the message's delivery), so another
        message for the same job (a second hook's delivery of the failure) does nothing, while this message, back
        after a failed GitLab call, tries again. GitLab answers with a new pending job, whose Job Hook is queued
        and launched for like any other.
        """
        pool = next((p for p in self._config.pools if p.name == job.retry_interrupted), None)
        log = {**_job_log(job), "pool": job.retry_interrupted}
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
            self._retry(job, pool, exc.reason, report)
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

    # -- one pool ----------------------------------------------------------------------------------------------

    def _scale_pool(self, pool: PoolConfig, items: list[_Matched], report: BatchReport) -> None:
        launch_id = self._new_launch_id()
        claimed: list[_Matched] = []
        held: dict[str, list[_Matched]] = defaultdict(list)
        claimed_at: dict[str, float] = {}
        # One conditional write per job, independent of each other: made together, so a batch's claims cost one
        # round trip's time rather than one per job.
        with ThreadPoolExecutor(max_workers=min(WRITE_WORKERS, len(items))) as workers:
            claims = list(
                workers.map(lambda i: self._store.claims.claim_job(i.job.project_id, i.job.job_id, launch_id), items)
            )
        for item, made in zip(items, claims, strict=True):
            claim = self._judge_claim(item, made, report)
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
            self._launch(pool, launch_id, claimed, report)

    def _claim(self, item: _Matched, launch_id: str, report: BatchReport) -> Claim | None:
        """Claim a job for ``launch_id``: the claim (ours or another launch's), or None when it needs no launch."""
        return self._judge_claim(
            item, self._store.claims.claim_job(item.job.project_id, item.job.job_id, launch_id), report
        )

    def _judge_claim(self, item: _Matched, claim: Claim, report: BatchReport) -> Claim | None:
        """The claim made for a job, or None (recorded and reported) when the job needs no launch."""
        if claim.outcome is ClaimOutcome.DEAD_LETTERED:
            logger.info("job already dead-lettered; copy dropped", extra=_job_log(item.job))
            report.add(Outcome.DUPLICATE)
            return None
        if claim.outcome is ClaimOutcome.NOT_PENDING:
            self._store.claims.mark_job(item.job.project_id, item.job.job_id, Outcome.NOT_PENDING.value)
            logger.info("job no longer pending", extra=_job_log(item.job))
            count("JobsNotPending")
            report.add(Outcome.NOT_PENDING)
            return None
        return claim

    def _held(
        self,
        pool: PoolConfig,
        holder: str,
        items: list[_Matched],
        claimed_at: float,
        launch_id: str,
        report: BatchReport,
    ) -> list[_Matched]:
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
            reclaimed: list[_Matched] = []
            for item in items:
                self._store.claims.release_claim(item.job.project_id, item.job.job_id, holder)
                claim = self._claim(item, launch_id, report)
                if claim is not None and claim.outcome is ClaimOutcome.CLAIMED:
                    reclaimed.append(item)
                elif claim is not None:
                    # Another invocation reclaimed it first.
                    self._requeue(item.job, self._policy.lease_wait_delay(0), report, Outcome.DUPLICATE)
            return reclaimed
        if decision is HeldJob.RESUME and launch is not None and self._take_over(holder):
            self._resume(pool, launch, items, report)
            return []
        # A live invocation is at it (a copy delivered twice at once): come back once it is done.
        for item in items:
            self._requeue(item.job, self._policy.lease_wait_delay(0), report, Outcome.DUPLICATE)
        return []

    def _take_over(self, launch_id: str) -> bool:
        return self._store.launches.take_over_launch(launch_id, stale_before=self._clock() - STALE_LAUNCH_SECONDS)

    def _launch(self, pool: PoolConfig, launch_id: str, items: list[_Matched], report: BatchReport) -> None:
        granted = self._store.capacity.acquire_leases(
            pool.name,
            len(items),
            pool.max_runners,
            launch_id,
            plan=lambda take: self._plan(pool, launch_id, take).to_json(),
        )
        running, waiting = items[:granted], items[granted:]
        for item in waiting:
            self._store.claims.release_claim(item.job.project_id, item.job.job_id, launch_id)
            self._wait(item, report)
        if not running:
            return
        log = {"pool": pool.name, "launch_id": launch_id, "count": len(running)}
        try:
            result = self._launcher.execute(self._plan(pool, launch_id, len(running)))
        except LaunchOutcomeUnknownError as exc:
            self._keep_for_resume(pool, launch_id, running, exc.reason, report, finished=True)
            return
        except RetryableError as exc:
            self._store.capacity.give_back_launch_leases(
                launch_id, pool.name, len(running), len(running), finished=True, reason=exc.reason
            )
            count("LaunchErrors")
            logger.warning("launch failed; jobs re-queued", extra={**log, "reason": exc.reason})
            for item in running:
                self._store.claims.release_claim(item.job.project_id, item.job.job_id, launch_id)
                self._retry(item.job, pool, exc.reason, report)
            return
        except LaunchRefusedError as exc:
            self._store.capacity.give_back_launch_leases(
                launch_id, pool.name, len(running), len(running), finished=True, reason=exc.code
            )
            self._refuse(pool, launch_id, running, exc.code, exc.reason, report)
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
            self._complete(
                pool, launch_id, instances, running[: len(instances)], report, adopting=False, held=len(instances)
            )
        if unknown:
            # The on-demand fallback got no answer: its instances may exist. Their leases and jobs stay with
            # this launch, which the jobs resume, sending the same fallback request again.
            reason = "on-demand fallback did not answer"
            self._keep_for_resume(pool, launch_id, unknown, reason, report, finished=not instances)

    def _short(
        self,
        pool: PoolConfig,
        launch_id: str,
        result: LaunchResult,
        held: int,
        missing: list[_Matched],
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
            self._refuse(pool, launch_id, missing, codes[0], reason, report, counted=True)
            return
        logger.warning("launch short of capacity", extra={**log, "made": made, "reason": reason})
        for item in missing:
            self._store.claims.release_claim(item.job.project_id, item.job.job_id, launch_id)
            self._retry(item.job, pool, reason, report)

    def _keep_for_resume(
        self,
        pool: PoolConfig,
        launch_id: str,
        items: list[_Matched],
        reason: str,
        report: BatchReport,
        *,
        finished: bool,
    ) -> None:
        """A CreateFleet of this launch got no answer, so instances may exist that nobody has heard of.

        Giving the leases back and launching the jobs again under a new launch id would leave those instances to
        nobody, beyond the pool's limit. Instead the launch keeps its leases and the jobs their claims; the jobs
        come back (an attempt spent) and resume it, sending the same requests with the same ``ClientToken``, which
        EC2 answers with whatever the lost call made. Only when a job has no attempt left does the launch give
        its leases back (``finished`` marks it failed), its jobs going to the dead-letter queue.
        """
        count("LaunchErrors")
        log = {"pool": pool.name, "launch_id": launch_id, "reason": reason}
        if any(item.job.attempt >= pool.max_launch_attempts for item in items):
            launch = self._store.launches.get_launch(launch_id)
            held = launch.leases if launch else 0
            self._store.capacity.give_back_launch_leases(
                launch_id, pool.name, held, held, finished=finished, reason=reason
            )
            logger.warning("launch outcome unknown and its jobs out of attempts; leases given back", extra=log)
            for item in items:
                self._store.claims.release_claim(item.job.project_id, item.job.job_id, launch_id)
                self._retry(item.job, pool, reason, report)
            return
        self._store.launches.mark_launch_incomplete(launch_id, reason)
        logger.warning("launch outcome unknown; its jobs will resume it with the same request", extra=log)
        for item in items:
            self._retry(item.job, pool, reason, report)

    def _resume(self, pool: PoolConfig, launch: LaunchRecord, items: list[_Matched], report: BatchReport) -> None:
        """Finish a launch that stopped part way, now that this invocation owns it.

        The instances tagged with its launch id are adopted. When they are fewer than it planned and it still
        holds leases, its requests are sent again exactly as first sent (the plan on its record): EC2 answers
        the calls that completed with their first answers, and launches only what was never launched.
        """
        launch_id, held = launch.launch_id, launch.leases
        logger.warning("resuming an unfinished launch", extra={"pool": pool.name, "launch_id": launch_id})
        count("LaunchesResumed")
        # A launch recorded without its plan made no CreateFleet call yet: planning it now sends nothing different.
        plan = LaunchPlan.from_json(launch.plan) if launch.plan else self._plan(pool, launch_id, held)
        instances = self._launcher.find_launched(launch_id)
        if held and len(instances) < plan.count:
            relaunched = self._relaunch(pool, launch_id, plan, items, held, instances, report)
            if relaunched is None:
                return
            instances = relaunched
        self._complete(pool, launch_id, instances, items, report, adopting=True, held=held)

    def _relaunch(
        self,
        pool: PoolConfig,
        launch_id: str,
        plan: LaunchPlan,
        items: list[_Matched],
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
                self._retry(item.job, pool, exc.reason, report)
            return None
        except LaunchRefusedError as exc:
            if found:
                return found
            self._store.capacity.give_back_launch_leases(
                launch_id, pool.name, held, held, finished=True, reason=exc.code
            )
            self._refuse(pool, launch_id, items, exc.code, exc.reason, report)
            return None
        if result.fallback_unknown and not last_attempt:
            self._store.launches.mark_launch_incomplete(launch_id, "on-demand fallback did not answer")
            for item in items:
                self._retry(item.job, pool, "on-demand fallback did not answer", report)
            return None
        merged = {instance.instance_id: instance for instance in result.instances}
        merged.update({instance.instance_id: instance for instance in found})
        return sorted(merged.values(), key=lambda instance: instance.instance_id)

    def _refuse(
        self,
        pool: PoolConfig,
        launch_id: str,
        items: list[_Matched],
        code: str,
        reason: str,
        report: BatchReport,
        *,
        counted: bool = False,
        message: str = "launch refused; jobs dead-lettered",
    ) -> None:
        """EC2 refused the launch for good: its jobs are released and dead-lettered with the AWS error code."""
        if not counted:
            count(f"LaunchError.{code}")
        logger.error(
            message,
            extra={"pool": pool.name, "launch_id": launch_id, "error_code": code, "reason": reason},
        )
        for item in items:
            self._store.claims.release_claim(item.job.project_id, item.job.job_id, launch_id)
            self._dead_letter(item.job, reason, report, error_code=code)

    # -- runners for launched instances --------------------------------------------------------------------------

    def _complete(
        self,
        pool: PoolConfig,
        launch_id: str,
        instances: list[LaunchedInstance],
        items: list[_Matched],
        report: BatchReport,
        *,
        adopting: bool,
        held: int,
        warm: bool = False,
    ) -> None:
        """Record the launch's instances, then give each its GitLab runner and token (see the module docstring).

        ``held`` is how many leases the launch record holds: one moves to each new runner record, the rest
        (instances never made, or terminated before they were recorded) go back to the pool.
        """
        try:
            alive, ready = self._record(pool, launch_id, instances, adopting=adopting, held=held, warm=warm)
        except ClientError as exc:
            # The instances exist and the launch record still holds their leases.
            self._halt(pool, launch_id, items, exc, "recording runners", report)
            return
        need_identity = [i for i in alive if i.instance_id not in ready]
        with ThreadPoolExecutor(max_workers=min(GITLAB_WORKERS, max(1, len(need_identity)))) as workers:
            identities = dict(
                zip(
                    [i.instance_id for i in need_identity],
                    workers.map(lambda i: self._runner_identity(pool, i, adopting), need_identity),
                    strict=True,
                )
            )
        failures = [identity.reason for identity in identities.values() if isinstance(identity, RetryableError)]
        created = {i: identity for i, identity in identities.items() if isinstance(identity, RunnerCredentials)}
        try:
            ready += self._store_identities(pool, created)
        except ClientError as exc:
            if not _transient(exc):
                self._halt(pool, launch_id, items, exc, "storing runner tokens", report)
                return
            failures.append(f"storing runner tokens failed with {error_code(exc)}")
        if failures:
            # The instances are recorded and hold their leases; the jobs come back to finish their runners.
            self._store.launches.mark_launch_incomplete(launch_id, failures[0])
            for item in items:
                self._retry(item.job, pool, failures[0], report)
            return
        launched, surplus = items[: len(ready)], items[len(ready) :]
        for item in surplus:
            # Its instance was terminated before its runner was ready: the job needs another launch.
            self._store.claims.release_claim(item.job.project_id, item.job.job_id, launch_id)
            self._retry(item.job, pool, "instance terminated before its runner was ready", report)
        if ready:
            self._store.launches.finish_launch(launch_id, ready)
        else:
            self._store.launches.fail_launch(launch_id, "instances terminated before their runners were ready")
        report.instances.extend(ready)
        report.add(Outcome.LAUNCHED, len(launched))
        by_id = {i.instance_id: i for i in instances}
        now = self._clock()
        for item, instance_id in zip(launched, ready, strict=False):
            logger.info(
                "runner launched",
                extra={
                    **_job_log(item.job),
                    "pool": pool.name,
                    "launch_id": launch_id,
                    "instance_id": instance_id,
                    "lifecycle": by_id[instance_id].lifecycle.value,
                    "instance_type": by_id[instance_id].instance_type,
                    "queue_wait": round(now - item.job.received_at, 3),
                },
            )

    def _record(
        self,
        pool: PoolConfig,
        launch_id: str,
        instances: list[LaunchedInstance],
        *,
        adopting: bool,
        held: int,
        warm: bool = False,
    ) -> tuple[list[LaunchedInstance], list[str]]:
        """Runner records for the instances not recorded yet; returns the live instances and the ready ones.

        Recorded before any GitLab runner or token exists, so the state-change handler always finds what to
        clean up; an instance terminated before this write has a tombstone, which refuses it.
        """
        known = self._store.runners.runners([i.instance_id for i in instances]) if adopting else {}
        new = [i for i in instances if i.instance_id not in known]
        now = self._clock()
        records = [
            RunnerRecord(
                instance_id=i.instance_id,
                pool=pool.name,
                launch_id=launch_id,
                lifecycle=i.lifecycle.value,
                instance_type=i.instance_type,
                subnet_id=i.subnet_id,
                launched_at=now,
                boot_deadline_at=now + pool.boot_deadline_seconds,
                token_key=self._tokens.key(pool.name, i.instance_id),
                max_builds=pool.max_builds,
                warm=warm,
            )
            for i in new
        ]
        refused = self._store.runners.record_runners(launch_id, records)
        dead = refused | {i for i, r in known.items() if r.terminated}
        alive = [i for i in instances if i.instance_id not in dead]
        leftover = held - (len(new) - len(refused))
        if leftover > 0:
            # Leases for instances the launch will not run: never made, or terminated before they were recorded.
            self._store.capacity.give_back_launch_leases(
                launch_id, pool.name, leftover, leftover, finished=not alive, reason="instances terminated"
            )
        for instance in new:
            if instance.instance_id not in refused:
                count(f"Launches.{instance.lifecycle.value}")
                count(f"Launches.{instance.instance_type}")
        ready = [
            i.instance_id for i in alive if i.instance_id in known and known[i.instance_id].gitlab_runner_id is not None
        ]
        return alive, ready

    def _store_identities(self, pool: PoolConfig, created: dict[str, RunnerCredentials]) -> list[str]:
        """Tokens, then identities, of new GitLab runners; returns the instances whose runner is now ready.

        The identity write is refused once the instance is terminated; the token and GitLab runner just made
        are then deleted here, since nobody else knows them. On an AWS error, the runners not stored yet are
        deleted from GitLab (best effort) before it propagates: the retry finds or makes them again.
        """
        deadline_at = self._clock() + pool.boot_deadline_seconds

        def store(instance_id: str, credentials: RunnerCredentials) -> bool | ClientError:
            try:
                self._tokens.put(self._tokens.key(pool.name, instance_id), instance_id, credentials.token, deadline_at)
                if self._store.runners.set_runner_identity(instance_id, credentials.runner_id):
                    return True
                self._discard_runner(pool, instance_id, credentials.runner_id)
                return False
            except ClientError as exc:
                return exc

        # Each instance's two writes depend on nothing another instance does: the instances are stored together.
        with ThreadPoolExecutor(max_workers=max(1, min(WRITE_WORKERS, len(created)))) as workers:
            stored = dict(zip(created, workers.map(lambda pair: store(*pair), created.items()), strict=True))
        ready = [instance_id for instance_id, done in stored.items() if done is True]
        left = {i: created[i] for i, done in stored.items() if isinstance(done, ClientError)}
        if left:
            for credentials in left.values():
                try:
                    self._gitlab.delete_runner(credentials.runner_id)
                except RetryableError:
                    # Found again by its description when the launch is resumed, or deleted by reconcile as an orphan.
                    logger.warning("GitLab runner of an unfinished launch left", extra={"id": credentials.runner_id})
            raise next(done for done in stored.values() if isinstance(done, ClientError))
        return ready

    def _halt(
        self, pool: PoolConfig, launch_id: str, items: list[_Matched], exc: ClientError, step: str, report: BatchReport
    ) -> None:
        """An AWS error after the instances exist. Their leases cannot go back while they run; the launch record
        keeps them with the reason: transient, the jobs come back and resume it; refused for good, the launch
        is failed (for reconcile to give back) and the jobs are released and dead-lettered."""
        code = error_code(exc) or "UnknownError"
        reason = f"{step} failed with {code}"
        if _transient(exc):
            self._store.launches.mark_launch_incomplete(launch_id, reason)
            for item in items:
                self._retry(item.job, pool, reason, report)
            return
        self._store.launches.fail_launch(launch_id, reason)
        self._refuse(
            pool,
            launch_id,
            items,
            code,
            reason,
            report,
            message="launch failed after its instances were made; jobs dead-lettered",
        )

    def _discard_runner(self, pool: PoolConfig, instance_id: str, runner_id: int) -> None:
        """The instance was terminated while its runner was made: delete what was made for it."""
        logger.info("instance terminated before its runner was ready", extra={"instance_id": instance_id})
        self._tokens.delete(self._tokens.key(pool.name, instance_id))
        try:
            self._gitlab.delete_runner(runner_id)
        except RetryableError as exc:
            # Left on the terminated record, marked, for a retried event or reconcile.
            self._store.runners.note_orphan_runner(instance_id, runner_id)
            logger.warning("GitLab runner left for cleanup", extra={"instance_id": instance_id, "reason": exc.reason})

    def _runner_identity(
        self, pool: PoolConfig, instance: LaunchedInstance, adopting: bool
    ) -> RunnerCredentials | RetryableError:
        """The new GitLab runner of an instance, or the RetryableError that prevented it."""
        description = runner_description(self._config.fleet, pool.name, instance.instance_id)
        try:
            if adopting:
                existing = self._gitlab.find_runner(description, pool.tags)
                if existing is not None:
                    return RunnerCredentials(existing, self._gitlab.reset_runner_token(existing))
            return self._gitlab.create_runner(
                description=description,
                tags=pool.tags,
                run_untagged=pool.run_untagged,
                maximum_timeout=pool.job_timeout_seconds,
                access_level=pool.access_level.value,
                maintenance_note=self._owner.note(self._clock()) if self._owner is not None else "",
            )
        except RetryableError as exc:
            return exc

    # -- warm runners ------------------------------------------------------------------------------------------

    def launch_warm(self, pool: PoolConfig, wanted: int) -> list[str]:
        """Launch up to ``wanted`` idle runners for ``pool`` (reconcile keeps warm pools topped up), through the
        same capacity leases as jobs, so a pool never exceeds max_runners. Returns the instances made ready.

        No job waits on them: what EC2 did not make goes back at once, and a launch that stops part way is left
        ``incomplete`` for reconcile to settle once it is stale.
        """
        self._tokens.learn_roles([pool.name])
        launch_id = self._new_launch_id()
        granted = self._store.capacity.acquire_leases(
            pool.name,
            wanted,
            pool.max_runners,
            launch_id,
            plan=lambda take: self._plan(pool, launch_id, take).to_json(),
        )
        if not granted:
            return []
        try:
            result = self._launcher.execute(self._plan(pool, launch_id, granted))
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
        self._complete(pool, launch_id, instances, [], report, adopting=False, held=len(instances), warm=True)
        return list(report.instances)

    # -- re-queueing -------------------------------------------------------------------------------------------

    def _template(self, pool: PoolConfig) -> LaunchTemplateRef:
        return LaunchTemplateRef(launch_template_name(self._config.fleet, pool.name))

    def _plan(self, pool: PoolConfig, launch_id: str, count: int) -> LaunchPlan:
        return self._launcher.plan(pool, self._template(pool), launch_id, count)

    def _wait(self, item: _Matched, report: BatchReport) -> None:
        """The pool is full: wait for capacity. Waiting is not failing, so it spends no attempt."""
        count("LeaseWaits")
        job = item.job.but(waits=item.job.waits + 1, pool=item.pool.name, tags=item.tags)
        self._requeue(job, self._policy.lease_wait_delay(item.job.waits), report, Outcome.WAITING)

    def _retry(self, job: QueuedJob, pool: PoolConfig | None, reason: str, report: BatchReport) -> None:
        max_attempts = pool.max_launch_attempts if pool else DEFAULT_MAX_ATTEMPTS
        if job.attempt >= max_attempts:
            self._dead_letter(job, reason, report)
            return
        count("JobsRetried")
        retried = job.but(attempt=job.attempt + 1, last_error=reason)
        self._requeue(retried, self._policy.backoff_delay(job.attempt), report, Outcome.RETRIED)

    def _dead_letter(self, job: QueuedJob, reason: str, report: BatchReport, *, error_code: str = "") -> None:
        self._dead_letters.send(job.but(last_error=reason))
        self._store.claims.mark_job_dead_lettered(job.project_id, job.job_id, reason, error_code)
        logger.error(
            "job dead-lettered",
            extra={**_job_log(job), "reason": reason, "error_code": error_code, "attempts": job.attempt},
        )
        count("JobsDeadLettered")
        report.add(Outcome.DEAD_LETTERED)

    def _requeue(self, job: QueuedJob, delay: int, report: BatchReport, outcome: Outcome) -> None:
        self._queue.send(job, delay_seconds=delay)
        logger.info(
            "job re-queued", extra={**_job_log(job), "delay": delay, "outcome": outcome.value, "reason": job.last_error}
        )
        report.add(outcome)


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


def _transient(exc: ClientError) -> bool:
    """An AWS error a later attempt may not meet (throttling, a conflict, AWS's own 5xx): also a transaction
    DynamoDB cancelled only for conflicts or throttling, which the store tried again until it gave up."""
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return (
        error_code(exc) in _TRANSIENT_AWS_ERROR_CODES
        or transiently_cancelled(exc)
        or (isinstance(status, int) and status >= 500)
    )


def _job_log(job: QueuedJob) -> dict[str, Any]:
    return {"project_id": job.project_id, "job_id": job.job_id, "attempt": job.attempt}


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
