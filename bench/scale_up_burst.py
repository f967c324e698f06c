"""Scale-up under a burst: 500 pending jobs over two pools of at most 200 runners, through the real sandbox.

The sandbox (moto server in a child process, the GitLab emulator, the webhook served over HTTP) runs the dev
stage with both pools at max_runners MAX_RUNNERS and no warm runners; two event-pump threads play concurrent
scale-up (and instance-state) invocations. A pipeline of JOBS_PER_POOL jobs tagged [docker, linux] and as many
tagged [docker, dind] is created in the emulator, which delivers real Job Hooks over HTTP (two per job: created,
then pending). Phase "fill": until 400 instances run; the 100 other jobs wait for capacity, and the full pools
are watched for OVERFILL_WATCH_SECONDS, never to pass their limit while those jobs keep asking. Then
FINISHING_PER_POOL instances per pool are terminated (and the state change announced, as AWS would); phase
"tail": until the 100 waiting jobs have launched.

Counted, for every launched runner:

* CreateFleet calls per launched instance (target at most TARGET_CREATE_FLEET_PER_INSTANCE);
* GitLab API calls per launched runner made by scale-up (GET job, POST /user/runners, GET /runners/all, POST
  reset_authentication_token; target at most TARGET_GITLAB_CALLS_PER_RUNNER), from the emulator's own count,
  and every GitLab API call (instance-state's runner deletions too);
* DynamoDB, SSM, IAM, EC2 and SQS calls by operation (runner tokens are DynamoDB items; SSM holds only the
  GitLab token, IAM answers the runner role's id once per process), from a botocore ``before-call`` handler on
  the app's own clients (``runtime.aws()``), split by who made them: the webhook (``WebhookIntake.handle``),
  scale-up and instance-state (the pump's handler invocations), and the pump itself (ReceiveMessage and
  DeleteMessageBatch, which Lambda's event-source mapping makes in AWS).

How it watches, without changing any code: the split wraps two objects of this process at run time (the
webhook intake's ``handle`` and the pump's ``_invoke``) to tag the calling thread; progress is read from the
app's own objects (an ``after-call`` handler on its EC2 client sums the instances CreateFleet made, and
scale-up's ``handle`` is wrapped to sum the jobs its batch reports say it launched), so waiting costs moto
nothing. Polling DescribeInstances or scanning the table while waiting would load moto (whose DynamoDB serves
one request at a time) and this process's interpreter lock, and slow what is measured. DescribeInstances with
the fleet's tag filters confirms the 400 running instances when CreateFleet has made them, and the table, the
queues, EC2 and the emulator are checked once at the end. The benchmark's own calls use clients of their own,
so they are not counted.

Wall time of the fill phase (pipeline creation until CreateFleet has answered with the 400th instance) is
reported against BASELINE_LAUNCHES bare ``run_instances`` calls (MinCount=MaxCount=1, the pool's launch
template by name, alternating pools and subnets) made one by one against the same moto server after the burst.
No target; the ratio is reported. Reports, never fails: exit status 0 whatever the figures.

The run is valid only if the burst kept the rules ``tests/integration/test_burst.py`` checks at a smaller size:
no pool ever past its limit, one instance per job ever, every job launched, nothing dead-lettered, every webhook
answered 200; any broken one is named on the INVALID line.

The sandbox's re-queue delays are its own (RUNNER_FLEET_LEASE_WAIT_SECONDS=2, against 20 by default): a job
waiting for capacity asks again every few seconds here, far more often than it would in AWS.

Run: ``.venv/bin/python bench/scale_up_burst.py`` (or ``make bench``).
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    PROJECT_DIR,
    footer,
    isolate_environment,
    load_average,
    ms,
    quiet_stdout,
    report,
    run_benchmark,
    wait_until,
)

JOBS_PER_POOL = 250
MAX_RUNNERS = 200
POOL_TAGS = {"docker": ("docker", "linux"), "build": ("docker", "dind")}  # pool -> the tags of its jobs
FINISHING_PER_POOL = 50
PUMPS = 2
PUMP_INTERVAL = 0.1
FILL_TIMEOUT = 150.0
TAIL_TIMEOUT = 240.0  # a harness bound, not a target: the tail took 111 s on this machine
BASELINE_LAUNCHES = 2 * MAX_RUNNERS
# How long the full pools are watched for an overfill while the waiting jobs keep asking.
OVERFILL_WATCH_SECONDS = 3.0
TARGET_CREATE_FLEET_PER_INSTANCE = 0.1
TARGET_GITLAB_CALLS_PER_RUNNER = 2.0
SCALE_UP_ROUTES = (
    ("GET", "/projects/:id/jobs/:job_id"),
    ("POST", "/user/runners"),
    ("GET", "/runners/all"),
    ("POST", "/runners/:id/reset_authentication_token"),
)
COUNTED_SERVICES = ("dynamodb", "ssm", "ec2", "sqs", "iam")
SIDES = ("webhook", "scale_up", "instance_state", "pump", "other")


class AwsCallCounter:
    """API calls on the app's botocore clients, by (side, service, operation); HTTP attempts by service; seconds
    spent inside the calls by (service, operation), summed over threads (busy time, not wall time)."""

    def __init__(self, pump_threads: set[str]) -> None:
        self.calls: Counter[tuple[str, str, str]] = Counter()
        self.attempts: Counter[str] = Counter()
        self.seconds: defaultdict[tuple[str, str], float] = defaultdict(float)
        self._pump_threads = pump_threads
        self._lock = threading.Lock()
        self._side = threading.local()

    def attach(self, client: Any) -> None:
        client.meta.events.register("before-call.*", self._before_call)
        client.meta.events.register("after-call.*", self._after_call)
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
        self._side.call_started = time.perf_counter()

    def _after_call(self, event_name: str, **kwargs: Any) -> None:
        _, service, operation = event_name.split(".", 2)
        spent = time.perf_counter() - getattr(self._side, "call_started", time.perf_counter())
        with self._lock:
            self.seconds[(service, operation)] += spent

    def _before_send(self, event_name: str, **kwargs: Any) -> None:
        service = event_name.split(".")[1]
        with self._lock:
            self.attempts[service] += 1

    def snapshot(self) -> tuple[Counter[tuple[str, str, str]], Counter[str], dict[tuple[str, str], float]]:
        with self._lock:
            return Counter(self.calls), Counter(self.attempts), dict(self.seconds)


@dataclass(frozen=True)
class Mark:
    """The counters at one moment."""

    at: float
    instances: int
    aws: Counter[tuple[str, str, str]]
    attempts: Counter[str]
    in_calls: dict[tuple[str, str], float]
    gitlab: Counter[tuple[str, str]]


@dataclass
class Phase:
    """What one phase cost: its wall time, launched instances, and the AWS and GitLab calls made during it."""

    name: str
    seconds: float
    instances: int
    aws: Counter[tuple[str, str, str]]
    attempts: Counter[str]
    in_calls: dict[tuple[str, str], float]
    gitlab: Counter[tuple[str, str]]

    @classmethod
    def between(cls, name: str, first: Mark, last: Mark) -> Phase:
        return cls(
            name,
            last.at - first.at,
            last.instances - first.instances,
            last.aws - first.aws,
            last.attempts - first.attempts,
            {k: v - first.in_calls.get(k, 0.0) for k, v in last.in_calls.items()},
            last.gitlab - first.gitlab,
        )

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
        from chalicelib.scaling.fleet import TAG_FLEET, TAG_POOL

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


class Progress:
    """What the app itself says it did, read from its own objects at no cost to moto: instances CreateFleet made
    (an ``after-call`` handler on the app's EC2 client) and jobs scale-up reported launched (its BatchReport)."""

    def __init__(self) -> None:
        self.instances = 0
        self.launched_jobs = 0
        self.instances_at: dict[int, float] = {}  # instance count -> when CreateFleet answered with it
        self._lock = threading.Lock()

    def attach(self, ec2: Any, scale_up: Any) -> None:
        ec2.meta.events.register("after-call.ec2.CreateFleet", self._fleet_created)
        handle = scale_up.handle

        def counted(jobs: Any) -> Any:
            from chalicelib.scaling.scale_up import Outcome

            batch = handle(jobs)
            with self._lock:
                self.launched_jobs += batch.outcomes.get(Outcome.LAUNCHED, 0)
            return batch

        scale_up.handle = counted

    def _fleet_created(self, parsed: dict[str, Any], **kwargs: Any) -> None:
        made = sum(len(entry.get("InstanceIds") or ()) for entry in parsed.get("Instances") or ())
        with self._lock:
            self.instances += made
            self.instances_at[self.instances] = time.perf_counter()

    def reached(self, instances: int) -> float | None:
        """When the instance count first reached ``instances`` (perf_counter), or None."""
        with self._lock:
            return min((at for n, at in self.instances_at.items() if n >= instances), default=None)


@dataclass
class BurstResult:
    phases: list[Phase]
    fill_s: float | None
    fill_confirmed: dict[str, int]
    describe_s: float
    tail_s: float | None
    instances_ever: int
    live_at_end: dict[str, int]
    runners_at_end: int
    launched_jobs: int
    jobs_queue_depth: int
    dead_letters: int
    deliveries: list[Any]
    baseline: list[float]
    stages_s: dict[str, float]
    problems: list[str]


class Burst:
    """The sandbox, the counters attached to the app's objects, and the two phases of the burst."""

    def __init__(self, workdir: Path) -> None:
        from fleetctl.sandbox.stack import Sandbox

        isolate_environment()
        # No runner agents: the burst measures launching, and counts instances as scale-up made them; agents would
        # run the jobs and power instances off meanwhile.
        self.stack = Sandbox(config_path=burst_config(workdir), workdir=workdir, run_pump=False, agents=False)
        self.pump_names = {f"bench-pump-{n}" for n in range(1, PUMPS + 1)}
        self.counter = AwsCallCounter(self.pump_names)
        self.progress = Progress()
        self.problems: list[str] = []
        self.stages: dict[str, float] = {}
        self.deliveries_before = 0
        self.stop_parts: dict[str, float] = {}

    def start(self) -> None:
        from chalicelib import runtime

        began = time.perf_counter()
        self.stack.start()
        config = self.stack.config
        assert config is not None
        self.config = config
        self.observer = Observer(config.fleet, config.state.table)
        for service in COUNTED_SERVICES:
            self.counter.attach(runtime.aws().client(service))
        # Tag the calling thread with who is calling (see the module docstring): the webhook's intake, and each
        # handler the pump invokes (scale_up, instance_state).
        counter, intake = self.counter, runtime.webhook_intake()
        handle, invoke = intake.handle, self.stack.pump._invoke
        intake.handle = lambda headers, body: counter.acting_as("webhook", lambda: handle(headers, body))  # type: ignore[method-assign]
        self.stack.pump._invoke = lambda name, handler, event: counter.acting_as(
            name, lambda: invoke(name, handler, event)
        )
        self.progress.attach(runtime.aws().ec2, runtime.scale_up())
        self.stages["sandbox start"] = time.perf_counter() - began

    def run(self) -> BurstResult:
        stop = threading.Event()
        pumps = [
            threading.Thread(target=self.stack.pump.run, args=(stop,), kwargs={"interval": PUMP_INTERVAL}, name=name)
            for name in sorted(self.pump_names)
        ]
        for pump in pumps:
            pump.start()
        try:
            self.deliveries_before = len(self.stack.gitlab.deliveries)
            start = self._mark()
            fill_s, confirmed, describe_s = self._fill(start.at)
            filled = self._mark()
            tail_s = self._tail() if fill_s is not None else None
            end = self._mark()
        finally:
            stop.set()
            for pump in pumps:
                pump.join(timeout=30)
        phases = [Phase.between("fill", start, filled), Phase.between("tail", filled, end)]
        self.stages["fill"], self.stages["tail"] = phases[0].seconds, phases[1].seconds
        return self._collect(phases, fill_s, confirmed, describe_s, tail_s)

    def _mark(self) -> Mark:
        aws, attempts, in_calls = self.counter.snapshot()
        return Mark(time.perf_counter(), self.progress.instances, aws, attempts, in_calls, self.stack.gitlab.calls)

    def _fill(self, started: float) -> tuple[float | None, dict[str, int], float]:
        """Create the pipeline; wait until CreateFleet has made 400 instances, then see them run in EC2."""
        target = MAX_RUNNERS * len(POOL_TAGS)
        self.stack.gitlab.create_pipeline(self.stack.project_id, self._specs())
        if not wait_until(lambda: self.progress.instances >= target, FILL_TIMEOUT, 0.05):
            self.problems.append(f"the pools did not fill in {FILL_TIMEOUT:.0f} s: {self.progress.instances} made")
            return None, {}, 0.0
        reached = self.progress.reached(target)
        assert reached is not None
        before = time.perf_counter()
        confirmed = self._live()
        describe_s = time.perf_counter() - before
        if confirmed != dict.fromkeys(POOL_TAGS, MAX_RUNNERS):
            self.problems.append(f"DescribeInstances shows {confirmed} running when CreateFleet had made {target}")
        # The waiting jobs keep asking for capacity: the full pools must stay full, never overfill.
        time.sleep(OVERFILL_WATCH_SECONDS)
        if self.progress.instances > target:
            self.problems.append(
                f"the full pools overfilled: {self.progress.instances} instances made while {target} were allowed"
            )
        return reached - started, confirmed, describe_s

    def _tail(self) -> float | None:
        """Terminate FINISHING_PER_POOL instances per pool (announcing it, as AWS would); wait for the waiters."""
        from fleetctl.sandbox.ec2_events import terminate_instances

        running = self.observer.instances(("running",))
        finishing = [i for pool in POOL_TAGS for i in running.get(pool, [])[:FINISHING_PER_POOL]]
        began = time.perf_counter()
        terminate_instances(self.observer.clients.ec2, finishing)
        total = JOBS_PER_POOL * len(POOL_TAGS)
        if wait_until(lambda: self.progress.launched_jobs >= total, TAIL_TIMEOUT, 0.1):
            return time.perf_counter() - began
        self.problems.append(
            f"the waiting jobs did not all launch in {TAIL_TIMEOUT:.0f} s:"
            f" {self.progress.launched_jobs} of {total} jobs launched"
        )
        return None

    def _collect(
        self,
        phases: list[Phase],
        fill_s: float | None,
        confirmed: dict[str, int],
        describe_s: float,
        tail_s: float | None,
    ) -> BurstResult:
        config, observer = self.config, self.observer
        began = time.perf_counter()
        result = BurstResult(
            phases=phases,
            fill_s=fill_s,
            fill_confirmed=confirmed,
            describe_s=describe_s,
            tail_s=tail_s,
            instances_ever=sum(len(ids) for ids in observer.instances(()).values()),
            live_at_end=self._live(),
            runners_at_end=len(self.stack.gitlab.runners()),
            launched_jobs=observer.launched_jobs(self.stack.project_id),
            jobs_queue_depth=observer.queue_depth(config.state.jobs_queue),
            dead_letters=observer.queue_depth(config.state.dead_letter_queue),
            deliveries=self.stack.gitlab.deliveries[self.deliveries_before :],
            baseline=[],
            stages_s=self.stages,
            problems=self.problems,
        )
        self.stages["checks"] = time.perf_counter() - began
        # The baseline, pumps stopped, against the same moto server (which now holds the burst's instances).
        began = time.perf_counter()
        result.baseline = bare_launches(observer, config)
        self.stages["baseline"] = time.perf_counter() - began
        return result

    def stop(self) -> None:
        began = time.perf_counter()
        # Each part's share of the stop, timed through instance-level wrappers.
        parts: list[tuple[str, Any]] = [
            ("moto", self.stack.aws),
            ("emulator", self.stack.gitlab),
            ("webhook server", self.stack.server),
        ]
        for name, part in parts:
            if part is not None:
                part.stop = self._timed(f"stop {name}", part.stop)
        self.stack.stop()
        self.stages["sandbox stop"] = time.perf_counter() - began
        self.stages.update(self.stop_parts)

    def _timed(self, name: str, work: Callable[[], None]) -> Callable[[], None]:
        def timed() -> None:
            began = time.perf_counter()
            try:
                work()
            finally:
                self.stop_parts[name] = time.perf_counter() - began

        return timed

    def _live(self) -> dict[str, int]:
        return {pool: len(ids) for pool, ids in sorted(self.observer.instances().items())}

    @staticmethod
    def _specs() -> list[dict[str, Any]]:
        return [
            {"name": f"{pool}-{i}", "stage": "test", "tags": list(tags)}
            for pool, tags in POOL_TAGS.items()
            for i in range(JOBS_PER_POOL)
        ]


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


def run_burst(workdir: Path) -> BurstResult:
    burst = Burst(workdir)
    try:
        burst.start()
        return burst.run()
    finally:
        burst.stop()


def _per(n: float, d: int) -> float:
    return n / d if d else float("nan")


def aws_table(total: Counter[tuple[str, str, str]], in_calls: dict[tuple[str, str], float], runners: int) -> list[str]:
    """One line per service and operation: calls by side, total, per launched runner, seconds inside the calls."""
    sides = [s for s in SIDES if any(side == s for side, _, _ in total)]
    by_op: dict[tuple[str, str], Counter[str]] = {}
    for (side, service, op), n in total.items():
        by_op.setdefault((service, op), Counter())[side] += n
    width = max((len(f"{s}.{o}") for s, o in by_op), default=10) + 2
    header = (
        f"    {'operation':<{width}}"
        + "".join(f"{s:>15}" for s in sides)
        + f"{'total':>8}{'/runner':>9}{'s in call':>11}"
    )
    lines = [header]
    for service in COUNTED_SERVICES:
        for (svc, op), sides_of in sorted(by_op.items()):
            if svc != service:
                continue
            calls = sum(sides_of.values())
            lines.append(
                f"    {f'{svc}.{op}':<{width}}"
                + "".join(f"{sides_of[s]:>15}" for s in sides)
                + f"{calls:>8}{_per(calls, runners):>9.2f}{in_calls.get((svc, op), 0.0):>11.1f}"
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
    attempts = fill.attempts + tail.attempts
    in_calls = {k: fill.in_calls.get(k, 0.0) + tail.in_calls.get(k, 0.0) for k in {*fill.in_calls, *tail.in_calls}}
    gitlab = fill.gitlab + tail.gitlab
    instances = fill.instances + tail.instances
    create_fleet = fill.create_fleet() + tail.create_fleet()
    scale_up_gitlab = fill.scale_up_gitlab() + tail.scale_up_gitlab()
    gitlab_total = sum(gitlab.values())
    fleet_per_instance = _per(create_fleet, instances)
    gitlab_per_runner = _per(scale_up_gitlab, instances)
    bare_s = sum(result.baseline)
    expected = JOBS_PER_POOL * len(POOL_TAGS)
    full = dict.fromkeys(sorted(POOL_TAGS), MAX_RUNNERS)
    problems = list(result.problems)
    if result.instances_ever != expected:
        problems.append(f"{result.instances_ever} instances were launched, not {expected} (one per job)")
    if result.live_at_end != full:
        problems.append(f"{result.live_at_end} instances live at the end, not {full}")
    if result.launched_jobs != expected:
        problems.append(f"the table shows {result.launched_jobs} of {expected} jobs launched")
    if result.dead_letters:
        problems.append(f"{result.dead_letters} messages dead-lettered")
    refused = [d for d in result.deliveries if d.status_code != 200]
    if refused:
        problems.append(f"{len(refused)} webhook deliveries not answered 200")
    valid = not problems
    fleet_met = fleet_per_instance <= TARGET_CREATE_FLEET_PER_INSTANCE
    gitlab_met = gitlab_per_runner <= TARGET_GITLAB_CALLS_PER_RUNNER
    ratio = (result.fill_s / bare_s) if result.fill_s and bare_s else float("nan")
    requeued = aws[("scale_up", "sqs", "SendMessage")]
    rereads = gitlab[SCALE_UP_ROUTES[0]] - expected
    durations = sorted(d.duration for d in result.deliveries) or [0.0]

    lines = [
        f"scale-up burst: {expected} jobs as webhooks over {len(POOL_TAGS)} pools of max {MAX_RUNNERS},"
        f" {PUMPS} pump threads; {FINISHING_PER_POOL} per pool terminated once full",
        f"  launched instances: {instances} ({fill.instances} fill, {tail.instances} tail); at the end"
        f" {result.live_at_end} live, {result.instances_ever} ever, {result.runners_at_end} GitLab runners,"
        f" {result.launched_jobs} jobs launched in the table, {result.jobs_queue_depth} messages queued,"
        f" {result.dead_letters} dead-lettered",
        f"  webhook deliveries: {len(result.deliveries)} (created + pending per job),"
        f" {len(result.deliveries) - len(refused)} answered 200; median {ms(durations[len(durations) // 2])},"
        f" p95 {ms(durations[int(len(durations) * 0.95) - 1 if len(durations) > 1 else 0])}",
        f"  CreateFleet calls: {create_fleet} ({fill.create_fleet()} fill, {tail.create_fleet()} tail):"
        f" {fleet_per_instance:.3f} per instance (target <= {TARGET_CREATE_FLEET_PER_INSTANCE}):"
        f" {_verdict(fleet_met)}; {_per(fill.instances, fill.create_fleet()):.1f} instances per call in the fill,"
        f" {_per(tail.instances, tail.create_fleet()):.1f} in the tail",
        f"  GitLab API calls by scale-up: {scale_up_gitlab}, {gitlab_per_runner:.2f} per runner"
        f" (target <= {TARGET_GITLAB_CALLS_PER_RUNNER}): {_verdict(gitlab_met)}",
        *(
            f"    {method} {route}: {gitlab[(method, route)]} ({fill.gitlab[(method, route)]} fill,"
            f" {tail.gitlab[(method, route)]} tail), {_per(gitlab[(method, route)], instances):.2f} per runner"
            for method, route in SCALE_UP_ROUTES
        ),
        f"    re-reads of jobs already read once (re-queued jobs asking again): {rereads};"
        f" jobs re-queued by scale-up: {requeued}",
        f"    every GitLab API call: {gitlab_total} ({_per(gitlab_total, instances):.2f} per runner): "
        + ", ".join(f"{m} {r} x{n}" for (m, r), n in sorted(gitlab.items())),
        f"  AWS calls on the app's clients, whole burst, by side (per runner = total / {instances}):",
        *aws_table(aws, in_calls, instances),
        "    (webhook: WebhookIntake.handle; scale_up, instance_state: the pump's handler invocations, scale-up's",
        "    worker threads included; pump: the polling Lambda's event-source mapping does in AWS; s in call: summed",
        "    over threads, moto serves DynamoDB one request at a time)",
        "    HTTP attempts by service: " + ", ".join(f"{s} {n}" for s, n in sorted(attempts.items())),
        f"    fill phase: DynamoDB {_busy(fill, 'dynamodb'):.1f} s in call over {fill.seconds:.0f} s"
        f" ({by_service(fill.aws, 'dynamodb')} calls, {_per(by_service(fill.aws, 'dynamodb'), fill.instances):.2f}"
        f" per runner); tail: {_busy(tail, 'dynamodb'):.1f} s over {tail.seconds:.0f} s",
        f"  wall time, pipeline created to {2 * MAX_RUNNERS} instances made: {_seconds(result.fill_s)}"
        f" (DescribeInstances then showed {result.fill_confirmed} running, in {ms(result.describe_s)})",
        f"    {len(result.baseline)} bare run_instances one by one, same moto: {bare_s:.1f} s"
        f" ({_mean_ms(result.baseline)} each; first 50 {_mean_ms(result.baseline[:50])},"
        f" last 50 {_mean_ms(result.baseline[-50:])}); ratio burst/bare {ratio:.2f} (no target)",
        f"  tail, terminations to the {2 * FINISHING_PER_POOL} waiting jobs launched: {_seconds(result.tail_s)}",
        "  stages: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result.stages_s.items()),
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
        "gitlab_job_rereads": rereads,
        "gitlab_calls_total": gitlab_total,
        "gitlab_calls_by_route": {f"{m} {r}": n for (m, r), n in sorted(gitlab.items())},
        "requeued_by_scale_up": requeued,
        "dynamodb_calls": operations(aws, "dynamodb"),
        "dynamodb_in_call_s": round(_busy(fill, "dynamodb") + _busy(tail, "dynamodb"), 1),
        "ssm_calls": operations(aws, "ssm"),
        "iam_calls": operations(aws, "iam"),
        "ec2_calls": operations(aws, "ec2"),
        "sqs_calls": operations(aws, "sqs"),
        "dynamodb_per_runner": round(_per(by_service(aws, "dynamodb"), instances), 2),
        "dynamodb_per_runner_webhook": round(_per(by_service(aws, "dynamodb", ("webhook",)), instances), 2),
        "dynamodb_per_runner_scale_up": round(_per(by_service(aws, "dynamodb", ("scale_up",)), instances), 2),
        "dynamodb_per_runner_instance_state": round(
            _per(by_service(aws, "dynamodb", ("instance_state",)), instances), 2
        ),
        "ssm_per_runner": round(_per(by_service(aws, "ssm"), instances), 2),
        "webhook_deliveries": len(result.deliveries),
        "fill_s": _round(result.fill_s),
        "bare_run_instances_s": round(bare_s, 2),
        "bare_run_instances": len(result.baseline),
        "fill_over_bare_ratio": round(ratio, 3),
        "tail_s": _round(result.tail_s),
        "load_average": [load_before, load_average()],
        "valid": valid,
        "met": fleet_met and gitlab_met and valid,
    }
    report(lines, figures)


def _busy(phase: Phase, service: str) -> float:
    return sum(seconds for (svc, _), seconds in phase.in_calls.items() if svc == service)


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def _seconds(value: float | None) -> str:
    return "did not finish" if value is None else f"{value:.1f} s"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _mean_ms(values: list[float]) -> str:
    return f"{_per(sum(values) * 1000, len(values)):.1f} ms" if values else "-"


if __name__ == "__main__":
    sys.exit(run_benchmark("scale_up_burst", main))
