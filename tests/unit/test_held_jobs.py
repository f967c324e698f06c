"""What scale-up does with a job another launch holds: a pure decision over the holding launch's record."""

from __future__ import annotations

import pytest

from chalicelib.scaling.launches import LaunchState
from chalicelib.scaling.policy import HeldJob, decide_held_job

NOW = 1_000_000.0
STALE = 120.0
FRESH = NOW - 10  # well within the staleness window
OLD = NOW - 300  # older than the window: its invocation is gone
EDGE = NOW - STALE  # exactly as old as the window


@pytest.mark.parametrize(
    ("state", "claimed_at", "started_at", "expected"),
    [
        # the holding launch made its runner: this copy is a duplicate, however old
        (LaunchState.LAUNCHED, FRESH, FRESH, HeldJob.DONE),
        (LaunchState.LAUNCHED, OLD, OLD, HeldJob.DONE),
        # no launch record: claimed a moment ago by a live invocation, or abandoned by a dead one
        (None, FRESH, 0.0, HeldJob.IN_PROGRESS),
        (None, OLD, 0.0, HeldJob.RECLAIM),
        (None, EDGE, 0.0, HeldJob.RECLAIM),
        # the launch failed (or gave every lease back): claim afresh, fresh or not
        (LaunchState.FAILED, FRESH, FRESH, HeldJob.RECLAIM),
        (LaunchState.FAILED, OLD, OLD, HeldJob.RECLAIM),
        # stopped part way on purpose: the next delivery resumes it at once
        (LaunchState.INCOMPLETE, FRESH, FRESH, HeldJob.RESUME),
        (LaunchState.INCOMPLETE, OLD, OLD, HeldJob.RESUME),
        # in the hands of an invocation: left alone until that invocation goes silent
        (LaunchState.LAUNCHING, FRESH, FRESH, HeldJob.IN_PROGRESS),
        (LaunchState.LAUNCHING, OLD, EDGE, HeldJob.IN_PROGRESS),
        (LaunchState.LAUNCHING, OLD, OLD, HeldJob.RESUME),
        (LaunchState.RESUMING, OLD, FRESH, HeldJob.IN_PROGRESS),
        (LaunchState.RESUMING, OLD, OLD, HeldJob.RESUME),
    ],
)
def test_the_decision_for_a_held_job(
    state: LaunchState | None, claimed_at: float, started_at: float, expected: HeldJob
) -> None:
    assert decide_held_job(state, claimed_at=claimed_at, started_at=started_at, now=NOW, stale_after=STALE) is expected


def test_every_launch_state_has_a_decision() -> None:
    for state in [*LaunchState, None]:
        assert decide_held_job(state, claimed_at=OLD, started_at=OLD, now=NOW, stale_after=STALE) in set(HeldJob)
