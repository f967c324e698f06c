"""Fault injection at the wire for boto3 clients, under the real botocore stack.

moto never throttles and never runs out of capacity, and mocking our own functions would test the mock. So
faults are injected where AWS would cause them: as HTTP answers. A :class:`WireFaults` registers botocore event
handlers on one client; everything above the wire (serialisation, signing, standard-mode retries with backoff,
the EC2 query-protocol parser, ClientError) runs for real, and what reaches moto is a real HTTP request.

* ``fail``: answer an operation with a real AWS error body and status (EC2 query XML), a number of times.
* ``capacity_shortage``: CreateFleet comes back as a real partial-success (or total-failure) answer, with
  ``errorSet`` items for the overrides of the given instance types; the rest is launched by moto.
* ``crash_after``: raise any BaseException once the real call has reached moto, as a Lambda killed between
  CreateFleet and its state write would.
* ``run_after``: run an action once a call has landed, before its caller sees the answer (a race, made exact).
* ``calls`` / ``attempts``: every API call (operation, parameters) and every attempt on the wire.

    with WireFaults(ec2) as faults:
        faults.fail("CreateFleet", "RequestLimitExceeded", times=2)
        faults.capacity_shortage(["m7i.large"], unavailable=2)
        launcher.launch(pool, template, launch_id, 5)
        assert faults.attempts("CreateFleet") == 3
"""

from __future__ import annotations

import copy
import json
import re
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl, urlencode
from xml.sax.saxutils import escape

from botocore.awsrequest import AWSPreparedRequest, AWSResponse
from botocore.exceptions import ReadTimeoutError
from botocore.httpsession import URLLib3Session

__all__ = ["Call", "SimulatedCrash", "WireFaults", "ec2_error_body", "json_error_body"]

# The statuses AWS sends with these codes; anything else is a client error (400).
_STATUS_BY_CODE = {
    "RequestLimitExceeded": 503,
    "Unavailable": 503,
    "ServiceUnavailable": 503,
    "InternalError": 500,
    "InternalFailure": 500,
}
_DEFAULT_MESSAGES = {
    "RequestLimitExceeded": "Request limit exceeded.",
    "InternalError": "An internal error has occurred.",
    "Unavailable": "The server is overloaded and can't handle the request.",
}
SPOT_CAPACITY_MESSAGE = "There is no Spot capacity available that matches your request."
ON_DEMAND_CAPACITY_MESSAGE = "We currently do not have sufficient capacity in the Availability Zone you requested."
_EC2_NAMESPACE = "http://ec2.amazonaws.com/doc/2016-11-15/"

_OVERRIDE_KEY = re.compile(r"LaunchTemplateConfigs\.(\d+)\.Overrides\.(\d+)\.(.+)")
_CONFIG_KEY = re.compile(r"LaunchTemplateConfigs\.(\d+)\.(.+)")
_SPEC_KEY = re.compile(r"LaunchTemplateConfigs\.(\d+)\.LaunchTemplateSpecification\.(\w+)")
_CAPACITY_KEYS = (
    "TargetCapacitySpecification.SpotTargetCapacity",
    "TargetCapacitySpecification.OnDemandTargetCapacity",
)


class SimulatedCrash(BaseException):
    """Stands for the Lambda runtime killing the function: not an Exception, so no handler catches it."""


@dataclass(frozen=True)
class Call:
    """One API call as the caller made it (before serialisation): the operation and its parameters."""

    operation: str
    params: dict[str, Any]


def ec2_error_body(code: str, message: str, request_id: str | None = None) -> bytes:
    """The body EC2 (query protocol) sends with an error status."""
    request_id = request_id or str(uuid.uuid4())
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Response><Errors><Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message></Error>"
        f"</Errors><RequestID>{request_id}</RequestID></Response>"
    ).encode()


def json_error_body(code: str, message: str) -> bytes:
    """The body a JSON-protocol service (DynamoDB, SSM) sends with an error status."""
    return json.dumps({"__type": code, "message": message}).encode()


def _json_response(url: str, status: int, content: bytes) -> AWSResponse:
    headers = {
        "Content-Type": "application/x-amz-json-1.1",
        "Content-Length": str(len(content)),
        "x-amzn-RequestId": str(uuid.uuid4()),
    }
    return AWSResponse(url, status, headers, _Body(content))


class _Body:
    """The ``raw`` of an AWSResponse: botocore reads the content through ``stream()``."""

    def __init__(self, content: bytes) -> None:
        self._content = content

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._content


def _response(url: str, status: int, content: bytes) -> AWSResponse:
    headers = {"Content-Type": "text/xml;charset=UTF-8", "Content-Length": str(len(content))}
    return AWSResponse(url, status, headers, _Body(content))


@dataclass
class _ErrorFault:
    operation: str
    code: str
    message: str
    status: int
    remaining: int | None
    skip: int


