"""The simulator's parts: the virtual clock and event order, seeded distributions, prices, the Pareto frontier and
the API-rate accounting against token buckets."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from chalicelib.config import load_config
from fleetctl.simulate import api_rates as api
from fleetctl.simulate.events import EventQueue, VirtualClock
from fleetctl.simulate.model import Distribution, ModelError, parse_rates, stream
from fleetctl.simulate.prices import ON_DEMAND, SPOT, PriceError, load_prices
from fleetctl.simulate.report import chosen, pareto_front, percentile

STAGES = Path(__file__).resolve().parents[2] / "chalicelib" / "stages"

# -- clock and events --


def test_events_fire_in_time_order_and_ties_in_the_order_scheduled() -> None:
    # given
    clock = VirtualClock(100.0)
    queue = EventQueue(clock)
    fired: list[tuple[str, float]] = []

    def note(name: str) -> None:
        fired.append((name, clock.now))

    queue.at(105.0, note, "late")
    queue.at(101.0, note, "first tie")
    queue.at(101.0, note, "second tie")
    queue.after(0.5, note, "soonest")
    # when
    queue.run()
    # then
    assert fired == [("soonest", 100.5), ("first tie", 101.0), ("second tie", 101.0), ("late", 105.0)]


def test_an_event_may_schedule_another_at_the_same_instant_which_fires_after_those_already_due() -> None:
    clock = VirtualClock()
    queue = EventQueue(clock)
    fired: list[str] = []

    def first() -> None:
        fired.append("first")
        queue.after(0.0, fired.append, "scheduled by first")

    queue.at(1.0, first)
    queue.at(1.0, fired.append, "second")
    queue.run()
    assert fired == ["first", "second", "scheduled by first"]


def test_the_clock_never_goes_back_and_the_past_cannot_be_scheduled() -> None:
    clock = VirtualClock(10.0)
    clock.advance_to(12.0)
    assert clock() == 12.0
    with pytest.raises(ValueError, match="cannot go back"):
        clock.advance_to(11.0)
    with pytest.raises(ValueError, match="in the past"):
        EventQueue(clock).at(5.0, print)


def test_run_until_leaves_later_events_queued() -> None:
    clock = VirtualClock()
    queue = EventQueue(clock)
    fired: list[int] = []
    for when in (1, 2, 3):
        queue.at(float(when), fired.append, when)
    queue.run(until=2.0)
    assert fired == [1, 2] and len(queue) == 1


# -- distributions --


@pytest.mark.parametrize("text", ["fixed:30", "uniform:20,60", "lognormal:40,0.25"])
def test_each_distribution_draws_the_same_values_from_the_same_seed(text: str) -> None:
    distribution = Distribution.parse(text)
    first = [distribution.sample(stream(7, "boot")) for _ in range(1)] + [
        distribution.sample(rng) for rng in [stream(7, "boot")] for _ in range(50)
    ]
    again = [distribution.sample(stream(7, "boot")) for _ in range(1)] + [
        distribution.sample(rng) for rng in [stream(7, "boot")] for _ in range(50)
    ]
    assert first == again
    assert all(value >= 0 for value in first)


def test_seeds_and_streams_give_different_draws() -> None:
    lognormal = Distribution.parse("lognormal:40,0.25")
    draws = {name: [lognormal.sample(rng) for rng in [stream(1, name)] for _ in range(5)] for name in ("a", "b")}
    assert draws["a"] != draws["b"]
    assert [lognormal.sample(rng) for rng in [stream(2, "a")] for _ in range(5)] != draws["a"]


def test_distributions_keep_their_shape() -> None:
    rng = stream(3, "shape")
    uniform = [Distribution.parse("uniform:20,60").sample(rng) for _ in range(2000)]
    assert min(uniform) >= 20 and max(uniform) <= 60
    lognormal = sorted(Distribution.parse("lognormal:40,0.25").sample(rng) for _ in range(2000))
    assert 36 < lognormal[1000] < 44  # the median is the first parameter
    assert Distribution.parse("fixed:30").sample(rng) == 30


@pytest.mark.parametrize("text", ["normal:1,2", "fixed:", "uniform:5", "uniform:9,3", "lognormal:x,1", "fixed:-1"])
def test_a_bad_distribution_is_refused_naming_the_option(text: str) -> None:
    with pytest.raises(ModelError, match="--boot"):
        Distribution.parse(text, "--boot")


def test_interruption_rates_by_pool_with_a_default() -> None:
    assert parse_rates(["docker=0.5", "0.01"], "--interruption-rate") == {"docker": 0.5, "*": 0.01}
    with pytest.raises(ModelError, match="--interruption-rate"):
        parse_rates(["docker=lots"], "--interruption-rate")


# -- prices --


def test_the_snapshot_prices_every_instance_type_of_the_example_configurations_and_says_its_date() -> None:
    prices = load_prices()
    assert prices.as_of
    for stage in ("dev.yaml", "prod.yaml"):
        config = load_config(STAGES / stage)
        for pool in config.pools:
            for instance_type in pool.instance_types:
                spot = prices.hourly(config.region or "", instance_type, SPOT)
                on_demand = prices.hourly(config.region or "", instance_type, ON_DEMAND)
                assert 0 < spot < on_demand


def test_a_price_file_overrides_the_snapshot_and_the_cheapest_type_is_found(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    regions = {"eu-west-1": {"a.large": {"on_demand": 0.2, "spot": 0.05}, "b.large": {"on_demand": 0.1, "spot": 0.07}}}
    path.write_text(json.dumps({"as_of": "2026-01-01", "regions": regions}))
    prices = load_prices(path)
    assert prices.hourly("eu-west-1", "a.large", SPOT) == 0.05
    assert prices.cheapest("eu-west-1", ["a.large", "b.large"], SPOT) == ("a.large", 0.05)
    assert prices.cheapest("eu-west-1", ["a.large", "b.large"], ON_DEMAND) == ("b.large", 0.1)


def test_a_missing_price_names_the_type_and_region() -> None:
    with pytest.raises(PriceError, match=r"x9\.huge in us-east-1"):
        load_prices().hourly("us-east-1", "x9.huge", SPOT)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "line 1"),
        ('{"regions": {"r": {"t": {"spot": 1}}}}', r"regions\.r\.t needs on_demand and spot"),
        ('{"regions": {"r": {"t": {"spot": "x", "on_demand": 1}}}}', "must be numbers"),
    ],
)
def test_a_bad_price_file_is_refused_with_where(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "prices.json"
    path.write_text(content)
    with pytest.raises(PriceError, match=message):
        load_prices(path)


# -- comparing runs --


def test_the_pareto_frontier_holds_the_runs_no_other_beats_on_both_cost_and_wait() -> None:
    points = [(10.0, 50.0), (12.0, 30.0), (11.0, 60.0), (20.0, 10.0), (12.0, 30.0), (25.0, 10.0)]
    # (11, 60) is beaten by (10, 50); (25, 10) by (20, 10); the two equal (12, 30) both stay
    assert pareto_front(points) == {0, 1, 3, 4}


def test_the_pick_is_the_cheapest_frontier_run_within_the_wait_target() -> None:
    class Run:
        def __init__(self, cost: float, wait: float) -> None:
            self.total = type("T", (), {"cost": cost, "wait_p95": wait})()

    runs = [Run(10, 50), Run(12, 30), Run(20, 10)]
    front = pareto_front([(r.total.cost, r.total.wait_p95) for r in runs])
    assert chosen(runs, front, 35.0) == 1  # type: ignore[arg-type]
    assert chosen(runs, front, 5.0) is None  # type: ignore[arg-type]


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 0.5), percentile(values, 0.95), percentile([], 0.5)) == (50.0, 95.0, 0.0)


# -- API rates --


def test_a_token_bucket_refuses_only_what_it_cannot_hold() -> None:
    # a bucket of 10, refilled 2 a second: 10 at once is fine, 3 a second after that overflows every second
    assert api.bucket_overflows(Counter({0: 10}), burst=10, refill=2) == 0
    assert api.bucket_overflows(Counter({0: 11}), burst=10, refill=2) == 1
    steady = Counter({second: 3 for second in range(1, 11)})
    assert api.bucket_overflows(Counter({0: 10}) + steady, burst=10, refill=2) == 10
    assert api.bucket_overflows(Counter({0: 10, 5: 10}), burst=10, refill=2) == 0  # refilled by then


def test_the_meter_reports_peak_and_mean_per_minute_by_operation() -> None:
    meter = api.ApiMeter()
    for second in range(0, 60, 2):  # 30 calls in the first minute
        meter.add(api.CREATE_FLEET, 960.0 + second)  # minutes are the clock's: 960 s starts one
    meter.add(api.CREATE_FLEET, 960.0 + 150)  # one in the third
    (rate,) = meter.rates(960.0, 960.0 + 180)
    assert (rate.operation, rate.calls, rate.peak_per_minute) == (api.CREATE_FLEET, 31, 30)
    assert rate.mean_per_minute == pytest.approx(31 / 3)


def test_a_burst_past_a_documented_limit_is_flagged_and_a_calm_load_is_not() -> None:
    meter = api.ApiMeter()
    for _ in range(60):
        meter.add(api.CREATE_FLEET, 0.0)  # 60 CreateFleet in one second: past the bucket of 50
    meter.add(api.GITLAB_GET_JOB, 0.0, 100)
    checks = {check.limit.operations[0]: check for check in meter.check()}
    assert checks[api.CREATE_FLEET].throttles
    assert not checks[api.GITLAB_GET_JOB].throttles
    meter.add(api.GITLAB_CREATE_RUNNER, 30.0, 1950)  # 2,050 GitLab API calls in one minute: past 2,000
    assert {check.limit.operations[0]: check for check in meter.check()}[api.GITLAB_GET_JOB].throttles


def test_every_limit_cites_its_source() -> None:
    assert all(limit.source.startswith("https://") for limit in api.LIMITS)
