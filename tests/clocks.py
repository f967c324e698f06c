"""A clock a test moves by hand, for the GitLab emulator's idea of now (runner contact, job timestamps, stuck jobs)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


class ManualClock:
    """GitLab's ``now``: fixed until the test moves it with :meth:`advance`."""

    def __init__(self) -> None:
        self.now = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)
