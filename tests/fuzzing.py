"""Hypothesis settings and strategies for the webhook's property suites: hostile Job Hook bodies and headers.

One fixed, database-less, derandomized setting (``FUZZ``), so that CI runs the same examples every time and a
failure reproduces anywhere; the example count stays modest so the suites take seconds, not minutes.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from chalicelib.intake import job_hooks
from chalicelib.intake.job_hooks import JobHook, parse_gitlab_time
from tests.payloads import job_hook

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)

KNOWN_FIELDS = (
    "build_id",
    "project_id",
    "build_status",
    "object_kind",
    "pipeline_id",
    "build_name",
    "build_stage",
    "ref",
    "project_name",
    "build_created_at",
    "build_started_at",
    "build_finished_at",
    "build_failure_reason",
    "retries_count",
    "runner",
)

# Numbers around every bound that matters: ids, signed and unsigned 64-bit, DynamoDB's 38 digits.
edge_integers = st.sampled_from(
    [0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**38 - 1, 10**38, 10**39, -(2**63) - 1]
)
integers = st.integers(min_value=-(2**70), max_value=2**70) | edge_integers
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([1e308, -1e308, 5e-324, 1.5])
# Lengths around the model's bounds and the stores' limits (SQS 256 KB, DynamoDB 400 KB, the 1 MiB body).
lengths = st.integers(min_value=0, max_value=2000) | st.sampled_from(
    [255, 256, 1024, 1025, 200_000, 270_000, 420_000, 1_100_000]
)
long_strings = st.builds(
    lambda char, n: char * n,
    st.sampled_from(["n", "é", "🚀", "\x00", "\u202e", "\ud7ff", "\ufffd"]),
    lengths,
)
strings = st.text() | long_strings
json_scalars = st.none() | st.booleans() | integers | floats | strings
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
# Pending is the status that queues a job, so it is drawn as often as all the others together.
statuses = st.one_of(st.just("pending"), st.sampled_from([s.value for s in job_hooks.JobStatus]), st.text(max_size=80))
runners = (
    st.fixed_dictionaries(
        {"id": integers},
        optional={"description": strings | st.none(), "tags": st.lists(strings, max_size=300) | json_values},
    )
    | json_values
)
timestamps = (
    st.sampled_from(["2021-02-23T02:41:37Z", "2019-11-21 13:34:18 UTC", "0001-01-01T00:00:00+23:59"])
    | st.datetimes().map(lambda d: d.isoformat())
    | strings
)
field_values = {
    "build_id": integers,
    "project_id": integers,
    "pipeline_id": integers | st.none(),
    "retries_count": integers,
    "build_status": statuses,
    "runner": runners,
    "build_created_at": timestamps,
    "build_started_at": timestamps,
    "build_finished_at": timestamps,
}


@st.composite
def hook_documents(draw: st.DrawFn) -> dict[str, Any]:
    """A documented Job Hook with some known fields replaced by hostile values, and unknown fields added."""
    document = job_hook(draw(statuses), build_id=draw(st.integers(min_value=1, max_value=2**40)))
    for name in draw(st.lists(st.sampled_from(KNOWN_FIELDS), unique=True, max_size=3)):
        choice = draw(st.sampled_from(["drop", "hostile", "any"]))
        if choice == "drop":
            document.pop(name, None)
        elif choice == "hostile":
            document[name] = draw(field_values.get(name, strings))
        else:
            document[name] = draw(json_values)
    document.update(draw(st.dictionaries(st.text(max_size=12), json_values, max_size=3)))
    return document


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """Request bodies: mutated hooks, arbitrary JSON, deep nesting, and bytes that are not JSON at all."""
    kind = draw(st.sampled_from(["hook", "hook", "hook", "json", "deep", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=2000))
    if kind == "json":
        return encode(draw(json_values))
    document = draw(hook_documents())
    if kind == "deep":
        depth = draw(st.integers(min_value=1, max_value=300_000))
        text = encode(document)
        return text[:-1] + b', "nested": ' + _nested(depth) + b"}"
    return encode(document)


def encode(value: Any) -> bytes:
    # ensure_ascii: lone surrogates become "\\ud800" escapes, as a hostile sender would write them.
    return json.dumps(value, allow_nan=True).encode()


def deep_body(depth: int) -> bytes:
    """A pending Job Hook with an unknown field nested ``depth`` arrays deep."""
    text = encode(job_hook("pending"))
    return text[:-1] + b', "nested": ' + _nested(depth) + b"}"


def assert_valid_hook(hook: JobHook) -> None:
    """What every parsed hook guarantees to the code behind it (DynamoDB, SQS, scale-up)."""
    assert isinstance(hook, JobHook)
    for value in (hook.build_id, hook.project_id, hook.pipeline_id, hook.runner.id if hook.runner else None):
        assert value is None or (type(value) is int and 0 < value <= job_hooks.MAX_ID)
    assert type(hook.retries_count) is int and 0 <= hook.retries_count <= job_hooks.MAX_COUNT
    strings = [hook.build_status, hook.build_name, hook.build_stage, hook.ref, hook.project_name]
    strings += [hook.build_failure_reason or ""]
    if hook.runner:
        strings += [hook.runner.description or "", hook.runner.runner_type or "", *hook.runner.tags]
    for text in strings:
        assert isinstance(text, str) and len(text) <= job_hooks.MAX_TEXT_LENGTH
        text.encode("utf-8")  # no lone surrogate: DynamoDB and SQS take UTF-8 only
    for stamp in (hook.build_created_at, hook.build_started_at, hook.build_finished_at):
        instant = parse_gitlab_time(stamp)
        assert instant is None or instant.utcoffset() is not None
