"""A launch record's life, as one pure transition function: (state, event) -> new state, and the write that makes
the move.

A launch record (``LAUNCH#<launch id>``) holds capacity leases from the moment scale-up takes them until each moves
to a runner record or goes back to the pool. Whatever happens in between (an invocation that stops half way, a
CreateFleet answer lost, a fallback that got no answer, reconcile settling it), a launch that holds leases must stay
where reconcile looks: the sparse ``fleet-records`` index, which only items carrying ``live`` enter. So every write
of a launch record comes from :func:`update`, which keeps ``live`` on it for every move but one: only
:attr:`LaunchEvent.UNMARK`, and only on a finished launch (launched or failed) that holds no lease, takes it off.
A move the table does not allow from the record's state is refused by the write's condition, never made.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from chalicelib.store import LIVE_ATTRIBUTE

LIVE_KIND = "launch"


class LaunchState(str, Enum):
    """Where a launch record is in its life."""

    LAUNCHING = "launching"  # leases taken; an invocation is making the instances and their runners
    RESUMING = "resuming"  # another invocation took over an unfinished launch
    INCOMPLETE = "incomplete"  # the invocation ended with runners unfinished; the next delivery resumes it
    LAUNCHED = "launched"  # every runner it made is recorded and has its GitLab identity
    # It stopped for good (``reason``); any leases it still holds are given back by reconcile.
    FAILED = "failed"


class LaunchEvent(str, Enum):
    FINISH = "finish"  # every runner it made is ready: launched
    PAUSE = "pause"  # the invocation ends with work left (runners unfinished, an answer lost): incomplete
    TAKE_OVER = "take_over"  # an invocation takes over an incomplete launch, or one whose owner went silent
    FAIL = "fail"  # it stops for good; leases it holds go back now (RETURN_ALL) or by reconcile
    RETURN_SOME = "return_some"  # some leases go back (fewer instances than planned); the state stays
    RETURN_ALL = "return_all"  # every lease it holds goes back and it stops for good
    UNMARK = "unmark"  # finished and holding nothing: it leaves the live index


UNFINISHED = (LaunchState.LAUNCHING, LaunchState.RESUMING, LaunchState.INCOMPLETE)
FINISHED = (LaunchState.LAUNCHED, LaunchState.FAILED)
_EVERY = (*UNFINISHED, *FINISHED)

# (event) -> the states it may move a launch from, and the state it moves it to (None: unchanged).
_MOVES: dict[LaunchEvent, tuple[tuple[LaunchState, ...], LaunchState | None]] = {
    # Only its owner finishes it; finishing twice (a retried write) is the same move.
    LaunchEvent.FINISH: ((LaunchState.LAUNCHING, LaunchState.RESUMING, LaunchState.LAUNCHED), LaunchState.LAUNCHED),
    # A launch some of whose instances are ready while the rest has no answer yet is paused even once launched:
    # its leases stay with it for the jobs that resume it. A failed launch gave its work up: it is not resumed.
    LaunchEvent.PAUSE: ((*UNFINISHED, LaunchState.LAUNCHED), LaunchState.INCOMPLETE),
    # The take-over's own condition also says when a launching or resuming owner counts as silent.
    LaunchEvent.TAKE_OVER: (UNFINISHED, LaunchState.RESUMING),
    LaunchEvent.FAIL: (_EVERY, LaunchState.FAILED),
    LaunchEvent.RETURN_SOME: (_EVERY, None),
    LaunchEvent.RETURN_ALL: (_EVERY, LaunchState.FAILED),
    LaunchEvent.UNMARK: (FINISHED, None),
}


def next_state(state: LaunchState, event: LaunchEvent) -> LaunchState | None:
    """The state ``event`` moves a launch in ``state`` to, or None when the move is not allowed."""
    sources, target = _MOVES[event]
    if state not in sources:
        return None
    return target or state


def stays_live(state: LaunchState, event: LaunchEvent, leases: int) -> bool:
    """Whether the launch is in the live index after the move: always, but for an unmark of a finished launch
    that holds nothing."""
    return not (event is LaunchEvent.UNMARK and state in FINISHED and leases <= 0)


@dataclass(frozen=True)
class LaunchUpdate:
    """One UpdateItem's expression, values, names and condition for the launch record."""

    expression: str
    values: Mapping[str, Any] = field(default_factory=dict)
    names: Mapping[str, str] = field(default_factory=dict)
    condition: str = ""


def update(
    event: LaunchEvent,
    *,
    now: float,
    reason: str = "",
    instances: tuple[str, ...] = (),
    held: int = 0,
    returned: int = 0,
    stale_before: float = 0.0,
) -> LaunchUpdate:
    """The write of ``event``: the new state where it has one, ``live`` kept (or, for UNMARK, removed), and a
    condition that refuses it unless the record is in a state the event may move (see :func:`next_state`).
    ``held``/``returned`` are the leases the record holds and gives back (RETURN_SOME, RETURN_ALL), compared and
    set so a retried write cannot land twice; ``stale_before`` is when a launching or resuming owner counts as
    silent (TAKE_OVER)."""
    sources, target = _MOVES[event]
    names = {"#state": "state", "#live": LIVE_ATTRIBUTE}
    values: dict[str, Any] = {f":from{i}": state.value for i, state in enumerate(sources)}
    condition = f"#state IN ({', '.join(f':from{i}' for i in range(len(sources)))})"
    sets: list[str] = []
    if event is LaunchEvent.UNMARK:
        return LaunchUpdate(
            f"REMOVE {LIVE_ATTRIBUTE}",
            {**values, ":none": 0},
            {"#state": "state"},
            f"{condition} AND leases <= :none",
        )
    values[":live"] = LIVE_KIND
    sets.append("#live = :live")
    if target is not None:
        values[":to"] = target.value
        sets.append("#state = :to")
    if event is LaunchEvent.FINISH:
        values.update({":now": now, ":ids": list(instances)})
        sets += ["finished_at = :now", "instances = :ids"]
    elif event in (LaunchEvent.PAUSE, LaunchEvent.FAIL, LaunchEvent.RETURN_ALL):
        values[":reason"] = reason or event.value
        sets.append("reason = :reason")
        if event is not LaunchEvent.PAUSE:
            values[":now"] = now
            sets.append("finished_at = :now")
    elif event is LaunchEvent.TAKE_OVER:
        values.update({":now": now, ":stale": stale_before, ":incomplete": LaunchState.INCOMPLETE.value})
        sets.append("started_at = :now")
        condition = f"{condition} AND (#state = :incomplete OR started_at < :stale)"
    if event in (LaunchEvent.RETURN_SOME, LaunchEvent.RETURN_ALL):
        values.update({":held": held, ":left": held - returned})
        sets.append("leases = :left")
        condition = f"{condition} AND leases = :held"
    return LaunchUpdate("SET " + ", ".join(sets), values, names, condition)
