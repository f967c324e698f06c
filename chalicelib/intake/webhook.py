"""GitLab webhook intake: authenticate, parse, de-duplicate, queue. Nothing else happens in the request.

GitLab waits at most 10 s for an answer and disables a hook after more than 3 consecutive failed answers (4xx and
5xx alike), so this path never calls GitLab or EC2, answers 200 to events it does not act on, 401/400/413 only to
requests that are really wrong, and 503 (never 500) when something of ours failed. GitLab never redelivers a
failed delivery by itself; only a person's resend (the hook's "Resend request") repeats its Idempotency-Key. So a
pending job is recorded first and queued second, and marked queued only once the send succeeded: a 503 leaves
the job recorded and findable as not queued, and a resend of the delivery queues it.

Order matters: the token is checked before the body is even looked at; the size limit before the body is
hashed for a signature; the signature before the JSON is parsed.

A request that fails because of what it carries is a 400 (or 413), never a 5xx: a 5xx says we are broken, and every
failed answer counts toward GitLab disabling the hook. So every value this module keeps is bounded before it reaches
DynamoDB or SQS: the body's fields by the ``JobHook`` model, the delivery key and the ``X-Gitlab-Instance`` header
here.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from chalicelib.errors import AuthenticationError, PayloadError, PayloadTooLargeError
from chalicelib.intake.job_hooks import JobHook, JobStatus, parse_job_hook
from chalicelib.intake.secrets import WebhookSecretSource
from chalicelib.intake.signing import SignedDelivery, token_matches, verify_signature
from chalicelib.jobs_queue import JobQueue, QueuedJob
from chalicelib.lifecycle.interruptions import asks_for_retry
from chalicelib.naming import described_instance
from chalicelib.observability import count, logger, seconds
from chalicelib.store import EventOutcome, FleetStore, JobEvent

MAX_BODY_BYTES = 1024 * 1024
JOB_HOOK = "Job Hook"
_MAX_KEY_LENGTH = 128
MAX_INSTANCE_LENGTH = 1024


@dataclass(frozen=True)
class WebhookResponse:
    status: int
    body: dict[str, Any] = field(default_factory=dict)


def _refused(reason: str) -> WebhookResponse:
    # The reason is logged for the operator; the caller learns nothing about which check failed.
    logger.warning("webhook refused", extra={"reason": reason})
    count("WebhooksRefused")
    return WebhookResponse(401, {"error": "unauthorized"})


def _bad_request(reason: str) -> WebhookResponse:
    logger.warning("webhook rejected", extra={"reason": reason})
    count("WebhooksMalformed")
    return WebhookResponse(400, {"error": reason})


def gitlab_instance(headers: Mapping[str, str]) -> str:
    """The ``X-Gitlab-Instance`` URL (kept on the job and its queue message), or PayloadError if it is not one."""
    value = headers.get("x-gitlab-instance", "")
    if len(value) > MAX_INSTANCE_LENGTH or not value.isprintable() or any(c.isspace() for c in value):
        raise PayloadError(f"X-Gitlab-Instance header is not a URL of at most {MAX_INSTANCE_LENGTH} characters")
    return value


def delivery_key(headers: Mapping[str, str], body: bytes) -> str:
    """Idempotency-Key (the same on a resend of the delivery), else X-Gitlab-Event-UUID, else the body's digest."""
    key = headers.get("idempotency-key") or headers.get("x-gitlab-event-uuid")
    if not key or len(key) > _MAX_KEY_LENGTH or not key.isprintable():
        return "sha256:" + hashlib.sha256(body).hexdigest()
    return key


