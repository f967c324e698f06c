"""The AWS shim's plumbing: requests parsed once, rules chained in order, errors in the shapes botocore reads."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable
from typing import Any

import botocore.session
from botocore.parsers import create_parser

from fleetctl.sandbox.aws_shim import AwsRequest, AwsResponse, AwsShim, Forward, Rule, aws_error, parse_request

AUTH = "AWS4-HMAC-SHA256 Credential=testing/20261129/us-east-1/{service}/aws4_request, SignedHeaders=host"


def _environ(service: str, body: bytes, *, target: str | None = None, path: str = "/") -> dict[str, Any]:
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": path,
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
        "HTTP_AUTHORIZATION": AUTH.format(service=service),
    }
    if target:
        environ["HTTP_X_AMZ_TARGET"] = target
        environ["CONTENT_TYPE"] = "application/x-amz-json-1.0"
    else:
        environ["CONTENT_TYPE"] = "application/x-www-form-urlencoded; charset=utf-8"
    return environ


def _parse_error(service: str, operation: str, response: AwsResponse) -> dict[str, Any]:
    model = botocore.session.get_session().get_service_model(service)
    parser = create_parser(model.metadata["protocol"])
    parsed = parser.parse(
        {"status_code": response.status, "headers": dict(response.headers), "body": response.body},
        model.operation_model(operation).output_shape,
    )
    return dict(parsed["Error"])


def _call(app: AwsShim, environ: dict[str, Any]) -> tuple[str, bytes]:
    status: list[str] = []

    def start_response(line: str, _headers: list[tuple[str, str]], _exc: Any = None) -> None:
        status.append(line)

    body = b"".join(app(environ, start_response))
    return status[0], body


def _moto_stand_in(seen: list[bytes]) -> Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        seen.append(environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"])))
        start_response("200 OK", [("Content-Type", "application/x-amz-json-1.0")])
        return [b'{"from": "moto"}']

    return app


class _Refuse(Rule):
    name = "refuse"

    def __init__(self) -> None:
        self.remaining = 0

    def handle(self, request: AwsRequest, forward: Forward) -> AwsResponse:
        if self.remaining:
            self.remaining -= 1
            return aws_error(request, "ThrottlingException", "Rate exceeded")
        return forward(request)

    def configure(self, action: str, payload: dict[str, Any]) -> Any:
        if action != "times":
            return super().configure(action, payload)
        self.remaining = int(payload["times"])
        return self.remaining

    def reset(self) -> None:
        self.remaining = 0


def test_json_request_is_parsed_into_service_operation_and_params() -> None:
    body = json.dumps({"Name": "/fleet/token"}).encode()
    request = parse_request(_environ("ssm", body, target="AmazonSSM.GetParameter"), body)
    assert (request.service, request.region, request.operation, request.protocol) == (
        "ssm",
        "us-east-1",
        "GetParameter",
        "json",
    )
    assert request.params == {"Name": "/fleet/token"}


def test_query_request_keeps_its_pairs_in_order() -> None:
    body = b"Action=CreateFleet&Version=2016-11-15&LaunchTemplateConfigs.1.Overrides.1.InstanceType=m7i.large"
    request = parse_request(_environ("ec2", body), body)
    assert request.operation == "CreateFleet" and request.protocol == "query"
    assert request.pairs[2] == ("LaunchTemplateConfigs.1.Overrides.1.InstanceType", "m7i.large")


def test_a_rule_answers_before_moto_and_reset_forgets_its_state() -> None:
    # given a shim with one rule, configured to refuse twice
    seen: list[bytes] = []
    rule = _Refuse()
    shim = AwsShim(_moto_stand_in(seen), [rule])
    status, answer = _call(shim, _environ("", b'{"times": 2}', path="/_shim/refuse/times"))
    assert status.startswith("200") and json.loads(answer) == {"result": 2}
    body = b'{"Name": "x"}'
    # when three calls arrive
    statuses = [_call(shim, _environ("ssm", body, target="AmazonSSM.GetParameter"))[0] for _ in range(3)]
    # then the first two never reached moto, and the third reached it with its body intact
    assert [s[:3] for s in statuses] == ["400", "400", "200"]
    assert seen == [body]
    # and a moto reset resets the rule too
    rule.remaining = 5
    _call(shim, _environ("", b"", path="/moto-api/reset"))
    assert rule.remaining == 0


def test_unknown_rule_or_action_is_a_400_naming_it() -> None:
    shim = AwsShim(_moto_stand_in([]), [_Refuse()])
    status, answer = _call(shim, _environ("", b"{}", path="/_shim/nope/times"))
    assert status.startswith("400") and "nope" in json.loads(answer)["error"]
    status, answer = _call(shim, _environ("", b"{}", path="/_shim/refuse/never"))
    assert status.startswith("400") and "never" in json.loads(answer)["error"]


def test_error_bodies_parse_as_botocore_reads_each_protocol() -> None:
    for service, target, operation in (
        ("dynamodb", "DynamoDB_20120810.TransactWriteItems", "TransactWriteItems"),
        ("ssm", "AmazonSSM.PutParameter", "PutParameter"),
        ("ec2", None, "CreateFleet"),
        ("iam", None, "GetRole"),
    ):
        body = b"{}" if target else f"Action={operation}".encode()
        request = parse_request(_environ(service, body, target=target), body)
        error = _parse_error(service, operation, aws_error(request, "SomeCode", "what went wrong"))
        assert (error["Code"], error["Message"]) == ("SomeCode", "what went wrong"), service
