"""Pool matching and re-queue delays: pure policy, no AWS."""

from __future__ import annotations

import random
from typing import Any

import pytest

from chalicelib.config import PoolConfig, parse_config
from chalicelib.scaling.policy import MAX_DELAY_SECONDS, RetryPolicy, can_take, leave_to_idle_runners, match_pool

SUBNET = "subnet-0123456789abcdef0"
SG = "sg-0123456789abcdef0"


def pools(*specs: dict[str, Any]) -> tuple[PoolConfig, ...]:
    config = parse_config(
        {
            "fleet": "runner-fleet-test",
            "gitlab": {"url": "https://gitlab.example.com", "token_parameter": "/t/gitlab"},
            "webhook": {"token_parameter": "/t/webhook"},
            "state": {"table": "t-table", "jobs_queue": "t-jobs", "dead_letter_queue": "t-dlq"},
            "cache_bucket": "t-cache",
            "ami_parameter": "/t/ami",
            "pools": [
                {
                    "instance_types": ["m7i.large"],
                    "subnets": [SUBNET],
                    "security_groups": [SG],
                    "max_runners": 5,
                    "image": {"repository": "ci/base"},
                    **spec,
                }
                for spec in specs
            ],
        }
    )
    return config.pools


FLEET = pools(
    {"name": "docker", "tags": ["docker", "linux"], "run_untagged": True},
    {"name": "build", "tags": ["docker", "linux", "dind"]},
    {"name": "gpu", "tags": ["gpu", "linux"]},
)


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        (["docker"], "docker"),
        (["linux"], "docker"),  # both docker and gpu fit; equal size, docker is listed first
        (["docker", "linux"], "docker"),  # the tightest fit, not the bigger build pool
        (["dind"], "build"),
        (["docker", "dind"], "build"),
        (["gpu"], "gpu"),
        ([], "docker"),  # untagged: only pools with run_untagged
        (["gpu", "dind"], None),  # no single pool has both
        (["windows"], None),
    ],
)
def test_match_pool(tags: list[str], expected: str | None) -> None:
    chosen = match_pool(tags, FLEET)
    assert (chosen.name if chosen else None) == expected


def test_an_untagged_job_matches_nothing_when_no_pool_runs_untagged() -> None:
    strict = pools({"name": "only", "tags": ["docker"], "run_untagged": False})
    assert match_pool([], strict) is None
    assert not can_take(strict[0], [])


def test_ties_go_to_the_pool_listed_first() -> None:
    first, second = pools({"name": "a", "tags": ["docker", "x"]}, {"name": "b", "tags": ["docker", "y"]})
    assert match_pool(["docker"], (first, second)) is first
    assert match_pool(["docker"], (second, first)) is second


def test_backoff_grows_exponentially_with_jitter_inside_each_step() -> None:
    policy = RetryPolicy(base_delay=4)
    rng = random.Random(7)
    for attempt, step in [(1, 4), (2, 8), (3, 16), (4, 32), (5, 64)]:
        delays = {policy.backoff_delay(attempt, rng) for _ in range(200)}
        assert min(delays) >= step // 2
        assert max(delays) <= step
        assert len(delays) > 1  # jittered


def test_backoff_never_exceeds_what_sqs_accepts() -> None:
    policy = RetryPolicy(base_delay=4)
    assert all(policy.backoff_delay(attempt) <= MAX_DELAY_SECONDS for attempt in range(1, 40))
    assert all(policy.lease_wait_delay(waits) <= MAX_DELAY_SECONDS for waits in range(0, 40))


def test_lease_waits_stretch_but_stay_bounded() -> None:
    policy = RetryPolicy(lease_wait=20)
    rng = random.Random(3)
    first = [policy.lease_wait_delay(0, rng) for _ in range(100)]
    later = [policy.lease_wait_delay(10, rng) for _ in range(100)]
    assert min(first) >= 15 and max(first) <= 25
    assert min(later) >= 90 and max(later) <= 150


# -- leaving jobs to idle runners -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("waiting", "idle", "deferred"),
    [
        ([], 3, set()),  # nothing waits
        ([(5, False), (3, False)], 0, set()),  # no idle runner: every job launches
        ([(5, False), (3, False), (9, False)], 1, {3}),  # one idle runner takes the oldest job
        ([(5, False), (3, False)], 2, {3, 5}),
        ([(5, False), (3, False)], 7, {3, 5}),  # more idle runners than jobs
        ([(3, True), (5, False)], 2, {5}),  # a job that had its grace launches now
        ([(3, True), (5, True)], 2, set()),
        ([(5, False)], -1, set()),
    ],
)
def test_jobs_are_left_to_idle_runners_oldest_first_once(
    waiting: list[tuple[int, bool]], idle: int, deferred: set[int]
) -> None:
    assert leave_to_idle_runners(waiting, idle) == deferred
