"""Image rotation's decisions: which pools an image event concerns, and what it does to each pool's image record.

Pure functions of the event, the record, the pool's configuration and ``now``: no I/O and no clock, so the handler,
reconcile's scan timeout and the operator commands reach the same answer for the same facts, and the tests read as
a table. Each returns the new record and a :class:`Decision` saying what happened and whether the pool must move
to a new digest (``promote``), which the service (:mod:`chalicelib.images.rotation`) carries out.

The documented outcomes, for a pool whose repository and tag the event names:

* **push** of a digest not seen before: promoted at once when the pool has no scan gate; with a gate, promoted
  when a scan of that digest already came (a scan may arrive before its push's event) and passes, rejected when
  it failed, else held as the candidate until its scan, until ``scan.timeout_minutes``;
* **the same event twice**, or a push of the digest already current or already the candidate: nothing changes;
* **two pushes in quick succession**: the later push by ECR's own push time wins, whatever order the events
  arrive in. An older push arriving after a newer one changes nothing. EventBridge gives event times to the
  second, so for two pushes in the same second ECR is asked which digest the tag names now (``tag_digest``);
  when it cannot say, the larger digest wins, which every handler reading the same events agrees on;
* **a tag moved back to an older digest**: a push like any other, decided again by its gate; a digest whose scan
  is already known is decided by that scan at once (a digest rejected before is rejected again);
* **a pinned pool** (``fleetctl image pin`` or ``rollback``): a push is remembered (the newest only) and decided
  when the pool is unpinned; nothing moves meanwhile;
* **scan** of the candidate: promote if it has no finding at or above the threshold, reject otherwise (a failed
  scan rejects too). A scan of another digest is remembered for its push. A scan of the current digest with
  findings at or above the threshold is reported and changes nothing: rolling back is an operator's decision;
* **delete** of the current digest: reported loudly (runners keep their pulled copy; a new runner would fail to
  pull it); of the candidate: the candidate is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

from chalicelib.config import PoolConfig, ScanGate, Severity
from chalicelib.images.events import ImageEvent, ImageEventKind
from chalicelib.images.record import (
    Candidate,
    CandidateState,
    ImageRecord,
    Outcome,
    PromotedBy,
    Push,
    Scan,
    Version,
)

# Inspector's UNTRIAGED and basic scanning's UNDEFINED have no place in the severity order; they count as the
# lowest, so only a threshold of INFORMATIONAL refuses them.
_UNRANKED_AS = Severity.INFORMATIONAL


class Verdict(str, Enum):
    PROMOTED = "promoted"
    AWAITING_SCAN = "awaiting_scan"
    REJECTED = "rejected"
    DUPLICATE = "duplicate"
    ALREADY_CURRENT = "already_current"
    SUPERSEDED = "superseded"
    DEFERRED_PINNED = "deferred_pinned"
    SCAN_REMEMBERED = "scan_remembered"
    CURRENT_FAILS_SCAN = "current_fails_scan"
    CURRENT_DELETED = "current_deleted"
    CANDIDATE_DELETED = "candidate_deleted"
    DELETE_UNUSED = "delete_unused"
    SCAN_TIMEOUT = "scan_timeout"
    NOTHING_DUE = "nothing_due"
    PINNED = "pinned"
    UNPINNED = "unpinned"


@dataclass(frozen=True)
class Decision:
    """What an event or command did to one pool's record. ``promote`` is the version to roll out, if any."""

    verdict: Verdict
    record: ImageRecord
    promote: Version | None = None
    reason: str = ""

    @property
    def changed(self) -> bool:
        return self.verdict not in (Verdict.DUPLICATE, Verdict.ALREADY_CURRENT, Verdict.SUPERSEDED, Verdict.NOTHING_DUE)


def concerns(pool: PoolConfig, event: ImageEvent, *, account: str, region: str) -> bool:
    """Whether ``event`` is about ``pool``'s image: its registry (account and region: the pool's own, or the
    fleet's), its repository and, for a push, its tag. Scans and deletes name a digest, whose tags may be gone, so
    any tag of the repository concerns the pool; the record says whether the digest matters."""
    image = pool.image
    if event.account != (image.account or account) or event.region != (image.region or region):
        return False
    if event.repository != image.repository:
        return False
    return event.kind is not ImageEventKind.PUSH or image.tag in event.tags


