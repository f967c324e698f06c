"""Warm pool schedule windows: whether a window is open, how many warm runners a pool wants, and when that changes.

A window opens when its ``start`` cron fires and closes when its ``end`` cron next fires. Both are read as wall
clock times in the window's time zone, as a cron daemon on a machine set to that zone would read them. So the
question "is it open now?" is answered by comparing the most recent ``start`` fire at or before now with the
most recent ``end`` fire at or before now: open exactly when the start fired later. A start and an end firing at
the same instant leave the window closed.

Daylight saving time, the reason this module computes fire times itself:

* A fire time that falls in a spring-forward gap (02:30 in Berlin on the last Sunday of March, when clocks go from
  02:00 to 03:00) fires at the first instant after the gap, 03:00 local. A window starting at 02:30 still opens on
  that day, an hour of wall clock later than usual and at the same instant as one starting at 03:00. Two fire
  times inside one gap coincide: a window that both starts and ends inside the gap stays closed that day.
* A fire time that falls in a fall-back overlap (02:30 in Berlin on the last Sunday of October, which happens twice)
  fires once, at its first occurrence. A window ending at 02:30 closes at the first 02:30 and is not reopened or
  closed again by the second.

croniter cannot be given the zone: iterating a time-zone-aware croniter 6.0.0 across a transition gives wrong
instants. From 2025-03-29 23:00 Berlin it yields ``30 1 * * *`` on 2025-03-31 at 00:30+02:00 (an hour early);
from 2025-10-26 it yields ``30 2 * * *`` on 2025-10-27 at 03:30+01:00 (an hour late); stepping ``30 2 * * *``
backwards from the fall-back morning it yields 2025-10-25 01:30+02:00. So croniter iterates naive wall clock
times here, where it is plain calendar arithmetic, and this module maps each to an instant with zoneinfo by the
rules above.

The look-back is bounded: only fires within :data:`LOOK_BACK` (366 days) before now count. A ``start`` that has
not fired in that span leaves its window closed, so a window whose start fires less than once a year (``0 8 29 2
*``, 29 February only) is open for at most 366 days after a start, and one whose start never fires (``0 8 30 2
*``) is always closed. :func:`next_change` looks as far ahead, and reports no change beyond that.

croniter is imported inside the functions that use it: this module may be imported on a Lambda cold start.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

    from croniter import croniter

    from chalicelib.config import ScheduleWindow, WarmConfig

__all__ = ["LOOK_BACK", "next_change", "warm_size", "window_open"]

LOOK_BACK = timedelta(days=366)
"""How far back a window's fires count, and how far ahead :func:`next_change` looks."""

_MINUTE = timedelta(minutes=1)
_EPOCH = datetime(1970, 1, 1)  # naive: croniter walks wall clock times
# A closed window whose every start coincides with an end never opens; stop looking after this many starts so
# that two spellings of one every-minute schedule cost milliseconds, not half a million croniter steps.
_MAX_COINCIDENT_STARTS = 1000


def window_open(window: ScheduleWindow, now: datetime) -> bool:
    """Whether ``window`` is open at ``now`` (time-zone aware): its start fired later than its end."""
    at = _utc(now)
    return _Window.of(window).open_at(at)


def warm_size(warm: WarmConfig, now: datetime) -> int:
    """How many idle runners the pool keeps at ``now``: ``size`` with no windows or inside any window, else 0."""
    at = _utc(now)
    if warm.size == 0 or not warm.windows:
        return warm.size
    return warm.size if any(_Window.of(window).open_at(at) for window in warm.windows) else 0


def next_change(warm: WarmConfig, now: datetime) -> datetime | None:
    """The first instant after ``now`` (in UTC) at which :func:`warm_size` differs from its value at ``now``.

    None when it never changes: size 0, no windows, or no change within :data:`LOOK_BACK` from ``now``.
    """
    at = _utc(now)
    if warm.size == 0 or not warm.windows:
        return None
    horizon = at + LOOK_BACK
    windows = [_Window.of(window) for window in warm.windows]
    states = [window.open_at(at) for window in windows]
    flips = [window.next_flip(at, horizon) for window in windows]
    was_open = any(states)
    # Each window's next flip is exact, so only the windows flipping at an instant need looking at again; windows
    # flipping at the same instant (one closing as another opens) are taken together before the pool is judged.
    while True:
        pending = [flip for flip in flips if flip is not None]
        if not pending:
            return None
        instant = min(pending)
        for index, flip in enumerate(flips):
            if flip == instant:
                states[index] = not states[index]
                flips[index] = windows[index].next_flip(instant, horizon)
        if any(states) != was_open:
            return instant


def _utc(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"now must be time-zone aware, got {now.isoformat()}")
    return now.astimezone(UTC)


