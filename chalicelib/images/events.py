"""ECR and Inspector events, decoded once at the edge into one typed :class:`ImageEvent`.

Three documented shapes reach the images handler from the default event bus (Amazon ECR User Guide, "Amazon ECR
events and EventBridge"; Amazon Inspector User Guide, "Creating custom responses to Amazon Inspector events with
Amazon EventBridge"):

* ``aws.ecr`` "ECR Image Action": a PUSH or DELETE, with a singular ``image-tag`` (absent or empty for a push or
  delete by digest) and ``result`` (only ``SUCCESS`` changed anything);
* ``aws.ecr`` "ECR Image Scan" (basic scanning): an ``image-tags`` array (often empty: the scan is of a digest)
  and ``finding-severity-counts``, with only the severities found;
* ``aws.inspector2`` "Inspector2 Scan" (enhanced scanning): the same counts plus a ``TOTAL``, but
  ``repository-name`` is the repository's ARN, so the repository's account and region come from it rather than
  from the envelope (which names the account Inspector runs in).

The account and region of the image are those of the registry that holds it, which for an event forwarded from
a central registry account by a cross-account rule is that account, not this fleet's. Unknown fields are
ignored; the fields relied on are strict, and a shape that lacks them is refused with :class:`PayloadError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any

import msgspec

from chalicelib.errors import PayloadError

ECR_SOURCE = "aws.ecr"
INSPECTOR_SOURCE = "aws.inspector2"
IMAGE_ACTION = "ECR Image Action"
BASIC_SCAN = "ECR Image Scan"
ENHANCED_SCAN = "Inspector2 Scan"
DETAIL_TYPES = (IMAGE_ACTION, BASIC_SCAN, ENHANCED_SCAN)
# A scan that finished: basic scanning says COMPLETE (or FAILED); Inspector says INITIAL_SCAN_COMPLETE on the
# push's scan and SCAN_COMPLETE on a rescan.
_SCAN_DONE = frozenset({"COMPLETE", "INITIAL_SCAN_COMPLETE", "SCAN_COMPLETE"})
_SCAN_FAILED = frozenset({"FAILED", "UNSUPPORTED_IMAGE", "SCAN_ELIGIBILITY_EXPIRED"})
_DIGEST_PREFIX = "sha256:"


class ImageEventKind(str, Enum):
    PUSH = "push"
    DELETE = "delete"
    SCAN = "scan"


class _Envelope(msgspec.Struct, frozen=True):
    id: str
    source: str
    detail_type: str = msgspec.field(name="detail-type")
    account: str = ""
    region: str = ""
    time: str = ""


class _ActionDetail(msgspec.Struct, frozen=True):
    repository_name: str = msgspec.field(name="repository-name")
    image_digest: str = msgspec.field(name="image-digest")
    action_type: str = msgspec.field(name="action-type")
    result: str = "SUCCESS"
    image_tag: str = msgspec.field(name="image-tag", default="")


class _ScanDetail(msgspec.Struct, frozen=True):
    repository_name: str = msgspec.field(name="repository-name")
    image_digest: str = msgspec.field(name="image-digest")
    scan_status: str = msgspec.field(name="scan-status")
    finding_severity_counts: dict[str, int] = msgspec.field(name="finding-severity-counts", default_factory=dict)
    image_tags: list[str] = msgspec.field(name="image-tags", default_factory=list)


class _Action(msgspec.Struct, frozen=True):
    detail: _ActionDetail


class _Scan(msgspec.Struct, frozen=True):
    detail: _ScanDetail


@dataclass(frozen=True)
class ImageEvent:
    """One image event, whatever its shape: which image (registry account, region, repository, digest), what
    happened to it, and when ECR says it happened (``at``, epoch seconds: a push's own time, which orders two
    pushes whatever order their events arrive in).

    ``tags`` is the push's or delete's one tag (none for one by digest) or the scan's tags. ``counts`` are a scan's
    findings by severity (``TOTAL`` dropped); ``scan_failed`` is a scan that ended without a result.
    """

    event_id: str
    kind: ImageEventKind
    account: str
    region: str
    repository: str
    digest: str
    tags: tuple[str, ...]
    at: float
    counts: tuple[tuple[str, int], ...] = ()
    scan_failed: bool = False

    @property
    def counts_dict(self) -> dict[str, int]:
        return dict(self.counts)


class IgnoredEvent(Exception):
    """A well-formed event that changes nothing: a failed push, a scan still in progress. Counted, not refused."""


def parse_image_event(raw: Any) -> ImageEvent:
    """Decode an EventBridge event of one of the three shapes; :class:`PayloadError` for anything else, and
    :class:`IgnoredEvent` for a documented event that says nothing about an image's content (a failed push)."""
    try:
        envelope = msgspec.convert(raw, _Envelope)
    except msgspec.ValidationError as exc:
        raise PayloadError(f"not an EventBridge event: {exc}") from None
    at = _event_time(envelope.time)
    try:
        if envelope.source == ECR_SOURCE and envelope.detail_type == IMAGE_ACTION:
            return _action(envelope, msgspec.convert(raw, _Action).detail, at)
        if (envelope.source, envelope.detail_type) in ((ECR_SOURCE, BASIC_SCAN), (INSPECTOR_SOURCE, ENHANCED_SCAN)):
            return _scan(envelope, msgspec.convert(raw, _Scan).detail, at)
    except msgspec.ValidationError as exc:
        raise PayloadError(f"malformed {envelope.detail_type!r} event: {exc}") from None
    raise PayloadError(f"not an image event: {envelope.source} {envelope.detail_type!r}")


