"""ECR's authorization token is valid for 12 hours; moto's GetAuthorizationToken says it expired in 2015.

Source: the GetAuthorizationToken API reference,
https://docs.aws.amazon.com/AmazonECR/latest/APIReference/API_GetAuthorizationToken.html ("The authorization token
is valid for 12 hours"), and the ``AuthorizationData`` data type (``expiresAt``: "The Unix time in seconds and
milliseconds when the authorization token expires"). The ECR credential helper caches a registry's token until
that time, so with moto's answer every pull would ask ECR again, which is not what runners do against AWS.
"""

from __future__ import annotations

import json
import time

from fleetctl.sandbox.aws_shim import AwsRequest, AwsResponse, Forward, Rule

__all__ = ["AuthorizationTokenValidity"]

TOKEN_VALIDITY_SECONDS = 12 * 3600


class AuthorizationTokenValidity(Rule):
    """GetAuthorizationToken's ``expiresAt`` is 12 hours after the call."""

    name = "ecr-authorization-token"

    def handle(self, request: AwsRequest, forward: Forward) -> AwsResponse:
        response = forward(request)
        if request.service != "ecr" or request.operation != "GetAuthorizationToken" or response.status != 200:
            return response
        answer = response.json()
        expires_at = round(time.time() + TOKEN_VALIDITY_SECONDS, 3)
        for data in answer.get("authorizationData", []):
            data["expiresAt"] = expires_at
        body = json.dumps(answer).encode()
        headers = [(key, value) for key, value in response.headers if key.lower() != "content-length"]
        return AwsResponse(response.status, [*headers, ("Content-Length", str(len(body)))], body)
