"""Warm cost of one webhook: the handler against the bare AWS calls, and AWS calls per webhook.

In one process, after warming both paths, alternates SAMPLES times (a) a valid pending Job Hook for a new job
through ``app.app(event, context)`` and (b) the same TransactWriteItems + SendMessage made on a plain boto3
client. Targets: median (a) at most TARGET_RATIO times median (b), and at most TARGET_CALLS AWS calls per
webhook in steady state, counted by a botocore ``before-call`` handler on the app's own clients. Reports,
never fails: exit status 0 whatever the figures.

Run: ``.venv/bin/python bench/webhook_cost.py`` (or ``make bench``).
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from typing import Any

from _child import BareWebhook, LambdaContext
from _common import (
    MotoProcess,
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
TARGET_RATIO = 1.3
TARGET_CALLS = 2
SERVICES = ("ssm", "dynamodb", "sqs")


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

    def total(self) -> int:
        return sum(self.calls.values())


def main() -> None:
    started = time.perf_counter()
    load_before = load_average()
    with MotoProcess() as stack, quiet_stdout():
        use_handler_environment(stack)
        import app
        from chalicelib import runtime

        meter = CallMeter()
        for service in SERVICES:
            meter.attach(runtime.aws().client(service))
        bare = BareWebhook(stack.target)

        # The first webhook builds the wiring and fetches the secret and the queue URL: counted apart.
        first = app.app(webhook_event(stack.webhook_token), LambdaContext())
        first_calls = dict(meter.calls)
        bare.cold(webhook_event(stack.webhook_token))
        valid = queued(first)
        for _ in range(WARMUP):
            valid = queued(app.app(webhook_event(stack.webhook_token), LambdaContext())) and valid
            bare.record_and_queue(webhook_event(stack.webhook_token))

        meter.calls.clear()
        meter.attempts = 0
        meter.in_calls = 0.0
        app_times: list[float] = []
        bare_times: list[float] = []
        per_webhook: list[int] = []
        for n in range(SAMPLES):
            app_event, app_context = webhook_event(stack.webhook_token), LambdaContext()
            bare_event = webhook_event(stack.webhook_token)
            for path in ("app", "bare") if n % 2 == 0 else ("bare", "app"):
                if path == "app":
                    calls_before = meter.total()
                    before = time.perf_counter()
                    response = app.app(app_event, app_context)
                    app_times.append(time.perf_counter() - before)
                    per_webhook.append(meter.total() - calls_before)
                    valid = queued(response) and valid
                else:
                    before = time.perf_counter()
                    bare.record_and_queue(bare_event)
                    bare_times.append(time.perf_counter() - before)
        steady_calls = dict(meter.calls)
        attempts, in_calls = meter.attempts, meter.in_calls

    app_median, bare_median = median(app_times), median(bare_times)
    ratio = app_median / bare_median
    most_calls = max(per_webhook)
    ratio_met = ratio <= TARGET_RATIO
    calls_met = most_calls <= TARGET_CALLS
    met = ratio_met and calls_met and valid
    load_after = load_average()
    lines = [
        f"webhook cost: {SAMPLES} warm webhooks each way (after {WARMUP} warm-up), one process, medians",
        f"  app  (app.app: verify, parse, TransactWriteItems, SendMessage)  {ms(app_median):>9}",
        f"  bare (boto3: TransactWriteItems, SendMessage)                   {ms(bare_median):>9}",
        f"  ratio app/bare {ratio:.2f} (target <= {TARGET_RATIO}): {'met' if ratio_met else 'MISSED'}",
        f"  app time outside AWS calls: {ms(sum(app_times) / SAMPLES - in_calls / SAMPLES)} per webhook (mean)",
        f"  AWS calls per webhook: at most {most_calls}, {sum(per_webhook) / SAMPLES:.2f} on average,"
        f" {attempts / SAMPLES:.2f} HTTP attempts (target <= {TARGET_CALLS}): {'met' if calls_met else 'MISSED'}",
        "    steady: " + ", ".join(f"{name} x{count}" for name, count in sorted(steady_calls.items())),
        "    first webhook: " + ", ".join(f"{name} x{count}" for name, count in sorted(first_calls.items())),
    ]
    if not valid:
        lines.append("  INVALID: some app webhooks were not answered 200 {'queued': true}")
    lines.append(
        f"  ({time.perf_counter() - started:.0f} s; load average {load_before} before, {load_after} after,"
        f" {os.cpu_count()} CPUs: figures from a busy machine are not comparable)"
    )
    figures = {
        "benchmark": "webhook_cost",
        "samples": SAMPLES,
        "app_median_ms": round(app_median * 1000, 2),
        "bare_median_ms": round(bare_median * 1000, 2),
        "ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "ratio_met": ratio_met,
        "calls_per_webhook_max": most_calls,
        "calls_per_webhook_mean": round(sum(per_webhook) / SAMPLES, 3),
        "calls_first_webhook": sum(first_calls.values()),
        "target_calls": TARGET_CALLS,
        "calls_met": calls_met,
        "load_average": [load_before, load_after],
        "valid": valid,
        "met": met,
    }
    report(lines, figures)


if __name__ == "__main__":
    sys.exit(run_benchmark("webhook_cost", main))
