"""Warm cost of one webhook: the handler against the bare AWS calls, and AWS calls per webhook.

In one process, after warming both paths, alternates SAMPLES times (a) a valid pending Job Hook for a new job
through ``app.app(event, context)`` and (b) the same UpdateItem + SendMessage + UpdateItem (recorded, queued,
marked queued) made on a plain boto3 client.
Targets: median (a) at most TARGET_RATIO times median (b), and at most TARGET_CALLS AWS calls per webhook in
steady state, counted by a botocore ``before-call`` handler on the app's own clients. The baseline is checked,
not assumed, to make the app's calls: the operations and request shapes (expressions, attribute names, value
types, message fields) of a first and of a steady webhook are recorded on both paths and must be equal, or
the run is reported invalid. Reports, never fails: exit status 0 whatever the figures.

Run: ``.venv/bin/python bench/webhook_cost.py`` (or ``make bench``).
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from _child import BareWebhook, LambdaContext
from _common import (
    LocalStack,
    MotoProcess,
    footer,
    load_average,
    median,
    ms,
    queued,
    quiet_stdout,
    report,
    run_benchmark,
    use_handler_environment,
    webhook_event,
)

WARMUP = 30
SAMPLES = 300
CLEAR_EVERY = 25  # pairs between emptying the table and the queue (see LocalStack.clear)
CACHE_REFRESH_CALL = "ssm.GetParameters"
TARGET_RATIO = 1.05
TARGET_CALLS = 3  # record the job, queue it, mark it queued
SERVICES = ("ssm", "dynamodb", "sqs")


class CallShapes:
    """The API calls made on botocore clients, as (operation, request shape), in order.

    The shape keeps what makes two requests the same call (table, key attribute, expressions, attribute names,
    the type of every value, the message's fields) and drops what differs between any two webhooks (ids, times,
    delivery keys), so the app's calls and the bare ones can be compared.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def attach(self, client: Any) -> None:
        client.meta.events.register("before-parameter-build", self._record)

    def _record(self, event_name: str, params: Mapping[str, Any], **kwargs: Any) -> None:
        operation = event_name.removeprefix("before-parameter-build.")
        self.calls.append((operation, json.dumps(_shape(params), sort_keys=True)))

    def take(self) -> list[tuple[str, str]]:
        taken, self.calls = self.calls, []
        return taken


