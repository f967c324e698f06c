"""Runners for a launch's instances: their records, then their GitLab runners and tokens, then their identities.

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

An AWS error after the instances exist cannot give their leases back (the instances hold them): the launch record
is left ``incomplete`` (transient, the jobs come back and resume it) or ``failed`` with the reason (for good, the
jobs are dead-lettered), for reconcile to settle once it is stale (chalicelib/lifecycle/rules.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from botocore.exceptions import ClientError

from chalicelib.aws import error_code
from chalicelib.config import FleetConfig, PoolConfig
from chalicelib.errors import RetryableError
from chalicelib.gitlab_api import GitLabApi, RunnerCredentials
from chalicelib.naming import FleetOwner, runner_description
from chalicelib.observability import count, logger
from chalicelib.scaling.batch import GITLAB_WORKERS, WRITE_WORKERS, BatchReport, Matched, Outcome, job_log
from chalicelib.scaling.fleet import THROTTLING_ERROR_CODES, LaunchedInstance
from chalicelib.scaling.giving_back import GiveBack
from chalicelib.scaling.store import ScaleStore
from chalicelib.scaling.store.records import RunnerRecord
from chalicelib.scaling.store.table import transiently_cancelled
from chalicelib.scaling.tokens import RunnerTokens

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


class RunnerRecorder:
    """Records a launch's instances and gives each its GitLab runner and token, in the order that keeps them
    findable (see the module docstring)."""

    def __init__(
        self,
        config: FleetConfig,
        store: ScaleStore,
        gitlab: GitLabApi,
        tokens: RunnerTokens,
        give_back: GiveBack,
        *,
        clock: Callable[[], float] = time.time,
        owner: FleetOwner | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._gitlab = gitlab
        self._tokens = tokens
        self._give_back = give_back
        self._clock = clock
        self._owner = owner

    def complete(
        self,
        pool: PoolConfig,
        launch_id: str,
        instances: list[LaunchedInstance],
        items: list[Matched],
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
            ready += self._store_identities(pool, created, warm=warm)
        except ClientError as exc:
            if not _transient(exc):
                self._halt(pool, launch_id, items, exc, "storing runner tokens", report)
                return
            failures.append(f"storing runner tokens failed with {error_code(exc)}")
        if failures:
            # The instances are recorded and hold their leases; the jobs come back to finish their runners.
            self._store.launches.mark_launch_incomplete(launch_id, failures[0])
            for item in items:
                self._give_back.retry(item.job, pool, failures[0], report)
            return
        launched, surplus = items[: len(ready)], items[len(ready) :]
        for item in surplus:
            # Its instance was terminated before its runner was ready: the job needs another launch.
            self._store.claims.release_claim(item.job.project_id, item.job.job_id, launch_id)
            self._give_back.retry(item.job, pool, "instance terminated before its runner was ready", report)
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
                    **job_log(item.job),
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

    def _store_identities(
        self, pool: PoolConfig, created: dict[str, RunnerCredentials], *, warm: bool = False
    ) -> list[str]:
        """Tokens, then identities, of new GitLab runners; returns the instances whose runner is now ready. A warm
        runner's token item tells its instance not to stop for idleness (``idle_wait_seconds`` 0): reconcile
        retires it when its window closes or the pool holds more warm runners than its size.

        The identity write is refused once the instance is terminated; the token and GitLab runner just made
        are then deleted here, since nobody else knows them. On an AWS error, the runners not stored yet are
        deleted from GitLab (best effort) before it propagates: the retry finds or makes them again.
        """
        deadline_at = self._clock() + pool.boot_deadline_seconds

        def store(instance_id: str, credentials: RunnerCredentials) -> bool | ClientError:
            try:
                self._tokens.put(
                    self._tokens.key(pool.name, instance_id),
                    instance_id,
                    credentials.token,
                    deadline_at,
                    idle_wait_seconds=0 if warm else None,
                )
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
        self, pool: PoolConfig, launch_id: str, items: list[Matched], exc: ClientError, step: str, report: BatchReport
    ) -> None:
        """An AWS error after the instances exist. Their leases cannot go back while they run; the launch record
        keeps them with the reason: transient, the jobs come back and resume it; refused for good, the launch
        is failed (for reconcile to give back) and the jobs are released and dead-lettered."""
        code = error_code(exc) or "UnknownError"
        reason = f"{step} failed with {code}"
        if _transient(exc):
            self._store.launches.mark_launch_incomplete(launch_id, reason)
            for item in items:
                self._give_back.retry(item.job, pool, reason, report)
            return
        self._store.launches.fail_launch(launch_id, reason)
        self._give_back.refuse(
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


def _transient(exc: ClientError) -> bool:
    """An AWS error a later attempt may not meet (throttling, a conflict, AWS's own 5xx): also a transaction
    DynamoDB cancelled only for conflicts or throttling, which the store tried again until it gave up."""
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return (
        error_code(exc) in _TRANSIENT_AWS_ERROR_CODES
        or transiently_cancelled(exc)
        or (isinstance(status, int) and status >= 500)
    )
