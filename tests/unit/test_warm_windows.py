"""Warm pool schedule windows: open or closed at an instant, the warm size, and when it next changes.

Instants are UTC. The DST facts used below (tzdata 2025):

* Europe/Berlin: 2025-03-30 01:00 UTC local 02:00 CET jumps to 03:00 CEST; 2025-10-26 01:00 UTC local 03:00 CEST
  falls back to 02:00 CET, so 02:00-02:59 happens at 00:00-00:59 UTC and again at 01:00-01:59 UTC.
* America/New_York: 2025-03-09 07:00 UTC 02:00 EST jumps to 03:00 EDT; 2025-11-02 06:00 UTC 02:00 EDT falls back
  to 01:00 EST, so 01:00-01:59 happens at 05:00-05:59 UTC and again at 06:00-06:59 UTC.
* Australia/Sydney: 2025-04-05 16:00 UTC 03:00 AEDT falls back to 02:00 AEST (02:00-02:59 at 15:00 and 16:00 UTC);
  2025-10-04 16:00 UTC 02:00 AEST jumps to 03:00 AEDT.
* Asia/Kolkata: +05:30 all year.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chalicelib.config import ScheduleWindow, WarmConfig
from chalicelib.lifecycle.windows import LOOK_BACK, next_change, warm_size, window_open


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def window(start: str, end: str, timezone: str = "UTC") -> ScheduleWindow:
    return ScheduleWindow(start=start, end=end, timezone=timezone)


BUSINESS_HOURS = window("0 8 * * *", "0 18 * * *")
NIGHT = window("0 22 * * *", "0 6 * * *")
WORKING_WEEK = window("0 8 * * 1", "0 18 * * 5")  # Monday 08:00 to Friday 18:00
BERLIN_WEEKDAYS = window("0 8 * * 1-5", "0 19 * * 1-5", "Europe/Berlin")
BERLIN_0230_0400 = window("30 2 * * *", "0 4 * * *", "Europe/Berlin")
BERLIN_0100_0230 = window("0 1 * * *", "30 2 * * *", "Europe/Berlin")
BERLIN_0215_0245 = window("15 2 * * *", "45 2 * * *", "Europe/Berlin")
BERLIN_0130_0300 = window("30 1 * * *", "0 3 * * *", "Europe/Berlin")
NEW_YORK_0230_0500 = window("30 2 * * *", "0 5 * * *", "America/New_York")
NEW_YORK_0130_0145 = window("30 1 * * *", "45 1 * * *", "America/New_York")
NEW_YORK_0100_0200 = window("0 1 * * *", "0 2 * * *", "America/New_York")
NEW_YORK_0000_0130 = window("0 0 * * *", "30 1 * * *", "America/New_York")
SYDNEY_0230_0400 = window("30 2 * * *", "0 4 * * *", "Australia/Sydney")
SYDNEY_0900_1700 = window("0 9 * * *", "0 17 * * *", "Australia/Sydney")
KOLKATA_OFFICE = window("0 9 * * 1-5", "0 18 * * 1-5", "Asia/Kolkata")


@pytest.mark.parametrize(
    ("schedule", "now", "expected"),
    [
        # UTC: opens on the start minute, closes on the end minute
        (BUSINESS_HOURS, utc(2025, 6, 4, 7, 59), False),
        (BUSINESS_HOURS, utc(2025, 6, 4, 8, 0), True),
        (BUSINESS_HOURS, utc(2025, 6, 4, 17, 59), True),
        (BUSINESS_HOURS, utc(2025, 6, 4, 18, 0), False),
        # spanning midnight
        (NIGHT, utc(2025, 6, 4, 21, 59), False),
        (NIGHT, utc(2025, 6, 4, 23, 0), True),
        (NIGHT, utc(2025, 6, 5, 3, 0), True),
        (NIGHT, utc(2025, 6, 5, 6, 0), False),
        # one window across the week: 2025-06-02 is a Monday
        (WORKING_WEEK, utc(2025, 6, 2, 7, 59), False),
        (WORKING_WEEK, utc(2025, 6, 2, 8, 0), True),
        (WORKING_WEEK, utc(2025, 6, 4, 3, 0), True),  # Wednesday night: the start fired two days ago
        (WORKING_WEEK, utc(2025, 6, 6, 17, 59), True),
        (WORKING_WEEK, utc(2025, 6, 6, 18, 0), False),
        (WORKING_WEEK, utc(2025, 6, 7, 12, 0), False),  # Saturday
        # weekdays in Berlin: summer is UTC+2, winter UTC+1
        (BERLIN_WEEKDAYS, utc(2025, 6, 4, 5, 59), False),
        (BERLIN_WEEKDAYS, utc(2025, 6, 4, 6, 0), True),
        (BERLIN_WEEKDAYS, utc(2025, 6, 4, 16, 59), True),
        (BERLIN_WEEKDAYS, utc(2025, 6, 4, 17, 0), False),
        (BERLIN_WEEKDAYS, utc(2025, 1, 8, 6, 59), False),
        (BERLIN_WEEKDAYS, utc(2025, 1, 8, 7, 0), True),
        (BERLIN_WEEKDAYS, utc(2025, 1, 8, 17, 59), True),
        (BERLIN_WEEKDAYS, utc(2025, 1, 8, 18, 0), False),
        (BERLIN_WEEKDAYS, utc(2025, 6, 7, 10, 0), False),  # Saturday: Friday's end fired last
        (BERLIN_WEEKDAYS, utc(2025, 6, 9, 6, 0), True),  # Monday 08:00 Berlin
        # Kolkata, half an hour off UTC
        (KOLKATA_OFFICE, utc(2025, 6, 4, 3, 29), False),
        (KOLKATA_OFFICE, utc(2025, 6, 4, 3, 30), True),
        (KOLKATA_OFFICE, utc(2025, 6, 4, 12, 29), True),
        (KOLKATA_OFFICE, utc(2025, 6, 4, 12, 30), False),
        (KOLKATA_OFFICE, utc(2025, 6, 7, 3, 30), False),  # Saturday
        # Sydney, southern hemisphere: summer (January) is UTC+11, winter (July) UTC+10
        (SYDNEY_0900_1700, utc(2025, 1, 7, 21, 59), False),
        (SYDNEY_0900_1700, utc(2025, 1, 7, 22, 0), True),
        (SYDNEY_0900_1700, utc(2025, 1, 8, 5, 59), True),
        (SYDNEY_0900_1700, utc(2025, 1, 8, 6, 0), False),
        (SYDNEY_0900_1700, utc(2025, 7, 7, 22, 59), False),
        (SYDNEY_0900_1700, utc(2025, 7, 7, 23, 0), True),
        (SYDNEY_0900_1700, utc(2025, 7, 8, 6, 59), True),
        (SYDNEY_0900_1700, utc(2025, 7, 8, 7, 0), False),
    ],
)
def test_a_window_is_open_from_its_start_until_its_end_in_its_own_time_zone(
    schedule: ScheduleWindow, now: datetime, expected: bool
) -> None:
    assert window_open(schedule, now) is expected


@pytest.mark.parametrize(
    ("schedule", "now", "expected"),
    [
        # Berlin spring forward: 02:30 does not exist; it fires at 03:00 CEST (01:00 UTC), so the window opens
        (BERLIN_0230_0400, utc(2025, 3, 30, 0, 59), False),
        (BERLIN_0230_0400, utc(2025, 3, 30, 1, 0), True),
        (BERLIN_0230_0400, utc(2025, 3, 30, 1, 59), True),
        (BERLIN_0230_0400, utc(2025, 3, 30, 2, 0), False),  # 04:00 CEST
        (BERLIN_0230_0400, utc(2025, 3, 31, 0, 29), False),  # the next day, back at 02:30 CEST
        (BERLIN_0230_0400, utc(2025, 3, 31, 0, 30), True),
        # an end inside the gap closes the window at 03:00 CEST
        (BERLIN_0100_0230, utc(2025, 3, 30, 0, 0), True),  # 01:00 CET
        (BERLIN_0100_0230, utc(2025, 3, 30, 0, 59), True),
        (BERLIN_0100_0230, utc(2025, 3, 30, 1, 0), False),
        # around the gap: from 01:30 CET to 03:00 CEST is half an hour
        (BERLIN_0130_0300, utc(2025, 3, 30, 0, 29), False),
        (BERLIN_0130_0300, utc(2025, 3, 30, 0, 30), True),
        (BERLIN_0130_0300, utc(2025, 3, 30, 1, 0), False),
        # start and end both inside the gap fire at the same instant: closed all day
        (BERLIN_0215_0245, utc(2025, 3, 30, 0, 59), False),
        (BERLIN_0215_0245, utc(2025, 3, 30, 1, 0), False),
        (BERLIN_0215_0245, utc(2025, 3, 30, 1, 30), False),
        (BERLIN_0215_0245, utc(2025, 3, 29, 1, 20), True),  # the day before, an ordinary day
        # Berlin fall back: 02:30 fires once, at its first occurrence (00:30 UTC, CEST)
        (BERLIN_0230_0400, utc(2025, 10, 26, 0, 29), False),
        (BERLIN_0230_0400, utc(2025, 10, 26, 0, 30), True),
        (BERLIN_0230_0400, utc(2025, 10, 26, 1, 30), True),  # the second 02:30, CET
        (BERLIN_0230_0400, utc(2025, 10, 26, 2, 59), True),  # 03:59 CET
        (BERLIN_0230_0400, utc(2025, 10, 26, 3, 0), False),  # 04:00 CET
        (BERLIN_0230_0400, utc(2025, 10, 27, 1, 29), False),  # the next day, at 02:30 CET
        (BERLIN_0230_0400, utc(2025, 10, 27, 1, 30), True),
        # an end inside the overlap closes at its first occurrence and stays closed through the second
        (BERLIN_0100_0230, utc(2025, 10, 25, 22, 59), False),
        (BERLIN_0100_0230, utc(2025, 10, 25, 23, 0), True),  # 01:00 CEST
        (BERLIN_0100_0230, utc(2025, 10, 26, 0, 29), True),
        (BERLIN_0100_0230, utc(2025, 10, 26, 0, 30), False),
        (BERLIN_0100_0230, utc(2025, 10, 26, 1, 45), False),  # 02:45 CET, the overlap's second pass
        # start and end inside the overlap: open for the first pass only
        (BERLIN_0215_0245, utc(2025, 10, 26, 0, 15), True),
        (BERLIN_0215_0245, utc(2025, 10, 26, 0, 45), False),
        (BERLIN_0215_0245, utc(2025, 10, 26, 1, 15), False),  # the second 02:15 does not reopen it
        (BERLIN_0215_0245, utc(2025, 10, 26, 1, 30), False),
        # New York spring forward: 02:30 fires at 03:00 EDT (07:00 UTC)
        (NEW_YORK_0230_0500, utc(2025, 3, 9, 6, 59), False),
        (NEW_YORK_0230_0500, utc(2025, 3, 9, 7, 0), True),
        (NEW_YORK_0230_0500, utc(2025, 3, 9, 8, 59), True),
        (NEW_YORK_0230_0500, utc(2025, 3, 9, 9, 0), False),  # 05:00 EDT
        # New York fall back: 01:30 and 01:45 fire in the EDT pass only
        (NEW_YORK_0130_0145, utc(2025, 11, 2, 5, 29), False),
        (NEW_YORK_0130_0145, utc(2025, 11, 2, 5, 30), True),
        (NEW_YORK_0130_0145, utc(2025, 11, 2, 5, 45), False),
        (NEW_YORK_0130_0145, utc(2025, 11, 2, 6, 30), False),  # 01:30 EST
        (NEW_YORK_0130_0145, utc(2025, 11, 2, 6, 40), False),
        # a window from the overlap's first hour to its end: 01:00 EDT to 02:00 EST, two hours
        (NEW_YORK_0100_0200, utc(2025, 11, 2, 4, 59), False),
        (NEW_YORK_0100_0200, utc(2025, 11, 2, 5, 0), True),
        (NEW_YORK_0100_0200, utc(2025, 11, 2, 6, 30), True),  # 01:30 EST
        (NEW_YORK_0100_0200, utc(2025, 11, 2, 7, 0), False),
        # a window ending inside the overlap lasts 01:30 of wall clock, not 02:30
        (NEW_YORK_0000_0130, utc(2025, 11, 2, 4, 0), True),  # 00:00 EDT
        (NEW_YORK_0000_0130, utc(2025, 11, 2, 5, 29), True),
        (NEW_YORK_0000_0130, utc(2025, 11, 2, 5, 30), False),
        (NEW_YORK_0000_0130, utc(2025, 11, 2, 6, 0), False),  # 01:00 EST
        # Sydney falls back in April: 02:30 AEDT (15:30 UTC) opens, 02:30 AEST changes nothing, 04:00 AEST closes
        (SYDNEY_0230_0400, utc(2025, 4, 5, 15, 29), False),
        (SYDNEY_0230_0400, utc(2025, 4, 5, 15, 30), True),
        (SYDNEY_0230_0400, utc(2025, 4, 5, 16, 30), True),
        (SYDNEY_0230_0400, utc(2025, 4, 5, 17, 59), True),
        (SYDNEY_0230_0400, utc(2025, 4, 5, 18, 0), False),
        # and springs forward in October: 02:30 fires at 03:00 AEDT (16:00 UTC)
        (SYDNEY_0230_0400, utc(2025, 10, 4, 15, 59), False),
        (SYDNEY_0230_0400, utc(2025, 10, 4, 16, 0), True),
        (SYDNEY_0230_0400, utc(2025, 10, 4, 16, 59), True),
        (SYDNEY_0230_0400, utc(2025, 10, 4, 17, 0), False),  # 04:00 AEDT
    ],
)
def test_daylight_saving_gaps_fire_after_the_gap_and_overlaps_fire_once(
    schedule: ScheduleWindow, now: datetime, expected: bool
) -> None:
    assert window_open(schedule, now) is expected


def test_the_result_does_not_depend_on_the_zone_now_is_given_in() -> None:
    # given the same instant in UTC and in Berlin's second pass through the fall-back overlap
    instant = utc(2025, 10, 26, 1, 30)
    berlin = instant.astimezone(ZoneInfo("Europe/Berlin"))
    assert berlin.fold == 1
    # then
    assert window_open(BERLIN_0215_0245, berlin) is window_open(BERLIN_0215_0245, instant) is False
    assert window_open(BERLIN_0230_0400, berlin) is True


def test_a_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="time-zone aware"):
        window_open(BUSINESS_HOURS, datetime(2025, 6, 4, 12, 0))


# Only fires within LOOK_BACK count: 2024-02-29 + 366 days is 2025-03-01.
LEAP_DAY = window("0 0 29 2 *", "0 0 30 2 *")  # starts on 29 February; the end never fires
NEVER = window("0 0 30 2 *", "0 0 * * *")


@pytest.mark.parametrize(
    ("schedule", "now", "expected"),
    [
        (LEAP_DAY, utc(2024, 2, 28, 23, 59), False),
        (LEAP_DAY, utc(2024, 2, 29, 0, 0), True),
        (LEAP_DAY, utc(2024, 12, 31, 0, 0), True),
        (LEAP_DAY, utc(2025, 2, 28, 23, 59), True),
        (LEAP_DAY, utc(2025, 3, 1, 0, 0), False),  # the start is 366 days old
        (LEAP_DAY, utc(2027, 6, 1, 0, 0), False),
        (NEVER, utc(2025, 6, 1, 12, 0), False),
    ],
)
def test_a_start_older_than_the_look_back_leaves_the_window_closed(
    schedule: ScheduleWindow, now: datetime, expected: bool
) -> None:
    assert timedelta(days=366) == LOOK_BACK
    assert window_open(schedule, now) is expected


MORNING = window("0 8 * * *", "0 12 * * *")
MIDDAY = window("0 10 * * *", "0 14 * * *")
AFTERNOON = window("0 12 * * *", "0 16 * * *")


@pytest.mark.parametrize(
    ("warm", "now", "expected"),
    [
        (WarmConfig(size=3), utc(2025, 6, 4, 3, 0), 3),  # no windows: warm all the time
        (WarmConfig(size=0), utc(2025, 6, 4, 3, 0), 0),
        (WarmConfig(size=0, windows=(BUSINESS_HOURS,)), utc(2025, 6, 4, 12, 0), 0),
        (WarmConfig(size=2, windows=(BUSINESS_HOURS,)), utc(2025, 6, 4, 12, 0), 2),
        (WarmConfig(size=2, windows=(BUSINESS_HOURS,)), utc(2025, 6, 4, 20, 0), 0),
        (WarmConfig(size=2, windows=(NEVER,)), utc(2025, 6, 4, 12, 0), 0),
        # overlapping windows: warm while any is open
        (WarmConfig(size=2, windows=(MORNING, MIDDAY)), utc(2025, 6, 4, 9, 0), 2),
        (WarmConfig(size=2, windows=(MORNING, MIDDAY)), utc(2025, 6, 4, 11, 0), 2),
        (WarmConfig(size=2, windows=(MORNING, MIDDAY)), utc(2025, 6, 4, 13, 0), 2),
        (WarmConfig(size=2, windows=(MORNING, MIDDAY)), utc(2025, 6, 4, 14, 0), 0),
        (WarmConfig(size=2, windows=(MORNING, MIDDAY)), utc(2025, 6, 4, 7, 0), 0),
        # windows in different zones
        (WarmConfig(size=1, windows=(KOLKATA_OFFICE, BERLIN_WEEKDAYS)), utc(2025, 6, 4, 4, 0), 1),
        (WarmConfig(size=1, windows=(KOLKATA_OFFICE, BERLIN_WEEKDAYS)), utc(2025, 6, 4, 16, 0), 1),
        (WarmConfig(size=1, windows=(KOLKATA_OFFICE, BERLIN_WEEKDAYS)), utc(2025, 6, 4, 20, 0), 0),
    ],
)
def test_warm_size_is_the_size_inside_any_window_and_zero_outside(
    warm: WarmConfig, now: datetime, expected: int
) -> None:
    assert warm_size(warm, now) == expected


@pytest.mark.parametrize(
    ("warm", "now", "expected"),
    [
        (WarmConfig(size=2, windows=(BUSINESS_HOURS,)), utc(2025, 6, 4, 7, 0), utc(2025, 6, 4, 8, 0)),
        (WarmConfig(size=2, windows=(BUSINESS_HOURS,)), utc(2025, 6, 4, 8, 0), utc(2025, 6, 4, 18, 0)),
        (WarmConfig(size=2, windows=(BUSINESS_HOURS,)), utc(2025, 6, 4, 18, 0), utc(2025, 6, 5, 8, 0)),
        (WarmConfig(size=2, windows=(WORKING_WEEK,)), utc(2025, 6, 6, 19, 0), utc(2025, 6, 9, 8, 0)),
        (WarmConfig(size=2, windows=(BERLIN_WEEKDAYS,)), utc(2025, 6, 6, 17, 0), utc(2025, 6, 9, 6, 0)),
        # the spring-forward start fires at the end of the gap, the fall-back one at its first occurrence
        (WarmConfig(size=1, windows=(BERLIN_0230_0400,)), utc(2025, 3, 29, 12, 0), utc(2025, 3, 30, 1, 0)),
        (WarmConfig(size=1, windows=(BERLIN_0230_0400,)), utc(2025, 10, 25, 12, 0), utc(2025, 10, 26, 0, 30)),
        (WarmConfig(size=1, windows=(BERLIN_0230_0400,)), utc(2025, 10, 26, 0, 30), utc(2025, 10, 26, 3, 0)),
        (WarmConfig(size=1, windows=(BERLIN_0215_0245,)), utc(2025, 3, 29, 12, 0), utc(2025, 3, 31, 0, 15)),
        # from the second pass through New York's overlap (01:00 EST) the window opened at 01:00 EDT ends at 02:00 EST
        (WarmConfig(size=1, windows=(NEW_YORK_0100_0200,)), utc(2025, 11, 2, 6, 0), utc(2025, 11, 2, 7, 0)),
        (WarmConfig(size=1, windows=(BERLIN_0215_0245,)), utc(2025, 10, 26, 0, 45), utc(2025, 10, 27, 1, 15)),
        # overlapping and adjacent windows: the size changes only when the last open one closes
        (WarmConfig(size=2, windows=(MORNING, MIDDAY)), utc(2025, 6, 4, 9, 0), utc(2025, 6, 4, 14, 0)),
        (WarmConfig(size=2, windows=(MORNING, AFTERNOON)), utc(2025, 6, 4, 9, 0), utc(2025, 6, 4, 16, 0)),
        (WarmConfig(size=2, windows=(MORNING, AFTERNOON)), utc(2025, 6, 4, 17, 0), utc(2025, 6, 5, 8, 0)),
        # a start renewed less than yearly drops out of the look-back
        (WarmConfig(size=1, windows=(LEAP_DAY,)), utc(2025, 2, 1, 0, 0), utc(2025, 3, 1, 0, 0)),
        (WarmConfig(size=1, windows=(LEAP_DAY,)), utc(2027, 6, 1, 0, 0), utc(2028, 2, 29, 0, 0)),
    ],
)
def test_next_change_is_when_the_warm_size_changes(warm: WarmConfig, now: datetime, expected: datetime) -> None:
    # when
    change = next_change(warm, now)
    # then
    assert change == expected
    assert warm_size(warm, change - timedelta(seconds=1)) == warm_size(warm, now)
    assert warm_size(warm, change) != warm_size(warm, now)


@pytest.mark.parametrize(
    "warm",
    [
        WarmConfig(size=2),  # warm all the time
        WarmConfig(size=0),
        WarmConfig(size=0, windows=(BUSINESS_HOURS,)),
        WarmConfig(size=2, windows=(NEVER,)),
        # start and end always coincide: the configuration refuses such a window (it never opens), and the module
        # copes with one all the same
        WarmConfig.model_construct(
            size=2, windows=(ScheduleWindow.model_construct(start="0 8 * * *", end="0 08 * * *", timezone="UTC"),)
        ),
        WarmConfig.model_construct(
            size=2, windows=(ScheduleWindow.model_construct(start="* * * * *", end="*/1 * * * *", timezone="UTC"),)
        ),
        # three windows that together cover every hour, each opening as another closes
        WarmConfig(
            size=2,
            windows=(
                window("0 0 * * *", "0 8 * * *"),
                window("0 8 * * *", "0 16 * * *"),
                window("0 16 * * *", "0 0 * * *"),
            ),
        ),
    ],
)
def test_next_change_is_none_when_the_warm_size_never_changes(warm: WarmConfig) -> None:
    assert next_change(warm, utc(2025, 6, 4, 12, 0)) is None


# Brute force: walk the instants minute by minute, read each on the zone's wall clock, and fire a cron at the
# instant its wall clock minute matches; after a spring-forward jump the skipped minutes fire at the first instant
# after it, and the second pass through a fall-back overlap fires nothing.

PROPERTY_ZONES = ("Europe/Berlin", "America/New_York", "Australia/Sydney", "Australia/Lord_Howe")
REFERENCE_SPAN = timedelta(days=4)  # every generated cron fires at least every three days
MINUTE = timedelta(minutes=1)


def field_values(field: str, low: int, high: int) -> frozenset[int]:
    values: set[int] = set()
    for part in field.split(","):
        if part == "*":
            values.update(range(low, high + 1))
        elif part.startswith("*/"):
            values.update(range(low, high + 1, int(part[2:])))
        elif "-" in part:
            first, last = (int(bound) for bound in part.split("-"))
            values.update(range(first, last + 1))
        else:
            values.add(int(part))
    return frozenset(values)


class CronMatcher:
    """Whether a wall clock minute matches a cron expression that restricts minute, hour and weekday only."""

    def __init__(self, expression: str) -> None:
        minute, hour, day_of_month, month, day_of_week = expression.split()
        assert (day_of_month, month) == ("*", "*")
        self.minutes = field_values(minute, 0, 59)
        self.hours = field_values(hour, 0, 23)
        self.weekdays = field_values(day_of_week, 0, 6)

    def __call__(self, wall: datetime) -> bool:
        # cron counts weekdays from Sunday, Python from Monday
        return wall.minute in self.minutes and wall.hour in self.hours and (wall.weekday() + 1) % 7 in self.weekdays


def reference_states(schedule: ScheduleWindow, since: datetime, until: datetime) -> dict[datetime, bool | None]:
    """Open or closed at each whole UTC minute in [since, until]; None until the first fire."""
    zone = ZoneInfo(schedule.timezone)
    starts, ends = CronMatcher(schedule.start), CronMatcher(schedule.end)
    state: bool | None = None
    states = {}
    instant = since
    previous = (instant - MINUTE).astimezone(zone).replace(tzinfo=None)
    while instant <= until:
        local = instant.astimezone(zone)
        wall = local.replace(tzinfo=None)
        # The minutes of wall clock this instant fires: its own, those a spring-forward jump skipped just before it,
        # and none in the second pass through a fall-back overlap.
        walls = [] if local.fold else [previous + MINUTE * step for step in range(1, (wall - previous) // MINUTE + 1)]
        started = any(starts(minute) for minute in walls)
        ended = any(ends(minute) for minute in walls)
        if started or ended:
            state = started and not ended
        states[instant] = state
        previous = wall
        instant += MINUTE
    return states


@functools.cache
def transitions(zone_name: str) -> tuple[datetime, ...]:
    zone = ZoneInfo(zone_name)
    found = []
    instant = utc(2024, 1, 1)
    offset = instant.astimezone(zone).utcoffset()
    while instant < utc(2027, 1, 1):
        instant += timedelta(minutes=30)
        if instant.astimezone(zone).utcoffset() != offset:
            found.append(instant)
            offset = instant.astimezone(zone).utcoffset()
    return tuple(found)


minutes = st.sampled_from(["0", "15", "30", "45", "59", "*/20", "0,30", "10-20", "*/7"])
# The hours DST moves in these zones (01:00-03:00) come up most often.
hours = (
    st.sampled_from(["1", "2", "3", "1-2", "0-3", "*/2", "2-3"])
    | st.sampled_from(["1", "2"])
    | st.integers(0, 23).map(str)
)
# Clocks change on a Sunday (0) in these zones, so most weekday fields take Sunday in.
weekdays = st.sampled_from(["*", "0-4", "0,1,2,4,6", "*", "1-5", "2-6"])
crons = st.builds(lambda m, h, d: f"{m} {h} * * {d}", minutes, hours, weekdays)
STRETCH = timedelta(hours=6)  # each example checks instants this long from its first one


@st.composite
def instants_near_transitions(draw: st.DrawFn, zone_name: str) -> datetime:
    near = draw(st.sampled_from(transitions(zone_name)))
    return near + timedelta(minutes=draw(st.integers(-4 * 60, 60)))


@st.composite
def cases(draw: st.DrawFn) -> tuple[ScheduleWindow, datetime]:
    zone_name = draw(st.sampled_from(PROPERTY_ZONES))
    start = draw(crons)
    end = draw(crons.filter(lambda expression: expression.split() != start.split()))
    anywhere = st.integers(0, 3 * 365 * 1440).map(lambda offset: utc(2024, 1, 1) + timedelta(minutes=offset))
    near = instants_near_transitions(zone_name)
    first = draw(near | near | near | anywhere)
    return window(start, end, zone_name), first + timedelta(seconds=draw(st.integers(0, 59)))


PROPERTY = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@PROPERTY
@given(cases())
def test_window_open_agrees_with_a_minute_by_minute_walk(case: tuple[ScheduleWindow, datetime]) -> None:
    # given
    schedule, first = case
    minute = first.replace(second=0, microsecond=0)
    states = reference_states(schedule, minute - REFERENCE_SPAN, minute + STRETCH)
    # then, every fifth minute of the stretch the walk knows about
    for offset in range(0, STRETCH // MINUTE, 5):
        expected = states[minute + offset * MINUTE]
        if expected is not None:
            assert window_open(schedule, first + offset * MINUTE) is expected, first + offset * MINUTE


# A window that rarely opens makes next_change search a year ahead: fewer examples keep this to seconds.
@settings(PROPERTY, max_examples=40)
@given(cases())
def test_next_change_agrees_with_a_minute_by_minute_walk(case: tuple[ScheduleWindow, datetime]) -> None:
    # given
    schedule, first = case
    minute = first.replace(second=0, microsecond=0)
    walk = list(reference_states(schedule, minute - REFERENCE_SPAN, minute + STRETCH + REFERENCE_SPAN).items())
    here = REFERENCE_SPAN // MINUTE
    warm = WarmConfig(size=1, windows=(schedule,))
    # then, from every half hour of the stretch the walk knows about
    for offset in range(0, STRETCH // MINUTE, 30):
        now, state = first + offset * MINUTE, walk[here + offset][1]
        if state is None:
            continue
        change = next((instant for instant, other in walk[here + offset + 1 :] if other is not state), None)
        if change is None:
            assert next_change(warm, now) is None or next_change(warm, now) > walk[-1][0], now
        else:
            assert next_change(warm, now) == change, now
