"""A job's item as scale-up and reconcile write it: tied to one launch, ever, and what became of the job.

The claim (``launch_id`` on the job's item) is the conditional write that makes "one launch per job" true; it is
released for a relaunch, or marked with what scale-up decided (not pending, unmatched, dead-lettered). A sweep
takes a pending job's queue claim here, and an interrupted job's one retry is taken here too.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from typing import Any

from botocore.exceptions import ClientError

from chalicelib.aws import error_code
from chalicelib.intake.job_hooks import JobStatus
from chalicelib.scaling.launches import LaunchState
from chalicelib.scaling.store.records import (
    DEAD_LETTERED_OUTCOME,
    LAUNCH_POOL_ATTRIBUTE,
    WAITING_POOL_ATTRIBUTE,
    Claim,
    ClaimOutcome,
)
from chalicelib.scaling.store.table import ScaleTable, update_request
from chalicelib.store import (
    LIVE_ATTRIBUTE,
    QUEUE_CLAIM_SECONDS,
    UNFINISHED_JOB_TTL_SECONDS,
    attribute_value,
    job_key,
    launch_key,
)


class ClaimStore(ScaleTable):
    """Job items: claims for launches, outcomes, sweep claims and interruption retries."""

    def claim_job(self, project_id: int, job_id: int, launch_id: str, pool: str) -> Claim:
        """Tie a job to a launch of ``pool``, once: the conditional write that makes "one launch per job, ever" true.

        The same condition refuses a job whose record the webhooks have moved past pending (running, finished,
        cancelled), so a job that waited for capacity is checked at no extra call, and a job already
        dead-lettered, so a second copy of its message cannot launch it (or fail the same way) again.
        """
        now = self._clock()
        request = update_request(
            self.table,
            job_key(project_id, job_id),
            f"SET launch_id = :launch, claimed_at = :now, {LAUNCH_POOL_ATTRIBUTE} = :pool, kind = :kind,"
            " project_id = :project, job_id = :job",
            {
                ":launch": launch_id,
                ":pool": pool,
                ":now": now,
                ":kind": "job",
                ":project": project_id,
                ":job": job_id,
                ":pending": JobStatus.PENDING.rank,
                ":dead": DEAD_LETTERED_OUTCOME,
            },
            "attribute_not_exists(launch_id) AND (attribute_not_exists(status_rank) OR status_rank <= :pending)"
            " AND (attribute_not_exists(outcome) OR outcome <> :dead)",
        )
        old = self._update_unless_refused(request)
        if old is None or old.get("launch_id") == launch_id:
            # (The second: refused by our own write, which landed before botocore retried the timed-out call.)
            return Claim(ClaimOutcome.CLAIMED, launch_id)
        if old.get("outcome") == DEAD_LETTERED_OUTCOME:
            return Claim(ClaimOutcome.DEAD_LETTERED, "")
        if old.get("launch_id"):
            return Claim(ClaimOutcome.HELD, str(old["launch_id"]), float(old.get("claimed_at", 0)))
        return Claim(ClaimOutcome.NOT_PENDING, "")

    def release_claim(self, project_id: int, job_id: int, launch_id: str, *, waiting_for: str = "") -> None:
        """Untie a job from a launch that will not run it, so a later attempt can claim it again. ``waiting_for``
        names the pool it waits for (full, or drained): the same write marks the item with it and the time it
        first waited, which ``fleetctl status`` counts as the pool's waiting jobs until a launch claims it."""
        expression = f"REMOVE launch_id, claimed_at, {LAUNCH_POOL_ATTRIBUTE}"
        values: dict[str, Any] = {":launch": launch_id}
        if waiting_for:
            expression = (
                f"SET {WAITING_POOL_ATTRIBUTE} = :pool, waiting_since = if_not_exists(waiting_since, :now) "
                + expression
            )
            values.update({":pool": waiting_for, ":now": self._clock()})
        try:
            self._client.update_item(
                **update_request(self.table, job_key(project_id, job_id), expression, values, "launch_id = :launch")
            )
        except ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise

    def release_for_relaunch(self, project_id: int, job_id: int, launch_id: str) -> str | None:
        """Untie a pending job from a launch that ended without a runner taking it, and in the same write make it a
        pending job waiting to be queued, under a queue claim: returns the claim (for :meth:`mark_queued` once
        the send succeeded, or :meth:`release_queue_claim` if it failed), or None when the launch no longer holds
        it. Whatever happens after this write, the job is found again: queued, or unqueued pending (reconcile
        queues those), never claimed by nothing."""
        claim = uuid.uuid4().hex
        now = self._clock()
        landed = self._write_unless_refused(
            "update_item",
            update_request(
                self.table,
                job_key(project_id, job_id),
                "SET #queued = :no, queue_claim = :claim, queue_claim_at = :now, updated_at = :now"
                f" REMOVE launch_id, claimed_at, {LAUNCH_POOL_ATTRIBUTE}",
                {":launch": launch_id, ":no": False, ":claim": claim, ":now": now},
                "launch_id = :launch",
                names={"#queued": "queued"},
            ),
        )
        return claim if landed else None

    def mark_job(self, project_id: int, job_id: int, outcome: str, **fields: Any) -> None:
        """Record what scale-up decided for a job (unmatched, not pending, dead-lettered ...)."""
        values = {
            "outcome": outcome,
            "outcome_at": self._clock(),
            "kind": "job",
            "project_id": project_id,
            "job_id": job_id,
            **{k: v for k, v in fields.items() if v is not None},
        }
        names = {f"#f{i}": k for i, k in enumerate(values)}
        expression = "SET " + ", ".join(f"#f{i} = :f{i}" for i in range(len(values)))
        self._client.update_item(
            **update_request(
                self.table,
                job_key(project_id, job_id),
                expression,
                {f":f{i}": v for i, v in enumerate(values.values())},
                names=names,
            )
        )

    def mark_job_dead_lettered(self, project_id: int, job_id: int, reason: str, error_code: str = "") -> None:
        """Record that scale-up gave up on a job; :meth:`claim_job` refuses it from then on."""
        self.mark_job(project_id, job_id, DEAD_LETTERED_OUTCOME, reason=reason, error_code=error_code or None)

    def jobs_needing_no_launch(self, jobs: list[tuple[int, int]]) -> set[tuple[int, int]]:
        """Of ``(project id, job id)`` pairs, those whose record says no launch is due: settled (an outcome such as
        dead-lettered or not pending), past pending, or claimed by a launch that made its runner."""
        settled: set[tuple[int, int]] = set()
        by_launch: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for item in self._batch_get([job_key(project, job) for project, job in jobs]):
            pair = (int(item["project_id"]), int(item["job_id"]))
            if "outcome" in item or int(item.get("status_rank", 0)) > JobStatus.PENDING.rank:
                settled.add(pair)
            elif item.get("launch_id"):
                by_launch[str(item["launch_id"])].append(pair)
        for launch in self._batch_get([launch_key(launch_id) for launch_id in by_launch]):
            if launch.get("state") == LaunchState.LAUNCHED.value:
                settled.update(by_launch[str(launch["pk"]).removeprefix(launch_key(""))])
        return settled

    def claim_interruption_retry(self, project_id: int, job_id: int, claim: str) -> bool:
        """Take the one retry an interrupted job gets, for ``claim`` (the message asking for it): True when it is
        this claim's to make, now or again (the message came back after a failed attempt), False when another
        claim took it or the retry was made. The job's record must exist: the webhook recorded its failure
        before asking."""
        request = update_request(
            self.table,
            job_key(project_id, job_id),
            "SET interruption_retry = if_not_exists(interruption_retry, :claim), interruption_retry_at = :now",
            {":claim": claim, ":now": self._clock()},
            "attribute_exists(pk) AND attribute_not_exists(interruption_retry_job)"
            " AND (attribute_not_exists(interruption_retry) OR interruption_retry = :claim)",
        )
        return self._update_unless_refused(request) is None

    def record_interruption_retry(self, project_id: int, job_id: int, new_job_id: int | None) -> None:
        """The retry of an interrupted job was made: GitLab's new job (None: GitLab no longer knew the job)."""
        self._write(
            "update_item",
            update_request(
                self.table,
                job_key(project_id, job_id),
                "SET interruption_retry_job = :new",
                {":new": new_job_id if new_job_id is not None else 0},
                "attribute_exists(interruption_retry)",
            ),
        )

    def claim_for_sweep(self, project_id: int, job_id: int, pipeline_id: int | None = None) -> str | None:
        """Take the queue claim of a pending job a sweep found: one the table does not know (its item is written
        now, pending and unqueued), one recorded as created whose pending Job Hook never came, or one recorded but
        never queued whose claim is free. Returns the claim, to
        pass to :meth:`mark_queued` after the send (or :meth:`release_queue_claim` if it fails), or None when
        the job is known otherwise (queued, claimed by a live sender, launched or settled)."""
        now = self._clock()
        claim = uuid.uuid4().hex
        values: dict[str, Any] = {
            ":claim": {"S": claim},
            ":now": attribute_value(now),
            ":stale": attribute_value(now - QUEUE_CLAIM_SECONDS),
            ":no": {"BOOL": False},
            ":job": {"S": "job"},
            ":pending": {"S": JobStatus.PENDING.value},
            ":rank": attribute_value(JobStatus.PENDING.rank),
            ":project": attribute_value(project_id),
            ":jobid": attribute_value(job_id),
            ":ttl": attribute_value(int(now) + UNFINISHED_JOB_TTL_SECONDS),
        }
        # The condition keeps the job at pending or before (created: its pending Job Hook was the one lost), so
        # pending is what it is now.
        assignments = (
            "kind = :job, project_id = :project, job_id = :jobid, #status = :pending, "
            "status_rank = :rank, pending_at = if_not_exists(pending_at, :now), "
            "#queued = :no, queue_claim = :claim, queue_claim_at = :now, updated_at = :now, #live = :job, "
            "#ttl = if_not_exists(#ttl, :ttl)"
        )
        if pipeline_id is not None:
            assignments += ", pipeline_id = if_not_exists(pipeline_id, :pipeline)"
            values[":pipeline"] = attribute_value(pipeline_id)
        request = {
            "TableName": self.table,
            "Key": {"pk": {"S": job_key(project_id, job_id)}},
            "UpdateExpression": f"SET {assignments}",
            "ConditionExpression": (
                "attribute_not_exists(pk) OR (status_rank <= :rank"
                " AND (attribute_not_exists(#queued) OR #queued = :no)"
                " AND attribute_not_exists(launch_id) AND attribute_not_exists(outcome)"
                " AND (attribute_not_exists(queue_claim) OR queue_claim_at < :stale))"
            ),
            "ExpressionAttributeNames": {
                "#status": "status",
                "#queued": "queued",
                "#live": LIVE_ATTRIBUTE,
                "#ttl": "ttl",
            },
            "ExpressionAttributeValues": values,
        }
        refused = self._update_unless_refused(request)
        return claim if refused is None or refused.get("queue_claim") == claim else None