@dataclass
class _CapacityFault:
    instance_types: frozenset[str] | None
    unavailable: int
    lifecycle: str
    code: str
    message: str
    remaining: int | None


@dataclass
class _CrashFault:
    operation: str
    exception: type[BaseException] | BaseException
    remaining: int | None


@dataclass
class _Action:
    operation: str
    action: Callable[[dict[str, Any]], None]
    remaining: int | None


@dataclass
class _Override:
    config: int
    index: int
    fields: dict[str, str] = field(default_factory=dict)


def _take(remaining: int | None) -> tuple[bool, int | None]:
    """Whether a fault with ``remaining`` uses left fires now, and how many it has afterwards."""
    if remaining is None:
        return True, None
    if remaining <= 0:
        return False, 0
    return True, remaining - 1


class WireFaults:
    """Registers fault handlers on one botocore client; use as a context manager so they are removed."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._service = client.meta.service_model.service_id.hyphenize()
        # DynamoDB and SSM speak the JSON protocol: their errors are JSON bodies, not EC2's query XML.
        self._json_protocol = client.meta.service_model.protocol == "json"
        self._lock = threading.Lock()
        self._errors: list[_ErrorFault] = []
        self._capacity: list[_CapacityFault] = []
        self._crashes: list[_CrashFault] = []
        self._actions: list[_Action] = []
        self._lost_answers: Counter[str] = Counter()
        self._attempts: list[str] = []
        self._http = URLLib3Session()
        self.calls: list[Call] = []
        self._handlers = [
            (f"before-parameter-build.{self._service}", self._record_call),
            (f"before-send.{self._service}", self._before_send),
            (f"after-call.{self._service}", self._after_call),
        ]
        for event, handler in self._handlers:
            client.meta.events.register(event, handler, unique_id=self._unique_id(event))

    # ---- lifecycle ---------------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Removes every handler; the client then talks to the endpoint untouched again."""
        for event, _ in self._handlers:
            self._client.meta.events.unregister(event, unique_id=self._unique_id(event))
        self._http.close()

    def _unique_id(self, event: str) -> str:
        return f"wire-faults-{id(self)}-{event}"

    # ---- configuring faults ------------------------------------------------------------------------------

    def fail(
        self,
        operation: str,
        code: str,
        message: str | None = None,
        *,
        status: int | None = None,
        times: int | None = None,
        after: int = 0,
    ) -> None:
        """Answers ``operation`` with an AWS error (``times`` attempts, or every attempt when None).

        Counted per attempt on the wire, so ``times=2`` with botocore's retries means two failed attempts;
        the first ``after`` attempts go through untouched (to fail only a later call, such as a fallback).
        The body is in the client's protocol's error format: EC2's query XML, or JSON for DynamoDB and SSM.
        """
        self._errors.append(
            _ErrorFault(
                operation=operation,
                code=code,
                message=message or _DEFAULT_MESSAGES.get(code, f"{code} (injected)"),
                status=status or _STATUS_BY_CODE.get(code, 400),
                remaining=times,
                skip=after,
            )
        )

    def capacity_shortage(
        self,
        instance_types: Iterable[str] | None = None,
        *,
        unavailable: int = 0,
        lifecycle: str = "spot",
        code: str = "InsufficientInstanceCapacity",
        message: str | None = None,
        times: int | None = None,
    ) -> None:
        """CreateFleet requests of ``lifecycle`` find no capacity for ``instance_types`` (None: any type).

        The overrides of those types come back as ``errorSet`` items; the others go to moto, asked for
        ``unavailable`` fewer units than requested (what the remaining pools could not supply either). When
        every override fails, or nothing is left to ask for, moto is not called and the answer is a total
        failure. Requests of another lifecycle (the on-demand fallback of a spot shortage) pass through.
        """
        default = SPOT_CAPACITY_MESSAGE if lifecycle == "spot" else ON_DEMAND_CAPACITY_MESSAGE
        self._capacity.append(
            _CapacityFault(
                instance_types=None if instance_types is None else frozenset(instance_types),
                unavailable=unavailable,
                lifecycle=lifecycle,
                code=code,
                message=message or default,
                remaining=times,
            )
        )

    def crash_after(
        self,
        operation: str,
        exception: type[BaseException] | BaseException = SimulatedCrash,
        *,
        times: int | None = 1,
    ) -> None:
        """Raises ``exception`` once ``operation`` has been answered by the endpoint, before the caller sees it."""
        self._crashes.append(_CrashFault(operation=operation, exception=exception, remaining=times))

    def run_after(self, operation: str, action: Callable[[dict[str, Any]], None], *, times: int | None = 1) -> None:
        """Runs ``action(parsed answer)`` once ``operation`` has been answered, before the caller sees the answer:
        something else happening in the world (an instance terminating, another Lambda's write) right then."""
        self._actions.append(_Action(operation=operation, action=action, remaining=times))

    # ---- what was seen -----------------------------------------------------------------------------------

    def calls_to(self, operation: str) -> list[Call]:
        """The API calls made to ``operation``, one per call however many attempts botocore made."""
        return [call for call in self.calls if call.operation == operation]

    def attempts(self, operation: str) -> int:
        """How many times ``operation`` went to the wire (retries included)."""
        return self._attempts.count(operation)

    # ---- handlers ----------------------------------------------------------------------------------------

    def _record_call(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        with self._lock:
            self.calls.append(Call(operation=model.name, params=copy.deepcopy(params)))

    def lose_answer(self, operation: str, times: int = 1) -> None:
        """The next ``times`` calls of ``operation`` reach the endpoint and take effect, but their answer is lost
        (a read timeout), so botocore's retry sends the same request again: the write has already landed."""
        with self._lock:
            self._lost_answers[operation] += times

    def _before_send(self, request: AWSPreparedRequest, event_name: str, **_: Any) -> AWSResponse | None:
        operation = event_name.rsplit(".", 1)[-1]
        with self._lock:
            self._attempts.append(operation)
            error = self._next_error(operation)
            lose = self._lost_answers[operation] > 0
            if lose:
                self._lost_answers[operation] -= 1
        if lose:
            self._http.send(request)
            raise ReadTimeoutError(endpoint_url=request.url)
        if error is not None:
            if self._json_protocol:
                return _json_response(request.url, error.status, json_error_body(error.code, error.message))
            return _response(request.url, error.status, ec2_error_body(error.code, error.message))
        if operation == "CreateFleet":
            return self._create_fleet_with_shortage(request)
        return None

    def _after_call(self, model: Any, parsed: dict[str, Any] | None = None, **_: Any) -> None:
        with self._lock:
            actions = []
            for action in self._actions:
                if action.operation == model.name:
                    fires, action.remaining = _take(action.remaining)
                    if fires:
                        actions.append(action)
        for action in actions:
            action.action(parsed or {})
        with self._lock:
            crash = None
            for fault in self._crashes:
                if fault.operation == model.name:
                    fires, fault.remaining = _take(fault.remaining)
                    if fires:
                        crash = fault
                        break
        if crash is not None:
            raise crash.exception

    def _next_error(self, operation: str) -> _ErrorFault | None:
        for fault in self._errors:
            if fault.operation == operation:
                if fault.skip > 0:
                    fault.skip -= 1
                    continue
                fires, fault.remaining = _take(fault.remaining)
                if fires:
                    return fault
        return None

    # ---- CreateFleet capacity shortage -------------------------------------------------------------------

    def _create_fleet_with_shortage(self, request: AWSPreparedRequest) -> AWSResponse | None:
        body = request.body.decode() if isinstance(request.body, bytes) else str(request.body or "")
        pairs = parse_qsl(body, keep_blank_values=True)
        params = dict(pairs)
        lifecycle = params.get("TargetCapacitySpecification.DefaultTargetCapacityType", "on-demand")
        overrides = _overrides(pairs)
        with self._lock:
            fault = self._next_capacity(lifecycle, overrides)
        if fault is None:
            return None
        failing = [
            o for o in overrides if fault.instance_types is None or o.fields.get("InstanceType") in fault.instance_types
        ]
        errors = b"".join(_error_item(o, _specs(pairs).get(o.config, {}), fault) for o in failing)
        surviving = [o for o in overrides if o not in failing]
        total = int(params.get("TargetCapacitySpecification.TotalTargetCapacity", "0"))
        asked = max(0, total - fault.unavailable) if surviving else 0
        if asked == 0:
            # EC2 still creates an (empty) instant fleet and answers 200: total failure is not an error status.
            content = (
                (
                    f'<?xml version="1.0" encoding="UTF-8"?>\n<CreateFleetResponse xmlns="{_EC2_NAMESPACE}">'
                    f"<requestId>{uuid.uuid4()}</requestId><fleetId>fleet-{uuid.uuid4()}</fleetId>"
                ).encode()
                + b"<errorSet>"
                + errors
                + b"</errorSet><fleetInstanceSet/></CreateFleetResponse>"
            )
            return _response(request.url, 200, content)
        rewritten = _rewrite(pairs, failing, asked)
        forwarded = self._forward(request, rewritten)
        if forwarded.status_code != 200:
            return forwarded
        closing = b"</CreateFleetResponse>"
        content = forwarded.content
        if closing not in content:
            raise AssertionError(f"unexpected CreateFleet answer from the endpoint: {content[:200]!r}")
        content = content.replace(closing, b"<errorSet>" + errors + b"</errorSet>" + closing)
        return _response(request.url, 200, content)

    def _next_capacity(self, lifecycle: str, overrides: list[_Override]) -> _CapacityFault | None:
        for fault in self._capacity:
            if fault.lifecycle != lifecycle:
                continue
            if fault.instance_types is not None and not any(
                o.fields.get("InstanceType") in fault.instance_types for o in overrides
            ):
                continue
            fires, fault.remaining = _take(fault.remaining)
            if fires:
                return fault
        return None

    def _forward(self, request: AWSPreparedRequest, body: str) -> AWSResponse:
        # The signature no longer matches the body; moto does not verify signatures, AWS is never reached.
        data = body.encode()
        headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
        headers["Content-Length"] = str(len(data))
        forwarded = AWSPreparedRequest(request.method, request.url, headers, data, stream_output=False)
        answer = self._http.send(forwarded)
        return _response(request.url, answer.status_code, answer.content)


def _overrides(pairs: list[tuple[str, str]]) -> list[_Override]:
    found: dict[tuple[int, int], _Override] = {}
    for key, value in pairs:
        match = _OVERRIDE_KEY.fullmatch(key)
        if match:
            config, index, name = int(match[1]), int(match[2]), match[3]
            found.setdefault((config, index), _Override(config, index)).fields[name] = value
    return [found[key] for key in sorted(found)]


def _specs(pairs: list[tuple[str, str]]) -> dict[int, dict[str, str]]:
    specs: dict[int, dict[str, str]] = {}
    for key, value in pairs:
        match = _SPEC_KEY.fullmatch(key)
        if match:
            specs.setdefault(int(match[1]), {})[match[2]] = value
    return specs


def _lower_first(name: str) -> str:
    return name[:1].lower() + name[1:]


def _error_item(override: _Override, spec: dict[str, str], fault: _CapacityFault) -> bytes:
    """One ``errorSet`` item, in the element names of botocore's CreateFleetError shape."""
    spec_xml = "".join(f"<{_lower_first(k)}>{escape(v)}</{_lower_first(k)}>" for k, v in spec.items())
    # Only plain fields (InstanceType, SubnetId, AvailabilityZone, MaxPrice...): nested ones would need
    # their own element structure and are not used by runner-fleet.
    override_xml = "".join(
        f"<{_lower_first(k)}>{escape(v)}</{_lower_first(k)}>" for k, v in override.fields.items() if "." not in k
    )
    return (
        "<item><launchTemplateAndOverrides>"
        f"<launchTemplateSpecification>{spec_xml}</launchTemplateSpecification>"
        f"<overrides>{override_xml}</overrides>"
        f"</launchTemplateAndOverrides><lifecycle>{escape(fault.lifecycle)}</lifecycle>"
        f"<errorCode>{escape(fault.code)}</errorCode><errorMessage>{escape(fault.message)}</errorMessage></item>"
    ).encode()


def _rewrite(pairs: list[tuple[str, str]], failing: list[_Override], asked: int) -> str:
    """The form body without the failing overrides, renumbered, asking for ``asked`` units in total."""
    dropped = {(o.config, o.index) for o in failing}
    all_overrides = _overrides(pairs)
    # The query protocol numbers list members from 1 without gaps; renumber what is left of each config,
    # and the configs themselves when one lost all its overrides.
    survivors: dict[int, list[int]] = {}
    configs_with_overrides: set[int] = set()
    for o in all_overrides:
        configs_with_overrides.add(o.config)
        if (o.config, o.index) not in dropped:
            survivors.setdefault(o.config, []).append(o.index)
    configs = sorted({int(m[1]) for key, _ in pairs if (m := _CONFIG_KEY.fullmatch(key))})
    kept_configs = [c for c in configs if c in survivors or c not in configs_with_overrides]
    config_number = {old: new for new, old in enumerate(kept_configs, start=1)}
    override_number = {
        (c, old): new for c, indexes in survivors.items() for new, old in enumerate(sorted(indexes), start=1)
    }
    out: list[tuple[str, str]] = []
    for key, value in pairs:
        override = _OVERRIDE_KEY.fullmatch(key)
        config = _CONFIG_KEY.fullmatch(key)
        if override:
            c, i = int(override[1]), int(override[2])
            if (c, i) in dropped or c not in config_number:
                continue
            new = f"LaunchTemplateConfigs.{config_number[c]}.Overrides.{override_number[(c, i)]}.{override[3]}"
            out.append((new, value))
        elif config:
            c = int(config[1])
            if c in config_number:
                out.append((f"LaunchTemplateConfigs.{config_number[c]}.{config[2]}", value))
        elif key == "TargetCapacitySpecification.TotalTargetCapacity":
            out.append((key, str(asked)))
        elif key in _CAPACITY_KEYS:
            out.append((key, str(min(int(value), asked))))
        else:
            out.append((key, value))
    return urlencode(out)