class WebhookIntake:
    def __init__(
        self,
        secrets: WebhookSecretSource,
        store: FleetStore,
        queue: JobQueue,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._secrets = secrets
        self._store = store
        self._queue = queue
        self._clock = clock

    def handle(self, headers: Mapping[str, str], body: bytes) -> WebhookResponse:
        """Answer one delivery. Infrastructure errors propagate; the handler boundary maps them to 503."""
        headers = {k.lower(): v for k, v in headers.items()}
        secrets = self._secrets.get()
        if secrets.token is None:
            return _refused("no webhook token configured")
        if secrets.signing_required and secrets.signing_secret is None:
            # Never downgrade to the token alone: the operator asked for signed deliveries.
            return _refused("webhook signing secret configured but empty")
        if not token_matches(headers.get("x-gitlab-token"), secrets.token):
            return _refused("token mismatch")
        if len(body) > MAX_BODY_BYTES:
            logger.warning("webhook body too large", extra={"bytes": len(body)})
            return WebhookResponse(413, {"error": "body too large"})
        signed: SignedDelivery | None = None
        if secrets.signing_secret is not None:
            try:
                signed = verify_signature(
                    secrets.signing_secret,
                    webhook_id=headers.get("webhook-id"),
                    timestamp=headers.get("webhook-timestamp"),
                    signature=headers.get("webhook-signature"),
                    body=body,
                    now=self._clock(),
                )
            except AuthenticationError as exc:
                return _refused(str(exc))
        event = headers.get("x-gitlab-event", "")
        if event != JOB_HOOK:
            return WebhookResponse(200, {"ignored": f"event {event[:40] or 'missing'}"})
        try:
            hook = parse_job_hook(body)
            instance = gitlab_instance(headers)
        except PayloadError as exc:
            return _bad_request(str(exc))
        return self._accept(hook, instance, headers, body, signed)

    def _accept(
        self, hook: JobHook, instance: str, headers: Mapping[str, str], body: bytes, signed: SignedDelivery | None
    ) -> WebhookResponse:
        status = hook.status
        if status is None:
            return WebhookResponse(200, {"ignored": f"status {hook.build_status[:40]}"})
        now = self._clock()
        key = delivery_key(headers, body)
        replay_key = f"{signed.webhook_id[:_MAX_KEY_LENGTH]}:{signed.timestamp}" if signed else None
        event = JobEvent(
            project_id=hook.project_id,
            job_id=hook.build_id,
            status=status,
            received_at=now,
            pipeline_id=hook.pipeline_id,
            name=hook.build_name,
            stage=hook.build_stage,
            ref=hook.ref,
            gitlab_instance=instance,
            runner_id=hook.runner.id if hook.runner else None,
            runner_description=hook.runner.description if hook.runner else None,
            failure_reason=hook.build_failure_reason if status is JobStatus.FAILED else None,
            retries_count=hook.retries_count,
        )
        try:
            recorded = self._store.record_job_event(key, event, replay_key)
        except PayloadTooLargeError as exc:
            logger.warning("webhook refused: job record full", extra={"reason": str(exc)})
            return WebhookResponse(413, {"error": "job record full"})
        log = {"project_id": hook.project_id, "job_id": hook.build_id, "status": status.value}
        outcome = recorded.outcome
        if outcome is EventOutcome.REPLAY:
            return _refused("replayed signed delivery")
        if recorded.claim is not None:
            self._enqueue(event, key, recorded.claim)
            logger.info("job queued", extra={**log, "resent": outcome is EventOutcome.UNQUEUED})
            count("JobsQueued")
            return WebhookResponse(200, {"queued": True})
        if outcome is not EventOutcome.RECORDED:
            logger.info("webhook ignored", extra={**log, "outcome": outcome.value})
            return WebhookResponse(200, {"ignored": outcome.value})
        logger.info("job status recorded", extra=log)
        if hook.runner is not None and (status is JobStatus.RUNNING or status.finished):
            self._runner_activity(hook, event, key)
        return WebhookResponse(200, {"recorded": status.value})

    def _runner_activity(self, hook: JobHook, event: JobEvent, key: str) -> None:
        """Move one of our runners between busy and idle, and time its pool's job start. Only the runner the hook
        names on the instance its description names counts (the record's GitLab runner id must match). A job
        that runner lost to a spot interruption is queued for scale-up to retry.

        Idle tracking only spares launches, so a failed write is logged, not answered with a 503: GitLab would
        count that toward disabling the hook, for an event whose job is already recorded.
        """
        runner = hook.runner
        assert runner is not None
        instance_id = described_instance(runner.description)
        if instance_id is None:
            return
        try:
            if event.status is JobStatus.RUNNING:
                started = self._store.runner_started_job(
                    instance_id, runner.id, event.project_id, event.job_id, event.received_at
                )
                if started is None:
                    return
                if hook.build_queued_duration is not None:
                    seconds("QueueWaitSeconds", hook.build_queued_duration, started.pool)
                if started.first_job and started.launched_at:
                    seconds("BootSeconds", max(0.0, event.received_at - started.launched_at), started.pool)
            else:
                finished = self._store.runner_finished_job(
                    instance_id, runner.id, event.project_id, event.job_id, event.received_at
                )
                if finished is not None and asks_for_retry(event.status, event.failure_reason, finished.interrupted):
                    self._queue_retry(event, key, finished.pool, instance_id)
        except (ClientError, BotoCoreError):
            logger.exception("runner activity not recorded", extra={"instance_id": instance_id, "job_id": event.job_id})
            count("RunnerActivityNotRecorded")

    def _queue_retry(self, event: JobEvent, key: str, pool: str, instance_id: str) -> None:
        """Ask scale-up to retry a job an interrupted runner lost: the webhook itself never calls GitLab. A failed
        send is logged and counted, not answered with a 503, which would bring nothing back: GitLab never
        redelivers, and a resend of the delivery is a duplicate."""
        job = _message(event, key).but(retry_interrupted=pool, retries=event.retries_count)
        log = {"project_id": event.project_id, "job_id": event.job_id, "pool": pool, "instance_id": instance_id}
        try:
            self._queue.send(job)
        except (ClientError, BotoCoreError):
            logger.exception("job lost to a spot interruption not queued for a retry", extra=log)
            count("InterruptionRetriesNotQueued")
            return
        logger.info("job lost to a spot interruption queued for a retry", extra=log)

    def _enqueue(self, event: JobEvent, key: str, claim: str) -> None:
        """Send the job's message, then mark its record queued. A failed send propagates (503) and leaves the
        record pending and not queued, its queue claim given back, so a resend of the delivery (or a sweep) can
        queue it later."""
        job = _message(event, key)
        try:
            self._queue.send(job)
        except (ClientError, BotoCoreError):
            logger.warning(
                "job recorded but not queued",
                extra={"project_id": event.project_id, "job_id": event.job_id, "delivery": key},
            )
            count("JobsNotQueued")
            try:
                self._store.release_queue_claim(event.project_id, event.job_id, claim)
            except (ClientError, BotoCoreError):
                # The claim then lapses after QUEUE_CLAIM_SECONDS; a resend before that is taken as a duplicate.
                logger.exception("queue claim not released", extra={"delivery": key})
            raise
        try:
            self._store.mark_queued(event.project_id, event.job_id)
        except (ClientError, BotoCoreError):
            # The message is on its way, so the delivery succeeded: answering 503 would count toward GitLab
            # disabling the hook for a job that will run. Unmarked, the job may be queued a second time by a resend
            # or a sweep, which scale-up's one-claim-per-job absorbs.
            logger.exception("job queued but not marked queued", extra={"delivery": key})


def _message(event: JobEvent, key: str) -> QueuedJob:
    """The jobs-queue message for the job ``event`` is about, sent for delivery ``key``."""
    return QueuedJob(
        project_id=event.project_id,
        job_id=event.job_id,
        pipeline_id=event.pipeline_id,
        job_name=event.name,
        gitlab_instance=event.gitlab_instance,
        received_at=event.received_at,
        delivery=key,
    )
