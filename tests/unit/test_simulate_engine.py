"""The simulation end to end on small traces: what a platform team would read off it (instances, waits, cost,
retries) for the policies the stage file sets, and that every policy decision is the product's own function."""

from __future__ import annotations

import ast
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from chalicelib.config import FleetConfig, load_config
from chalicelib.lifecycle import interruptions, rules, windows
from chalicelib.scaling import fleet, policy
from fleetctl.simulate.engine import Simulation
from fleetctl.simulate.history import HistoryJob
from fleetctl.simulate.model import Distribution, Model
from fleetctl.simulate.prices import load_prices
from fleetctl.simulate.report import Summary, summarise
from fleetctl.simulate.runs import with_settings

ROOT = Path(__file__).resolve().parents[2]
DEV = load_config(ROOT / "chalicelib" / "stages" / "dev.yaml")
PRICES = load_prices()
# A Monday, 10:00 UTC (inside the dev build pool's Berlin working-day window).
T0 = datetime(2026, 1, 5, 10, 0, tzinfo=UTC).timestamp()
BOOT = 30.0
CALM = Model(boot=Distribution("fixed", BOOT), image_pull=Distribution("fixed", 0.0), interruption_rate={"*": 0.0})
DOCKER = ("docker",)
DIND = ("dind", "docker")


def config(**settings: Any) -> FleetConfig:
    return with_settings(DEV, {"pools.build.warm.size": 0, **settings})


def jobs(*specs: tuple[float, float, tuple[str, ...]]) -> list[HistoryJob]:
    """(seconds after T0, duration, tags) each."""
    return [HistoryJob(id=i + 1, pending_at=T0 + at, duration=d, tags=t) for i, (at, d, t) in enumerate(specs)]


def simulate(cfg: FleetConfig, trace: Sequence[HistoryJob], model: Model = CALM, seed: int = 0) -> Summary:
    outcome = Simulation(cfg, trace, model=model, prices=PRICES, seed=seed).run()
    return summarise(outcome, PRICES, cfg.region or "", {p.name: p.instance_types for p in cfg.pools}, {})


def test_a_lone_job_gets_one_instance_and_waits_its_boot_and_the_queue() -> None:
    summary = simulate(config(), jobs((0, 120, DOCKER)))
    docker = summary.pools["docker"]
    assert (docker.jobs, docker.launched) == (1, 1)
    assert BOOT <= docker.wait_max <= BOOT + 5
    assert docker.cost > docker.floor_cost > 0


def test_an_idle_runner_takes_the_next_job_within_its_idle_wait() -> None:
    summary = simulate(config(**{"pools.docker.idle_wait_seconds": 600}), jobs((0, 60, DOCKER), (300, 60, DOCKER)))
    docker = summary.pools["docker"]
    assert docker.launched == 1
    assert docker.wait_p50 <= 3.0  # the second job waited one poll at most


def test_a_runner_powers_off_after_its_idle_wait() -> None:
    summary = simulate(config(**{"pools.docker.idle_wait_seconds": 60}), jobs((0, 60, DOCKER), (600, 60, DOCKER)))
    assert summary.pools["docker"].launched == 2
    hours = summary.pools["docker"].instance_hours
    # two short lives, not one of ten minutes
    assert sum(hours.values()) * 3600 < 2 * (BOOT + 60 + 60 + 30)


def test_an_ephemeral_pool_launches_one_instance_per_job() -> None:
    summary = simulate(config(), jobs((0, 30, DIND), (200, 30, DIND), (400, 30, DIND)))
    assert (summary.pools["build"].jobs, summary.pools["build"].launched) == (3, 3)


def test_max_builds_replaces_a_runner_after_that_many_jobs() -> None:
    summary = simulate(config(**{"pools.docker.max_builds": 2}), jobs(*[(i * 200.0, 30, DOCKER) for i in range(3)]))
    assert summary.pools["docker"].launched == 2


