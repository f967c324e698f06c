"""A launch's plan (the CreateFleet requests it sends, kept on its record) and how transaction cancellations are
read. No network."""

from __future__ import annotations

import random
from typing import Any

import pytest
from botocore.exceptions import ClientError

from chalicelib.scaling.fleet import LaunchPlan, Lifecycle, build_fleet_request, fallback_request, plan_launch
from chalicelib.scaling.store.table import cancellation_reasons, transiently_cancelled
from chalicelib.store import conflict_backoff
from tests.unit.test_fleet_request import LAUNCH, TEMPLATE, make_pool


def _plan(**pool: Any) -> LaunchPlan:
    return plan_launch(make_pool(**pool), TEMPLATE, fleet="runner-fleet-test", launch_id=LAUNCH, count=5)


def test_a_plan_survives_its_record_unchanged() -> None:
    plan = _plan()
    assert LaunchPlan.from_json(plan.to_json()) == plan
    assert (plan.count, plan.lifecycle, plan.fallback) == (5, Lifecycle.SPOT, True)


def test_the_fallback_request_is_the_on_demand_request_for_the_missing_count() -> None:
    expected = build_fleet_request(
        make_pool(), TEMPLATE, fleet="runner-fleet-test", launch_id=LAUNCH, count=2, lifecycle=Lifecycle.ON_DEMAND
    )
    assert fallback_request(_plan(), 2) == expected


def test_a_plan_keeps_what_it_was_made_with_whatever_the_pool_becomes() -> None:
    plan = _plan()
    later = plan_launch(
        make_pool(instance_types=["c7i.large"], on_demand_fallback=False),
        TEMPLATE,
        fleet="runner-fleet-test",
        launch_id=LAUNCH,
        count=5,
    )
    assert later.request["ClientToken"] == plan.request["ClientToken"]
    assert later.request != plan.request  # which is why a resumed launch sends the kept plan, not a new one
    assert {o["InstanceType"] for o in plan.request["LaunchTemplateConfigs"][0]["Overrides"]} == {
        "m7i.large",
        "m6i.large",
        "m5.large",
    }


def test_an_on_demand_pool_plans_no_fallback() -> None:
    plan = _plan(market="on-demand")
    assert (plan.lifecycle, plan.fallback) == (Lifecycle.ON_DEMAND, False)
    with pytest.raises(ValueError, match="missing"):
        fallback_request(plan, 0)


def _cancelled(*codes: str) -> ClientError:
    return ClientError(
        {
            "Error": {"Code": "TransactionCanceledException", "Message": "Transaction cancelled"},
            "CancellationReasons": [{"Code": code} for code in codes],
        },
        "TransactWriteItems",
    )


@pytest.mark.parametrize(
    ("codes", "transient"),
    [
        (("None", "TransactionConflict"), True),
        (("ThrottlingError", "None"), True),
        (("ProvisionedThroughputExceeded",), True),
        (("ConditionalCheckFailed", "None"), False),
        # A condition that failed is what it says, whatever else happened to the transaction.
        (("ConditionalCheckFailed", "TransactionConflict"), False),
        (("ValidationError",), False),
    ],
)
def test_only_conflicts_and_throttling_make_a_cancellation_worth_trying_again(
    codes: tuple[str, ...], transient: bool
) -> None:
    exc = _cancelled(*codes)
    assert cancellation_reasons(exc) == list(codes)
    assert transiently_cancelled(exc) is transient


def test_other_errors_have_no_cancellation_reasons() -> None:
    other = ClientError({"Error": {"Code": "ConditionalCheckFailedException"}}, "UpdateItem")
    assert cancellation_reasons(other) == []
    assert not transiently_cancelled(other)


def test_conflict_backoff_grows_jittered_and_capped() -> None:
    rng = random.Random(7)
    delays = [conflict_backoff(attempt, rng) for attempt in range(10)]
    assert all(0.0125 <= d <= 0.025 for d in delays[:1])
    assert all(0.5 <= d <= 1.0 for d in delays[6:])
    assert delays[3] > delays[0]
