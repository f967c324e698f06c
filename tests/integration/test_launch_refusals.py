"""Launches EC2 refuses for good, as the AWS shim refuses them (``fleetctl/sandbox/aws_rules/ec2_fleet.py``):
scale-up gives the leases back and dead-letters the jobs with EC2's error code, and nothing is launched.

The rules themselves, with their sources, are tested in ``test_aws_ec2_rules.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_scale_up import Fleet

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def fleet(fresh_sandbox: Any) -> Fleet:
    return Fleet(fresh_sandbox)


def test_a_pool_with_two_subnets_in_one_zone_dead_letters_its_jobs_with_invalidfleetconfig(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CreateFleet naming an instance type twice in one zone fails with InvalidFleetConfig (HTTP 400; sources in
    test_aws_ec2_rules.py). Bootstrap refuses such a pool; a stage file changed after bootstrap still gets no
    instance, and its jobs are dead-lettered at once with the code, not retried."""
    # given the docker pool with a second subnet in the zone of its first
    [first, *others] = fleet.config.pools[0].subnets
    found = fleet.ec2.describe_subnets(SubnetIds=[first])["Subnets"][0]
    extra = fleet.ec2.create_subnet(
        VpcId=found["VpcId"], CidrBlock="10.42.240.0/20", AvailabilityZone=found["AvailabilityZone"]
    )["Subnet"]["SubnetId"]
    config = fleet.with_pool("docker", subnets=(first, *others, extra))
    # deployed as such (the Lambdas' policies allow the new subnet), without running bootstrap again
    stage_file = tmp_path / "stage.json"
    stage_file.write_text(json.dumps(config.model_dump(mode="json")))
    monkeypatch.setenv("RUNNER_FLEET_CONFIG", str(stage_file))
    [job] = fleet.pipeline(["docker"])

    # when
    report = fleet.scale_up(config).handle_messages(fleet.take_queued(1))

    # then nothing launched, the lease is back, and the job is dead-lettered with EC2's code
    assert report.as_dict() == {"dead_lettered": 1}
    assert fleet.instances() == []
    assert fleet.leases("docker") == 0
    [dead] = fleet.dead_letters(1)
    assert dead["job_id"] == job
    assert "InvalidFleetConfig" in dead["last_error"]
    assert "duplicate instance pools" in dead["last_error"]
    record = fleet.job(job)
    assert (record["outcome"], record["error_code"]) == ("dead_lettered", "InvalidFleetConfig")
    assert fleet.take_queued(0, timeout=2) == []


def test_without_the_spot_role_jobs_are_dead_lettered_and_after_bootstrap_they_launch(fleet: Fleet) -> None:
    """Without AWSServiceRoleForEC2Spot a spot CreateFleet answers no instance and
    AuthFailure.ServiceLinkedRoleCreationNotPermitted for every override (sources in test_aws_ec2_rules.py); the
    scale-up Lambda may not create the role, bootstrap does. The docker pool falls back to on-demand only for
    capacity errors, so it does not here."""
    # given an account without the role (bootstrap made it; someone deleted it)
    iam = fleet.runtime.aws().client("iam")
    [role] = iam.list_roles(PathPrefix="/aws-service-role/spot.amazonaws.com/")["Roles"]
    iam.delete_role(RoleName=role["RoleName"])
    [job] = fleet.pipeline(["docker"])

    # when scale-up takes the job
    report = fleet.scale_up().handle_messages(fleet.take_queued(1))

    # then no instance, the lease is back and the job is dead-lettered with EC2's code
    assert report.as_dict() == {"dead_lettered": 1}
    assert fleet.instances() == []
    assert fleet.leases("docker") == 0
    assert fleet.gitlab_runners() == []
    [dead] = fleet.dead_letters(1)
    assert dead["job_id"] == job
    assert "AuthFailure.ServiceLinkedRoleCreationNotPermitted" in dead["last_error"]
    assert fleet.job(job)["error_code"] == "AuthFailure.ServiceLinkedRoleCreationNotPermitted"

    # when bootstrap runs again
    plan = fleet.sandbox.bootstrap()

    # then it made the role, and the next job gets its spot runner
    assert "create   spot_role  AWSServiceRoleForEC2Spot (service-linked, spot.amazonaws.com)" in plan
    [second] = fleet.pipeline(["docker"])
    assert fleet.scale_up().handle_messages(fleet.take_queued(1)).as_dict() == {"launched": 1}
    [instance] = fleet.instances("docker")
    assert instance.get("InstanceLifecycle") == "spot"
    assert fleet.leases("docker") == 1
    assert fleet.job(second).get("outcome") != "dead_lettered"