@dataclass(frozen=True)
class _Cron:
    """One cron expression read as wall clock time in one zone, its fires mapped to instants (in UTC)."""

    expression: str
    zone: ZoneInfo

    def last_fire(self, at: datetime, after: datetime) -> datetime | None:
        """The latest fire in (``after``, ``at``], or None."""
        # croniter's get_prev excludes its start, so start one minute past the last whole minute.
        start = _latest_wall(at, self.zone).replace(second=0, microsecond=0) + _MINUTE
        for wall in self._walls(start, backwards=True):
            instant = _instant(wall, self.zone)
            if instant <= after:
                return None
            if instant <= at:
                return instant
        return None

    def next_fire(self, after: datetime, until: datetime) -> datetime | None:
        """The earliest fire in (``after``, ``until``], or None."""
        # From ``after``'s own wall clock time: in the second pass through a fall-back overlap, the rest of the
        # overlap has fired already (at its first occurrence) and is skipped below.
        start = after.astimezone(self.zone).replace(tzinfo=None, second=0, microsecond=0)
        for wall in self._walls(start, backwards=False):
            instant = _instant(wall, self.zone)
            if instant > until:
                return None
            if instant > after:
                return instant
        return None

    def fires_at(self, instant: datetime) -> bool:
        return self.last_fire(instant, instant - _MINUTE) == instant

    @functools.cached_property
    def _schedule(self) -> croniter:
        from croniter import croniter

        # Parsing the expression is most of croniter's cost; one parsed schedule is moved to each search's start.
        return croniter(self.expression, _EPOCH)

    def _walls(self, start: datetime, *, backwards: bool) -> Iterator[datetime]:
        from croniter import CroniterBadDateError

        schedule = self._schedule
        schedule.set_current(start, force=True)
        step = schedule.get_prev if backwards else schedule.get_next
        while True:
            try:
                wall: datetime = step(datetime)
            except CroniterBadDateError:  # the expression names no real date (30 February): it never fires
                return
            yield wall


@dataclass(frozen=True)
class _Window:
    start: _Cron
    end: _Cron

    @classmethod
    def of(cls, window: ScheduleWindow) -> _Window:
        zone = window.zone
        return cls(_Cron(window.start, zone), _Cron(window.end, zone))

    def open_at(self, at: datetime) -> bool:
        return self._is_open(self.start.last_fire(at, at - LOOK_BACK), at)

    def next_flip(self, after: datetime, horizon: datetime) -> datetime | None:
        """The first instant in (``after``, ``horizon``] at which the window opens or closes, or None."""
        started = self.start.last_fire(after, after - LOOK_BACK)
        if not self._is_open(started, after):
            return self._next_open(after, horizon)
        assert started is not None  # an open window has started
        closes = self.end.next_fire(after, horizon)
        # The last start drops out of the look-back at started + LOOK_BACK unless another start renews it first.
        # Any later start is past ``after`` + LOOK_BACK, which is at or past the horizon.
        expires = started + LOOK_BACK
        if expires <= horizon and self.start.next_fire(after, expires) is None:
            return expires if closes is None else min(closes, expires)
        return closes

    def _is_open(self, started: datetime | None, at: datetime) -> bool:
        if started is None:
            return False
        ended = self.end.last_fire(at, at - LOOK_BACK)
        return ended is None or started > ended

    def _next_open(self, after: datetime, horizon: datetime) -> datetime | None:
        instant = after
        for _ in range(_MAX_COINCIDENT_STARTS):
            started = self.start.next_fire(instant, horizon)
            if started is None:
                return None
            if not self.end.fires_at(started):
                return started
            instant = started
        return None


def _latest_wall(at: datetime, zone: ZoneInfo) -> datetime:
    """A naive wall clock time at or after every one whose fire (by the rules above) is at or before ``at``.

    Usually ``at``'s local time. During the second pass through a fall-back overlap it is later: the overlap's
    times fire at their first occurrence, so the rest of the overlap has fired already. The bound is ``at`` read
    with the offset from before the transition, which may run past the overlap's end; the times beyond it fire
    after ``at`` and are skipped.
    """
    first_offset = at.astimezone(zone).replace(fold=0).utcoffset()
    assert first_offset is not None  # a ZoneInfo always has an offset
    return at.astimezone(UTC).replace(tzinfo=None) + first_offset


def _instant(wall: datetime, zone: ZoneInfo) -> datetime:
    """When a cron fire at naive wall clock time ``wall`` in ``zone`` happens, in UTC.

    A time that happens twice (fall-back overlap) fires at its first occurrence; a time that does not happen
    (spring-forward gap) fires at the end of the gap, the transition itself.
    """
    first = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if first.astimezone(zone).replace(tzinfo=None) == wall:
        return first
    # In a gap, fold=0 reads the wall time with the offset from before the transition and fold=1 with the one
    # after, which puts the transition in (early, first]. Offsets change on whole seconds: bisect for it.
    early = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    before = early.astimezone(zone).utcoffset()
    low, high = int(early.timestamp()), int(first.timestamp())
    while high - low > 1:
        middle = (low + high) // 2
        if datetime.fromtimestamp(middle, UTC).astimezone(zone).utcoffset() == before:
            low = middle
        else:
            high = middle
    return datetime.fromtimestamp(high, UTC)
