"""A pool's image record (``IMAGE#<pool>``): the digest its runners run, a candidate awaiting its scan, scans seen,
and the history of every digest the pool was offered.

Frozen and plain, so the decisions (:mod:`chalicelib.images.decisions`) are pure functions of it; it is stored as
one item whose ``revision`` every write conditions on, so two handlers (or a handler and an operator) that read the
same record cannot both write their reading of it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

# Enough for rollback and for an operator to see the last weeks of pushes; the item stays far below DynamoDB's
# 400 KB.
HISTORY_LIMIT = 30
SCANS_LIMIT = 30


class PromotedBy(str, Enum):
    """What made a digest the pool's current one."""

    BOOTSTRAP = "bootstrap"
    PUSH = "push"
    SCAN = "scan"
    OPERATOR = "operator"


class Outcome(str, Enum):
    """What became of a digest the pool was offered (its history entry)."""

    PROMOTED = "promoted"
    REJECTED = "rejected"
    SUPERSEDED = "superseded"
    DELETED = "deleted"


class CandidateState(str, Enum):
    AWAITING_SCAN = "awaiting_scan"
    # The scan did not come within the pool's scan timeout. Reported, and still decided by a scan that comes late.
    SCAN_TIMEOUT = "scan_timeout"


@dataclass(frozen=True)
class Scan:
    """A finished scan of one digest: its findings by severity, or a scan that failed."""

    digest: str
    counts: tuple[tuple[str, int], ...]
    failed: bool = False
    at: float = 0.0

    def as_item(self) -> dict[str, Any]:
        return {"digest": self.digest, "counts": dict(self.counts), "failed": self.failed, "at": self.at}

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> Scan:
        counts = tuple(sorted((str(k), int(v)) for k, v in item.get("counts", {}).items()))
        return cls(str(item["digest"]), counts, bool(item.get("failed", False)), float(item.get("at", 0)))


@dataclass(frozen=True)
class Version:
    """One digest in the pool's history, or its current one."""

    digest: str
    tag: str
    pushed_at: float
    outcome: Outcome = Outcome.PROMOTED
    promoted_at: float | None = None
    by: PromotedBy | None = None
    counts: tuple[tuple[str, int], ...] | None = None
    reason: str = ""

    def as_item(self) -> dict[str, Any]:
        item: dict[str, Any] = {
            "digest": self.digest,
            "tag": self.tag,
            "pushed_at": self.pushed_at,
            "outcome": self.outcome.value,
        }
        if self.promoted_at is not None:
            item["promoted_at"] = self.promoted_at
        if self.by is not None:
            item["by"] = self.by.value
        if self.counts is not None:
            item["counts"] = dict(self.counts)
        if self.reason:
            item["reason"] = self.reason
        return item

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> Version:
        counts = item.get("counts")
        return cls(
            digest=str(item["digest"]),
            tag=str(item.get("tag", "")),
            pushed_at=float(item.get("pushed_at", 0)),
            outcome=Outcome(item.get("outcome", Outcome.PROMOTED.value)),
            promoted_at=float(item["promoted_at"]) if item.get("promoted_at") is not None else None,
            by=PromotedBy(item["by"]) if item.get("by") else None,
            counts=tuple(sorted((str(k), int(v)) for k, v in counts.items())) if counts is not None else None,
            reason=str(item.get("reason", "")),
        )


@dataclass(frozen=True)
class Candidate:
    """A pushed digest waiting for its scan before it may be promoted."""

    digest: str
    tag: str
    pushed_at: float
    received_at: float
    deadline: float
    state: CandidateState = CandidateState.AWAITING_SCAN

    def as_item(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "tag": self.tag,
            "pushed_at": self.pushed_at,
            "received_at": self.received_at,
            "deadline": self.deadline,
            "state": self.state.value,
        }

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> Candidate:
        return cls(
            str(item["digest"]),
            str(item.get("tag", "")),
            float(item.get("pushed_at", 0)),
            float(item.get("received_at", 0)),
            float(item.get("deadline", 0)),
            CandidateState(item.get("state", CandidateState.AWAITING_SCAN.value)),
        )


@dataclass(frozen=True)
class Push:
    """A push seen while the pool was pinned: decided as if it had just arrived when the pool is unpinned."""

    digest: str
    tag: str
    pushed_at: float

    def as_item(self) -> dict[str, Any]:
        return {"digest": self.digest, "tag": self.tag, "pushed_at": self.pushed_at}

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> Push:
        return cls(str(item["digest"]), str(item.get("tag", "")), float(item.get("pushed_at", 0)))


@dataclass(frozen=True)
class ImageRecord:
    """Everything the pool knows about its CI image. ``revision`` 0 is a record never written."""

    pool: str
    revision: int = 0
    current: Version | None = None
    candidate: Candidate | None = None
    history: tuple[Version, ...] = ()
    scans: tuple[Scan, ...] = ()
    # The push time of the newest push seen for the pool's tag: an older push arriving later never wins.
    latest_push_at: float = 0.0
    latest_push_digest: str = ""
    pinned: bool = False
    deferred: Push | None = None
    # The launch template version whose user data names ``current``; scale-up launches from it.
    template_version: int | None = None
    # When ECR said the current digest was deleted (new runners would fail to pull it); cleared by a promotion.
    current_deleted_at: float | None = None

    def scan_of(self, digest: str) -> Scan | None:
        return next((scan for scan in self.scans if scan.digest == digest), None)

    def with_scan(self, scan: Scan) -> ImageRecord:
        others = tuple(s for s in self.scans if s.digest != scan.digest)
        return replace(self, scans=(scan, *others)[:SCANS_LIMIT])

    def with_history(self, version: Version) -> ImageRecord:
        return replace(self, history=(version, *self.history)[:HISTORY_LIMIT])

    def known(self, digest: str) -> Version | None:
        """The newest history entry of ``digest``."""
        return next((v for v in self.history if v.digest == digest), None)

    def as_item(self) -> dict[str, Any]:
        item: dict[str, Any] = {
            "pool": self.pool,
            "revision": self.revision,
            "history": [v.as_item() for v in self.history],
            "scans": [s.as_item() for s in self.scans],
            "latest_push_at": self.latest_push_at,
            "latest_push_digest": self.latest_push_digest,
            "pinned": self.pinned,
        }
        optional = {
            "current": self.current.as_item() if self.current else None,
            "candidate": self.candidate.as_item() if self.candidate else None,
            "deferred": self.deferred.as_item() if self.deferred else None,
            "template_version": self.template_version,
            "current_deleted_at": self.current_deleted_at,
        }
        item.update({key: value for key, value in optional.items() if value is not None})
        return item

    @classmethod
    def from_item(cls, pool: str, item: dict[str, Any] | None) -> ImageRecord:
        if not item:
            return cls(pool)
        return cls(
            pool=pool,
            revision=int(item.get("revision", 0)),
            current=Version.from_item(item["current"]) if item.get("current") else None,
            candidate=Candidate.from_item(item["candidate"]) if item.get("candidate") else None,
            history=tuple(Version.from_item(v) for v in item.get("history", [])),
            scans=tuple(Scan.from_item(s) for s in item.get("scans", [])),
            latest_push_at=float(item.get("latest_push_at", 0)),
            latest_push_digest=str(item.get("latest_push_digest", "")),
            pinned=bool(item.get("pinned", False)),
            deferred=Push.from_item(item["deferred"]) if item.get("deferred") else None,
            template_version=int(item["template_version"]) if item.get("template_version") is not None else None,
            current_deleted_at=float(item["current_deleted_at"]) if item.get("current_deleted_at") else None,
        )
