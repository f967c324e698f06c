"""The jobs queue between the webhook and scale-up: the message schema and a sender.

The webhook puts one message per pending job, and one per job lost to a spot interruption (to be retried);
scale-up consumes them. The message carries only what scale-up
needs to act without the original webhook (GitLab is asked again for tags and status), plus the attempt count
that re-queued retries increment.
"""

from __future__ import annotations

import threading
from typing import Annotated, Any

import msgspec
import msgspec.json

# Ids are positive and fit DynamoDB's and GitLab's signed 64-bit integers.
_Id = Annotated[int, msgspec.Meta(gt=0, le=2**63 - 1)]
_Count = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]


class QueuedJob(msgspec.Struct, frozen=True):
    """One jobs-queue message. Like the Job Hook, decoded strictly (an id given as a string or a boolean is a
    malformed message, not something to coerce) while unknown fields are ignored, so a message written by a newer
    or older release still decodes. The JSON is an object with these fields, in this order."""

    project_id: _Id
    job_id: _Id
    received_at: float
    pipeline_id: _Id | None = None
    job_name: str = ""
    gitlab_instance: str = ""
    delivery: str = ""
    attempt: Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)] = 1
    waits: _Count = 0
    last_error: str = ""
    # Set once a job has been matched and waits for capacity: its next turn needs no GitLab read.
    pool: str = ""
    tags: tuple[str, ...] = ()
    # Set once the job was left to an idle runner of its pool for a grace: it is not deferred again.
    graced: bool = False
    # Set (to the runner's pool) when a runner whose spot instance EC2 interrupted failed the job: scale-up
    # retries the job once through GitLab's API, if that pool allows it, instead of launching for it.
    retry_interrupted: str = ""
    # How many times GitLab had retried that job before (its Job Hook's ``retries_count``): a job that is itself a
    # retry is not retried again, so interruptions never chain retries.
    retries: _Count = 0

    def to_json(self) -> str:
        return _encoder.encode(self).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> QueuedJob:
        """Decode a message body; ValueError (naming the bad field) when it is not a queued job."""
        try:
            return _decoder.decode(text)
        except msgspec.ValidationError as exc:
            raise ValueError(f"not a queued job: {exc}") from None
        except msgspec.DecodeError:
            raise ValueError("not JSON") from None

    def but(self, **changes: Any) -> QueuedJob:
        """A copy with ``changes`` (a retry's attempt, a wait's pool and tags, a grace, a dead letter's last error)."""
        return msgspec.structs.replace(self, **changes)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(QueuedJob)


class JobQueue:
    """Sends ``QueuedJob`` messages; the queue URL is resolved once per container from the queue name."""

    def __init__(self, sqs_client: Any, queue_name: str) -> None:
        self._sqs = sqs_client
        self.queue_name = queue_name
        self._url: str | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        if self._url is None:
            with self._lock:
                if self._url is None:
                    self._url = str(self._sqs.get_queue_url(QueueName=self.queue_name)["QueueUrl"])
        return self._url

    def send(self, job: QueuedJob, delay_seconds: int = 0) -> None:
        self.send_raw(job.to_json(), delay_seconds)

    def send_raw(self, body: str, delay_seconds: int = 0) -> None:
        self._sqs.send_message(QueueUrl=self.url, MessageBody=body, DelaySeconds=delay_seconds)
