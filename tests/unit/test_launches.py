"""The launch record's transitions (chalicelib/scaling/launches.py): every (state, event) pair, and each write."""

from __future__ import annotations

import pytest

from chalicelib.scaling.launches import FINISHED, UNFINISHED, LaunchEvent, LaunchState, next_state, stays_live, update

L, R, INC, D, F = (
    LaunchState.LAUNCHING,
    LaunchState.RESUMING,
    LaunchState.INCOMPLETE,
    LaunchState.LAUNCHED,
    LaunchState.FAILED,
)
# Rows: the state a launch is in; columns: each event; cells: the state it moves to (None: refused).
TABLE: dict[LaunchEvent, dict[LaunchState, LaunchState | None]] = {
    LaunchEvent.FINISH: {L: D, R: D, INC: None, D: D, F: None},
    LaunchEvent.PAUSE: {L: INC, R: INC, INC: INC, D: INC, F: None},
    LaunchEvent.TAKE_OVER: {L: R, R: R, INC: R, D: None, F: None},
    LaunchEvent.FAIL: {L: F, R: F, INC: F, D: F, F: F},
    LaunchEvent.RETURN_SOME: {L: L, R: R, INC: INC, D: D, F: F},
    LaunchEvent.RETURN_ALL: {L: F, R: F, INC: F, D: F, F: F},
    LaunchEvent.UNMARK: {L: None, R: None, INC: None, D: D, F: F},
}


@pytest.mark.parametrize(
    ("state", "event", "expected"),
    [(state, event, row[state]) for event, row in TABLE.items() for state in LaunchState],
    ids=lambda v: getattr(v, "value", str(v)),
)
def test_every_transition(state: LaunchState, event: LaunchEvent, expected: LaunchState | None) -> None:
    assert next_state(state, event) == expected


def test_the_table_covers_every_event_and_state() -> None:
    assert set(TABLE) == set(LaunchEvent)
    assert all(set(row) == set(LaunchState) for row in TABLE.values())


@pytest.mark.parametrize("event", list(LaunchEvent))
def test_each_write_is_refused_unless_the_record_is_in_a_state_the_event_may_move(event: LaunchEvent) -> None:
    move = update(event, now=1.0)
    allowed = {state.value for state in LaunchState if next_state(state, event) is not None}

    named = {value for key, value in move.values.items() if key.startswith(":from")}

    assert named == allowed
    assert move.condition.startswith("#state IN (")


@pytest.mark.parametrize("event", [e for e in LaunchEvent if e is not LaunchEvent.UNMARK])
def test_every_write_but_unmark_keeps_the_launch_in_the_live_index(event: LaunchEvent) -> None:
    """A launch that holds leases is always where reconcile looks, whatever stops it between two writes."""
    move = update(event, now=1.0, reason="r", held=2, returned=1)

    assert "#live = :live" in move.expression
    assert move.values[":live"] == "launch"
    assert "REMOVE" not in move.expression


def test_unmark_removes_the_live_mark_only_from_a_finished_launch_holding_nothing() -> None:
    move = update(LaunchEvent.UNMARK, now=1.0)

    assert move.expression == "REMOVE live"
    assert move.condition.endswith("AND leases <= :none")
    assert {v for k, v in move.values.items() if k.startswith(":from")} == {s.value for s in FINISHED}
    for state in LaunchState:
        assert stays_live(state, LaunchEvent.UNMARK, leases=0) is (state in UNFINISHED)
        assert stays_live(state, LaunchEvent.UNMARK, leases=1) is True


def test_returning_leases_is_a_compare_and_set_on_the_count_held() -> None:
    move = update(LaunchEvent.RETURN_SOME, now=1.0, held=3, returned=2)

    assert "leases = :left" in move.expression
    assert (move.values[":held"], move.values[":left"]) == (3, 1)
    assert move.condition.endswith("AND leases = :held")
    assert ":to" not in move.values  # the state stays


def test_a_take_over_needs_an_incomplete_launch_or_a_silent_owner() -> None:
    move = update(LaunchEvent.TAKE_OVER, now=100.0, stale_before=40.0)

    assert move.condition.endswith("AND (#state = :incomplete OR started_at < :stale)")
    assert (move.values[":now"], move.values[":stale"], move.values[":to"]) == (100.0, 40.0, "resuming")