def scan_passes(scan: Scan, gate: ScanGate) -> tuple[bool, str]:
    """Whether a scan lets a digest through the gate, and why not."""
    if scan.failed:
        return False, "the scan failed"
    over = [
        f"{severity} {n}" for severity, n in scan.counts if n > 0 and _rank(severity) >= gate.severity_threshold.rank
    ]
    if over:
        return False, f"findings at or above {gate.severity_threshold.value}: " + ", ".join(over)
    return True, ""


def _rank(severity: str) -> int:
    try:
        return Severity(severity.upper()).rank
    except ValueError:
        return _UNRANKED_AS.rank


def decide(
    record: ImageRecord, event: ImageEvent, pool: PoolConfig, now: float, tag_digest: str | None = None
) -> Decision:
    """The record after ``event``, for a pool the event :func:`concerns`. ``tag_digest`` is the digest ECR says the
    pool's tag names now, asked only for a push in the same second as the newest push seen (:func:`needs_tag`)."""
    if event.kind is ImageEventKind.PUSH:
        push = Push(event.digest, event.tags[0] if event.tags else pool.image.tag, event.at)
        return _push(record, push, pool, now, tag_digest)
    if event.kind is ImageEventKind.SCAN:
        return _scan(record, Scan(event.digest, event.counts, event.scan_failed, event.at), pool, now)
    return _delete(record, event.digest, now)


def needs_tag(record: ImageRecord, event: ImageEvent) -> bool:
    """Whether a push came in the same second as the newest push seen, of another digest: EventBridge gives event
    times to the second, so only ECR can say which of the two the tag names now."""
    return (
        event.kind is ImageEventKind.PUSH
        and event.at == record.latest_push_at
        and event.digest != record.latest_push_digest
    )


def _newer(push: Push, record: ImageRecord, tag_digest: str | None) -> bool:
    if push.pushed_at != record.latest_push_at:
        return push.pushed_at > record.latest_push_at
    if push.digest == record.latest_push_digest:
        return False
    if tag_digest is not None:
        return tag_digest == push.digest
    return push.digest > record.latest_push_digest


def _push(record: ImageRecord, push: Push, pool: PoolConfig, now: float, tag_digest: str | None = None) -> Decision:
    if not _newer(push, record, tag_digest):
        if push.digest == record.latest_push_digest:
            return Decision(Verdict.DUPLICATE, record)
        return Decision(Verdict.SUPERSEDED, record, reason=f"a later push ({record.latest_push_digest}) won")
    record = replace(record, latest_push_at=push.pushed_at, latest_push_digest=push.digest)
    if record.pinned:
        return Decision(Verdict.DEFERRED_PINNED, replace(record, deferred=push), reason="the pool is pinned")
    return _offer(record, push, pool, now)


def _offer(record: ImageRecord, push: Push, pool: PoolConfig, now: float) -> Decision:
    """A push that won: promote it, hold it for its scan, or reject it."""
    if record.current is not None and record.current.digest == push.digest:
        # A re-tag of what runs already, or the tag moved back to it: only the push time moves on; a candidate it
        # replaces is superseded.
        return Decision(Verdict.ALREADY_CURRENT, _drop_candidate(record, Outcome.SUPERSEDED, "tag back on current"))
    record = _drop_candidate(record, Outcome.SUPERSEDED, f"a later push ({push.digest}) won")
    if pool.scan is None:
        return _promote(record, push, PromotedBy.PUSH, now, None)
    scan = record.scan_of(push.digest)
    if scan is None:
        deadline = now + pool.scan.timeout_minutes * 60
        candidate = Candidate(push.digest, push.tag, push.pushed_at, now, deadline)
        return Decision(Verdict.AWAITING_SCAN, replace(record, candidate=candidate))
    return _judge(record, push, scan, pool.scan, now)


def _judge(record: ImageRecord, push: Push, scan: Scan, gate: ScanGate, now: float) -> Decision:
    passed, why = scan_passes(scan, gate)
    if passed:
        return _promote(replace(record, candidate=None), push, PromotedBy.SCAN, now, scan.counts)
    rejected = Version(push.digest, push.tag, push.pushed_at, Outcome.REJECTED, counts=scan.counts, reason=why)
    return Decision(Verdict.REJECTED, replace(record, candidate=None).with_history(rejected), reason=why)


