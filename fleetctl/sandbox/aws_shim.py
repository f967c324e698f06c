"""The AWS shim: a thin layer on the wire in front of moto that answers the way AWS does where moto does not.

moto implements the happy path of each API and is kinder than AWS in ways that let a test pass where production
fails: it never throttles, never cancels a transaction for a conflict, ignores idempotency tokens, accepts fleet
requests AWS refuses. The shim sits between the HTTP server and moto (WSGI middleware in the local AWS process),
so every client, the Lambda code, fleetctl, Powertools and tests alike, meets it through the standard
``AWS_ENDPOINT_URL`` with no special code path.

Each behaviour is a :class:`Rule` in a chain: a rule sees the parsed request, and either answers it itself (with
AWS's error code, status and body for that protocol), or forwards it down the chain and may look at or replace
moto's answer. Rules keep their own state (counters, remembered tokens); ``POST /moto-api/reset`` forgets it with
moto's. Tests and the sandbox configure a rule through ``POST /_shim/<rule>/<action>`` with a JSON body
(:meth:`fleetctl.sandbox.local_aws.LocalAws.shim`), for example to inject transaction conflicts.
"""

from __future__ import annotations

import io
import json
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape

__all__ = [
    "AwsRequest",
    "AwsResponse",
    "AwsShim",
    "Forward",
    "Rule",
    "ShimConfigError",
    "aws_error",
]

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
ADMIN_PREFIX = "/_shim/"
RESET_PATH = "/moto-api/reset"

_CREDENTIAL_SCOPE = re.compile(r"Credential=[^/]+/\d{8}/([^/]+)/([^/]+)/aws4_request")
# botocore's JSON-protocol error parser takes the code after the last '#' of __type.
_JSON_ERROR_NAMESPACE = {
    "dynamodb": "com.amazonaws.dynamodb.v20120810",
    "ssm": "com.amazonaws.ssm",
    "events": "com.amazonaws.events",
    "sqs": "com.amazonaws.sqs",
}
_EC2_ERROR_SERVICES = {"ec2"}


class ShimConfigError(ValueError):
    """A ``/_shim`` configuration request names an unknown rule or action, or carries a bad value."""


@dataclass(frozen=True)
class AwsRequest:
    """One AWS API call as it arrived on the wire, parsed once for every rule."""

    service: str  # the SigV4 signing name: "dynamodb", "ec2", "ssm", "events", "iam", "sqs", ...
    region: str
    operation: str  # "TransactWriteItems", "CreateFleet", ...
    protocol: Literal["json", "query", "other"]
    params: dict[str, Any]  # the JSON body, or the query pairs as a dict (last value wins)
    pairs: tuple[tuple[str, str], ...]  # the query protocol's pairs, in order; () for JSON
    body: bytes
    environ: dict[str, Any] = field(repr=False)

    @property
    def request_id(self) -> str:
        return str(uuid.uuid4())


@dataclass
class AwsResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body or b"{}")

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        return next((value for key, value in self.headers if key.lower() == lowered), None)


Forward = Callable[[AwsRequest], AwsResponse]


def aws_error(request: AwsRequest, code: str, message: str, status: int = 400, **extra: Any) -> AwsResponse:
    """AWS's error answer for ``request``'s protocol: a JSON ``__type`` body, EC2's ``<Response><Errors>``
    document, or the ``<ErrorResponse>`` of the other query services (IAM, STS). ``extra`` adds JSON members
    (DynamoDB's ``CancellationReasons``, for example)."""
    request_id = str(uuid.uuid4())
    if request.protocol == "json":
        namespace = _JSON_ERROR_NAMESPACE.get(request.service)
        body = {"__type": f"{namespace}#{code}" if namespace else code, "message": message, **extra}
        headers = [
            ("Content-Type", "application/x-amz-json-1.0"),
            ("x-amzn-RequestId", request_id),
            ("x-amzn-ErrorType", code),
        ]
        return AwsResponse(status, headers, json.dumps(body).encode())
    if request.service in _EC2_ERROR_SERVICES:
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Response><Errors><Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message></Error>"
            f"</Errors><RequestID>{request_id}</RequestID></Response>"
        )
    else:
        kind = "Receiver" if status >= 500 else "Sender"
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<ErrorResponse><Error><Type>{kind}</Type><Code>{escape(code)}</Code>"
            f"<Message>{escape(message)}</Message></Error><RequestId>{request_id}</RequestId></ErrorResponse>"
        )
    return AwsResponse(status, [("Content-Type", "text/xml"), ("x-amzn-RequestId", request_id)], xml.encode())


