"""The AWS shim's EC2 client-token rule, through boto3 against the local AWS: CreateFleet is idempotent."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from botocore.exceptions import ClientError

from chalicelib.aws import AwsClients
from fleetctl.sandbox.local_aws import LocalAws
from tests.faults import WireFaults

pytestmark = pytest.mark.timeout(120)


# One of moto's Amazon Linux images; a listing of every Amazon image is large enough to time out a busy machine.
AL2023 = [{"Name": "name", "Values": ["al2023-ami-2023*"]}]


@pytest.fixture(scope="module")
def ec2(local_aws: LocalAws) -> Any:
    return AwsClients().ec2


@pytest.fixture(scope="module")
def subnet(ec2: Any) -> str:
    image = ec2.describe_images(Owners=["amazon"], Filters=AL2023)["Images"][0]["ImageId"]
    vpc = ec2.create_vpc(CidrBlock="10.30.0.0/16")["Vpc"]["VpcId"]
    ec2.create_launch_template(LaunchTemplateName="shim-tokens", LaunchTemplateData={"ImageId": image})
    return str(ec2.create_subnet(VpcId=vpc, CidrBlock="10.30.1.0/24")["Subnet"]["SubnetId"])


def _fleet(subnet: str, token: str, count: int = 2, template: str = "shim-tokens") -> dict[str, Any]:
    return {
        "Type": "instant",
        "ClientToken": token,
        "LaunchTemplateConfigs": [
            {
                "LaunchTemplateSpecification": {"LaunchTemplateName": template, "Version": "$Default"},
                "Overrides": [{"InstanceType": "m7i.large", "SubnetId": subnet}],
            }
        ],
        "TargetCapacitySpecification": {"TotalTargetCapacity": count, "DefaultTargetCapacityType": "on-demand"},
        "TagSpecifications": [{"ResourceType": "instance", "Tags": [{"Key": "token", "Value": token}]}],
    }


def _instances(ec2: Any, token: str) -> list[str]:
    found = ec2.describe_instances(Filters=[{"Name": "tag:token", "Values": [token]}])
    return sorted(i["InstanceId"] for r in found["Reservations"] for i in r["Instances"])


def _ids(answer: dict[str, Any]) -> list[str]:
    return sorted(i for entry in answer["Instances"] for i in entry["InstanceIds"])


def test_a_repeated_token_with_the_same_request_answers_the_first_fleet(ec2: Any, subnet: str) -> None:
    """ "Ensuring idempotency in Amazon EC2 API requests" (CreateFleet takes a client token): "If you retry a
    request that completed successfully using the same client token and the same parameters, the retry succeeds
    without performing any further actions":
    https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-idempotency.html
    """
    token = f"t-{uuid.uuid4()}"
    first = ec2.create_fleet(**_fleet(subnet, token))
    again = ec2.create_fleet(**_fleet(subnet, token))
    assert again["FleetId"] == first["FleetId"]
    assert _ids(again) == _ids(first)
    assert _instances(ec2, token) == _ids(first)
    assert len(_ids(first)) == 2


def test_a_retry_of_a_call_whose_answer_was_lost_makes_no_second_fleet(ec2: Any, subnet: str) -> None:
    """ "Ensuring idempotency in Amazon EC2 API requests": a timed-out request retried with its client token
    completes no more than once:
    https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-idempotency.html
    """
    token = f"t-{uuid.uuid4()}"
    with WireFaults(ec2) as faults:
        faults.lose_answer("CreateFleet")
        answer = ec2.create_fleet(**_fleet(subnet, token, count=3))
    assert faults.attempts("CreateFleet") == 2
    assert _instances(ec2, token) == _ids(answer)
    assert len(_ids(answer)) == 3


def test_a_repeated_token_with_another_request_is_a_mismatch(ec2: Any, subnet: str) -> None:
    """ "Ensuring idempotency in Amazon EC2 API requests": "If you retry a request with the same client token,
    but change one or more of the API parameters, the IdempotentParameterMismatch error is returned"; the EC2
    error codes list it as a client error (HTTP 400):
    https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-idempotency.html
    https://docs.aws.amazon.com/AWSEC2/latest/APIReference/errors-overview.html
    """
    token = f"t-{uuid.uuid4()}"
    ec2.create_fleet(**_fleet(subnet, token, count=1))
    with pytest.raises(ClientError) as refused:
        ec2.create_fleet(**_fleet(subnet, token, count=2))
    error = refused.value.response
    assert error["Error"]["Code"] == "IdempotentParameterMismatch"
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert len(_instances(ec2, token)) == 1


def test_a_refused_call_leaves_its_token_free(ec2: Any, subnet: str) -> None:
    """ "Ensuring idempotency in Amazon EC2 API requests": only a request that *completed successfully* is
    answered again; a refused one launched nothing, and the token may be sent again:
    https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-idempotency.html
    """
    token = f"t-{uuid.uuid4()}"
    with pytest.raises(ClientError):
        ec2.create_fleet(**_fleet(subnet, token, template="no-such-template"))
    answer = ec2.create_fleet(**_fleet(subnet, token))
    assert _instances(ec2, token) == _ids(answer)