def test_max_runners_caps_the_pool_and_the_rest_wait_for_capacity() -> None:
    cfg = config(**{"pools.docker.max_runners": 2, "pools.docker.max_builds": 1})
    summary = simulate(cfg, jobs(*[(0.0, 300, DOCKER)] * 5))
    docker = summary.pools["docker"]
    assert (docker.jobs, docker.peak_instances) == (5, 2)
    assert docker.wait_max >= 300  # the last ones waited for a runner to finish


def test_a_job_no_pool_can_run_is_counted_and_launches_nothing() -> None:
    summary = simulate(config(), jobs((0, 30, ("gpu",))))
    assert summary.unmatched == 1 and summary.total.launched == 0


def test_a_warm_pool_keeps_runners_ready_so_jobs_start_at_once() -> None:
    cfg = config(**{"pools.docker.warm.size": 2, "pools.docker.idle_wait_seconds": 3600})
    summary = simulate(cfg, jobs((600, 60, DOCKER), (900, 60, DOCKER)))
    docker = summary.pools["docker"]
    assert docker.wait_max <= 3.0
    assert docker.launched >= 2  # launched by reconcile, before any job


def test_warm_runners_are_retired_once_their_window_closes() -> None:
    # given: the build pool warm from 08:00 to 19:00 Berlin; the trace runs from 17:30 to 19:40 Berlin time
    cfg = with_settings(DEV, {"pools.build.warm.size": 2, "pools.build.ephemeral": True})
    start = datetime(2026, 1, 5, 16, 30, tzinfo=UTC).timestamp()
    trace = [HistoryJob(id=i, pending_at=start + i * 1800.0, duration=30, tags=DOCKER) for i in range(1, 5)]
    # when
    simulation = Simulation(cfg, trace, model=CALM, prices=PRICES, seed=0)
    simulation.run()
    # then: warm runners were launched, and none outlived the window by more than reconcile's two steps
    assert simulation.tally["build"].launched_for_warm >= 2
    window_end = datetime(2026, 1, 5, 18, 0, tzinfo=UTC).timestamp()
    warm = [life for life in simulation.lives if life.pool == "build" and life.warm]
    assert warm and all(life.ended_at <= window_end + 3 * 60 for life in warm)
    assert any("warm window is closed" in life.reason for life in warm)


def test_runners_are_retired_before_their_max_lifetime_without_losing_jobs() -> None:
    cfg = config(
        **{
            "pools.docker.max_lifetime_minutes": 20,
            "pools.docker.job_timeout_seconds": 600,
            "pools.docker.idle_wait_seconds": 600,
            "pools.docker.max_builds": 1000,
        }
    )
    summary = simulate(cfg, jobs(*[(i * 120.0, 60, DOCKER) for i in range(30)]))
    docker = summary.pools["docker"]
    assert docker.jobs == 30 and docker.lost_jobs == 0
    assert docker.launched >= 5  # an hour of jobs, each runner retired after about ten minutes


def test_spot_interruptions_lose_jobs_which_are_retried_once() -> None:
    model = Model(boot=Distribution("fixed", BOOT), interruption_rate={"docker": 30.0})
    summary = simulate(
        config(**{"pools.docker.max_builds": 1}), jobs(*[(i * 10.0, 600, DOCKER) for i in range(20)]), model
    )
    docker = summary.pools["docker"]
    assert docker.interruptions > 0 and docker.lost_jobs > 0
    assert 0 < docker.retried_jobs <= docker.lost_jobs


def test_capacity_errors_fall_back_to_on_demand_where_the_pool_allows_it() -> None:
    model = Model(boot=Distribution("fixed", BOOT), capacity_error_rate=1.0, interruption_rate={"*": 0.0})
    with_fallback = simulate(config(), jobs((0, 60, DOCKER)), model)
    assert any(key.startswith("on-demand") for key in with_fallback.pools["docker"].instance_hours)
    without = simulate(config(**{"pools.docker.on_demand_fallback": False}), jobs((0, 60, DOCKER)), model)
    assert without.pools["docker"].launched == 0 and without.pools["docker"].dead_lettered == 1


