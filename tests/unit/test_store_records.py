"""Runner and launch items decode into typed records at the store boundary."""

from __future__ import annotations

import pytest

from chalicelib.scaling.launches import LaunchState
from chalicelib.scaling.store.records import CLEANUP_PENDING, LaunchRecord, RunnerRecord
from chalicelib.store import RunnerState, from_item


def test_a_new_runner_item_decodes_back_into_the_same_record() -> None:
    # given
    record = RunnerRecord(
        instance_id="i-0123456789abcdef0",
        pool="docker",
        launch_id="launch-1",
        lifecycle="spot",
        instance_type="m7i.large",
        subnet_id="subnet-0123456789abcdef0",
        launched_at=100.5,
        boot_deadline_at=700.5,
        token_key="TOKEN#AROAEXAMPLEROLEID0001:i-0123456789abcdef0",
    )
    # when
    decoded = RunnerRecord.from_item(from_item(record.new_item(now=100.5)))
    # then: the same, now holding its lease
    assert decoded == RunnerRecord(**{**record.__dict__, "lease": True})
    assert decoded.state is RunnerState.BOOTING
    assert not decoded.terminated


def test_a_terminated_record_with_pending_cleanup_and_a_tombstone() -> None:
    terminated = RunnerRecord.from_item(
        {
            "instance_id": "i-1",
            "pool": "docker",
            "state": "terminated",
            "gitlab_runner_id": 42,
            "gitlab_cleanup": CLEANUP_PENDING,
        }
    )
    assert (terminated.terminated, terminated.gitlab_runner_id, terminated.gitlab_cleanup) == (True, 42, True)
    assert not terminated.token_cleanup
    tombstone = RunnerRecord.from_item({"instance_id": "i-2", "state": "terminated", "tombstone": True})
    assert (tombstone.terminated, tombstone.tombstone, tombstone.lease, tombstone.pool) == (True, True, False, "")


@pytest.mark.parametrize("state", list(LaunchState))
def test_a_launch_item_decodes_with_its_state(state: LaunchState) -> None:
    item = {"pool": "docker", "state": state.value, "leases": 2, "requested": 3, "started_at": 5, "instances": ["i-1"]}
    launch = LaunchRecord.from_item("launch-1", item)
    assert launch == LaunchRecord("launch-1", "docker", state, 2, 3, 5.0, "", ("i-1",))


def test_an_unknown_state_is_refused_at_the_boundary() -> None:
    with pytest.raises(ValueError):
        LaunchRecord.from_item("launch-1", {"state": "exploded"})
    with pytest.raises(ValueError):
        RunnerRecord.from_item({"instance_id": "i-1", "state": "exploded"})
