"""The images function: one EventBridge event in, each concerned pool's record and launch template moved.

The function's entry point (app.py only routes here), so that what an image event costs and may touch is this
module's: a well-formed event that changes nothing (a failed push, a scan still running) is logged; a malformed
one is reported and counted (``ImageEventsMalformed``) rather than raised, since Lambda's retries of an
asynchronous invocation would fail the same way; everything else is
:class:`~chalicelib.images.rotation.ImageRotation`'s.
"""

from __future__ import annotations

from typing import Any

from chalicelib.errors import PayloadError
from chalicelib.images.events import IgnoredEvent, parse_image_event
from chalicelib.images.rotation import ImageRotation, PoolOutcome
from chalicelib.observability import count, logger


def handle_image_event(raw: Any, rotation: ImageRotation) -> list[PoolOutcome]:
    try:
        event = parse_image_event(raw)
    except IgnoredEvent as exc:
        logger.info("image event changes nothing", extra={"reason": str(exc)})
        return []
    except PayloadError as exc:
        count("ImageEventsMalformed")
        logger.error("malformed image event", extra={"reason": str(exc)})
        return []
    return rotation.handle(event)