class Rule:
    """One way AWS behaves that moto does not. Subclasses override what they need; the base forwards."""

    name: ClassVar[str]

    def handle(self, request: AwsRequest, forward: Forward) -> AwsResponse:
        return forward(request)

    def configure(self, action: str, payload: dict[str, Any]) -> Any:
        """Answer ``POST /_shim/<name>/<action>``; the return value is sent back as JSON."""
        raise ShimConfigError(f"rule {self.name!r} has no action {action!r}")

    def reset(self) -> None:
        """Forget all state, as moto forgets its resources on reset."""


def parse_request(environ: dict[str, Any], body: bytes) -> AwsRequest:
    auth = str(environ.get("HTTP_AUTHORIZATION", ""))
    scope = _CREDENTIAL_SCOPE.search(auth)
    region, service = scope.groups() if scope else ("", "")
    target = str(environ.get("HTTP_X_AMZ_TARGET", ""))
    content_type = str(environ.get("CONTENT_TYPE", ""))
    if target:
        try:
            params = json.loads(body or b"{}")
        except ValueError:
            params = {}
        return AwsRequest(
            service=service,
            region=region,
            operation=target.rpartition(".")[2],
            protocol="json",
            params=params if isinstance(params, dict) else {},
            pairs=(),
            body=body,
            environ=environ,
        )
    if content_type.startswith("application/x-www-form-urlencoded"):
        pairs = tuple(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        query = dict(pairs)
        return AwsRequest(
            service=service,
            region=region,
            operation=query.get("Action", ""),
            protocol="query",
            params=query,
            pairs=pairs,
            body=body,
            environ=environ,
        )
    return AwsRequest(service, region, "", "other", {}, (), body, environ)


class AwsShim:
    """WSGI middleware: run each request through the rules, then moto."""

    def __init__(self, app: WsgiApp, rules: Sequence[Rule]) -> None:
        self._app = app
        self._rules = {rule.name: rule for rule in rules}
        self._chain = list(rules)
        self._admin_lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = str(environ.get("PATH_INFO", ""))
        body = _read_body(environ)
        if path.startswith(ADMIN_PREFIX):
            return self._admin(path[len(ADMIN_PREFIX) :], body, start_response)
        if path == RESET_PATH:
            with self._admin_lock:
                for rule in self._chain:
                    rule.reset()
        if path.startswith("/moto-api"):
            return self._app(_with_body(environ, body), start_response)
        request = parse_request(environ, body)
        response = self._run(request, 0)
        start_response(_status_line(response.status), response.headers)
        return [response.body]

    def _run(self, request: AwsRequest, index: int) -> AwsResponse:
        if index == len(self._chain):
            return self._moto(request)
        rule = self._chain[index]
        return rule.handle(request, lambda forwarded: self._run(forwarded, index + 1))

    def _moto(self, request: AwsRequest) -> AwsResponse:
        captured: dict[str, Any] = {}

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            captured["status"] = int(status.split(" ", 1)[0])
            captured["headers"] = list(headers)

        chunks = self._app(_with_body(request.environ, request.body), start_response)
        try:
            body = b"".join(chunks)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        return AwsResponse(captured["status"], captured["headers"], body)

    def _admin(self, route: str, body: bytes, start_response: Callable[..., Any]) -> Iterable[bytes]:
        name, _, action = route.partition("/")
        try:
            rule = self._rules.get(name)
            if rule is None:
                raise ShimConfigError(f"no shim rule {name!r}; known: {sorted(self._rules)}")
            payload = json.loads(body or b"{}")
            with self._admin_lock:
                result = rule.configure(action, payload)
            status, answer = "200 OK", {"result": result}
        except (ShimConfigError, ValueError, TypeError, KeyError) as exc:
            status, answer = "400 Bad Request", {"error": str(exc)}
        encoded = json.dumps(answer).encode()
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(encoded)))])
        return [encoded]


def _read_body(environ: dict[str, Any]) -> bytes:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    stream = environ.get("wsgi.input")
    if stream is None:
        return b""
    if length:
        return bytes(stream.read(length))
    # A chunked request (no Content-Length): werkzeug's server gives a stream that ends with the body.
    if environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked" or environ.get("wsgi.input_terminated"):
        return bytes(stream.read())
    return b""


def _with_body(environ: dict[str, Any], body: bytes) -> dict[str, Any]:
    copied = dict(environ)
    copied["wsgi.input"] = io.BytesIO(body)
    copied["CONTENT_LENGTH"] = str(len(body))
    copied.pop("HTTP_TRANSFER_ENCODING", None)
    return copied


def _status_line(status: int) -> str:
    from http import HTTPStatus

    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Error"
