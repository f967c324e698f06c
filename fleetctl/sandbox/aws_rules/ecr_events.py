"""ECR puts an "ECR Image Action" event on the account's default event bus for every image push and delete that
succeeds; moto puts none. This rule puts them, from moto's answers to PutImage and BatchDeleteImage.

Source: the Amazon ECR User Guide, "Amazon ECR events and EventBridge"
(https://docs.aws.amazon.com/AmazonECR/latest/userguide/ecr-eventbridge.html): "Event for a completed image push"
and "Event for an image deletion", each with source ``aws.ecr``, detail-type ``ECR Image Action``, ``resources``
empty and detail ``{"result": "SUCCESS", "repository-name", "image-digest", "action-type": "PUSH" | "DELETE",
"image-tag"}``; "Events are emitted on a best effort basis", and AWS services' events reach EventBridge "in near
real time".

* PutImage: one ``PUSH`` event, the digest moto's answer gives the image (``image.imageId.imageDigest``) and the
  request's ``imageTag`` (no ``image-tag`` for a push without one); a push ECR refuses (an error answer, such as
  ``ImageAlreadyExistsException``) puts nothing;
* BatchDeleteImage: one ``DELETE`` event for each image id the answer lists as deleted (``imageIds``), none for
  its ``failures``.

Each event is put a short lag after the call (0.3 s by default, ``POST /_shim/ecr-events/set``
``{"lag_seconds": x}``) with ``Time`` the moment of the call, so its ``time`` is when the image was pushed or
deleted, as ECR stamps it, not when it arrived. Events are put into moto's EventBridge in this process, on the
default bus of the account and region the call was made in, so they reach the rules an application made, exactly
as a ``PutEvents`` would. ``POST /_shim/ecr-events/put`` lists what was put, and ``status`` the lag and how many
events are still due.
"""

from __future__ import annotations

import heapq
import itertools
import json
import threading
import time
from typing import Any

from fleetctl.sandbox.aws_rules.support import lag_seconds, moto_account
from fleetctl.sandbox.aws_shim import AwsRequest, AwsResponse, Forward, Rule, ShimConfigError

__all__ = ["EcrImageEvents"]

SOURCE = "aws.ecr"
IMAGE_ACTION = "ECR Image Action"
DEFAULT_LAG_SECONDS = 0.3


def _detail(repository: str, digest: str, action: str, tag: str | None) -> dict[str, str]:
    detail = {"result": "SUCCESS", "repository-name": repository, "image-digest": digest, "action-type": action}
    if tag:
        detail["image-tag"] = tag
    return detail


def _pushed(request: AwsRequest, answer: Any) -> list[dict[str, str]]:
    """The detail of the push a PutImage answer reports, or none when it names no image."""
    image = answer.get("image") if isinstance(answer, dict) else None
    if not isinstance(image, dict):
        return []
    digest = (image.get("imageId") or {}).get("imageDigest") or ""
    repository = image.get("repositoryName") or request.params.get("repositoryName") or ""
    if not digest or not repository:
        return []
    return [_detail(repository, digest, "PUSH", request.params.get("imageTag"))]


def _deleted(request: AwsRequest, answer: Any) -> list[dict[str, str]]:
    """The detail of each deletion a BatchDeleteImage answer reports (its ``imageIds``, not its ``failures``)."""
    repository = str(request.params.get("repositoryName") or "")
    ids = answer.get("imageIds") if isinstance(answer, dict) else None
    if not repository or not isinstance(ids, list):
        return []
    return [
        _detail(repository, image_id["imageDigest"], "DELETE", image_id.get("imageTag"))
        for image_id in ids
        if isinstance(image_id, dict) and image_id.get("imageDigest")
    ]


class EcrImageEvents(Rule):
    """Every successful PutImage and BatchDeleteImage puts its ``ECR Image Action`` events on the default bus."""

    name = "ecr-events"

    def __init__(self, *, lag: float = DEFAULT_LAG_SECONDS) -> None:
        self._lock = threading.Condition()
        self._default = lag_seconds(lag)
        self._lag = self._default
        # (due, order, account, region, entry)
        self._due: list[tuple[float, int, str, str, dict[str, Any]]] = []
        self._order = itertools.count()
        self.put: list[dict[str, str]] = []
        self._worker = threading.Thread(target=self._deliver, name="ecr-events", daemon=True)
        self._worker.start()

    def handle(self, request: AwsRequest, forward: Forward) -> AwsResponse:
        response = forward(request)
        if request.service != "ecr" or request.protocol != "json" or response.status != 200 or not request.region:
            return response
        if request.operation == "PutImage":
            details = _pushed(request, _json(response))
        elif request.operation == "BatchDeleteImage":
            details = _deleted(request, _json(response))
        else:
            return response
        if details:
            self._schedule(moto_account(request), request.region, details)
        return response

    def configure(self, action: str, payload: dict[str, Any]) -> Any:
        if action == "set":
            unknown = set(payload) - {"lag_seconds"}
            if unknown:
                raise ShimConfigError(f"unknown settings {sorted(unknown)}; known: ['lag_seconds']")
            lag = lag_seconds(payload["lag_seconds"])
            with self._lock:
                self._lag = lag
                return {"lag_seconds": lag}
        if action == "put":
            with self._lock:
                return list(self.put)
        if action == "status":
            with self._lock:
                return {"lag_seconds": self._lag, "due": len(self._due), "put": len(self.put)}
        return super().configure(action, payload)

    def reset(self) -> None:
        with self._lock:
            self._due.clear()
            self.put.clear()
            self._lag = self._default

    def _schedule(self, account: str, region: str, details: list[dict[str, str]]) -> None:
        # ECR stamps the event with the time of the action; EventBridge takes ``time`` from the entry's ``Time``.
        stamped = time.time()
        with self._lock:
            due = time.monotonic() + self._lag
            for detail in details:
                entry = {
                    "Source": SOURCE,
                    "DetailType": IMAGE_ACTION,
                    "Detail": json.dumps(detail),
                    "Resources": [],
                    "Time": stamped,
                }
                heapq.heappush(self._due, (due, next(self._order), account, region, entry))
            self._lock.notify()

    def _deliver(self) -> None:
        while True:
            with self._lock:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._lock.wait(timeout=None if not self._due else max(0.0, self._due[0][0] - time.monotonic()))
                _, _, account, region, entry = heapq.heappop(self._due)
            self._put(account, region, entry)

    def _put(self, account: str, region: str, entry: dict[str, Any]) -> None:
        from moto.events.models import events_backends

        try:
            events_backends[account][region].put_events([entry])
        except Exception:
            # Never stop the worker over one event: ECR emits its events on a best effort basis.
            return
        detail = json.loads(entry["Detail"])
        with self._lock:
            self.put.append(
                {
                    "repository": detail["repository-name"],
                    "digest": detail["image-digest"],
                    "action": detail["action-type"],
                    **({"tag": detail["image-tag"]} if "image-tag" in detail else {}),
                    "account": account,
                    "region": region,
                }
            )


def _json(response: AwsResponse) -> Any:
    try:
        return response.json()
    except ValueError:
        return None