def _shape(value: Any, key: str = "") -> Any:
    if key == "MessageBody" and isinstance(value, str):
        return {name: type(field).__name__ for name, field in json.loads(value).items()}
    if key == "QueueUrl":
        return "<url>"
    if isinstance(value, Mapping):
        if len(value) == 1 and next(iter(value)) in ("S", "N", "SS", "NS", "BOOL", "L", "M"):
            return next(iter(value))  # a DynamoDB attribute value: its type only
        return {k: _shape(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return value


class CallMeter:
    """Counts API calls and HTTP attempts on botocore clients, and the time spent inside the calls."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.attempts = 0
        self.in_calls = 0.0
        self._call_started = 0.0

    def attach(self, client: Any) -> None:
        events = client.meta.events
        events.register("before-call", self._before_call)
        events.register("after-call", self._after_call)
        events.register("before-send", self._before_send)

    def _before_call(self, event_name: str, **kwargs: Any) -> None:
        self.calls[event_name.removeprefix("before-call.")] += 1
        self._call_started = time.perf_counter()

    def _after_call(self, **kwargs: Any) -> None:
        self.in_calls += time.perf_counter() - self._call_started

    def _before_send(self, **kwargs: Any) -> None:
        self.attempts += 1

    def reset(self) -> None:
        self.calls.clear()
        self.attempts = 0
        self.in_calls = 0.0


@dataclass
class Samples:
    app: list[float] = field(default_factory=list)
    bare: list[float] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)  # AWS calls each app webhook made, cache refreshes aside
    refreshes: int = 0
    valid: bool = True


def measure(chalice_app: Any, bare: BareWebhook, stack: LocalStack, meter: CallMeter) -> Samples:
    """SAMPLES webhooks each way, alternating which path goes first."""
    samples = Samples()
    for n in range(SAMPLES):
        if n % CLEAR_EVERY == 0:
            stack.clear()
        app_event, app_context = webhook_event(stack.webhook_token), LambdaContext()
        bare_event = webhook_event(stack.webhook_token)
        for path in ("app", "bare") if n % 2 == 0 else ("bare", "app"):
            if path == "bare":
                before = time.perf_counter()
                bare.record_and_queue(bare_event)
                samples.bare.append(time.perf_counter() - before)
                continue
            calls_before = Counter(meter.calls)
            before = time.perf_counter()
            response = chalice_app(app_event, app_context)
            samples.app.append(time.perf_counter() - before)
            made = meter.calls - calls_before
            if made[CACHE_REFRESH_CALL]:
                # The secret cache expired (its max_age): one call per minute per container, not per webhook.
                samples.refreshes += 1
                made[CACHE_REFRESH_CALL] -= 1
            samples.calls.append(made.total())
            samples.valid = samples.valid and queued(response)
    return samples


@dataclass
class Baseline:
    """What the first two webhooks of each path showed: whether the bare calls are the app's calls."""

    mismatches: list[str]
    first_calls: dict[str, int]  # the app's first webhook: operation -> calls
    queued: bool  # both app webhooks answered 200 {"queued": true}


def check_baseline(chalice_app: Any, bare: BareWebhook, stack: LocalStack, app_clients: list[Any]) -> Baseline:
    """A first and a second webhook each way, their calls recorded and compared (differences in ``mismatches``)."""
    app_shapes, bare_shapes = CallShapes(), CallShapes()
    for client in app_clients:
        app_shapes.attach(client)
    for client in (bare.ssm, bare.dynamodb, bare.sqs):
        bare_shapes.attach(client)
    recorded: dict[str, list[tuple[str, str]]] = {}
    answered = queued(chalice_app(webhook_event(stack.webhook_token), LambdaContext()))
    recorded["first app"] = app_shapes.take()
    bare.cold(webhook_event(stack.webhook_token))
    recorded["first bare"] = bare_shapes.take()
    answered = queued(chalice_app(webhook_event(stack.webhook_token), LambdaContext())) and answered
    recorded["steady app"] = app_shapes.take()
    bare.record_and_queue(webhook_event(stack.webhook_token))
    recorded["steady bare"] = bare_shapes.take()
    mismatches = []
    for moment in ("first", "steady"):
        app_calls, bare_calls = recorded[f"{moment} app"], recorded[f"{moment} bare"]
        app_ops, bare_ops = [op for op, _ in app_calls], [op for op, _ in bare_calls]
        if app_ops != bare_ops:
            mismatches.append(f"{moment} webhook: app called {app_ops}, bare {bare_ops}")
            continue
        for (operation, app_shape), (_, bare_shape) in zip(app_calls, bare_calls, strict=True):
            if app_shape != bare_shape:
                mismatches.append(f"{moment} webhook: {operation} differs: app {app_shape}, bare {bare_shape}")
    first_calls = Counter(op for op, _ in recorded["first app"])
    return Baseline(mismatches, dict(first_calls), answered)


def main() -> None:
    started, load_before = time.perf_counter(), load_average()
    with MotoProcess() as stack, quiet_stdout():
        use_handler_environment(stack)
        import app
        from chalicelib import runtime

        meter = CallMeter()
        for service in SERVICES:
            meter.attach(runtime.aws().client(service))
        bare = BareWebhook(stack.target)

        # The first webhook builds the wiring and fetches the secret and the queue URL: counted apart. The first
        # two webhooks of each path also show whether the baseline makes the app's calls.
        baseline = check_baseline(app.app, bare, stack, [runtime.aws().client(s) for s in SERVICES])
        first_calls = baseline.first_calls
        valid = baseline.queued
        for _ in range(WARMUP):
            valid = queued(app.app(webhook_event(stack.webhook_token), LambdaContext())) and valid
            bare.record_and_queue(webhook_event(stack.webhook_token))

        meter.reset()
        window_started = time.perf_counter()
        samples = measure(app.app, bare, stack, meter)
        window = time.perf_counter() - window_started
    valid = valid and samples.valid
    same_calls = not baseline.mismatches

    app_median, bare_median = median(samples.app), median(samples.bare)
    ratio = app_median / bare_median
    most_calls = max(samples.calls)
    mean_calls = sum(samples.calls) / SAMPLES
    ratio_met = ratio <= TARGET_RATIO
    calls_met = most_calls <= TARGET_CALLS
    outside_calls = (sum(samples.app) - meter.in_calls) / SAMPLES
    lines = [
        f"webhook cost: {SAMPLES} warm webhooks each way (after {WARMUP} warm-up), one process, medians",
        f"  app  (app.app: verify, parse, UpdateItem, SendMessage, UpdateItem)  {ms(app_median):>9}",
        f"  bare (boto3: UpdateItem, SendMessage, UpdateItem)                   {ms(bare_median):>9}",
        f"  ratio app/bare {ratio:.2f} (target <= {TARGET_RATIO}): {'met' if ratio_met else 'MISSED'}",
        f"  app time outside its AWS calls: {ms(outside_calls)} per webhook (mean)",
        f"  AWS calls per webhook: at most {most_calls}, {mean_calls:.2f} on average"
        f" (target <= {TARGET_CALLS}): {'met' if calls_met else 'MISSED'};"
        f" {meter.attempts / SAMPLES:.2f} HTTP attempts",
        f"    steady, {SAMPLES} webhooks in {window:.0f} s: " + _calls(meter.calls),
        f"    secret cache refreshes (GetParameters once per max_age, not per webhook): {samples.refreshes}",
        "    first webhook: " + _calls(first_calls),
        "  baseline makes the app's calls (operations, order, request shapes; first and steady webhook): "
        + ("yes" if same_calls else "NO"),
    ]
    if not valid:
        lines.append("  INVALID: some app webhooks were not answered 200 {'queued': true}")
    if not same_calls:
        lines.append("  INVALID: the bare baseline does not make the app's calls:")
        lines.extend(f"    {problem}" for problem in baseline.mismatches)
    lines.append(footer(started, load_before))
    figures = {
        "benchmark": "webhook_cost",
        "samples": SAMPLES,
        "app_median_ms": round(app_median * 1000, 2),
        "bare_median_ms": round(bare_median * 1000, 2),
        "ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "ratio_met": ratio_met,
        "app_outside_aws_calls_ms": round(outside_calls * 1000, 2),
        "calls_per_webhook_max": most_calls,
        "calls_per_webhook_mean": round(mean_calls, 3),
        "target_calls": TARGET_CALLS,
        "calls_met": calls_met,
        "calls_first_webhook": sum(first_calls.values()),
        "secret_refreshes": samples.refreshes,
        "baseline_same_calls": same_calls,
        "load_average": [load_before, load_average()],
        "valid": valid and same_calls,
        "met": ratio_met and calls_met and valid and same_calls,
    }
    report(lines, figures)


def _calls(calls: Mapping[str, int]) -> str:
    return ", ".join(f"{name} x{count}" for name, count in sorted(calls.items()))


if __name__ == "__main__":
    sys.exit(run_benchmark("webhook_cost", main))