def test_a_job_whose_launches_fail_is_tried_once_per_attempt_and_never_relaunched_meanwhile() -> None:
    # A failed launch releases its claim, as scale-up's does: reconcile's rule for jobs whose runner took another
    # must not see the job, waiting its backoff, as claimed by a finished launch and queue a second copy of it.
    model = Model(boot=Distribution("fixed", BOOT), capacity_error_rate=1.0, interruption_rate={"*": 0.0})
    failing = simulate(config(**{"pools.docker.on_demand_fallback": False}), jobs((0, 60, DOCKER)), model)
    attempts = config().pool("docker").max_launch_attempts
    calls = {rate.operation: rate.calls for rate in failing.api_rates}
    # one CreateFleet per attempt, one send per attempt (the webhook's, then a re-queue after each failure but the last)
    assert calls["ec2:CreateFleet"] == attempts and calls["sqs:SendMessage"] == attempts
    assert failing.pools["docker"].dead_lettered == 1


def test_a_run_is_reproducible_from_its_seed() -> None:
    model = Model(interruption_rate={"*": 5.0})
    trace = jobs(*[(i * 7.0, 100 + i, DOCKER if i % 3 else DIND) for i in range(60)])
    first = simulate(config(), trace, model, seed=11).as_json()
    assert simulate(config(), trace, model, seed=11).as_json() == first
    assert simulate(config(), trace, model, seed=12).as_json() != first


# -- every decision is the product's --


def watch(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, calls: Counter[str]) -> None:
    original: Callable[..., Any] = getattr(module, name)

    def recorded(*args: Any, **kwargs: Any) -> Any:
        calls[name] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, recorded)


def test_the_simulator_decides_through_the_products_functions(monkeypatch: pytest.MonkeyPatch) -> None:
    # given: each decision function of the product, watched where the product defines it
    calls: Counter[str] = Counter()
    for module, name in [
        (policy, "match_pool"),
        (policy, "can_take"),
        (policy, "leave_to_idle_runners"),
        (fleet, "plan_launch"),
        (rules, "decide"),
        (rules, "retire_at"),
        (windows, "warm_size"),
        (interruptions, "decide_retry"),
    ]:
        watch(monkeypatch, module, name, calls)
    cfg = with_settings(DEV, {"pools.docker.max_builds": 2})
    model = Model(boot=Distribution("fixed", BOOT), interruption_rate={"*": 20.0})
    # when
    simulate(cfg, jobs(*[(i * 30.0, 400, DOCKER if i % 2 else DIND) for i in range(20)]), model)
    # then
    assert set(calls) == {
        "match_pool",
        "can_take",
        "leave_to_idle_runners",
        "plan_launch",
        "decide",
        "retire_at",
        "warm_size",
        "decide_retry",
    }


def test_a_changed_product_decision_changes_the_simulation(monkeypatch: pytest.MonkeyPatch) -> None:
    # given: pool matching that matches nothing, and reconcile that decides nothing
    monkeypatch.setattr(policy, "match_pool", lambda tags, pools: None)
    monkeypatch.setattr(rules, "decide", lambda facts, config: [])
    cfg = config(**{"pools.docker.warm.size": 3})
    # when
    summary = simulate(cfg, jobs((600, 60, DOCKER)))
    # then: no launch for the job, and no warm runner either
    assert summary.unmatched == 1 and summary.total.launched == 0


def test_the_simulator_defines_no_policy_of_its_own() -> None:
    decisions = {
        "match_pool",
        "can_take",
        "leave_to_idle_runners",
        "decide",
        "retirements",
        "warm_launches",
        "retire_at",
        "window_open",
        "next_change",
        "decide_retry",
        "plan_launch",
        "backoff_delay",
        "lease_wait_delay",
    }
    defined = set()
    for path in (ROOT / "fleetctl" / "simulate").glob("*.py"):
        tree = ast.parse(path.read_text())
        defined |= {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    # warm_size is defined once, as the memo that calls windows.warm_size (see engine.warm_sizes_held)
    assert defined & decisions == set()
