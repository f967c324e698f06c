"""Scale-up under a burst: 500 pending jobs over two pools of at most 200 runners, through the real sandbox.

The sandbox (moto server in a child process, the GitLab emulator, the webhook served over HTTP) runs the dev
stage with both pools at max_runners MAX_RUNNERS and no warm runners; two event-pump threads play concurrent
scale-up (and instance-state) invocations. A pipeline of JOBS_PER_POOL jobs tagged [docker, linux] and as many
tagged [docker, dind] is created in the emulator, which delivers a real Job Hook per job over HTTP. Phase
"fill": until 400 instances run (the 100 other jobs wait for capacity). Then FINISHING_PER_POOL instances per
pool are terminated (and the state change announced, as AWS would); phase "tail": until the 100 waiting jobs
have launched.

Counted, for every launched runner:

* CreateFleet calls per launched instance (target at most TARGET_CREATE_FLEET_PER_INSTANCE);
* GitLab API calls per launched runner made by scale-up (GET job, POST /user/runners, GET /runners/all, POST
  reset_authentication_token; target at most TARGET_GITLAB_CALLS_PER_RUNNER), from the emulator's own count,
  and every GitLab API call (instance-state's runner deletions too);
* DynamoDB, SSM, EC2 and SQS calls by operation, from a botocore ``before-call`` handler on the app's own
  clients (``runtime.aws()``), split by who made them: the webhook (``WebhookIntake.handle``), scale-up and
  instance-state (the pump's handler invocations), and the pump itself (ReceiveMessage and DeleteMessageBatch,
  which Lambda's event-source mapping makes in AWS). The split wraps two objects of this process at run time
  (the webhook intake's ``handle`` and the pump's ``_invoke``) to tag the calling thread; no code changes.
  The benchmark's own polling, terminations and baseline use clients of their own, so they are not counted.

Wall time of the fill phase (pipeline creation until 400 instances run, polled every POLL_SECONDS) is reported
against BASELINE_LAUNCHES bare ``run_instances`` calls (MinCount=MaxCount=1, the pool's launch template by
name, alternating pools and subnets) made one by one against the same moto server after the burst. No target;
the ratio is reported. Reports, never fails: exit status 0 whatever the figures.

The sandbox's re-queue delays are its own (RUNNER_FLEET_LEASE_WAIT_SECONDS=2, against 20 by default): a job
waiting for capacity asks again every few seconds here, far more often than in AWS.

Run: ``.venv/bin/python bench/scale_up_burst.py`` (or ``make bench``).
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import PROJECT_DIR, footer, load_average, quiet_stdout, report, run_benchmark

JOBS_PER_POOL = 250
MAX_RUNNERS = 200
POOL_TAGS = {"docker": ("docker", "linux"), "build": ("docker", "dind")}  # pool -> the tags of its jobs
FINISHING_PER_POOL = 50
PUMPS = 2
PUMP_INTERVAL = 0.1
POLL_SECONDS = 0.5
FILL_TIMEOUT = 150.0
TAIL_TIMEOUT = 75.0
BASELINE_LAUNCHES = 2 * MAX_RUNNERS
TARGET_CREATE_FLEET_PER_INSTANCE = 0.1
TARGET_GITLAB_CALLS_PER_RUNNER = 2.0
SCALE_UP_ROUTES = (
    ("GET", "/projects/:id/jobs/:job_id"),
    ("POST", "/user/runners"),
    ("GET", "/runners/all"),
    ("POST", "/runners/:id/reset_authentication_token"),
)
COUNTED_SERVICES = ("dynamodb", "ssm", "ec2", "sqs")
SIDES = ("webhook", "scale_up", "instance_state", "pump", "other")


class AwsCallCounter:
    """API calls on the app's botocore clients, by (side, service, operation); HTTP attempts by service."""

    def __init__(self, pump_threads: set[str]) -> None:
        self.calls: Counter[tuple[str, str, str]] = Counter()
        self.attempts: Counter[str] = Counter()
        self._pump_threads = pump_threads
        self._lock = threading.Lock()
        self._side = threading.local()

    def attach(self, client: Any) -> None:
        client.meta.events.register("before-call.*", self._before_call)
        client.meta.events.register("before-send.*", self._before_send)

    def acting_as(self, side: str, work: Callable[[], Any]) -> Any:
        """Run ``work`` with this thread's calls counted for ``side``."""
        outer = getattr(self._side, "name", None)
        self._side.name = side
        try:
            return work()
        finally:
            self._side.name = outer

    def _current_side(self) -> str:
        side = getattr(self._side, "name", None)
        if side is not None:
            return str(side)
        thread = threading.current_thread().name
        if thread in self._pump_threads:
            return "pump"
        # Scale-up's worker threads (GitLab reads and runner creation; the GitLab token is read from SSM there).
        return "scale_up" if thread.startswith("ThreadPoolExecutor") else "other"

    def _before_call(self, event_name: str, **kwargs: Any) -> None:
        _, service, operation = event_name.split(".", 2)
        key = (self._current_side(), service, operation)
        with self._lock:
            self.calls[key] += 1

    def _before_send(self, event_name: str, **kwargs: Any) -> None:
        service = event_name.split(".")[1]
        with self._lock:
            self.attempts[service] += 1

    def snapshot(self) -> tuple[Counter[tuple[str, str, str]], Counter[str]]:
        with self._lock:
            return Counter(self.calls), Counter(self.attempts)


