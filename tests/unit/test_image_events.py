"""Image events decoded from each documented shape (tests/fixtures/aws/README.md says where each comes from)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from chalicelib.errors import PayloadError
from chalicelib.images.events import IgnoredEvent, ImageEventKind, parse_image_event

FIXTURES = Path(__file__).parent.parent / "fixtures" / "aws"


def fixture(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return loaded


def test_a_push_names_its_one_tag_and_ecrs_push_time() -> None:
    # given / when
    event = parse_image_event(fixture("ecr-image-action-push.json"))
    # then
    assert event.kind is ImageEventKind.PUSH
    assert (event.account, event.region, event.repository) == ("111111111111", "eu-west-1", "ci/build-base")
    assert event.tags == ("stable",)
    assert event.digest.startswith("sha256:")
    assert event.at == 1796030045.0  # 2026-11-30T09:14:05Z


def test_a_push_by_digest_has_no_tag() -> None:
    raw = fixture("ecr-image-action-push.json")
    del raw["detail"]["image-tag"]
    assert parse_image_event(raw).tags == ()


def test_a_delete_is_a_delete() -> None:
    event = parse_image_event(fixture("ecr-image-action-delete.json"))
    assert event.kind is ImageEventKind.DELETE
    assert event.tags == ("stable",)


def test_a_basic_scan_carries_its_counts_and_an_empty_tag_list() -> None:
    event = parse_image_event(fixture("ecr-image-scan.json"))
    assert event.kind is ImageEventKind.SCAN
    assert event.counts_dict == {"CRITICAL": 2, "MEDIUM": 5}
    assert event.tags == ()
    assert not event.scan_failed


def test_an_enhanced_scan_names_the_repository_and_its_registry_by_arn_and_drops_the_total() -> None:
    event = parse_image_event(fixture("inspector2-scan.json"))
    assert event.kind is ImageEventKind.SCAN
    # The envelope's account is Inspector's; the image's registry is the ARN's.
    assert (event.account, event.region, event.repository) == ("111111111111", "eu-west-1", "ci/build-base")
    assert event.counts_dict == {"HIGH": 3, "LOW": 7}
    assert event.tags == ("stable",)


def test_a_scan_that_failed_is_a_failed_scan_and_one_still_running_changes_nothing() -> None:
    raw = fixture("ecr-image-scan.json")
    raw["detail"]["scan-status"] = "FAILED"
    raw["detail"].pop("finding-severity-counts")
    assert parse_image_event(raw).scan_failed
    raw["detail"]["scan-status"] = "IN_PROGRESS"
    with pytest.raises(IgnoredEvent):
        parse_image_event(raw)


def test_a_failed_push_changes_nothing() -> None:
    raw = fixture("ecr-image-action-push.json")
    raw["detail"]["result"] = "FAILURE"
    with pytest.raises(IgnoredEvent):
        parse_image_event(raw)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e: e["detail"].pop("image-digest"), "malformed"),
        (lambda e: e["detail"].update({"image-digest": "latest"}), "not an image digest"),
        (lambda e: e["detail"].update({"action-type": "RETAG"}), "unknown ECR image action"),
        (lambda e: e.update({"detail-type": "EC2 Instance State-change Notification"}), "not an image event"),
        (lambda e: e.update({"time": "yesterday"}), "not an event time"),
        (lambda e: e.pop("id"), "not an EventBridge event"),
    ],
)
def test_a_malformed_event_is_refused_with_its_reason(change: Any, message: str) -> None:
    raw = fixture("ecr-image-action-push.json")
    change(raw)
    with pytest.raises(PayloadError, match=message):
        parse_image_event(raw)


def test_an_inspector_event_whose_repository_is_not_an_ecr_arn_is_refused() -> None:
    raw = fixture("inspector2-scan.json")
    raw["detail"]["repository-name"] = "arn:aws:s3:::bucket"
    with pytest.raises(PayloadError, match="not an ECR repository ARN"):
        parse_image_event(raw)
