"""Each runner instance's GitLab token, in an SSM SecureString that only that instance may read.

The parameter is named after the instance id (the instance derives the name from its own metadata, so user data
never carries it) and tagged with the instance's ARN; the instance role allows GetParameter and DeleteParameter
only where that tag equals ``${ec2:SourceInstanceARN}``. The boot script reads the token once and deletes it.
"""

from __future__ import annotations

from typing import Any

from botocore.exceptions import ClientError

from chalicelib.aws import error_code
from chalicelib.naming import INSTANCE_ARN_TAG, runner_token_parameter


def instance_arn(region: str, account_id: str, instance_id: str) -> str:
    return f"arn:aws:ec2:{region}:{account_id}:instance/{instance_id}"


class RunnerTokens:
    def __init__(self, ssm_client: Any, fleet: str, region: str, account_id: str) -> None:
        self._ssm = ssm_client
        self._fleet = fleet
        self._region = region
        self._account_id = account_id

    def put(self, instance_id: str, token: str) -> str:
        """Store (or, after a token reset, replace) an instance's token; returns the parameter name."""
        name = runner_token_parameter(self._fleet, instance_id)
        arn = instance_arn(self._region, self._account_id, instance_id)
        try:
            # SSM refuses Tags together with Overwrite, so the first write tags and a replacement overwrites.
            self._ssm.put_parameter(
                Name=name, Value=token, Type="SecureString", Tags=[{"Key": INSTANCE_ARN_TAG, "Value": arn}]
            )
        except ClientError as exc:
            if error_code(exc) != "ParameterAlreadyExists":
                raise
            self._ssm.put_parameter(Name=name, Value=token, Type="SecureString", Overwrite=True)
        return name

    def delete(self, instance_id: str) -> None:
        try:
            self._ssm.delete_parameter(Name=runner_token_parameter(self._fleet, instance_id))
        except ClientError as exc:
            if error_code(exc) != "ParameterNotFound":
                raise