@dataclass
class Phase:
    """What one phase cost: launched instances, AWS calls and GitLab calls made during it, and its wall time."""

    name: str
    seconds: float
    instances: int
    aws: Counter[tuple[str, str, str]]
    gitlab: Counter[tuple[str, str]]

    def create_fleet(self) -> int:
        return sum(n for (_, service, op), n in self.aws.items() if service == "ec2" and op == "CreateFleet")

    def scale_up_gitlab(self) -> int:
        return sum(self.gitlab[route] for route in SCALE_UP_ROUTES)


def burst_config(workdir: Path) -> Path:
    """A copy of the dev stage file: both pools at MAX_RUNNERS, no warm runners."""
    import yaml

    document = yaml.safe_load((PROJECT_DIR / "chalicelib" / "stages" / "dev.yaml").read_text())
    pools = {pool["name"]: pool for pool in document["pools"]}
    for name, tags in POOL_TAGS.items():
        if tuple(pools.get(name, {}).get("tags", ())) != tags:
            raise RuntimeError(f"dev.yaml has no pool {name} tagged {list(tags)}; the burst assumes it")
    for pool in document["pools"]:
        pool["max_runners"] = MAX_RUNNERS
        pool["warm"] = {"size": 0, "windows": []}
    path = workdir / "burst.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def isolate_environment() -> None:
    """Nothing in this process's environment may send boto3 anywhere but the sandbox's moto (set on start)."""
    for key in [k for k in os.environ if k.startswith(("AWS_", "POWERTOOLS_"))]:
        del os.environ[key]
    os.environ["AWS_CONFIG_FILE"] = os.devnull
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"  # the moto child process too


