"""Token comparison and Standard Webhooks signature verification."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from chalicelib.errors import AuthenticationError
from chalicelib.intake.signing import sign, signing_key, token_matches, verify_signature

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
BODY = b'{"object_kind":"build","build_id":1}'
NOW = 1_800_000_000


def _verify(
    body: bytes = BODY,
    *,
    timestamp: int = NOW,
    signature: str | None = None,
    webhook_id: str = "msg_1",
    now: float = NOW,
) -> object:
    signature = signature if signature is not None else sign(SECRET, webhook_id, timestamp, body)
    return verify_signature(
        SECRET, webhook_id=webhook_id, timestamp=str(timestamp), signature=signature, body=body, now=now
    )


def test_signature_matches_the_standard_webhooks_construction() -> None:
    # given the spec's construction, computed independently
    expected = base64.b64encode(hmac.new(b"k" * 32, b"msg_1.1800000000." + BODY, hashlib.sha256).digest()).decode()
    # then
    assert sign(SECRET, "msg_1", NOW, BODY) == f"v1,{expected}"


def test_a_good_signature_is_accepted() -> None:
    delivery = _verify()
    assert delivery.webhook_id == "msg_1"  # type: ignore[attr-defined]
    assert delivery.timestamp == NOW  # type: ignore[attr-defined]


def test_a_tampered_body_is_refused() -> None:
    signature = sign(SECRET, "msg_1", NOW, BODY)
    with pytest.raises(AuthenticationError, match="no matching"):
        _verify(BODY.replace(b"1}", b"2}"), signature=signature)


def test_a_signature_for_another_id_is_refused() -> None:
    signature = sign(SECRET, "msg_other", NOW, BODY)
    with pytest.raises(AuthenticationError, match="no matching"):
        _verify(signature=signature)


@pytest.mark.parametrize("offset", [-301, 301, -86400, 86400])
def test_stale_and_future_timestamps_are_refused(offset: int) -> None:
    with pytest.raises(AuthenticationError, match="tolerance"):
        _verify(timestamp=NOW + offset)


@pytest.mark.parametrize("offset", [-300, 0, 300])
def test_timestamps_inside_five_minutes_are_accepted(offset: int) -> None:
    _verify(timestamp=NOW + offset)


def test_one_valid_signature_among_several_is_enough() -> None:
    good = sign(SECRET, "msg_1", NOW, BODY)
    rotated_out = sign("whsec_" + base64.b64encode(b"o" * 32).decode(), "msg_1", NOW, BODY)
    _verify(signature=f"v1,bm90LWl0 {rotated_out} v2,ignored {good}")


def test_only_v1_signatures_count() -> None:
    good = sign(SECRET, "msg_1", NOW, BODY).removeprefix("v1,")
    with pytest.raises(AuthenticationError):
        _verify(signature=f"v2,{good}")


@pytest.mark.parametrize(
    ("webhook_id", "timestamp", "signature"),
    [(None, "1", "v1,x"), ("id", None, "v1,x"), ("id", "1", None), ("id", "1", "")],
)
def test_missing_headers_are_refused(webhook_id: str | None, timestamp: str | None, signature: str | None) -> None:
    with pytest.raises(AuthenticationError, match="missing"):
        verify_signature(SECRET, webhook_id=webhook_id, timestamp=timestamp, signature=signature, body=BODY, now=NOW)


@pytest.mark.parametrize(
    "timestamp",
    [
        "soon",
        "1" + "0" * 400,  # int() takes it, but subtracting it from the float clock raised OverflowError
        "9" * 5000,  # beyond int()'s digit limit
        " 1800000000",
        "1_800_000_000",
        "\u0661\u0668\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660",  # Arabic-Indic digits
        "-1800000000",
    ],
)
def test_a_timestamp_that_is_not_plain_digits_is_refused(timestamp: str) -> None:
    with pytest.raises(AuthenticationError, match="integer"):
        verify_signature(SECRET, webhook_id="id", timestamp=timestamp, signature="v1,x", body=BODY, now=NOW)


@pytest.mark.parametrize("webhook_id", ["msg_\ud800", "msg_\n1", "m" * 257])
def test_a_webhook_id_that_is_not_printable_or_too_long_is_refused(webhook_id: str) -> None:
    with pytest.raises(AuthenticationError, match="webhook-id"):
        verify_signature(SECRET, webhook_id=webhook_id, timestamp=str(NOW), signature="v1,x", body=BODY, now=NOW)


def test_a_secret_that_is_not_base64_is_an_error() -> None:
    with pytest.raises(AuthenticationError, match="base64"):
        signing_key("whsec_***")


@pytest.mark.parametrize(
    ("provided", "expected", "matches"),
    [
        ("s3cret", "s3cret", True),
        ("s3cre", "s3cret", False),
        ("s3cretx", "s3cret", False),
        ("S3CRET", "s3cret", False),
        ("", "s3cret", False),
        (None, "s3cret", False),
        ("s3cret", "", False),
        ("ünïcödé", "ünïcödé", True),
        ("\ud800", "s3cret", False),  # a lone surrogate compares, it does not raise
    ],
)
def test_token_comparison(provided: str | None, expected: str, matches: bool) -> None:
    assert token_matches(provided, expected) is matches
