"""Property: ``parse_job_hook`` returns a hook the stores can take, or raises ``PayloadError``; nothing else.

Anything else escaping the parser reaches the handler boundary as a 503, which counts toward GitLab disabling
the hook. The explicit examples are inputs that did escape before the model bounded them.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given

from chalicelib.errors import PayloadError
from chalicelib.intake.job_hooks import MAX_ID, parse_job_hook
from tests.fuzzing import FUZZ, assert_valid_hook, bodies, deep_body, encode
from tests.payloads import job_hook


@FUZZ
@given(bodies())
@example(deep_body(100_000)).via("RecursionError escaped the decoder")
@example(encode(job_hook("pending", build_id=MAX_ID + 1))).via("an id beyond signed 64-bit was accepted")
@example(encode(job_hook("pending", build_name="n" * 420_000))).via("a name longer than a DynamoDB item")
@example(encode(job_hook("pending", build_created_at="0001-01-01T00:00:00+23:59"))).via("created_at overflowed")
def test_a_body_parses_to_a_valid_hook_or_is_a_payload_error(body: bytes) -> None:
    # when
    try:
        hook = parse_job_hook(body)
    except PayloadError as exc:
        # then the reason is short enough to send back to GitLab
        assert len(str(exc)) <= 300
        return
    # then
    assert_valid_hook(hook)


def test_the_reason_names_the_field_even_for_a_huge_bad_value() -> None:
    # given an unknown object_kind, which msgspec quotes in its message
    body = json.dumps(job_hook("pending", object_kind="x" * 100_000)).encode()
    # when
    with pytest.raises(PayloadError) as refused:
        parse_job_hook(body)
    # then
    reason = str(refused.value)
    assert reason.endswith("at `$.object_kind`")
    assert len(reason) < 300


def test_a_name_beyond_the_bound_is_refused_naming_the_field() -> None:
    body = json.dumps(job_hook("pending", build_name="n" * 256)).encode()
    with pytest.raises(PayloadError) as refused:
        parse_job_hook(body)
    assert str(refused.value) == "invalid Job Hook: Expected `str` of length <= 255 - at `$.build_name`"