class Observer:
    """The benchmark's own view of the fleet, through clients of its own (never counted)."""

    def __init__(self, fleet: str, table: str) -> None:
        from chalicelib.aws import AwsClients
        from chalicelib.store import FleetStore
        from fleetctl.sandbox.local_aws import SANDBOX_REGION

        self.clients = AwsClients(region=SANDBOX_REGION)
        self.fleet = fleet
        self.store = FleetStore(table, self.clients.dynamodb)

    def instances(self, states: tuple[str, ...] = ("pending", "running")) -> dict[str, list[str]]:
        """Instance ids of this fleet by pool, in the given states (all states when empty)."""
        from chalicelib.fleet import TAG_FLEET, TAG_POOL

        filters = [{"Name": f"tag:{TAG_FLEET}", "Values": [self.fleet]}]
        if states:
            filters.append({"Name": "instance-state-name", "Values": list(states)})
        found: dict[str, list[str]] = {}
        for page in self.clients.ec2.get_paginator("describe_instances").paginate(Filters=filters):
            for reservation in page["Reservations"]:
                for instance in reservation["Instances"]:
                    pool = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}.get(TAG_POOL, "?")
                    found.setdefault(pool, []).append(instance["InstanceId"])
        return found

    def launched_jobs(self, project_id: int) -> int:
        """Jobs of the project tied to a finished launch (two scans, to spare moto's one-at-a-time DynamoDB)."""
        launched = {
            str(item["pk"]).removeprefix("LAUNCH#")
            for item in self.store.scan("launch")
            if item.get("state") == "launched"
        }
        return sum(
            1
            for item in self.store.scan("job")
            if item.get("project_id") == project_id and item.get("launch_id") in launched
        )

    def queue_depth(self, name: str) -> int:
        sqs = self.clients.sqs
        url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
        attributes = sqs.get_queue_attributes(
            QueueUrl=url,
            AttributeNames=[
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
                "ApproximateNumberOfMessagesDelayed",
            ],
        )["Attributes"]
        return sum(int(v) for v in attributes.values())


