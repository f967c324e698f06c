"""Reconcile's rules as pure decisions: tables of facts in, actions out. No AWS, no GitLab, no clock."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import pytest

from chalicelib.config import FleetConfig, parse_config
from chalicelib.gitlab_api import GitLabRunner
from chalicelib.intake.job_hooks import JobStatus
from chalicelib.lifecycle.facts import SWEEP_PROJECTS, Facts, InstanceFact, JobFact, PendingJob, TokenFact, sweep_turn
from chalicelib.lifecycle.invariants import check
from chalicelib.lifecycle.reconcile import may_retire
from chalicelib.lifecycle.rules import (
    MAX_RUNNER_DELETIONS,
    RETIRE_GRACE_SECONDS,
    CleanUp,
    DeleteRunner,
    DeleteToken,
    Kind,
    Pause,
    Reap,
    RecoverJob,
    Retire,
    SettleLaunch,
    Unmark,
    WarmLaunch,
    decide,
    retire_at,
)
from chalicelib.scaling.launches import LaunchState
from chalicelib.scaling.store.records import LaunchRecord, RunnerRecord
from chalicelib.store import RETIRING, RunnerState

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z, a Friday
FLEET = "rf-test"


def config(**pool: Any) -> FleetConfig:
    return parse_config(
        {
            "fleet": FLEET,
            "gitlab": {"url": "https://gitlab.example.com", "token_parameter": "/t/gitlab"},
            "webhook": {"token_parameter": "/t/webhook"},
            "state": {"table": "t-table", "jobs_queue": "t-jobs", "dead_letter_queue": "t-dlq"},
            "cache_bucket": "t-cache",
            "ami_parameter": "/t/ami",
            "pools": [
                {
                    "name": "docker",
                    "tags": ["docker"],
                    "instance_types": ["m7i.large"],
                    "subnets": ["subnet-0123456789abcdef0"],
                    "security_groups": ["sg-0123456789abcdef0"],
                    "max_runners": 5,
                    "image": {"repository": "ci/base"},
                    "boot_deadline_seconds": 300,
                    "max_lifetime_minutes": 240,
                    "job_timeout_seconds": 3600,
                    **pool,
                }
            ],
        }
    )


CONFIG = config()


def record(instance: str, **fields: Any) -> RunnerRecord:
    values: dict[str, Any] = {
        "instance_id": instance,
        "pool": "docker",
        "launch_id": "L1",
        "launched_at": NOW - 1000,
        "boot_deadline_at": NOW - 700,
        "gitlab_runner_id": int(instance.removeprefix("i-")),
        "state": RunnerState.IDLE,
        "lease": True,
    }
    values.update(fields)
    return RunnerRecord(**values)


def instance(instance_id: str, **fields: Any) -> InstanceFact:
    values: dict[str, Any] = {
        "instance_id": instance_id,
        "pool": "docker",
        "launch_id": "L1",
        "state": "running",
        "launched_at": NOW - 1000,
        "template_version": "1",
    }
    values.update(fields)
    return InstanceFact(**values)


def runner(runner_id: int, status: str = "online", instance_id: str | None = None) -> GitLabRunner:
    described = instance_id or f"i-{runner_id}"
    return GitLabRunner(runner_id, f"runner-fleet {FLEET}/docker {described}", status, paused=False)


def facts(
    records: list[RunnerRecord] = (),  # type: ignore[assignment]
    instances: list[InstanceFact] = (),  # type: ignore[assignment]
    runners: list[GitLabRunner] | None = None,
    **fields: Any,
) -> Facts:
    live = {r.instance_id: r for r in records}
    leases = sum(1 for r in records if r.lease)
    values: dict[str, Any] = {
        "now": NOW,
        "records": live,
        "launches": [],
        "leases": {"docker": leases},
        "instances": {i.instance_id: i for i in instances},
        "template_versions": {"docker": "1"},
        "gitlab_runners": [runner(r.gitlab_runner_id) for r in records if r.gitlab_runner_id]
        if runners is None
        else runners,
        "pending_jobs": [],
    }
    values.update(fields)
    return Facts(**values)


def healthy(*ids: str) -> Facts:
    return facts([record(i) for i in ids], [instance(i) for i in ids])


def kinds(actions: list[Any]) -> list[tuple[str, str]]:
    return [(type(a).__name__, getattr(a, "instance_id", "") or getattr(a, "launch_id", "")) for a in actions]


# -- a healthy fleet ---------------------------------------------------------------------------------------


def test_a_healthy_fleet_needs_nothing_and_its_invariants_hold() -> None:
    seen = healthy("i-1", "i-2")
    assert decide(seen, CONFIG) == []
    assert check(seen, CONFIG) == []


# -- never contacted ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "deadline", "runner_id", "reaped"),
    [
        ("never_contacted", NOW - 1, 1, True),  # past the deadline, never heard of: reaped
        ("never_contacted", NOW + 60, 1, False),  # still booting within its deadline
        ("online", NOW - 1, 1, False),  # it registered
        ("offline", NOW - 1, 1, False),  # it registered once (offline now: its job decides, not the deadline)
        (None, NOW - 1, None, True),  # never got a GitLab runner at all
        (None, NOW + 60, None, False),  # no GitLab runner yet, within its deadline
    ],
)
def test_a_runner_that_never_contacted_gitlab_by_its_deadline_is_reaped(
    status: str | None, deadline: float, runner_id: int | None, reaped: bool
) -> None:
    booting = record("i-1", state=RunnerState.BOOTING, boot_deadline_at=deadline, gitlab_runner_id=runner_id)
    seen = facts([booting], [instance("i-1")], [runner(1, status)] if status else [])
    actions = [a for a in decide(seen, CONFIG) if isinstance(a, Reap)]
    assert [(a.instance_id, a.kind) for a in actions] == ([("i-1", Kind.NEVER_CONTACTED)] if reaped else [])


def test_never_contacted_is_not_judged_while_gitlab_is_unreadable() -> None:
    booting = record("i-1", state=RunnerState.BOOTING, boot_deadline_at=NOW - 1)
    assert decide(facts([booting], [instance("i-1")], runners=None, gitlab_runners=None), CONFIG) == []


# -- untracked instances and lost records ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("launched_ago", "launch_state", "launch_age", "state", "reaped"),
    [
        (600, None, 0, "running", True),  # old, no record, no launch at work
        (30, None, 0, "running", False),  # just launched: its record may be on the way
        (600, LaunchState.LAUNCHING, 10, "running", False),  # its launch is at work right now
        (600, LaunchState.LAUNCHING, 600, "running", True),  # its launch went silent long ago
        (600, None, 0, "shutting-down", False),  # already on its way out
    ],
)
def test_an_instance_no_record_knows_is_reaped_once_nothing_is_still_making_it(
    launched_ago: float, launch_state: LaunchState | None, launch_age: float, state: str, reaped: bool
) -> None:
    launches = [LaunchRecord("L9", "docker", launch_state, 1, 1, NOW - launch_age)] if launch_state is not None else []
    seen = facts(
        [], [instance("i-9", launch_id="L9", launched_at=NOW - launched_ago, state=state)], [], launches=launches
    )
    actions = [a for a in decide(seen, CONFIG) if isinstance(a, Reap)]
    assert [(a.instance_id, a.kind) for a in actions] == ([("i-9", Kind.UNTRACKED_INSTANCE)] if reaped else [])


@pytest.mark.parametrize(
    ("launched_ago", "cleaned"),
    [(600, True), (30, False)],  # a young record's instance may not be listed yet (eventual consistency)
)
def test_a_record_whose_instance_is_gone_is_cleaned_up(launched_ago: float, cleaned: bool) -> None:
    lost = record("i-1", launched_at=NOW - launched_ago)
    seen = facts([lost], [], [])
    assert [a for a in decide(seen, CONFIG) if isinstance(a, CleanUp)] == (
        [CleanUp("record whose instance no longer exists", instance_id="i-1", kind=Kind.LOST_INSTANCE)]
        if cleaned
        else []
    )
    assert [v.invariant for v in check(seen, CONFIG)] == [
        "record without an instance",
        "record's GitLab runner missing",
        "lease counter differs from live instances",
    ]


def test_a_terminated_record_with_cleanup_left_is_finished() -> None:
    left = record("i-1", state=RunnerState.TERMINATED, lease=False, gitlab_cleanup=True)
    actions = decide(facts([left], [], [runner(1, "offline")]), CONFIG)
    assert kinds(actions) == [("CleanUp", "i-1")]
    assert actions[0].kind is Kind.CLEANUP_LEFT  # type: ignore[attr-defined]


# -- GitLab runners --------------------------------------------------------------------------------------


def test_a_gitlab_runner_of_the_fleet_without_instance_or_record_is_deleted() -> None:
    other = GitLabRunner(77, "shared runner of someone else", "online", paused=False)
    another_fleet = GitLabRunner(78, "runner-fleet other/docker i-78", "online", paused=False)
    seen = facts([], [], [runner(5, "offline"), other, another_fleet])
    assert [(type(a).__name__, a.runner_id) for a in decide(seen, CONFIG)] == [("DeleteRunner", 5)]  # type: ignore[attr-defined]


def test_a_gitlab_runner_whose_record_is_live_is_left_to_the_record() -> None:
    # Its record was written before the runner was made, and the instance listing came last: a record without
    # an instance is the record's rule to judge, not the GitLab runner's.
    young = record("i-3", launched_at=NOW - 10)
    assert [a for a in decide(facts([young], [], [runner(3)]), CONFIG) if isinstance(a, DeleteRunner)] == []


# -- launches ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "leases", "age", "expected"),
    [
        (LaunchState.LAUNCHING, 2, 30, []),  # at work
        (LaunchState.LAUNCHING, 2, 600, ["SettleLaunch"]),  # its owner died
        (LaunchState.RESUMING, 1, 600, ["SettleLaunch"]),
        (LaunchState.INCOMPLETE, 1, 30, []),  # its jobs come back to resume it
        (LaunchState.INCOMPLETE, 1, 600, ["SettleLaunch"]),  # nobody resumed it
        (LaunchState.FAILED, 2, 5, ["SettleLaunch"]),  # failed for good, still holding leases
        (LaunchState.FAILED, 0, 5, ["Unmark"]),
        (LaunchState.LAUNCHED, 0, 5, ["Unmark"]),
    ],
)
def test_a_launch_holding_leases_past_its_window_is_settled(
    state: LaunchState, leases: int, age: float, expected: list[str]
) -> None:
    launch = LaunchRecord("L2", "docker", state, leases, leases, NOW - age)
    actions = decide(facts(launches=[launch], leases={"docker": leases}), CONFIG)
    assert [type(a).__name__ for a in actions] == expected
    for action in actions:
        assert isinstance(action, (SettleLaunch, Unmark)) and action.launch_id == "L2"


# -- retirement -------------------------------------------------------------------------------------------


def test_retirement_point_leaves_a_job_time_to_finish_within_the_lifetime() -> None:
    pool = CONFIG.pools[0]  # 240 minutes, job timeout one hour
    assert retire_at(record("i-1", launched_at=0.0), pool) == 3 * 3600
    longest = config(max_lifetime_minutes=120, job_timeout_seconds=3600).pools[0]
    assert retire_at(record("i-1", launched_at=0.0), longest) == 3600  # the longest job timeout allowed: half


@pytest.mark.parametrize(
    ("fields", "status", "version", "paused"),
    [
        ({"launched_at": NOW - 3 * 3600 - 1}, "online", "1", True),  # past its retirement point, idle
        # busy: paused too, so it finishes its job and starts no other its lifetime cannot hold
        ({"launched_at": NOW - 3 * 3600 - 1, "busy": ("1:2",), "state": RunnerState.BUSY}, "online", "1", True),
        ({"launched_at": NOW - 3 * 3600 - 1, "draining": "spot interruption"}, "online", "1", False),
        ({"launched_at": NOW - 3600}, "online", "2", True),  # the pool's template moved on (new image)
        ({"launched_at": NOW - 3600, "busy": ("1:2",), "state": RunnerState.BUSY}, "online", "2", True),
        ({"launched_at": NOW - 3600}, "online", "1", False),
        # booted and never given a job: due once GitLab heard from it (a paused runner is listed "paused")
        ({"state": RunnerState.BOOTING, "launched_at": NOW - 3 * 3600 - 1}, "online", "1", True),
        ({"state": RunnerState.BOOTING, "launched_at": NOW - 3 * 3600 - 1}, "paused", "1", True),
        ({"state": RunnerState.BOOTING, "launched_at": NOW - 3 * 3600 - 1}, "never_contacted", "1", False),
        ({"state": RunnerState.DONE, "launched_at": NOW - 3 * 3600 - 1}, "online", "1", False),  # powers off
    ],
)
def test_runners_due_for_retirement_are_paused_first(
    fields: dict[str, Any], status: str, version: str, paused: bool
) -> None:
    old = record("i-1", **fields)
    seen = facts([old], [instance("i-1")], [runner(1, status)], template_versions={"docker": version})
    actions = decide(seen, CONFIG)
    pauses = [a for a in actions if isinstance(a, Pause)]
    assert [(a.instance_id, a.runner_id) for a in pauses] == ([("i-1", 1)] if paused else [])
    assert [a for a in actions if isinstance(a, Retire)] == []  # never retired in the run that pauses it


def retiring_record(**fields: Any) -> RunnerRecord:
    values = {"draining": f"{RETIRING}past its lifetime's retirement point", "draining_at": NOW - 60}
    return record("i-1", **{**values, **fields})


@pytest.mark.parametrize(
    ("fields", "paused_in_gitlab", "listed", "expected"),
    [
        ({}, True, True, "retire"),  # paused a grace ago, runs nothing
        ({"draining_at": NOW - RETIRE_GRACE_SECONDS + 1}, True, True, ""),  # within the grace: a request may land
        ({"busy": ("1:2",), "state": RunnerState.BUSY}, True, True, ""),  # still runs its job: waits
        ({}, False, True, "pause"),  # marked, but the pause never reached GitLab: paused again
        ({}, True, False, "retire"),  # its GitLab runner is gone already: the instance still goes
        ({"draining": "spot interruption"}, True, True, ""),  # an interruption's pause is not a retirement
    ],
)
def test_a_retiring_runner_is_retired_a_grace_after_its_pause_once_it_runs_nothing(
    fields: dict[str, Any], paused_in_gitlab: bool, listed: bool, expected: str
) -> None:
    gitlab = [
        GitLabRunner(
            1, f"runner-fleet {FLEET}/docker i-1", "paused" if paused_in_gitlab else "online", paused_in_gitlab
        )
    ]
    seen = facts([retiring_record(**fields)], [instance("i-1")], gitlab if listed else [])

    actions = [a for a in decide(seen, CONFIG) if isinstance(a, (Pause, Retire))]

    kinds = {Pause: "pause", Retire: "retire"}
    assert [kinds[type(a)] for a in actions] == ([expected] if expected else [])


def test_warm_runners_are_retired_when_their_window_closes() -> None:
    # A window on weekdays 09:00 to 17:00 in Berlin; NOW is 09:00 in Berlin on a Friday: open.
    windows = [{"start": "0 9 * * 1-5", "end": "0 17 * * 1-5", "timezone": "Europe/Berlin"}]
    warm = config(warm={"size": 2, "windows": windows})
    idle_warm = record("i-1", warm=True, launched_at=NOW - 600)
    assert [a for a in decide(facts([idle_warm], [instance("i-1")]), warm) if isinstance(a, Pause)] == []
    evening = NOW + 9 * 3600  # 18:00 in Berlin
    seen = facts([idle_warm], [instance("i-1")], now=evening)
    assert [a.instance_id for a in decide(seen, warm) if isinstance(a, Pause)] == ["i-1"]


@pytest.mark.parametrize(
    ("runners", "paused"),
    [
        # three warm runners idle, two of them longer than the idle wait (600 s): the longest idle one goes
        ({"i-1": NOW - 700, "i-2": NOW - 900, "i-3": NOW - 10}, ["i-2"]),
        ({"i-1": NOW - 700, "i-2": NOW - 900, "i-3": NOW - 800}, ["i-2"]),  # the size's worth stays
        ({"i-1": NOW - 10, "i-2": NOW - 20, "i-3": NOW - 30}, []),  # none idle past the idle wait yet
        ({"i-1": NOW - 700, "i-2": NOW - 900}, []),  # no more than the size
    ],
)
def test_warm_runners_beyond_the_warm_size_are_retired_once_idle_past_the_idle_wait(
    runners: dict[str, float], paused: list[str]
) -> None:
    warm = config(warm={"size": 2, "windows": []}, idle_wait_seconds=600)
    records = [record(i, warm=True, idle_since=since) for i, since in runners.items()]
    busy = record("i-4", warm=True, state=RunnerState.BUSY, busy=("7:1",))  # busy: neither idle nor surplus
    not_warm = record("i-5", idle_since=NOW - 3600)  # idles out by itself
    seen = facts([*records, busy, not_warm], [instance(r.instance_id) for r in [*records, busy, not_warm]])
    actions = [a for a in decide(seen, warm) if isinstance(a, Pause)]
    assert [a.instance_id for a in actions] == paused
    assert all("beyond the pool's warm size" in a.reason for a in actions)


def test_a_warm_runner_never_given_a_job_counts_as_idle_since_its_launch() -> None:
    warm = config(warm={"size": 1, "windows": []}, idle_wait_seconds=600)
    old = record("i-1", warm=True, state=RunnerState.BOOTING, launched_at=NOW - 900)
    new = record("i-2", warm=True, state=RunnerState.BOOTING, launched_at=NOW - 100)
    seen = facts([old, new], [instance("i-1"), instance("i-2")])
    assert [a.instance_id for a in decide(seen, warm) if isinstance(a, Pause)] == ["i-1"]


# -- lost webhooks ------------------------------------------------------------------------------------------


def job(project: int, job_id: int, **item: Any) -> JobFact:
    values = {"kind": "job", "project_id": project, "job_id": job_id, "status": "pending", **item}
    values.setdefault("status_rank", JobStatus(str(values["status"])).rank)
    return JobFact(project, job_id, str(values["status"]), NOW - 60, values)


@pytest.mark.parametrize(
    ("item", "recovered"),
    [
        ({"queued": False, "pending_at": NOW - 600}, True),  # recorded, its send failed, nobody holds it
        ({"queued": False, "queue_claim": "w", "queue_claim_at": NOW - 10}, False),  # a webhook is sending now
        ({"queued": False, "queue_claim": "w", "queue_claim_at": NOW - 600}, True),  # its sender died
        ({"queued": True}, False),
        ({"queued": False, "launch_id": "L1"}, False),  # scale-up has it
        ({"queued": False, "status": "running"}, False),
    ],
)
def test_a_recorded_but_unqueued_job_is_recovered(item: dict[str, Any], recovered: bool) -> None:
    actions = [a for a in decide(facts(jobs=[job(7, 70, **item)]), CONFIG) if isinstance(a, RecoverJob)]
    assert [(a.project_id, a.job_id, a.known) for a in actions] == ([(7, 70, True)] if recovered else [])


def test_a_pending_job_the_table_never_heard_of_is_recovered_after_a_while() -> None:
    seen = facts(
        jobs=[job(7, 70, queued=True)],
        pending_jobs=[
            PendingJob(7, 70, NOW - 900),  # known: queued
            PendingJob(7, 71, NOW - 900),  # unknown, pending for 15 minutes: its hook was lost
            PendingJob(7, 72, NOW - 5),  # unknown, but its hook may be on the way
        ],
    )
    actions = [a for a in decide(seen, CONFIG) if isinstance(a, RecoverJob)]
    assert [(a.project_id, a.job_id, a.known) for a in actions] == [(7, 71, False)]


def test_a_job_recorded_as_created_whose_pending_hook_was_lost_is_recovered() -> None:
    created = job(7, 80, status="created", status_rank=1, updated_at=NOW - 600)
    fresh = job(7, 81, status="created", status_rank=1, updated_at=NOW - 5)  # its pending hook may be on the way
    seen = facts(jobs=[created, fresh], pending_jobs=[PendingJob(7, 80, NOW - 900), PendingJob(7, 81, NOW - 900)])
    actions = [a for a in decide(seen, CONFIG) if isinstance(a, RecoverJob)]
    assert [(a.project_id, a.job_id, a.known) for a in actions] == [(7, 80, True)]


@pytest.mark.parametrize(
    ("claimed_ago", "outcome", "relaunched"),
    [
        (300 + 120 + 1, None, True),  # past the boot deadline and the launch window: its runner never came
        (300, None, False),  # its runner may still be booting
        (3600, "dead_lettered", False),  # settled: left alone
    ],
)
def test_a_pending_job_whose_launch_ended_without_a_runner_is_launched_again(
    claimed_ago: float, outcome: str | None, relaunched: bool
) -> None:
    item = {"status_rank": 2, "queued": True, "launch_id": "L1", "claimed_at": NOW - claimed_ago}
    if outcome:
        item["outcome"] = outcome
    seen = facts(jobs=[job(7, 90, **item)], pending_jobs=[PendingJob(7, 90, NOW - 3600)])
    actions = [a for a in decide(seen, CONFIG) if isinstance(a, RecoverJob)]
    assert [(a.job_id, a.relaunch_from) for a in actions] == ([(90, "L1")] if relaunched else [])


def claimed(job_id: int, ago: float, launch: str = "L1", **item: Any) -> JobFact:
    """A pending job the table holds for ``launch`` of the docker pool, claimed ``ago`` seconds ago."""
    values = {"queued": True, "launch_id": launch, "claimed_at": NOW - ago, "launch_pool": "docker", **item}
    return job(7, job_id, **values)


@pytest.mark.parametrize(
    ("jobs", "runners", "launches", "relaunched"),
    [
        ([claimed(90, 61)], [], [], [90]),  # its runner took another job, and none is coming
        ([claimed(90, 59)], [], [], []),  # the launch may still be recording its instances
        ([claimed(90, 61)], [record("i-1", state=RunnerState.BOOTING)], [], []),  # a booting runner will take it
        ([claimed(90, 61)], [record("i-1", state=RunnerState.IDLE)], [], []),  # so will an idle one
        ([claimed(90, 61)], [record("i-1", busy=("7:89",), state=RunnerState.BUSY)], [], [90]),
        ([claimed(90, 61)], [record("i-1", draining="retiring: old", state=RunnerState.IDLE)], [], [90]),
        ([claimed(90, 61)], [record("i-1", pool="build", state=RunnerState.IDLE)], [], [90]),  # another pool's
        ([claimed(90, 300), claimed(91, 200), claimed(92, 100)], [record("i-1", state=RunnerState.IDLE)], [], [90, 91]),
        ([claimed(90, 61)], [], [LaunchState.LAUNCHING], []),  # its launch is still at work
        ([claimed(90, 61, status="running")], [], [], []),  # taken
        ([claimed(90, 61, outcome="dead_lettered")], [], [], []),
        ([claimed(90, 61, launch_pool="")], [], [], []),  # claimed before claims named their pool
    ],
)
def test_a_pending_job_whose_runner_took_another_job_is_launched_again_when_no_runner_is_coming(
    jobs: list[JobFact], runners: list[RunnerRecord], launches: list[LaunchState], relaunched: list[int]
) -> None:
    made = [LaunchRecord("L1", "docker", state, 0, 1, NOW - 61) for state in launches]
    seen = facts(runners, [instance(r.instance_id) for r in runners], jobs=jobs, launches=made)
    actions = [a for a in decide(seen, CONFIG) if isinstance(a, RecoverJob)]
    assert [(a.job_id, a.relaunch_from) for a in actions] == [(j, "L1") for j in relaunched]


# -- warm pools ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "ready", "leases", "max_runners", "launched"),
    [
        (2, 0, 0, 5, 2),
        (2, 1, 1, 5, 1),
        (2, 2, 2, 5, 0),
        (3, 0, 4, 5, 1),  # never past max_runners: one lease left
        (3, 0, 5, 5, 0),
        (0, 0, 0, 5, 0),
    ],
)
def test_a_warm_pool_is_topped_up_within_max_runners(
    size: int, ready: int, leases: int, max_runners: int, launched: int
) -> None:
    pool = config(warm={"size": size}, max_runners=max_runners)
    idle = [record(f"i-{n}", launched_at=NOW - 60) for n in range(1, ready + 1)]
    busy = [record(f"i-{n}", state=RunnerState.BUSY, busy=("1:1",)) for n in range(10, 10 + leases - ready)]
    seen = facts(idle + busy, [instance(r.instance_id) for r in idle + busy])
    actions = [a for a in decide(seen, pool) if isinstance(a, WarmLaunch)]
    assert [a.count for a in actions] == ([launched] if launched else [])


def test_no_warm_launch_while_gitlab_is_unreadable() -> None:
    pool = config(warm={"size": 2})
    assert decide(facts(gitlab_runners=None), pool) == []
    assert [type(a).__name__ for a in decide(facts(), pool)] == ["WarmLaunch"]


def test_a_warm_runner_still_booting_counts_as_ready() -> None:
    pool = config(warm={"size": 1})
    booting = record("i-1", warm=True, state=RunnerState.BOOTING, boot_deadline_at=NOW + 100)
    assert [a for a in decide(facts([booting], [instance("i-1")], [runner(1, "never_contacted")]), pool)] == []


# -- invariants ----------------------------------------------------------------------------------------------


def test_each_invariant_is_reported_with_its_subject() -> None:
    seen = facts(
        [record("i-1"), record("i-2")],
        [instance("i-1"), instance("i-3")],
        [runner(1), runner(2), runner(4)],
        tokens=[TokenFact("TOKEN#r:i-1", "i-1", NOW - 1), TokenFact("TOKEN#r:i-2", "i-2", NOW + 60)],
        leases={"docker": 3},
    )
    assert sorted(str(v) for v in check(seen, CONFIG)) == [
        "GitLab runner without an instance: 2 (runner-fleet rf-test/docker i-2)",
        "GitLab runner without an instance: 4 (runner-fleet rf-test/docker i-4)",
        "instance without a record: i-3 (running, pool docker)",
        "lease counter differs from live instances: docker (3 leases, 2 live)",
        "lease counter differs from the leases held: docker (3 leases, 2 held by records and launches)",
        "record without an instance: i-2 (state idle)",
        "token past its boot deadline: i-1 (1.0 s past)",
    ]


def test_the_invariants_that_would_have_caught_the_lifecycle_defects() -> None:
    due = NOW - 4 * 3600  # launched 4 hours ago: past its retirement point (3 hours) an hour ago
    paused = GitLabRunner(2, f"runner-fleet {FLEET}/docker i-2", "paused", paused=True)
    launch = LaunchRecord("L9", "docker", LaunchState.INCOMPLETE, leases=1, requested=2, started_at=NOW - 600)
    running_late = job(
        7, 71, status="running", running_at=NOW - 60, runner_description=f"runner-fleet {FLEET}/docker i-1"
    )
    seen = facts(
        [record("i-1", launched_at=due), record("i-2"), record("i-3", draining="spot interruption warning")],
        [instance("i-1"), instance("i-2"), instance("i-3")],
        # i-2 is paused though its record does not drain; i-3 drains but is not paused; two runners for i-1
        [runner(1), paused, runner(3), runner(5, instance_id="i-1")],
        leases={"docker": 4},
        launches=[launch],
        jobs=[running_late, job(7, 72, queued=True)],
        pending_jobs=[PendingJob(7, 72, NOW - 600), PendingJob(7, 73, NOW - 600), PendingJob(7, 74, NOW - 10)],
    )

    assert sorted(str(v) for v in check(seen, CONFIG)) == [
        "job started on a runner past its retirement point: i-1 (job 7:71 3540 s after it)",
        "lease counter differs from live instances: docker (4 leases, 3 live)",
        "more than one GitLab runner for an instance: i-1 (2 runners)",
        "paused in GitLab unlike its record: i-2 (paused in GitLab, record does not drain)",
        "paused in GitLab unlike its record: i-3 (not paused in GitLab, record drains (spot interruption warning))",
        "pending job neither queued nor claimed: 7:73 (lost Job Hook?)",
    ]
    # the launch's lease is held where reconcile looks, so the counter matches what records and launches hold


def test_a_launch_holding_leases_outside_the_live_index_shows_as_a_lease_mismatch() -> None:
    # the launch holding the second lease is missing from the facts (it lost its live mark)
    seen = facts([record("i-1")], [instance("i-1")], leases={"docker": 2})

    assert "lease counter differs from the leases held: docker (2 leases, 1 held by records and launches)" in [
        str(v) for v in check(seen, CONFIG, settled_before=NOW - 120)
    ]


def test_during_a_run_what_is_younger_than_the_grace_is_not_judged() -> None:
    young = record("i-9", launched_at=NOW - 30)  # recorded a moment ago: its instance not listed yet
    unrecorded = instance("i-8", launched_at=NOW - 30)  # launched a moment ago: its record not written yet
    seen = facts([young], [unrecorded], [runner(9)], leases={"docker": 1})

    assert check(seen, CONFIG, settled_before=NOW - 120) == []
    assert {v.invariant for v in check(seen, CONFIG)} >= {"record without an instance", "instance without a record"}


def test_during_a_run_a_runner_whose_live_record_does_not_name_it_yet_is_left_to_the_record() -> None:
    # the instance ended at once (a spot interruption at boot); the index has its record without the runner's id
    unnamed = record("i-9", launched_at=NOW - 5, gitlab_runner_id=None)
    seen = facts([unnamed], [], [runner(9)])

    assert check(seen, CONFIG, settled_before=NOW - 120) == []
    assert "GitLab runner without an instance" in {v.invariant for v in check(seen, CONFIG)}


# -- the pause, grace, re-check, retire race -------------------------------------------------------------------

# Events of one retirement (the reconcile side, in its order: the record marked, the runner paused, the grace
# passed, the re-check) and of a job request that may reach the runner. GitLab checks that the runner is active
# once, at the start of POST /jobs/request ("check"), then gives it a job ("assign"); the running Job Hook then
# reaches the table ("hook"). A request that passed its check before the pause is given its job within the grace
# (a request lasts far less than RETIRE_GRACE_SECONDS). Every interleaving is decided: the runner is retired only
# when no job reached it, and never deleted with a job.
RECONCILE_STEPS = ("mark", "pause", "grace", "recheck")
JOB_STEPS = ("check", "assign", "hook")


def _interleavings(*, grace: bool = True) -> list[tuple[str, ...]]:
    reconcile = RECONCILE_STEPS if grace else tuple(s for s in RECONCILE_STEPS if s != "grace")
    orders = []
    for order in itertools.permutations(reconcile + JOB_STEPS):
        if [s for s in order if s in reconcile] != list(reconcile):
            continue
        if [s for s in order if s in JOB_STEPS] != list(JOB_STEPS):
            continue
        if grace and order.index("check") < order.index("pause") and order.index("assign") > order.index("grace"):
            continue  # a request in flight at the pause ends within the grace
        orders.append(order)
    return orders


def _play(order: tuple[str, ...]) -> tuple[bool, bool]:
    """Play one interleaving against a model of GitLab and of the table; returns (retired, ran the job)."""
    paused = passed = assigned = hooked = False
    retired = False
    for step in order:
        if step == "check":
            passed = not paused  # GitLab's active? check, once, at the start of the request
        elif step == "assign":
            assigned = passed
            if assigned and retired:
                return True, True  # the job went to a runner that is being deleted
        elif step == "hook":
            hooked = assigned
        elif step == "pause":
            paused = True
        elif step == "recheck":
            running = [(1, 1)] if assigned else []
            current = record(
                "i-1", busy=("1:1",) if hooked else (), state=RunnerState.BUSY if hooked else RunnerState.IDLE
            )
            retired = may_retire(running, current)
    return retired, assigned


@pytest.mark.parametrize("order", _interleavings(), ids=lambda o: "-".join(o))
def test_retire_is_decided_for_every_interleaving_with_a_job(order: tuple[str, ...]) -> None:
    retired, ran_job = _play(order)
    assert not (retired and ran_job)  # never deleted under a job
    # and it is retired exactly when the job's request came after the pause (the job went elsewhere)
    assert retired == (order.index("check") > order.index("pause"))


def test_without_the_grace_a_request_past_its_check_gets_a_job_on_a_runner_being_deleted() -> None:
    # the race the grace closes: the check passes just before the pause, the job is given just after the re-check
    unsafe = [order for order in _interleavings(grace=False) if all(_play(order))]
    assert ("check", "mark", "pause", "recheck", "assign", "hook") in unsafe


def test_may_retire_only_a_runner_gitlab_and_the_table_say_runs_nothing() -> None:
    idle = record("i-1")
    assert may_retire([], idle)
    assert may_retire(None, idle)  # GitLab no longer knows the runner
    assert not may_retire([(1, 2)], idle)
    assert not may_retire([], replace(idle, busy=("1:2",)))


# -- the sweep's turns, expired tokens ------------------------------------------------------------------------


def test_each_run_sweeps_its_turn_of_the_projects_and_every_project_comes_round() -> None:
    projects = list(range(1, 46))  # 45 projects, 20 a run: three turns
    turns = [sweep_turn(projects, NOW + 60 * run) for run in range(3)]

    assert all(len(turn) <= SWEEP_PROJECTS for turn in turns)
    assert sorted(p for turn in turns for p in turn) == projects
    assert sweep_turn(projects, NOW + 180) == turns[0]  # and round again
    assert sweep_turn([3, 1, 2], NOW) == [1, 2, 3]  # few projects: every one, every run


def test_a_token_past_its_boot_deadline_is_deleted() -> None:
    seen = healthy("i-1")
    seen = replace(seen, tokens=[TokenFact("TOKEN#r:i-9", "i-9", NOW - 1)])

    assert [a for a in decide(seen, CONFIG) if isinstance(a, DeleteToken)] == [
        DeleteToken("runner token past its boot deadline", key="TOKEN#r:i-9", instance_id="i-9")
    ]


def test_the_token_of_a_runner_reaped_in_the_same_run_goes_with_its_cleanup_not_twice() -> None:
    # given a runner that never contacted GitLab by its boot deadline, whose token is past that deadline too
    booting = record("i-1", state=RunnerState.BOOTING, boot_deadline_at=NOW - 1, gitlab_runner_id=1)
    seen = facts([booting], [instance("i-1")], [runner(1, "never_contacted")])
    seen = replace(seen, tokens=[TokenFact("TOKEN#r:i-1", "i-1", NOW - 1), TokenFact("TOKEN#r:i-9", "i-9", NOW - 1)])

    actions = decide(seen, CONFIG)

    # then the reap cleans up its token; only the other instance's token is deleted on its own
    assert [a.instance_id for a in actions if isinstance(a, Reap)] == ["i-1"]
    assert [a.instance_id for a in actions if isinstance(a, DeleteToken)] == ["i-9"]


def test_gitlab_runner_deletions_are_bounded_per_run() -> None:
    orphans = [runner(100 + n, instance_id=f"i-{100 + n}") for n in range(MAX_RUNNER_DELETIONS + 10)]
    seen = facts([], [], orphans, leases={})

    assert len([a for a in decide(seen, CONFIG) if isinstance(a, DeleteRunner)]) == MAX_RUNNER_DELETIONS
