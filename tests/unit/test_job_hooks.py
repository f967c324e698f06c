"""Job Hook parsing: every documented shape, both timestamp formats, strict ids, unknown fields ignored."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from chalicelib.errors import PayloadError
from chalicelib.intake.job_hooks import JobHook, JobStatus, parse_gitlab_time, parse_job_hook
from tests.payloads import job_hook


def parse(document: object) -> JobHook:
    return parse_job_hook(json.dumps(document).encode())


def test_the_documented_job_hook_parses() -> None:
    hook = parse(job_hook("pending", build_id=1977, project_id=380, pipeline_id=2366))

    assert (hook.build_id, hook.project_id, hook.pipeline_id) == (1977, 380, 2366)
    assert hook.status is JobStatus.PENDING
    assert hook.created_at == datetime(2021, 2, 23, 2, 41, 37, 886000, tzinfo=UTC)
    assert hook.runner is None


def test_legacy_timestamps_parse_to_the_same_instant() -> None:
    hook = parse(job_hook(legacy_times=True))
    assert hook.created_at == datetime(2021, 2, 23, 2, 41, 37, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2019-11-21 13:34:18 UTC", datetime(2019, 11, 21, 13, 34, 18, tzinfo=UTC)),
        ("2021-02-23T02:41:37.886Z", datetime(2021, 2, 23, 2, 41, 37, 886000, tzinfo=UTC)),
        ("2021-02-23T02:41:37Z", datetime(2021, 2, 23, 2, 41, 37, tzinfo=UTC)),
        ("2021-02-23T03:41:37+01:00", datetime(2021, 2, 23, 2, 41, 37, tzinfo=UTC)),
        (None, None),
        ("", None),
    ],
)
def test_gitlab_time_formats(text: str | None, expected: datetime | None) -> None:
    assert parse_gitlab_time(text) == expected


def test_a_running_job_carries_its_runner() -> None:
    runner = {
        "active": True,
        "runner_type": "project_type",
        "is_shared": False,
        "id": 380987,
        "description": "runner-fleet i-0abc",
        "tags": ["linux", "docker"],
    }
    hook = parse(job_hook("running", runner=runner, build_started_at="2021-02-23T02:42:00Z"))

    assert hook.runner is not None
    assert (hook.runner.id, hook.runner.description, hook.runner.tags) == (
        380987,
        "runner-fleet i-0abc",
        ("linux", "docker"),
    )
    assert hook.started_at == datetime(2021, 2, 23, 2, 42, tzinfo=UTC)


@pytest.mark.parametrize("status", [s.value for s in JobStatus])
def test_every_documented_status_is_known(status: str) -> None:
    assert parse(job_hook(status)).status is JobStatus(status)


def test_an_unknown_status_parses_but_is_not_a_known_status() -> None:
    assert parse(job_hook("teleported")).status is None


def test_unknown_fields_are_ignored() -> None:
    hook = parse(job_hook(some_future_field={"x": 1}, build_allow_failure=True))
    assert hook.build_id > 0


def test_finished_statuses_rank_above_everything_else() -> None:
    finished = [s for s in JobStatus if s.finished]
    assert {s.value for s in finished} == {"success", "failed", "canceled", "skipped"}
    assert all(s.rank < JobStatus.SUCCESS.rank for s in JobStatus if not s.finished)
    assert JobStatus.CREATED.rank < JobStatus.PENDING.rank < JobStatus.RUNNING.rank


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"build_id": None}, "build_id"),
        ({"build_id": "1977"}, "build_id"),
        ({"build_id": 0}, "build_id"),
        ({"build_id": True}, "build_id"),
        ({"project_id": 3.0}, "project_id"),
        ({"build_status": 1}, "build_status"),
        ({"build_created_at": "last tuesday"}, "build_created_at"),
        ({"build_created_at": 1614047497}, "build_created_at"),
        ({"object_kind": "pipeline"}, "object_kind"),
        ({"runner": {"description": "no id"}}, "`id` - at `$.runner`"),
    ],
)
def test_malformed_fields_are_named(change: dict[str, object], field: str) -> None:
    body = {**job_hook(), **change}
    with pytest.raises(PayloadError) as raised:
        parse(body)
    assert field in str(raised.value)


@pytest.mark.parametrize("missing", ["build_id", "project_id", "build_status"])
def test_required_fields(missing: str) -> None:
    body = job_hook()
    del body[missing]
    with pytest.raises(PayloadError, match=missing):
        parse(body)


@pytest.mark.parametrize("document", [[], "x", 3, None])
def test_the_body_must_be_an_object(document: object) -> None:
    with pytest.raises(PayloadError, match="Expected `object`"):
        parse(document)


@pytest.mark.parametrize("body", [b"", b"{", b"not json", b"\xff\xfe{}"])
def test_bytes_that_are_not_json_are_refused(body: bytes) -> None:
    with pytest.raises(PayloadError, match="not JSON"):
        parse_job_hook(body)


def test_a_string_that_is_not_utf8_is_refused() -> None:
    body = json.dumps(job_hook(build_name="NAME")).encode().replace(b"NAME", b"caf\xe9")
    with pytest.raises(PayloadError, match="not UTF-8"):
        parse_job_hook(body)


@pytest.mark.parametrize(
    ("path", "value", "accepted"),
    [
        ("build_id", 2**63 - 1, True),
        ("build_id", 2**63, False),  # GitLab ids are signed 64-bit; scale-up sends them back to its API
        ("project_id", 0, False),
        ("pipeline_id", 2**64, False),
        ("retries_count", 1_000_000, True),
        ("retries_count", -1, False),
        ("retries_count", 10**30, False),
        ("build_status", "s" * 65, False),
        ("build_name", "n" * 255, True),
        ("build_name", "n" * 256, False),
        ("build_stage", "s" * 256, False),
        ("build_failure_reason", "f" * 256, False),
        ("ref", "r" * 1024, True),
        ("ref", "r" * 1025, False),
        ("project_name", "p" * 1025, False),
        ("build_created_at", "t" * 65, False),
        ("build_created_at", "0001-01-01T00:00:00+23:59", False),  # before year 1 once in UTC
        ("runner.id", 2**63, False),
        ("runner.description", "d" * 1025, False),
        ("runner.tags", ["t"] * 257, False),
        ("runner.tags", ["t" * 256], False),
    ],
)
def test_every_kept_value_is_bounded_and_a_refusal_names_the_field(path: str, value: object, accepted: bool) -> None:
    # given a documented hook with one value at or beyond its bound
    document = job_hook("running", runner={"id": 7, "description": "runner-fleet i-0abc", "tags": ["docker"]})
    parent, _, name = path.rpartition(".")
    (document[parent] if parent else document)[name] = value
    # when / then
    if accepted:
        assert parse(document).build_id > 0
    else:
        with pytest.raises(PayloadError) as refused:
            parse(document)
        assert f"at `$.{path}" in str(refused.value)
