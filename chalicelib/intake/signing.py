"""Webhook authentication: the shared ``X-Gitlab-Token`` and Standard Webhooks signatures.

GitLab sends its secret token as-is, so the comparison must be constant-time. When a signing secret is
configured, GitLab also signs each request the Standard Webhooks way (``webhook-id``,
``webhook-timestamp``, ``webhook-signature: v1,<base64 HMAC-SHA256 of id.timestamp.body>``); the timestamp is
per request, so a resend (the hook's "Resend request") carries a fresh one under the same ``webhook-id``, while a
replayed capture repeats the old pair.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass

from chalicelib.errors import AuthenticationError

TOLERANCE_SECONDS = 300
MAX_WEBHOOK_ID_LENGTH = 256
_MAX_TIMESTAMP_DIGITS = 12  # seconds since the epoch: eleven digits last until the year 5138
_SECRET_PREFIX = "whsec_"  # noqa: S105 - a format prefix, not a secret


def token_matches(provided: str | None, expected: str) -> bool:
    """Constant-time comparison of the ``X-Gitlab-Token`` header with the configured secret."""
    if not provided or not expected:
        return False
    # surrogatepass: a header value is any str (a lone surrogate included); it must compare, never raise.
    return hmac.compare_digest(provided.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True)
class SignedDelivery:
    """The identity of a verified signed delivery attempt."""

    webhook_id: str
    timestamp: int


def signing_key(secret: str) -> bytes:
    """The HMAC key behind a ``whsec_<base64>`` secret (a bare base64 secret is accepted too)."""
    encoded = secret.removeprefix(_SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise AuthenticationError("signing secret is not valid base64") from None
    if not key:
        raise AuthenticationError("signing secret is empty")
    return key


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``v1,<signature>`` value for a delivery; the tests sign with it.

    The sandbox's GitLab emulator signs with its own implementation, so the two are checked against each other.
    """
    message = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(signing_key(secret), message, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def verify_signature(
    secret: str,
    *,
    webhook_id: str | None,
    timestamp: str | None,
    signature: str | None,
    body: bytes,
    now: float,
    tolerance: int = TOLERANCE_SECONDS,
) -> SignedDelivery:
    """Verify a Standard Webhooks signature or raise ``AuthenticationError`` saying why.

    The header may carry several space-separated signatures (during secret rotation); one valid ``v1`` match
    is enough. A timestamp outside ``tolerance`` in either direction is refused, which bounds how long a
    captured request could be replayed; the caller refuses an exact replay inside that window.
    """
    if not webhook_id or not timestamp or not signature:
        raise AuthenticationError("missing webhook-id, webhook-timestamp or webhook-signature")
    if len(webhook_id) > MAX_WEBHOOK_ID_LENGTH or not webhook_id.isprintable():
        raise AuthenticationError("webhook-id is not printable or too long")
    # Digits only and few of them: int() would also take " 12", "1_2", other scripts' digits, and a number too
    # large to subtract from a float (OverflowError).
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= _MAX_TIMESTAMP_DIGITS):
        raise AuthenticationError("webhook-timestamp is not an integer")
    sent_at = int(timestamp)
    if abs(now - sent_at) > tolerance:
        raise AuthenticationError("webhook-timestamp outside the tolerance window")
    expected = sign(secret, webhook_id, sent_at, body).encode("ascii")
    for candidate in signature.split():
        if candidate.startswith("v1,") and hmac.compare_digest(candidate.encode("utf-8", "replace"), expected):
            return SignedDelivery(webhook_id=webhook_id, timestamp=sent_at)
    raise AuthenticationError("no matching webhook-signature")
