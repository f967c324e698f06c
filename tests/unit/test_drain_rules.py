"""A drained pool in reconcile's rules: its runners are retired as past their retirement point are (paused busy or
idle, retired once they run nothing), and it is never kept warm. Pure decisions, no AWS."""

from __future__ import annotations

from dataclasses import replace

from chalicelib.lifecycle.rules import RETIRE_GRACE_SECONDS, Pause, Retire, WarmLaunch, decide
from chalicelib.scaling.store.records import PoolCounter
from chalicelib.store import RETIRING, RunnerState
from tests.unit.test_reconcile_rules import CONFIG, NOW, config, facts, instance, record, runner


def test_every_booted_runner_of_a_drained_pool_is_paused_busy_or_idle() -> None:
    # given a drained pool with an idle runner, a busy one, and one still booting (GitLab never heard from it)
    idle = record("i-1", launched_at=NOW - 60)
    busy = record("i-2", launched_at=NOW - 60, state=RunnerState.BUSY, busy=("1:7",))
    booting = record("i-3", launched_at=NOW - 10, boot_deadline_at=NOW + 290, state=RunnerState.BOOTING)
    seen = facts(
        [idle, busy, booting],
        [instance("i-1"), instance("i-2"), instance("i-3")],
        runners=[runner(1), runner(2), runner(3, status="never_contacted")],
        drained={"docker": NOW - 5},
    )

    # when reconcile decides
    paused = [a for a in decide(seen, CONFIG) if isinstance(a, Pause)]

    # then the booted two are paused for retirement, named for the drain; the booting one waits until it boots
    assert sorted(a.instance_id for a in paused) == ["i-1", "i-2"]
    assert {a.reason for a in paused} == {"its pool is drained"}


def test_a_paused_runner_of_a_drained_pool_is_retired_only_once_it_runs_nothing() -> None:
    retiring = {"draining": RETIRING + "its pool is drained", "draining_at": NOW - RETIRE_GRACE_SECONDS - 1}
    busy = record("i-2", state=RunnerState.BUSY, busy=("1:7",), **retiring)
    paused = [replace(runner(2), paused=True)]
    seen = facts([busy], [instance("i-2")], runners=paused, drained={"docker": NOW - 100})
    assert [a for a in decide(seen, CONFIG) if isinstance(a, Retire)] == []

    done = record("i-2", state=RunnerState.IDLE, **retiring)
    seen = facts([done], [instance("i-2")], runners=paused, drained={"docker": NOW - 100})
    assert [a.instance_id for a in decide(seen, CONFIG) if isinstance(a, Retire)] == ["i-2"]


def test_a_drained_warm_pool_is_not_kept_warm() -> None:
    warm = config(warm={"size": 2})
    assert [a for a in decide(facts(), warm) if isinstance(a, WarmLaunch)] != []
    assert [a for a in decide(facts(drained={"docker": NOW}), warm) if isinstance(a, WarmLaunch)] == []


def test_an_undrained_pool_is_left_alone() -> None:
    seen = facts([record("i-1", launched_at=NOW - 60)], [instance("i-1")])
    assert [a for a in decide(seen, CONFIG) if isinstance(a, Pause)] == []


def test_a_pool_counter_item_reads_its_drain_mark() -> None:
    assert PoolCounter.from_item("docker", None) == PoolCounter("docker")
    counter = PoolCounter.from_item("docker", {"leases": 2, "template_version": 3, "drained_at": NOW})
    assert (counter.leases, counter.template_version, counter.drained) == (2, 3, True)
    assert not PoolCounter.from_item("docker", {"leases": 1}).drained