def _action(envelope: _Envelope, detail: _ActionDetail, at: float) -> ImageEvent:
    if detail.result != "SUCCESS":
        raise IgnoredEvent(f"{detail.action_type} {detail.result}")
    kinds = {"PUSH": ImageEventKind.PUSH, "DELETE": ImageEventKind.DELETE}
    if detail.action_type not in kinds:
        raise PayloadError(f"unknown ECR image action {detail.action_type!r}")
    return ImageEvent(
        event_id=envelope.id,
        kind=kinds[detail.action_type],
        account=envelope.account,
        region=envelope.region,
        repository=detail.repository_name,
        digest=_digest(detail.image_digest),
        tags=(detail.image_tag,) if detail.image_tag else (),
        at=at,
    )


def _scan(envelope: _Envelope, detail: _ScanDetail, at: float) -> ImageEvent:
    account, region, repository = envelope.account, envelope.region, detail.repository_name
    if repository.startswith("arn:"):
        account, region, repository = _repository_arn(repository)
    failed = detail.scan_status in _SCAN_FAILED
    if not failed and detail.scan_status not in _SCAN_DONE:
        raise IgnoredEvent(f"scan {detail.scan_status}")
    found = detail.finding_severity_counts.items()
    counts = tuple(sorted((severity.upper(), int(n)) for severity, n in found if severity.upper() != "TOTAL"))
    return ImageEvent(
        event_id=envelope.id,
        kind=ImageEventKind.SCAN,
        account=account,
        region=region,
        repository=repository,
        digest=_digest(detail.image_digest),
        tags=tuple(detail.image_tags),
        at=at,
        counts=counts,
        scan_failed=failed,
    )


def _repository_arn(arn: str) -> tuple[str, str, str]:
    """``arn:aws:ecr:<region>:<account>:repository/<name>`` -> (account, region, name); names may hold slashes."""
    parts = arn.split(":", 5)
    if len(parts) != 6 or parts[2] != "ecr" or not parts[5].startswith("repository/"):
        raise PayloadError(f"not an ECR repository ARN: {arn!r}")
    return parts[4], parts[3], parts[5].removeprefix("repository/")


def _digest(value: str) -> str:
    if not value.startswith(_DIGEST_PREFIX) or len(value) <= len(_DIGEST_PREFIX):
        raise PayloadError(f"not an image digest: {value!r}")
    return value


def _event_time(value: str) -> float:
    if not value:
        return 0.0
    try:
        stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise PayloadError(f"not an event time: {value!r}") from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp()