def _promote(
    record: ImageRecord, push: Push, by: PromotedBy, now: float, counts: tuple[tuple[str, int], ...] | None
) -> Decision:
    version = Version(push.digest, push.tag, push.pushed_at, Outcome.PROMOTED, now, by, counts)
    promoted = replace(record.with_history(version), current=version, current_deleted_at=None)
    return Decision(Verdict.PROMOTED, promoted, promote=version)


def _drop_candidate(record: ImageRecord, outcome: Outcome, reason: str) -> ImageRecord:
    if record.candidate is None:
        return record
    old = record.candidate
    dropped = Version(old.digest, old.tag, old.pushed_at, outcome, reason=reason)
    return replace(record, candidate=None).with_history(dropped)


def _scan(record: ImageRecord, scan: Scan, pool: PoolConfig, now: float) -> Decision:
    if record.scan_of(scan.digest) == scan:
        return Decision(Verdict.DUPLICATE, record)
    record = record.with_scan(scan)
    candidate = record.candidate
    if candidate is not None and candidate.digest == scan.digest and pool.scan is not None:
        return _judge(record, Push(candidate.digest, candidate.tag, candidate.pushed_at), scan, pool.scan, now)
    if record.current is not None and record.current.digest == scan.digest:
        current = replace(record.current, counts=scan.counts)
        record = replace(record, current=current)
        if pool.scan is not None:
            passed, why = scan_passes(scan, pool.scan)
            if not passed:
                return Decision(Verdict.CURRENT_FAILS_SCAN, record, reason=why)
    return Decision(Verdict.SCAN_REMEMBERED, record)


def _delete(record: ImageRecord, digest: str, now: float) -> Decision:
    if record.current is not None and record.current.digest == digest:
        if record.current_deleted_at is not None:
            return Decision(Verdict.DUPLICATE, record)
        reason = "runners keep their pulled copy; a new runner would fail to pull it"
        return Decision(Verdict.CURRENT_DELETED, replace(record, current_deleted_at=now), reason=reason)
    if record.candidate is not None and record.candidate.digest == digest:
        return Decision(Verdict.CANDIDATE_DELETED, _drop_candidate(record, Outcome.DELETED, "deleted from ECR"))
    return Decision(Verdict.DELETE_UNUSED, record)


def expire(record: ImageRecord, now: float) -> Decision:
    """Reconcile's check: a candidate whose scan is past its deadline is reported as ``scan_timeout``, once."""
    candidate = record.candidate
    if candidate is None or candidate.state is CandidateState.SCAN_TIMEOUT or now < candidate.deadline:
        return Decision(Verdict.NOTHING_DUE, record)
    timed_out = replace(candidate, state=CandidateState.SCAN_TIMEOUT)
    waited = round(now - candidate.received_at)
    return Decision(Verdict.SCAN_TIMEOUT, replace(record, candidate=timed_out), reason=f"no scan after {waited} s")


def pin(record: ImageRecord, digest: str, tag: str, pushed_at: float, now: float) -> Decision:
    """An operator pins ``digest``: it becomes current (rolled out like any promotion) and pushes wait."""
    pinned = replace(record, pinned=True)
    if record.current is not None and record.current.digest == digest:
        return Decision(Verdict.PINNED, pinned)
    pinned = _drop_candidate(pinned, Outcome.SUPERSEDED, "pinned by an operator")
    return _promote(pinned, Push(digest, tag, pushed_at), PromotedBy.OPERATOR, now, None)


def rollback_target(record: ImageRecord, to: str | None) -> Version | None:
    """The version a rollback goes to: ``to`` if the pool ran it, else the last one promoted before the current."""
    promoted = [v for v in record.history if v.outcome is Outcome.PROMOTED]
    if to is not None:
        return next((v for v in promoted if v.digest == to), None)
    current = record.current.digest if record.current else None
    return next((v for v in promoted if v.digest != current), None)


def unpin(record: ImageRecord, pool: PoolConfig, now: float) -> Decision:
    """Pushes count again; a push that came while pinned is decided now, as if it had just arrived."""
    deferred = record.deferred
    record = replace(record, pinned=False, deferred=None)
    if deferred is None:
        return Decision(Verdict.UNPINNED, record)
    decided = _offer(record, deferred, pool, now)
    return (
        decided
        if decided.promote is not None or decided.verdict is Verdict.AWAITING_SCAN
        else replace(decided, verdict=Verdict.UNPINNED)
    )
