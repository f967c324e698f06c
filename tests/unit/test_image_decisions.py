"""Image rotation's decisions, as a table of the documented outcomes (chalicelib/images/decisions.py)."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

import pytest

from chalicelib.config import FleetConfig, PoolConfig, parse_config
from chalicelib.images import decisions
from chalicelib.images.decisions import Verdict
from chalicelib.images.events import ImageEvent, ImageEventKind
from chalicelib.images.record import CandidateState, ImageRecord, Outcome, PromotedBy

ACCOUNT, REGION = "111111111111", "eu-west-1"
T0 = 1_800_000_000.0


def digest(name: str) -> str:
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


A, B, C = digest("a"), digest("b"), digest("c")


def config(**image_pool: Any) -> FleetConfig:
    return parse_config(
        {
            "fleet": "demo",
            "gitlab": {"url": "https://gitlab.example.com", "token_parameter": "/t/gitlab"},
            "webhook": {"token_parameter": "/t/webhook"},
            "state": {"table": "t-table", "jobs_queue": "t-jobs", "dead_letter_queue": "t-dlq"},
            "cache_bucket": "t-cache",
            "ami_parameter": "/t/ami",
            "pools": [
                {
                    "name": "docker",
                    "tags": ["docker"],
                    "instance_types": ["m7i.large"],
                    "subnets": ["subnet-0123456789abcdef0"],
                    "security_groups": ["sg-0123456789abcdef0"],
                    "max_runners": 5,
                    "image": {"repository": "ci/base", "tag": "stable"},
                    **image_pool,
                }
            ],
        }
    )


PLAIN = config().pools[0]
GATED = config(scan={"severity_threshold": "HIGH", "timeout_minutes": 30}).pools[0]


def push(d: str, at: float = T0, tag: str = "stable", **fields: Any) -> ImageEvent:
    values: dict[str, Any] = {
        "event_id": f"push-{d[-6:]}-{at}",
        "kind": ImageEventKind.PUSH,
        "account": ACCOUNT,
        "region": REGION,
        "repository": "ci/base",
        "digest": d,
        "tags": (tag,),
        "at": at,
    }
    return ImageEvent(**{**values, **fields})


def scan(d: str, at: float = T0 + 60, failed: bool = False, **counts: int) -> ImageEvent:
    return replace(
        push(d, at),
        kind=ImageEventKind.SCAN,
        tags=(),
        counts=tuple(sorted(counts.items())),
        scan_failed=failed,
    )


def delete(d: str) -> ImageEvent:
    return replace(push(d, T0 + 500), kind=ImageEventKind.DELETE)


def run(pool: PoolConfig, *events: ImageEvent, record: ImageRecord | None = None) -> list[decisions.Decision]:
    """Each event in turn, each decided on the record the one before left, at one minute after the event."""
    current = record or ImageRecord(pool.name)
    made = []
    for event in events:
        decided = decisions.decide(current, event, pool, event.at + 1)
        made.append(decided)
        current = decided.record
    return made


def on(d: str) -> ImageRecord:
    """A pool running ``d`` since bootstrap."""
    return run(PLAIN, push(d, T0 - 3600))[0].record


# -- which pools an event concerns ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "concerns"),
    [
        ({}, True),
        ({"repository": "ci/other"}, False),
        ({"tags": ("latest",)}, False),
        ({"tags": ()}, False),  # a push by digest moves no tag
        ({"account": "999999999999"}, False),
        ({"region": "us-east-1"}, False),
        ({"kind": ImageEventKind.SCAN, "tags": ()}, True),  # a scan of a digest: the record says if it matters
        ({"kind": ImageEventKind.DELETE, "tags": ("old",)}, True),
    ],
)
def test_an_event_concerns_the_pools_running_its_registry_repository_and_for_a_push_its_tag(
    change: dict[str, Any], concerns: bool
) -> None:
    event = replace(push(A), **change)
    assert decisions.concerns(PLAIN, event, account=ACCOUNT, region=REGION) is concerns


def test_a_pool_on_another_accounts_registry_takes_that_accounts_events_only() -> None:
    central = config(image={"repository": "ci/base", "tag": "stable", "account": "333333333333"}).pools[0]
    assert decisions.concerns(central, replace(push(A), account="333333333333"), account=ACCOUNT, region=REGION)
    assert not decisions.concerns(central, push(A), account=ACCOUNT, region=REGION)


# -- push and scan ---------------------------------------------------------------------------------------------


def test_a_push_is_promoted_at_once_for_a_pool_without_a_scan_gate() -> None:
    (decided,) = run(PLAIN, push(A))
    assert decided.verdict is Verdict.PROMOTED
    assert decided.promote is not None and decided.promote.digest == A
    assert decided.record.current is not None and decided.record.current.by is PromotedBy.PUSH
    assert [(v.digest, v.outcome) for v in decided.record.history] == [(A, Outcome.PROMOTED)]


def test_a_gated_pool_holds_a_push_until_its_scan_passes_then_promotes_it_by_the_scan() -> None:
    held, passed = run(GATED, push(A), scan(A, MEDIUM=4, LOW=1))
    assert held.verdict is Verdict.AWAITING_SCAN and held.promote is None
    assert held.record.candidate is not None and held.record.candidate.deadline == T0 + 1 + 30 * 60
    assert passed.verdict is Verdict.PROMOTED
    assert passed.record.current is not None
    assert (passed.record.current.digest, passed.record.current.by) == (A, PromotedBy.SCAN)
    assert passed.record.current.counts == (("LOW", 1), ("MEDIUM", 4))
    assert passed.record.candidate is None


@pytest.mark.parametrize(("counts", "failed"), [({"HIGH": 1}, False), ({"CRITICAL": 3, "LOW": 2}, False), ({}, True)])
def test_a_scan_at_or_above_the_threshold_or_a_failed_scan_rejects_the_candidate_and_keeps_the_current(
    counts: dict[str, int], failed: bool
) -> None:
    _, rejected = run(GATED, push(B, T0 + 10), scan(B, failed=failed, **counts), record=on(A))
    assert rejected.verdict is Verdict.REJECTED
    assert rejected.promote is None
    assert rejected.record.current is not None and rejected.record.current.digest == A
    assert rejected.record.candidate is None
    assert rejected.record.history[0].digest == B and rejected.record.history[0].outcome is Outcome.REJECTED
    assert rejected.reason


def test_a_scan_that_arrives_before_its_push_decides_the_push_when_it_comes() -> None:
    remembered, promoted = run(GATED, scan(A, T0 - 5, LOW=2), push(A))
    assert remembered.verdict is Verdict.SCAN_REMEMBERED
    assert promoted.verdict is Verdict.PROMOTED and promoted.promote is not None


def test_an_unranked_severity_counts_as_the_lowest() -> None:
    strict = config(scan={"severity_threshold": "INFORMATIONAL"}).pools[0]
    assert run(GATED, push(A), scan(A, UNTRIAGED=3))[1].verdict is Verdict.PROMOTED
    assert run(strict, push(A), scan(A, UNTRIAGED=3))[1].verdict is Verdict.REJECTED


# -- idempotence and order ---------------------------------------------------------------------------------------


def test_the_same_push_twice_changes_nothing_the_second_time() -> None:
    first, again = run(PLAIN, push(A), push(A))
    assert first.verdict is Verdict.PROMOTED
    assert again.verdict is Verdict.DUPLICATE and not again.changed and again.record == first.record


def test_the_same_scan_twice_changes_nothing_the_second_time() -> None:
    decided = run(GATED, push(A), scan(A, LOW=1), scan(A, LOW=1))
    assert decided[2].verdict is Verdict.DUPLICATE and not decided[2].changed


def test_the_later_push_wins_by_ecrs_push_time_not_by_arrival() -> None:
    newer, older = run(PLAIN, push(B, T0 + 5), push(A, T0))
    assert newer.verdict is Verdict.PROMOTED
    assert older.verdict is Verdict.SUPERSEDED and not older.changed
    assert older.record.current is not None and older.record.current.digest == B


def test_two_pushes_in_the_same_second_are_ordered_by_digest_whatever_their_order_of_arrival() -> None:
    low, high = sorted([A, B])
    one_way = run(PLAIN, push(low), push(high))[-1].record
    other_way = run(PLAIN, push(high), push(low))[-1].record
    assert one_way.current is not None and other_way.current is not None
    assert one_way.current.digest == other_way.current.digest == high


def test_two_pushes_in_the_same_second_are_ordered_by_the_digest_ecrs_tag_names_when_ecr_can_say() -> None:
    low, high = sorted([A, B])
    first = run(PLAIN, push(high))[0].record
    assert decisions.needs_tag(first, push(low))
    assert not decisions.needs_tag(first, push(high)) and not decisions.needs_tag(first, push(low, T0 + 1))
    # the tag names the smaller digest now: it was pushed last, whatever the digest order says
    later = decisions.decide(first, push(low), PLAIN, T0 + 2, tag_digest=low)
    assert later.verdict is Verdict.PROMOTED and later.promote is not None and later.promote.digest == low
    earlier = decisions.decide(first, push(low), PLAIN, T0 + 2, tag_digest=high)
    assert earlier.verdict is Verdict.SUPERSEDED


def test_a_later_push_supersedes_a_candidate_still_waiting_for_its_scan() -> None:
    _, second = run(GATED, push(A), push(B, T0 + 5))
    assert second.verdict is Verdict.AWAITING_SCAN
    assert second.record.candidate is not None and second.record.candidate.digest == B
    assert second.record.history[0].digest == A and second.record.history[0].outcome is Outcome.SUPERSEDED


def test_a_push_of_the_digest_already_current_changes_only_the_push_time() -> None:
    (decided,) = run(PLAIN, push(A, T0 + 100, tag="stable"), record=on(A))
    assert decided.verdict is Verdict.ALREADY_CURRENT and decided.promote is None
    assert decided.record.latest_push_at == T0 + 100


def test_a_tag_moved_back_to_an_older_digest_is_promoted_again_without_a_gate() -> None:
    decided = run(PLAIN, push(B, T0), push(A, T0 + 60), record=on(A))
    assert decided[-1].verdict is Verdict.PROMOTED
    assert decided[-1].record.current is not None and decided[-1].record.current.digest == A


def test_a_tag_moved_back_to_a_digest_rejected_before_is_rejected_again_by_its_known_scan() -> None:
    decided = run(GATED, push(B, T0), scan(B, T0 + 30, CRITICAL=1), push(C, T0 + 60), push(B, T0 + 90), record=on(A))
    assert decided[-1].verdict is Verdict.REJECTED


# -- pinning and rollback ------------------------------------------------------------------------------------------


def test_a_pinned_pool_defers_a_push_and_decides_it_when_unpinned() -> None:
    pinned = decisions.pin(on(A), A, "stable", T0, T0 + 10)
    assert pinned.verdict is Verdict.PINNED and pinned.record.pinned
    (deferred,) = run(PLAIN, push(B, T0 + 20), record=pinned.record)
    assert deferred.verdict is Verdict.DEFERRED_PINNED and deferred.promote is None
    assert deferred.record.current is not None and deferred.record.current.digest == A
    unpinned = decisions.unpin(deferred.record, PLAIN, T0 + 30)
    assert unpinned.verdict is Verdict.PROMOTED and unpinned.promote is not None and unpinned.promote.digest == B
    assert not unpinned.record.pinned and unpinned.record.deferred is None


def test_unpinning_with_no_push_meanwhile_leaves_the_pinned_digest() -> None:
    pinned = decisions.pin(on(A), A, "stable", T0, T0 + 10)
    unpinned = decisions.unpin(pinned.record, PLAIN, T0 + 20)
    assert unpinned.verdict is Verdict.UNPINNED and unpinned.promote is None
    assert unpinned.record.current is not None and unpinned.record.current.digest == A


def test_pinning_another_digest_promotes_it_by_the_operator() -> None:
    decided = decisions.pin(on(A), B, "stable", T0, T0 + 10)
    assert decided.verdict is Verdict.PROMOTED and decided.promote is not None
    assert decided.promote.by is PromotedBy.OPERATOR and decided.record.pinned


def test_rollback_goes_to_the_last_digest_promoted_before_the_current_or_to_one_named() -> None:
    record = run(PLAIN, push(B, T0), push(C, T0 + 60), record=on(A))[-1].record
    assert [v.digest for v in record.history] == [C, B, A]
    target = decisions.rollback_target(record, None)
    assert target is not None and target.digest == B
    named = decisions.rollback_target(record, A)
    assert named is not None and named.digest == A
    assert decisions.rollback_target(record, digest("never")) is None


def test_a_digest_that_was_rejected_is_no_rollback_target() -> None:
    record = run(GATED, push(B, T0), scan(B, CRITICAL=1), record=on(A))[-1].record
    assert decisions.rollback_target(record, B) is None


# -- deletes and scan timeouts --------------------------------------------------------------------------------------


def test_deleting_the_current_digest_is_reported_once_and_keeps_the_current() -> None:
    first, again = run(PLAIN, delete(A), delete(A), record=on(A))
    assert first.verdict is Verdict.CURRENT_DELETED and first.record.current_deleted_at is not None
    assert first.record.current is not None and first.record.current.digest == A
    assert again.verdict is Verdict.DUPLICATE


def test_deleting_the_candidate_drops_it_and_deleting_anything_else_changes_nothing() -> None:
    held = run(GATED, push(B))[0].record
    (dropped,) = run(GATED, delete(B), record=held)
    assert dropped.verdict is Verdict.CANDIDATE_DELETED and dropped.record.candidate is None
    (other,) = run(GATED, delete(C), record=held)
    assert other.verdict is Verdict.DELETE_UNUSED


def test_a_scan_past_its_deadline_is_reported_once_and_a_late_scan_still_decides_it() -> None:
    held = run(GATED, push(A))[0].record
    assert held.candidate is not None
    assert decisions.expire(held, held.candidate.deadline - 1).verdict is Verdict.NOTHING_DUE
    timed_out = decisions.expire(held, held.candidate.deadline)
    assert timed_out.verdict is Verdict.SCAN_TIMEOUT
    assert timed_out.record.candidate is not None and timed_out.record.candidate.state is CandidateState.SCAN_TIMEOUT
    assert decisions.expire(timed_out.record, held.candidate.deadline + 600).verdict is Verdict.NOTHING_DUE
    (late,) = run(GATED, scan(A, T0 + 7200, LOW=1), record=timed_out.record)
    assert late.verdict is Verdict.PROMOTED


def test_a_rescan_of_the_current_digest_that_fails_the_gate_is_reported_and_changes_nothing_else() -> None:
    record = run(GATED, push(A), scan(A, LOW=1))[-1].record
    (rescan,) = run(GATED, scan(A, T0 + 86400, CRITICAL=1), record=record)
    assert rescan.verdict is Verdict.CURRENT_FAILS_SCAN and rescan.promote is None
    assert rescan.record.current is not None and rescan.record.current.counts == (("CRITICAL", 1),)


def test_the_record_survives_its_item_form() -> None:
    record = run(GATED, push(B, T0), scan(B, T0 + 10, CRITICAL=1), push(C, T0 + 20), record=on(A))[-1].record
    record = decisions.pin(record, A, "stable", T0, T0 + 30).record
    record = replace(record, template_version=7, revision=3)
    assert ImageRecord.from_item("docker", record.as_item()) == record
