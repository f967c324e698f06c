"""The jobs queue between the webhook and scale-up: the message schema and a sender.

The webhook puts one message per pending job; scale-up consumes them. The message carries only what scale-up
needs to act without the original webhook (GitLab is asked again for tags and status), plus the attempt count
that re-queued retries increment.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class QueuedJob:
    project_id: int
    job_id: int
    received_at: float
    pipeline_id: int | None = None
    job_name: str = ""
    gitlab_instance: str = ""
    delivery: str = ""
    attempt: int = 1
    waits: int = 0
    last_error: str = ""
    # Set once a job has been matched and waits for capacity: its next turn needs no GitLab read.
    pool: str = ""
    tags: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> QueuedJob:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise TypeError("a queued job is a JSON object")
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        if "tags" in fields:
            fields["tags"] = tuple(str(t) for t in fields["tags"])
        job = cls(**fields)
        if not isinstance(job.project_id, int) or not isinstance(job.job_id, int):
            raise TypeError("project_id and job_id must be integers")
        return job


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