def wait_until(condition: Callable[[], bool], timeout: float, every: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(every)


def bare_launches(observer: Observer, config: Any) -> list[float]:
    """BASELINE_LAUNCHES run_instances calls one by one (pools and subnets alternating); each call's seconds."""
    from chalicelib.naming import launch_template_name

    ec2 = observer.clients.ec2
    pools = [config.pool(name) for name in POOL_TAGS]
    seconds = []
    for n in range(BASELINE_LAUNCHES):
        pool = pools[n % len(pools)]
        subnet = pool.subnets[(n // len(pools)) % len(pool.subnets)]
        before = time.perf_counter()
        ec2.run_instances(
            MinCount=1,
            MaxCount=1,
            LaunchTemplate={"LaunchTemplateName": launch_template_name(config.fleet, pool.name)},
            SubnetId=subnet,
        )
        seconds.append(time.perf_counter() - before)
    return seconds


@dataclass
class BurstResult:
    phases: list[Phase]
    fill_s: float | None
    tail_s: float | None
    highest: dict[str, int]
    instances_ever: int
    live_at_end: dict[str, int]
    runners_at_end: int
    launched_jobs: int
    jobs_queue_depth: int
    dead_letters: int
    attempts: Counter[str]
    baseline: list[float]
    problems: list[str]


def run_burst(workdir: Path) -> BurstResult:
    from chalicelib import runtime
    from fleetctl.sandbox.ec2_events import terminate_instances
    from fleetctl.sandbox.stack import Sandbox

    isolate_environment()
    stack = Sandbox(config_path=burst_config(workdir), workdir=workdir, run_pump=False)
    stack.start()
    try:
        config = stack.config
        assert config is not None
        observer = Observer(config.fleet, config.state.table)
        pump_names = {f"bench-pump-{n}" for n in range(1, PUMPS + 1)}
        counter = AwsCallCounter(pump_names)
        for service in COUNTED_SERVICES:
            counter.attach(runtime.aws().client(service))
        # Tag the calling thread with who is calling (see the module docstring): the webhook's intake, and each
        # handler the pump invokes (scale_up, instance_state).
        intake = runtime.webhook_intake()
        handle = intake.handle
        intake.handle = lambda headers, body: counter.acting_as("webhook", lambda: handle(headers, body))
        invoke = stack.pump._invoke
        stack.pump._invoke = lambda name, handler, event: counter.acting_as(name, lambda: invoke(name, handler, event))

        specs = [
            {"name": f"{pool}-{i}", "stage": "test", "tags": list(tags)}
            for pool, tags in POOL_TAGS.items()
            for i in range(JOBS_PER_POOL)
        ]
        highest: Counter[str] = Counter()
        problems: list[str] = []

        def live() -> dict[str, int]:
            counts = {pool: len(ids) for pool, ids in observer.instances().items()}
            for pool, n in counts.items():
                highest[pool] = max(highest[pool], n)
            return counts

        full = dict.fromkeys(POOL_TAGS, MAX_RUNNERS)
        stop = threading.Event()
        pumps = [
            threading.Thread(target=stack.pump.run, args=(stop,), kwargs={"interval": PUMP_INTERVAL}, name=name)
            for name in sorted(pump_names)
        ]
        for pump in pumps:
            pump.start()
        try:
            aws_0, _ = counter.snapshot()
            gitlab_0 = stack.gitlab.calls
            started = time.perf_counter()
            stack.gitlab.create_pipeline(stack.project_id, specs)
            filled = wait_until(lambda: live() == full, FILL_TIMEOUT, POLL_SECONDS)
            fill_s = time.perf_counter() - started
            aws_1, _ = counter.snapshot()
            gitlab_1 = stack.gitlab.calls
            ever_1 = sum(len(ids) for ids in observer.instances(()).values())
            tail_s: float | None = None
            if not filled:
                problems.append(f"the pools did not fill in {FILL_TIMEOUT:.0f} s: {live()} live")
            else:
                running = observer.instances(("running",))
                finishing = [i for pool in POOL_TAGS for i in running.get(pool, [])[:FINISHING_PER_POOL]]
                tail_started = time.perf_counter()
                terminate_instances(observer.clients.ec2, observer.clients.client("events"), finishing)
                total_jobs = JOBS_PER_POOL * len(POOL_TAGS)
                # Cheap signals first (EC2, the emulator's memory); the table scans confirm the launches.
                signals = wait_until(
                    lambda: live() == full and len(stack.gitlab.runners()) == 2 * MAX_RUNNERS,
                    TAIL_TIMEOUT,
                    POLL_SECONDS,
                )
                left = max(1.0, TAIL_TIMEOUT - (time.perf_counter() - tail_started))
                if signals and wait_until(lambda: observer.launched_jobs(stack.project_id) == total_jobs, left, 1.0):
                    tail_s = time.perf_counter() - tail_started
                else:
                    problems.append(f"the waiting jobs did not all launch in {TAIL_TIMEOUT:.0f} s")
            aws_2, attempts = counter.snapshot()
            gitlab_2 = stack.gitlab.calls
        finally:
            stop.set()
            for pump in pumps:
                pump.join(timeout=30)

        ever_2 = sum(len(ids) for ids in observer.instances(()).values())
        phases = [
            Phase("fill", fill_s, ever_1, aws_1 - aws_0, gitlab_1 - gitlab_0),
            Phase(
                "tail",
                (tail_s or 0.0),
                ever_2 - ever_1,
                aws_2 - aws_1,
                gitlab_2 - gitlab_1,
            ),
        ]
        result = BurstResult(
            phases=phases,
            fill_s=fill_s if filled else None,
            tail_s=tail_s,
            highest=dict(highest),
            instances_ever=ever_2,
            live_at_end={pool: len(ids) for pool, ids in observer.instances().items()},
            runners_at_end=len(stack.gitlab.runners()),
            launched_jobs=observer.launched_jobs(stack.project_id),
            jobs_queue_depth=observer.queue_depth(config.state.jobs_queue),
            dead_letters=observer.queue_depth(config.state.dead_letter_queue),
            attempts=attempts,
            baseline=[],
            problems=problems,
        )
        # The baseline, pumps stopped, against the same moto server (which now holds the burst's instances).
        result.baseline = bare_launches(observer, config)
        return result
    finally:
        stack.stop()


def _per(n: float, d: int) -> float:
    return n / d if d else float("nan")


def aws_table(total: Counter[tuple[str, str, str]], runners: int) -> list[str]:
    """One line per service and operation: calls by side, total, and per launched runner."""
    sides = [s for s in SIDES if any(side == s for side, _, _ in total)]
    by_op: dict[tuple[str, str], Counter[str]] = {}
    for (side, service, op), n in total.items():
        by_op.setdefault((service, op), Counter())[side] += n
    width = max((len(f"{s}.{o}") for s, o in by_op), default=10) + 2
    header = f"    {'operation':<{width}}" + "".join(f"{s:>15}" for s in sides) + f"{'total':>8}{'/runner':>9}"
    lines = [header]
    for service in COUNTED_SERVICES:
        for (svc, op), sides_of in sorted(by_op.items()):
            if svc != service:
                continue
            calls = sum(sides_of.values())
            lines.append(
                f"    {f'{svc}.{op}':<{width}}"
                + "".join(f"{sides_of[s]:>15}" for s in sides)
                + f"{calls:>8}{_per(calls, runners):>9.2f}"
            )
    return lines


def by_service(total: Counter[tuple[str, str, str]], service: str, sides: tuple[str, ...] = SIDES) -> int:
    return sum(n for (side, svc, _), n in total.items() if svc == service and side in sides)


def operations(total: Counter[tuple[str, str, str]], service: str) -> dict[str, int]:
    ops: Counter[str] = Counter()
    for (_, svc, op), n in total.items():
        if svc == service:
            ops[op] += n
    return dict(sorted(ops.items()))


def main() -> None:
    started, load_before = time.perf_counter(), load_average()
    with tempfile.TemporaryDirectory(prefix="bench-burst-") as tmp, quiet_stdout():
        result = run_burst(Path(tmp))

    fill, tail = result.phases
    aws = fill.aws + tail.aws
    gitlab = fill.gitlab + tail.gitlab
    instances = fill.instances + tail.instances
    create_fleet = fill.create_fleet() + tail.create_fleet()
    scale_up_gitlab = fill.scale_up_gitlab() + tail.scale_up_gitlab()
    gitlab_total = sum(gitlab.values())
    fleet_per_instance = _per(create_fleet, instances)
    gitlab_per_runner = _per(scale_up_gitlab, instances)
    bare_s = sum(result.baseline)
    expected = JOBS_PER_POOL * len(POOL_TAGS)
    problems = list(result.problems)
    if result.instances_ever != expected:
        problems.append(f"{result.instances_ever} instances were launched, not {expected} (one per job)")
    if any(n > MAX_RUNNERS for n in result.highest.values()):
        problems.append(f"a pool ran more than {MAX_RUNNERS} instances: {result.highest}")
    if result.launched_jobs != expected:
        problems.append(f"{result.launched_jobs} of {expected} jobs launched")
    if result.dead_letters:
        problems.append(f"{result.dead_letters} messages dead-lettered")
    valid = not problems
    fleet_met = fleet_per_instance <= TARGET_CREATE_FLEET_PER_INSTANCE
    gitlab_met = gitlab_per_runner <= TARGET_GITLAB_CALLS_PER_RUNNER
    ratio = (result.fill_s / bare_s) if result.fill_s and bare_s else float("nan")
    waits = aws[("scale_up", "sqs", "SendMessage")]

    lines = [
        f"scale-up burst: {expected} jobs as webhooks over {len(POOL_TAGS)} pools of max {MAX_RUNNERS},"
        f" {PUMPS} pump threads; {FINISHING_PER_POOL} per pool terminated once full",
        f"  launched instances: {instances} ({fill.instances} fill, {tail.instances} tail);"
        f" highest live per pool {result.highest}; GitLab runners at the end {result.runners_at_end}",
        f"  CreateFleet calls: {create_fleet} ({fill.create_fleet()} fill, {tail.create_fleet()} tail):"
        f" {fleet_per_instance:.3f} per instance (target <= {TARGET_CREATE_FLEET_PER_INSTANCE}):"
        f" {'met' if fleet_met else 'MISSED'};"
        f" mean {_per(instances, create_fleet):.1f} instances per call",
        f"  GitLab API calls by scale-up: {scale_up_gitlab}, {gitlab_per_runner:.2f} per runner"
        f" (target <= {TARGET_GITLAB_CALLS_PER_RUNNER}): {'met' if gitlab_met else 'MISSED'}",
        *(
            f"    {method} {route}: {gitlab[(method, route)]} ({fill.gitlab[(method, route)]} fill,"
            f" {tail.gitlab[(method, route)]} tail), {_per(gitlab[(method, route)], instances):.2f} per runner"
            for method, route in SCALE_UP_ROUTES
        ),
        f"    every GitLab API call: {gitlab_total} ({_per(gitlab_total, instances):.2f} per runner): "
        + ", ".join(f"{m} {r} x{n}" for (m, r), n in sorted(gitlab.items())),
        f"    jobs re-queued by scale-up (mostly waiting for capacity; each re-read from GitLab): {waits}",
        f"  AWS calls on the app's clients, whole run, by side (per runner = total / {instances}):",
        *aws_table(aws, instances),
        "    (webhook: WebhookIntake.handle; scale_up/instance_state: the pump's handler invocations, scale-up's"
        " worker threads included; pump: the event-source polling Lambda does in AWS)",
        "    HTTP attempts by service: " + ", ".join(f"{s} {n}" for s, n in sorted(result.attempts.items())),
        f"  wall time, pipeline created to {2 * MAX_RUNNERS} instances running:"
        f" {_seconds(result.fill_s)} (polled every {POLL_SECONDS} s);"
        f" {len(result.baseline)} bare run_instances one by one: {bare_s:.1f} s"
        f" ({_per(bare_s * 1000, len(result.baseline)):.1f} ms each; first 50 {_mean_ms(result.baseline[:50])},"
        f" last 50 {_mean_ms(result.baseline[-50:])}); ratio burst/bare {ratio:.2f} (no target)",
        f"  tail: terminations to the {2 * FINISHING_PER_POOL} waiting jobs launched: {_seconds(result.tail_s)}",
    ]
    if not valid:
        lines.append("  INVALID: " + "; ".join(problems))
    lines.append(footer(started, load_before))
    figures = {
        "benchmark": "scale_up_burst",
        "jobs": expected,
        "instances_launched": instances,
        "create_fleet_calls": create_fleet,
        "create_fleet_per_instance": round(fleet_per_instance, 4),
        "target_create_fleet_per_instance": TARGET_CREATE_FLEET_PER_INSTANCE,
        "create_fleet_met": fleet_met,
        "gitlab_scale_up_calls": scale_up_gitlab,
        "gitlab_scale_up_calls_per_runner": round(gitlab_per_runner, 3),
        "target_gitlab_calls_per_runner": TARGET_GITLAB_CALLS_PER_RUNNER,
        "gitlab_met": gitlab_met,
        "gitlab_calls_total": gitlab_total,
        "gitlab_calls_by_route": {f"{m} {r}": n for (m, r), n in sorted(gitlab.items())},
        "requeued_by_scale_up": waits,
        "dynamodb_calls": operations(aws, "dynamodb"),
        "ssm_calls": operations(aws, "ssm"),
        "ec2_calls": operations(aws, "ec2"),
        "sqs_calls": operations(aws, "sqs"),
        "dynamodb_per_runner": round(_per(by_service(aws, "dynamodb"), instances), 2),
        "dynamodb_per_runner_scale_up": round(_per(by_service(aws, "dynamodb", ("scale_up",)), instances), 2),
        "dynamodb_per_runner_webhook": round(_per(by_service(aws, "dynamodb", ("webhook",)), instances), 2),
        "ssm_per_runner": round(_per(by_service(aws, "ssm"), instances), 2),
        "fill_s": _round(result.fill_s),
        "bare_run_instances_s": round(bare_s, 2),
        "bare_run_instances": len(result.baseline),
        "fill_over_bare_ratio": round(ratio, 3),
        "tail_s": _round(result.tail_s),
        "highest_live": result.highest,
        "load_average": [load_before, load_average()],
        "valid": valid,
        "met": fleet_met and gitlab_met and valid,
    }
    report(lines, figures)


def _seconds(value: float | None) -> str:
    return "did not finish" if value is None else f"{value:.1f} s"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _mean_ms(values: list[float]) -> str:
    return f"{_per(sum(values) * 1000, len(values)):.1f} ms" if values else "-"


if __name__ == "__main__":
    sys.exit(run_benchmark("scale_up_burst", main))
