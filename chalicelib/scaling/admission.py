"""Which of a batch's jobs go on to a launch: read from GitLab and matched to a pool, left to the pool's idle
runners for a grace, or, back from waiting for capacity, let through as far as their pool has room.

The decisions themselves are pure functions of :mod:`chalicelib.scaling.policy` (``match_pool``,
``leave_to_idle_runners``); this reads what they need (GitLab's view of each job, a pool's idle runners and
leases) and acts on what they decide. A job found to need no launch, by GitLab or by its claim, is recorded as
such here.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from botocore.exceptions import ClientError

from chalicelib.aws import error_code
from chalicelib.config import FleetConfig
from chalicelib.errors import RetryableError
from chalicelib.gitlab_api import GitLabApi, JobInfo
from chalicelib.jobs_queue import QueuedJob
from chalicelib.observability import count, logger
from chalicelib.scaling.batch import GITLAB_WORKERS, BatchReport, Matched, Outcome, job_log
from chalicelib.scaling.giving_back import GiveBack
from chalicelib.scaling.policy import RetryPolicy, leave_to_idle_runners, match_pool
from chalicelib.scaling.store import ScaleStore
from chalicelib.scaling.store.records import Claim, ClaimOutcome


class Admission:
    """Reads, matches, defers and admits a batch's jobs; judges the claim made for each."""

    def __init__(
        self, config: FleetConfig, store: ScaleStore, gitlab: GitLabApi, give_back: GiveBack, policy: RetryPolicy
    ) -> None:
        self._config = config
        self._store = store
        self._gitlab = gitlab
        self._give_back = give_back
        self._policy = policy

    def read_and_match(self, jobs: Sequence[QueuedJob], report: BatchReport) -> list[Matched]:
        with ThreadPoolExecutor(max_workers=min(GITLAB_WORKERS, max(1, len(jobs)))) as pool:
            answers = list(pool.map(self._read_job, jobs))
        matched: list[Matched] = []
        for job, answer in zip(jobs, answers, strict=True):
            if isinstance(answer, RetryableError):
                self._give_back.retry(job, None, answer.reason, report)
                continue
            if answer is None or answer.status != "pending":
                status = answer.status if answer else "gone"
                self._store.claims.mark_job(job.project_id, job.job_id, Outcome.NOT_PENDING.value, gitlab_status=status)
                logger.info("job no longer pending", extra={**job_log(job), "gitlab_status": status})
                count("JobsNotPending")
                report.add(Outcome.NOT_PENDING)
                continue
            pool_config = match_pool(answer.tags, self._config.pools)
            if pool_config is None:
                self._store.claims.mark_job(job.project_id, job.job_id, Outcome.UNMATCHED.value, tags=list(answer.tags))
                logger.warning("no pool can run job", extra={**job_log(job), "tags": list(answer.tags)})
                count("JobsUnmatched")
                report.add(Outcome.UNMATCHED)
                continue
            count("JobsMatched")
            matched.append(Matched(job, pool_config, answer.tags))
        return matched

    def defer_to_idle_runners(self, matched: list[Matched], report: BatchReport) -> list[Matched]:
        """Leave jobs to their pools' idle runners for a grace; returns the jobs to launch for now.

        An idle runner with builds left asks GitLab for the next job by itself, so launching for a job it is about
        to take would start an instance with nothing to do. A deferred job comes back after the grace, is read
        from GitLab again, and launches only if it is still pending.
        """
        by_pool: dict[str, list[Matched]] = defaultdict(list)
        for item in matched:
            by_pool[item.pool.name].append(item)
        launch: list[Matched] = []
        for pool_name, items in by_pool.items():
            fresh = sum(1 for item in items if not item.job.graced)
            idle = self._count_idle_runners(pool_name, fresh) if fresh else 0
            deferred = leave_to_idle_runners([(item.job.job_id, item.job.graced) for item in items], idle)
            for item in items:
                if item.job.job_id not in deferred:
                    launch.append(item)
                    continue
                count("JobsDeferredToIdleRunners")
                self._give_back.requeue(item.job.but(graced=True), self._policy.idle_grace, report, Outcome.DEFERRED)
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

    def admit_waiting(self, jobs: Sequence[QueuedJob], report: BatchReport) -> list[Matched]:
        """Jobs back from waiting for capacity: as many as their pool has room for go on, the rest wait again (all of
        them while the pool is drained).

        They were read from GitLab and matched before they waited; asking GitLab again on every turn would spend
        its API rate limit on jobs that cannot launch anyway. Whether a job is still pending is checked by the
        claim itself, against what the webhooks recorded. Those that wait again are first looked up in the table
        (one BatchGetItem per 100): a copy of a job that needs no launch any more (launched by another copy of its
        message, finished, or settled) is dropped, or it would wait for as long as its pool stays full.
        """
        by_pool: dict[str, list[QueuedJob]] = defaultdict(list)
        for job in jobs:
            by_pool[job.pool].append(job)
        admitted: list[Matched] = []
        for pool_name, group in by_pool.items():
            pool = self._config.pool(pool_name)
            # One read of the pool's counter: its leases, and whether the operator drained it (no room at all).
            counter = self._store.capacity.pool_counter(pool_name)
            room = 0 if counter.drained else max(0, pool.max_runners - counter.leases)
            admitted += [Matched(job, pool, job.tags) for job in group[:room]]
            over = group[room:]
            settled = (
                self._store.claims.jobs_needing_no_launch([(job.project_id, job.job_id) for job in over])
                if over
                else set()
            )
            for job in over:
                if (job.project_id, job.job_id) in settled:
                    logger.info("waiting copy of a job that needs no launch dropped", extra=job_log(job))
                    report.add(Outcome.DUPLICATE)
                    continue
                self._give_back.wait(Matched(job, pool, job.tags), report, drained=counter.drained)
        return admitted

    def _read_job(self, job: QueuedJob) -> JobInfo | RetryableError | None:
        try:
            return self._gitlab.job(job.project_id, job.job_id)
        except RetryableError as exc:
            return exc

    def judge_claim(self, item: Matched, claim: Claim, report: BatchReport) -> Claim | None:
        """The claim made for a job, or None (recorded and reported) when the job needs no launch."""
        if claim.outcome is ClaimOutcome.DEAD_LETTERED:
            logger.info("job already dead-lettered; copy dropped", extra=job_log(item.job))
            report.add(Outcome.DUPLICATE)
            return None
        if claim.outcome is ClaimOutcome.NOT_PENDING:
            self._store.claims.mark_job(item.job.project_id, item.job.job_id, Outcome.NOT_PENDING.value)
            logger.info("job no longer pending", extra=job_log(item.job))
            count("JobsNotPending")
            report.add(Outcome.NOT_PENDING)
            return None
        return claim
