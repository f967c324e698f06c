"""Jobs that do not launch now go back: to wait for capacity, to be tried again after a backoff, or to the
dead-letter queue with their reason.

Waiting is not failing: a job whose pool is full, or drained by the operator (``fleetctl drain``), spends no
attempt. A retry spends one, and a job out of attempts
is dead-lettered and marked so on its record, so that no copy of its message claims it again. A launch EC2
refused for good releases its jobs' claims and dead-letters them with the AWS error code. A launch whose
CreateFleet got no answer keeps its leases and its jobs' claims, for the jobs to come back and resume it.
"""

from __future__ import annotations

from chalicelib.config import PoolConfig
from chalicelib.jobs_queue import JobQueue, QueuedJob
from chalicelib.observability import count, logger
from chalicelib.scaling.batch import BatchReport, Matched, Outcome, job_log
from chalicelib.scaling.policy import RetryPolicy
from chalicelib.scaling.store import ScaleStore

DEFAULT_MAX_ATTEMPTS = 8


class GiveBack:
    """Re-queues, retries and dead-letters the jobs of a batch that do not launch now."""

    def __init__(self, store: ScaleStore, queue: JobQueue, dead_letters: JobQueue, policy: RetryPolicy) -> None:
        self._store = store
        self._queue = queue
        self._dead_letters = dead_letters
        self._policy = policy

    def keep_for_resume(
        self,
        pool: PoolConfig,
        launch_id: str,
        items: list[Matched],
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
                self.retry(item.job, pool, reason, report)
            return
        self._store.launches.mark_launch_incomplete(launch_id, reason)
        logger.warning("launch outcome unknown; its jobs will resume it with the same request", extra=log)
        for item in items:
            self.retry(item.job, pool, reason, report)

    def refuse(
        self,
        pool: PoolConfig,
        launch_id: str,
        items: list[Matched],
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
            self.dead_letter(item.job, reason, report, error_code=code)

    def wait(self, item: Matched, report: BatchReport, *, drained: bool = False) -> None:
        """The pool is full, or drained: wait for capacity (or the undrain). Waiting is not failing, so it spends no
        attempt; each turn, the job's record is looked up again (:meth:`Admission.admit_waiting`), so a job that
        finished or was cancelled meanwhile stops waiting. A drained pool's waits count as ``DrainWaits``, not as
        ``LeaseWaits``, which say a pool is too small."""
        count("DrainWaits" if drained else "LeaseWaits")
        job = item.job.but(waits=item.job.waits + 1, pool=item.pool.name, tags=item.tags)
        self.requeue(job, self._policy.lease_wait_delay(item.job.waits), report, Outcome.WAITING)

    def retry(self, job: QueuedJob, pool: PoolConfig | None, reason: str, report: BatchReport) -> None:
        max_attempts = pool.max_launch_attempts if pool else DEFAULT_MAX_ATTEMPTS
        if job.attempt >= max_attempts:
            self.dead_letter(job, reason, report)
            return
        count("JobsRetried")
        retried = job.but(attempt=job.attempt + 1, last_error=reason)
        self.requeue(retried, self._policy.backoff_delay(job.attempt), report, Outcome.RETRIED)

    def dead_letter(self, job: QueuedJob, reason: str, report: BatchReport, *, error_code: str = "") -> None:
        self._dead_letters.send(job.but(last_error=reason))
        self._store.claims.mark_job_dead_lettered(job.project_id, job.job_id, reason, error_code)
        logger.error(
            "job dead-lettered",
            extra={**job_log(job), "reason": reason, "error_code": error_code, "attempts": job.attempt},
        )
        count("JobsDeadLettered")
        report.add(Outcome.DEAD_LETTERED)

    def requeue(self, job: QueuedJob, delay: int, report: BatchReport, outcome: Outcome) -> None:
        self._queue.send(job, delay_seconds=delay)
        logger.info(
            "job re-queued", extra={**job_log(job), "delay": delay, "outcome": outcome.value, "reason": job.last_error}
        )
        report.add(outcome)
