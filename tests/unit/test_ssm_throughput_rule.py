"""The AWS shim's Parameter Store throughput rule, on a clock of its own: AWS's quotas, its error, its knobs."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable
from typing import Any

import botocore.session
from botocore.parsers import create_parser

from fleetctl.sandbox.aws_rules.ssm import ParameterStoreThroughput
from fleetctl.sandbox.aws_shim import AwsShim

AUTH = "AWS4-HMAC-SHA256 Credential=testing/20261129/{region}/{service}/aws4_request, SignedHeaders=host"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _moto_stand_in(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "application/x-amz-json-1.1")])
    return [b"{}"]


class Shim:
    def __init__(self) -> None:
        self.clock = Clock()
        self.rule = ParameterStoreThroughput(clock=self.clock)
        self.app = AwsShim(_moto_stand_in, [self.rule])

    def call(self, operation: str, *, service: str = "ssm", region: str = "us-east-1") -> tuple[int, bytes]:
        body = json.dumps({"Name": "/fleet/x"}).encode()
        prefix = {"ssm": "AmazonSSM", "dynamodb": "DynamoDB_20120810"}[service]
        environ = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": "/",
            "CONTENT_LENGTH": str(len(body)),
            "CONTENT_TYPE": "application/x-amz-json-1.1",
            "wsgi.input": io.BytesIO(body),
            "HTTP_AUTHORIZATION": AUTH.format(region=region, service=service),
            "HTTP_X_AMZ_TARGET": f"{prefix}.{operation}",
        }
        return self._send(environ)

    def configure(self, action: str, **payload: Any) -> Any:
        body = json.dumps(payload).encode()
        environ = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": f"/_shim/ssm-throughput/{action}",
            "CONTENT_LENGTH": str(len(body)),
            "wsgi.input": io.BytesIO(body),
        }
        status, answer = self._send(environ)
        assert status == 200, answer
        return json.loads(answer)["result"]

    def _send(self, environ: dict[str, Any]) -> tuple[int, bytes]:
        statuses: list[str] = []
        body = b"".join(self.app(environ, lambda line, _headers, _exc=None: statuses.append(line)))
        return int(statuses[0].split(" ", 1)[0]), body

    def passed(self, operation: str, times: int, **where: Any) -> int:
        return sum(self.call(operation, **where)[0] == 200 for _ in range(times))


def _botocore_error(operation: str, status: int, body: bytes) -> dict[str, Any]:
    model = botocore.session.get_session().get_service_model("ssm")
    parser = create_parser(model.metadata["protocol"])
    parsed = parser.parse(
        {"status_code": status, "headers": {}, "body": body}, model.operation_model(operation).output_shape
    )
    return dict(parsed["Error"])


def test_reads_share_40_a_second_and_a_refusal_is_a_throttling_exception() -> None:
    """AWS General Reference, "AWS Systems Manager endpoints and quotas" (docs.aws.amazon.com/general/latest/gr/
    ssm.html), Parameter Store "Max throughput (transactions per second)": default throughput 40, shared by
    GetParameter, GetParameters and GetParametersByPath, per account and Region; past it, HTTP 400
    ThrottlingException "Rate exceeded" (AWS re:Post knowledge center, ssm-parameter-store-rate-exceeded)."""
    shim = Shim()
    # given a second's worth of reads, spread over the three operations that share the quota
    spent = shim.passed("GetParameter", 20) + shim.passed("GetParameters", 10) + shim.passed("GetParametersByPath", 10)
    assert spent == 40
    # when one more arrives in the same instant
    status, body = shim.call("GetParameters")
    # then it is refused as AWS refuses it, as botocore reads it
    assert status == 400
    assert _botocore_error("GetParameters", status, body) == {"Code": "ThrottlingException", "Message": "Rate exceeded"}
    # and the quota refills at 40 a second: a quarter second later, 10 more pass and no more
    shim.clock.now += 0.25
    assert shim.passed("GetParameter", 11) == 10
    # while another Region has a quota of its own
    assert shim.passed("GetParameter", 40, region="eu-west-1") == 40
    assert shim.configure("throttled") == {"GetParameters": 1, "GetParameter": 1}


def test_put_parameter_gets_3_a_second() -> None:
    """PutParameter is not on the quota page; AWS Support gave 3 TPS with standard throughput and 10 with higher
    throughput (github-aws-runners/terraform-aws-github-runner issue 2944: an autoscaler writing one runner token
    parameter per instance). The PutParameter API reference says the throughput setting covers PutParameter."""
    shim = Shim()
    # a burst of 10 writes: 3 pass (one second's worth), the rest are throttled
    assert shim.passed("PutParameter", 10) == 3
    # 5 writes a second, sustained for 4 seconds: 3 a second pass
    passed = 0
    for _ in range(20):
        shim.clock.now += 0.2
        passed += shim.passed("PutParameter", 1)
    assert passed == 12
    # the reads have a bucket of their own, and operations without a published quota pass
    assert shim.passed("GetParameter", 40) == 40
    assert shim.passed("DeleteParameter", 50) == 50
    # and other services are not Parameter Store's business
    assert shim.passed("PutItem", 50, service="dynamodb") == 50


def test_higher_throughput_and_other_quotas_are_configurable_and_reset_restores_the_defaults() -> None:
    """Higher throughput (same quota page): GetParameter and GetParameters share 10,000 a second, and
    GetParametersByPath gets 100 of its own; PutParameter 10 (issue 2944 above)."""
    shim = Shim()
    assert shim.configure("high_throughput", enabled=True) is True
    assert shim.passed("PutParameter", 12) == 10
    assert shim.passed("GetParametersByPath", 101) == 100
    assert shim.passed("GetParameter", 500) == 500
    # a test that measures can set a quota of its own, or switch throttling off
    assert shim.configure("quota", group="PutParameter", rate=1, burst=2) == {
        "group": "PutParameter",
        "rate": 1.0,
        "burst": 2.0,
    }
    assert shim.passed("PutParameter", 5) == 2
    shim.configure("enabled", enabled=False)
    assert shim.passed("PutParameter", 50) == 50
    # a reset (moto's /moto-api/reset) brings back the standard quotas, on, with nothing counted
    shim.app({"PATH_INFO": "/moto-api/reset", "wsgi.input": io.BytesIO(b"")}, lambda *_: None)
    assert shim.configure("throttled") == {}
    assert shim.passed("PutParameter", 5) == 3
