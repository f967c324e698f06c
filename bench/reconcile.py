"""Reconcile at scale: its AWS and GitLab calls per run, and its wall time, over fleets of 100 and 1,000 runners.

One sandbox (moto server in a child process, the GitLab emulator; no runner agents, no event pump) runs a copy of
the dev stage file whose pools (docker and build) allow MAX_RUNNERS each and keep no warm runners. The fleet is
made directly, as scale-up would leave it, in a fraction of the time launching it would take. Per batch of at most
RUN_BATCH instances of one pool: ``CapacityStore.acquire_leases`` (the launch and its leases); one EC2 RunInstances
from the pool's launch template, carrying the fleet, pool and launch tags; the runner records as
``RunnerStore.record_runners`` writes them (``RunnerRecord.new_item``, the launch's leases moved onto them), though
not in its transaction, for which moto copies the whole table once per item; ``finish_launch``. Then, for each
instance, a GitLab runner made with the fleet's own ``GitLabApi.create_runner`` (described by
``runner_description``) and ``set_runner_identity``. A healthy runner has contacted GitLab (``POST /runners/verify``
with its token, as ``gitlab-runner verify`` does, then ``POST /jobs/request``, which is what GitLab counts as contact)
and, in a pool whose runners take more than one build, finished
one job (``runner_finished_job``, as its Job Hook would record it); an ephemeral pool's runner waits for its one
job. Either way it is idle, hours from its retirement point. BOOTING runners per fleet never contact GitLab and
keep their token item, as an instance hung at boot does; they are young, so a run on the real clock leaves them
alone.

Four cases, the fleet grown from 100 to 1,000 runners between the second and the third:

* N runners, 0 needing action: REPEATS runs of ``Reconciler.run()`` on the real clock; every run must act on
  nothing;
* N runners, 10 needing action: LOST instances terminated in EC2 with no event reaching the fleet (their records
  are "lost instances"), and the BOOTING never-contacted runners, past their boot deadline on a clock moved
  CLOCK_OFFSET seconds ahead; one run, which must report exactly OrphansReaped.LostInstance = LOST and
  OrphansReaped.NeverContacted = BOOTING, and nothing else. Afterwards their records must have left the index,
  their GitLab runners be gone and the never-contacted instances be terminated, every other runner untouched.

Measured per run: AWS calls by operation, from a botocore ``before-call`` handler on a dedicated
``chalicelib.aws.AwsClients`` given to ``build_reconciler`` (the benchmark's own calls use other clients, never
counted), and GitLab API calls by route, from the emulator's own count diffed around the run (nothing else talks
to the emulator meanwhile). Target: calls grow with the pages of the fleet and with the runners needing action,
never one call per runner. The expected pages are computed independently of the run: each kind's Query pages of the
``fleet-records`` index (the items' DynamoDB sizes against Query's 1 MB page), DescribeInstances pages of 1,000
live instances, GitLab runner listing pages of 100, one pending-jobs page per connected project and one read of each
connected hook (up to HOOK_CHECKS a run). A case meets
the target when its calls are at most those pages plus FIXED_AWS_CALLS (the run lease taken and released, one
DescribeLaunchTemplates) plus AWS_PER_ACTION AWS calls and GITLAB_PER_ACTION GitLab calls per runner acted on.

Then the sweep for lost Job Hooks, for SWEEP_PROJECT_COUNTS connected projects (each with its hook record, none
with a pending job): one run's GitLab calls and the sweep's wall time, and how many runs bring every project round,
against the baseline of listing every active project's pending jobs one after another (what the sweep did before
it was bounded); the ratio is printed. Invalid when the projects are not all active, or the calls are not the
bound's (at most SWEEP_PROJECTS a run) and the baseline's one per project.

Wall time of one run (the median of REPEATS for the no-action case), of ``reconciler.facts.gather()`` alone, and
the seconds the run spent inside its AWS calls (an ``after-call`` handler; the rest is GitLab and the app itself),
are reported against the baseline: one unfiltered DescribeInstances of every instance (terminated ones included),
paginated 1,000 a page as reconcile's own, on another client in the same process, listed before each run (the
median). No target; the ratio is printed. The baseline is reported invalid when reconcile no longer makes a
DescribeInstances call, or when the baseline's calls are not DescribeInstances alone, or it does not list the
fleet's live instances as the benchmark made them. The reconciler's and the baseline's clients have the Lambda's
configuration but a longer read timeout: moto answers a page of 1,000 instances in more than the Lambda's 5 s.
Reports, never fails: exit status 0 whatever the figures.

Run: ``.venv/bin/python bench/reconcile.py`` (or ``make bench``).
"""

from __future__ import annotations

import itertools
import math
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from _common import (
    PROJECT_DIR,
    footer,
    isolate_environment,
    load_average,
    median,
    ms,
    quiet_stdout,
    report,
    run_benchmark,
)

FLEETS = (100, 1000)
LOST = 5  # instances terminated without their event reaching the fleet
BOOTING = 5  # runners that never contact GitLab
NEEDING_ACTION = LOST + BOOTING
POOLS = ("docker", "build")
MAX_RUNNERS = 1000  # the most a stage file allows per pool; the fleet is spread over both
RUN_BATCH = 50  # instances per RunInstances call and per launch
SETUP_WORKERS = 8
SETUP_READ_TIMEOUT = 120
RUN_READ_TIMEOUT = 60
REPEATS = 2
# Past every boot deadline of the dev stage (600 s) and the instance visibility window (120 s), hours short of
# any runner's retirement point (max lifetime 720 min).
CLOCK_OFFSET = 900.0
QUERY_PAGE_BYTES = 1024 * 1024  # DynamoDB Query's page
INSTANCE_PAGE = 1000  # reconcile's DescribeInstances page size, and the baseline's
RUNNER_PAGE = 100  # GitLab's listing page, as GitLabApi.runners asks for it
# The kinds reconcile reads from the fleet-records index.
LIVE_KINDS = ("runner", "launch", "pool", "job", "hook", "image")
# The run lease's PutItem and DeleteItem, one DescribeLaunchTemplates, one Query of the token-deadlines index.
FIXED_AWS_CALLS = 4
AWS_PER_ACTION = 6  # record, lease, token and cleanup writes, and a TerminateInstances
GITLAB_PER_ACTION = 2  # deleting its runner, plus room for a retry
COUNTED_SERVICES = ("dynamodb", "ec2", "sqs", "ssm", "iam")
LIVE_INSTANCE_STATES = ("pending", "running", "shutting-down", "stopping", "stopped")
SWEEP_PROJECT_COUNTS = (10, 100, 1000)  # connected projects the sweep's cost is stated for


class CallCounter:
    """API calls made on some botocore clients, by ``service.Operation`` (a ``before-call`` handler), and the
    seconds spent inside them (until ``after-call``), summed over threads."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self._lock = threading.Lock()
        self._local = threading.local()

    def attach(self, client: Any) -> None:
        client.meta.events.register("before-call.*", self._before_call)
        client.meta.events.register("after-call.*", self._after_call)

    def _before_call(self, event_name: str, **kwargs: Any) -> None:
        _, service, operation = event_name.split(".", 2)
        with self._lock:
            self.calls[f"{service}.{operation}"] += 1
        self._local.started = time.perf_counter()

    def _after_call(self, event_name: str, **kwargs: Any) -> None:
        _, service, operation = event_name.split(".", 2)
        spent = time.perf_counter() - getattr(self._local, "started", time.perf_counter())
        with self._lock:
            self.seconds[f"{service}.{operation}"] += spent

    def snapshot(self) -> tuple[Counter[str], dict[str, float]]:
        with self._lock:
            return Counter(self.calls), dict(self.seconds)


def stage_config(workdir: Path) -> Path:
    """A copy of the dev stage file: both pools at MAX_RUNNERS, no warm runners."""
    import yaml

    document = yaml.safe_load((PROJECT_DIR / "chalicelib" / "stages" / "dev.yaml").read_text())
    names = {pool["name"] for pool in document["pools"]}
    if not set(POOLS) <= names:
        raise RuntimeError(f"dev.yaml has pools {sorted(names)}; the benchmark assumes {list(POOLS)}")
    for pool in document["pools"]:
        pool["max_runners"] = MAX_RUNNERS
        pool["warm"] = {"size": 0, "windows": []}
    path = workdir / "reconcile.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def item_size(item: Mapping[str, Any]) -> int:
    """An item's size as DynamoDB counts it against a page: attribute names plus values (numbers as their
    significant digits, about one byte per two, plus one), sets and lists with their members."""
    return sum(len(name.encode()) + _value_size(value) for name, value in item.items())


def _value_size(value: Any) -> int:
    if isinstance(value, bool) or value is None:
        return 1
    if isinstance(value, int | float | Decimal):
        digits = len(str(abs(Decimal(str(value)))).replace(".", "").lstrip("0")) or 1
        return 1 + math.ceil(digits / 2)
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, set | frozenset | list | tuple):
        return 3 + sum(_value_size(member) for member in value)
    if isinstance(value, Mapping):
        return 3 + item_size(value)
    return len(str(value).encode())


@dataclass
class Expected:
    """The pages of the fleet as the benchmark counts them, before the run."""

    query_pages: dict[str, int]
    instance_pages: int
    runner_pages: int
    pending_pages: int
    hook_reads: int
    live_instances: int
    records: int
    gitlab_runners: int

    @property
    def aws_pages(self) -> int:
        return sum(self.query_pages.values()) + self.instance_pages

    @property
    def gitlab_pages(self) -> int:
        return self.runner_pages + self.pending_pages + self.hook_reads

    def aws_limit(self, actions: int) -> int:
        return self.aws_pages + FIXED_AWS_CALLS + AWS_PER_ACTION * actions

    def gitlab_limit(self, actions: int) -> int:
        return self.gitlab_pages + GITLAB_PER_ACTION * actions


@dataclass(frozen=True)
class Baseline:
    """One unfiltered DescribeInstances listing: its seconds, instances listed (every state, every tag), the
    fleet's live ones among them, and the calls it made."""

    seconds: float
    listed: int
    live: int
    calls: Counter[str]


@dataclass(frozen=True)
class RunSample:
    """One ``Reconciler.run()``: its seconds, report, AWS calls and seconds inside them, GitLab calls."""

    seconds: float
    report: Any
    aws: Counter[str]
    in_aws: dict[str, float]
    gitlab: Counter[str]


@dataclass
class Case:
    runners: int
    needing_action: int
    expected: Expected
    runs: list[RunSample]
    gather_s: float
    baseline_s: list[float]
    baseline_instances: int
    baseline_calls: Counter[str]
    known_live: int  # the fleet's live instances as the benchmark made and terminated them
    problems: list[str] = field(default_factory=list)

    @property
    def actions(self) -> int:
        return self.needing_action

    @property
    def run_s(self) -> list[float]:
        return [run.seconds for run in self.runs]

    @property
    def aws(self) -> Counter[str]:
        """The last run's AWS calls (the no-action runs all make the same)."""
        return self.runs[-1].aws

    @property
    def gitlab(self) -> Counter[str]:
        return self.runs[-1].gitlab

    @property
    def metrics(self) -> dict[str, int]:
        return dict(self.runs[-1].report.metrics)

    @property
    def in_aws_s(self) -> float:
        return median([sum(run.in_aws.values()) for run in self.runs])

    def slowest_aws(self) -> list[tuple[str, float]]:
        return sorted(self.runs[-1].in_aws.items(), key=lambda pair: -pair[1])[:3]

    @property
    def aws_calls(self) -> int:
        return sum(self.aws.values())

    @property
    def gitlab_calls(self) -> int:
        return sum(self.gitlab.values())

    @property
    def aws_met(self) -> bool:
        return self.aws_calls <= self.expected.aws_limit(self.actions)

    @property
    def gitlab_met(self) -> bool:
        return self.gitlab_calls <= self.expected.gitlab_limit(self.actions)

    def baseline_problems(self) -> list[str]:
        problems = []
        if not self.aws["ec2.DescribeInstances"]:
            problems.append("reconcile made no DescribeInstances call, the call the baseline stands for")
        if set(self.baseline_calls) != {"ec2.DescribeInstances"}:
            problems.append(f"the baseline made {dict(self.baseline_calls)}, not DescribeInstances alone")
        if self.expected.live_instances != self.known_live:
            problems.append(
                f"the baseline listed {self.expected.live_instances} live instances of the fleet, which has"
                f" {self.known_live}"
            )
        return problems

    @property
    def ratio(self) -> float:
        return median(self.run_s) / median(self.baseline_s)


class Bench:
    """The sandbox, the fleet made in it, and the reconciler on counted clients."""

    def __init__(self, workdir: Path) -> None:
        from fleetctl.sandbox.stack import SANDBOX_GROUP, Sandbox

        isolate_environment()
        self.stack = Sandbox(config_path=stage_config(workdir), workdir=workdir, run_pump=False, agents=False)
        self.stack_group = SANDBOX_GROUP
        self.stages: dict[str, float] = {}
        self._jobs = itertools.count(1)
        self._booting: list[str] = []  # never-contacted runners not reaped yet
        self._healthy: list[str] = []

    def start(self) -> None:
        from botocore.config import Config

        from chalicelib.aws import DEFAULT_CONFIG, AwsClients
        from chalicelib.gitlab_api import GitLabApi
        from chalicelib.lifecycle.reconcile import build_reconciler
        from chalicelib.naming import FleetOwner, runner_role_name
        from chalicelib.scaling.scale_up import build_scale_up
        from chalicelib.scaling.store import ScaleStore
        from chalicelib.scaling.tokens import RunnerRoles, RunnerTokens
        from fleetctl.sandbox.local_aws import SANDBOX_REGION
        from fleetctl.sandbox.stack import GITLAB_FLEET_TOKEN

        began = time.perf_counter()
        self.stack.start()
        config = self.stack.config
        assert config is not None
        self.config = config
        # The benchmark's own clients (never counted), the reconciler's (counted) and the baseline's.
        # moto copies the whole table once per item of a transaction, so a launch's record_runners takes seconds
        # once the table holds a large fleet: the benchmark's own client waits for it rather than retrying.
        self.own = AwsClients(
            config=Config(retries={"mode": "standard", "max_attempts": 3}, read_timeout=SETUP_READ_TIMEOUT),
            region=SANDBOX_REGION,
        )
        self.store = ScaleStore(config.state.table, self.own.dynamodb)
        self.owner = FleetOwner(config.fleet, config.state.table, lambda: self.own.client("sts"))
        self.tokens = RunnerTokens(
            self.own.dynamodb,
            config.state.table,
            RunnerRoles(self.own.client("iam"), {p.name: runner_role_name(config.fleet, p.name) for p in config.pools}),
        )
        self.gitlab_api = GitLabApi(
            self.stack.gitlab.url,
            lambda: GITLAB_FLEET_TOKEN,
            runner_type=config.gitlab.runner_type,
            owner_id=config.gitlab.runner_owner_id,
        )
        # The Lambda's client configuration, but for the read timeout: moto takes longer than its 5 s to answer a
        # DescribeInstances page of 1,000 instances (AWS does not), and the run would stop on "facts unreadable".
        run_config = DEFAULT_CONFIG.merge(Config(read_timeout=RUN_READ_TIMEOUT))
        self.counted = AwsClients(config=run_config, region=SANDBOX_REGION)
        self.counter = CallCounter()
        for service in COUNTED_SERVICES:
            self.counter.attach(self.counted.client(service))
        self.baseline_ec2 = AwsClients(config=run_config, region=SANDBOX_REGION).ec2
        self.baseline_counter = CallCounter()
        self.baseline_counter.attach(self.baseline_ec2)
        counted, api = self.counted, self.gitlab_api

        def reconciler(offset: float) -> Any:
            return build_reconciler(
                config,
                counted,
                api,
                lambda: build_scale_up(config, counted, api),
                clock=lambda: time.time() + offset,
            )

        self.reconciler = reconciler
        self.stages["sandbox start"] = time.perf_counter() - began

    def stop(self) -> None:
        began = time.perf_counter()
        self.stack.stop()
        self.stages["sandbox stop"] = time.perf_counter() - began

    # -- the fleet ---------------------------------------------------------------------------------------------

    def grow(self, healthy: int, booting: int) -> None:
        """Add ``healthy`` idle runners and ``booting`` never-contacted ones, spread over the pools."""
        began = time.perf_counter()
        wanted = [(True, n) for n in range(healthy)] + [(False, n) for n in range(booting)]
        by_pool: dict[str, list[bool]] = {name: [] for name in POOLS}
        for index, (contacted, _) in enumerate(wanted):
            by_pool[POOLS[index % len(POOLS)]].append(contacted)
        made: list[tuple[Any, str, bool]] = []
        for name, contacts in by_pool.items():
            pool = self.config.pool(name)
            for start in range(0, len(contacts), RUN_BATCH):
                batch = contacts[start : start + RUN_BATCH]
                ids = self._launch(pool, len(batch), subnet=pool.subnets[(start // RUN_BATCH) % len(pool.subnets)])
                made += [(pool, instance_id, contacted) for instance_id, contacted in zip(ids, batch, strict=True)]
        with ThreadPoolExecutor(max_workers=SETUP_WORKERS) as workers:
            list(workers.map(lambda each: self._runner(*each), made))
        self._healthy += [instance_id for _, instance_id, contacted in made if contacted]
        self._booting += [instance_id for _, instance_id, contacted in made if not contacted]
        self.stages[f"grow by {healthy + booting}"] = time.perf_counter() - began

    def _launch(self, pool: Any, count: int, subnet: str) -> list[str]:
        """A launch of ``count`` instances of ``pool``, as scale-up leaves it: leases, instances, records, done."""
        from chalicelib.naming import FLEET_TAG, LAUNCH_TAG, POOL_TAG, launch_template_name
        from chalicelib.scaling.store.records import RunnerRecord

        fleet = self.config.fleet
        launch_id = uuid.uuid4().hex
        granted = self.store.capacity.acquire_leases(pool.name, count, pool.max_runners, launch_id)
        if granted != count:
            raise RuntimeError(f"pool {pool.name} granted {granted} of {count} leases")
        tags = [
            {"Key": FLEET_TAG, "Value": fleet},
            {"Key": POOL_TAG, "Value": pool.name},
            {"Key": LAUNCH_TAG, "Value": launch_id},
        ]
        answer = self.own.ec2.run_instances(
            MinCount=count,
            MaxCount=count,
            LaunchTemplate={"LaunchTemplateName": launch_template_name(fleet, pool.name)},
            SubnetId=subnet,
            TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
        )
        instances = answer["Instances"]
        now = time.time()
        records = [
            RunnerRecord(
                instance_id=instance["InstanceId"],
                pool=pool.name,
                launch_id=launch_id,
                lifecycle="on-demand",
                instance_type=instance.get("InstanceType", ""),
                subnet_id=subnet,
                launched_at=now,
                boot_deadline_at=now + pool.boot_deadline_seconds,
                token_key=self.tokens.key(pool.name, instance["InstanceId"]),
                max_builds=pool.max_builds,
            )
            for instance in instances
        ]
        self._record(launch_id, records)
        ids = [record.instance_id for record in records]
        self.store.launches.finish_launch(launch_id, ids)
        return ids

    def _record(self, launch_id: str, records: list[Any]) -> None:
        """What ``RunnerStore.record_runners`` leaves: each record's item as it writes it (``new_item``, holding its
        lease) and the launch's leases moved onto them. Written without its transaction: moto copies the whole
        table once per item of a transaction, which would make the fleet quadratic to build (a minute for 1,000)."""
        from chalicelib.store import launch_key

        dynamodb, table, now = self.own.dynamodb, self.config.state.table, time.time()
        for start in range(0, len(records), 25):  # BatchWriteItem takes at most 25 requests
            requests = [{"PutRequest": {"Item": record.new_item(now)}} for record in records[start : start + 25]]
            while requests:
                answer = dynamodb.batch_write_item(RequestItems={table: requests})
                requests = answer.get("UnprocessedItems", {}).get(table, [])
        dynamodb.update_item(
            TableName=table,
            Key={"pk": {"S": launch_key(launch_id)}},
            UpdateExpression="SET leases = leases - :n",
            ConditionExpression="leases >= :n",
            ExpressionAttributeValues={":n": {"N": str(len(records))}},
        )

    def _runner(self, pool: Any, instance_id: str, contacted: bool) -> None:
        """The instance's GitLab runner and identity; contacted and idle after one job, or never contacted."""
        import requests

        from chalicelib.naming import runner_description
        from chalicelib.store import RunnerState

        credentials = self.gitlab_api.create_runner(
            description=runner_description(self.config.fleet, pool.name, instance_id),
            tags=pool.tags,
            run_untagged=pool.run_untagged,
            maximum_timeout=pool.job_timeout_seconds,
            maintenance_note=self.owner.note(time.time()),
        )
        if not contacted:
            record = self.store.runners.runners([instance_id])[instance_id]
            self.tokens.put(record.token_key, instance_id, credentials.token, record.boot_deadline_at)
        if not self.store.runners.set_runner_identity(instance_id, credentials.runner_id):
            raise RuntimeError(f"identity of {instance_id} refused")
        if not contacted:
            return
        verified = requests.post(
            f"{self.stack.gitlab.url}/api/v4/runners/verify",
            json={"token": credentials.token, "system_id": f"s_{instance_id.removeprefix('i-')[:12]}"},
            timeout=10,
        )
        if verified.status_code != 200:
            raise RuntimeError(f"POST /runners/verify answered {verified.status_code}")
        # GitLab counts a runner contacted only once it asks for a job (verify leaves a glrt- runner
        # never_contacted: lib/api/ci/runner.rb), as run-single does right after verify.
        asked = requests.post(
            f"{self.stack.gitlab.url}/api/v4/jobs/request",
            json={"token": credentials.token, "system_id": f"s_{instance_id.removeprefix('i-')[:12]}"},
            timeout=10,
        )
        if asked.status_code not in (201, 204):
            raise RuntimeError(f"POST /jobs/request answered {asked.status_code}")
        if pool.max_builds <= 1:
            return  # an ephemeral runner's one job would end it: idle means booted and waiting for that job
        finish = self.store.runner_finished_job(
            instance_id, credentials.runner_id, self.stack.project_id, next(self._jobs), time.time()
        )
        if finish is None or finish.state is not RunnerState.IDLE:
            raise RuntimeError(f"runner {instance_id} is {finish} after its first job, not idle")

    def lose_instances(self) -> list[str]:
        """Terminate LOST healthy instances in EC2; no event reaches the fleet (no pump runs)."""
        lost, self._healthy = self._healthy[:LOST], self._healthy[LOST:]
        self.own.ec2.terminate_instances(InstanceIds=lost)
        return lost

    @property
    def booting(self) -> list[str]:
        """The never-contacted runners, due to be reaped once past their boot deadline."""
        return list(self._booting)

    def forget_booting(self) -> None:
        """The ten-action case reaped the never-contacted runners: they are no longer part of the fleet."""
        self._booting = []

    # -- measuring ---------------------------------------------------------------------------------------------

    def expected(self, live: int) -> Expected:
        """The fleet's pages, from the benchmark's own reads of the table and GitLab, and ``live``, the fleet's
        live instances as the baseline listed them."""
        from chalicelib.lifecycle.facts import HOOK_CHECKS
        from chalicelib.store import LIVE_ATTRIBUTE

        sizes: Counter[str] = Counter()
        counts: Counter[str] = Counter()
        for item in self.store.scan():
            kind = item.get(LIVE_ATTRIBUTE)
            if kind in LIVE_KINDS:
                sizes[str(kind)] += item_size(item)
                counts[str(kind)] += 1
        runners = len(self.stack.gitlab.runners())
        projects = counts["hook"]  # no job is recorded: the active projects are the connected ones
        return Expected(
            query_pages={kind: max(1, math.ceil(sizes[kind] / QUERY_PAGE_BYTES)) for kind in LIVE_KINDS},
            instance_pages=max(1, math.ceil(live / INSTANCE_PAGE)),
            runner_pages=max(1, math.ceil(runners / RUNNER_PAGE)),
            pending_pages=projects,
            hook_reads=min(projects, HOOK_CHECKS),
            live_instances=live,
            records=counts["runner"],
            gitlab_runners=runners,
        )

    def baseline(self) -> Baseline:
        """One unfiltered DescribeInstances, fully paginated as reconcile's own (1,000 a page)."""
        from chalicelib.naming import FLEET_TAG

        before, _ = self.baseline_counter.snapshot()
        began = time.perf_counter()
        instances = [
            instance
            for page in self.baseline_ec2.get_paginator("describe_instances").paginate(
                PaginationConfig={"PageSize": INSTANCE_PAGE}
            )
            for reservation in page["Reservations"]
            for instance in reservation["Instances"]
        ]
        seconds = time.perf_counter() - began
        live = sum(
            1
            for instance in instances
            if instance["State"]["Name"] in LIVE_INSTANCE_STATES
            and {"Key": FLEET_TAG, "Value": self.config.fleet} in instance.get("Tags", [])
        )
        return Baseline(seconds, len(instances), live, self.baseline_counter.snapshot()[0] - before)

    def run(self, offset: float) -> RunSample:
        """One reconcile run on a clock ``offset`` seconds ahead, counted."""
        reconciler = self.reconciler(offset)
        (aws, in_aws), gitlab = self.counter.snapshot(), self.stack.gitlab.calls
        began = time.perf_counter()
        run_report = reconciler.run()
        seconds = time.perf_counter() - began
        (aws_after, in_aws_after), gitlab_after = self.counter.snapshot(), self.stack.gitlab.calls
        return RunSample(
            seconds=seconds,
            report=run_report,
            aws=aws_after - aws,
            in_aws={op: spent - in_aws.get(op, 0.0) for op, spent in in_aws_after.items() if op in aws_after - aws},
            gitlab=Counter({f"{m} {r}": n for (m, r), n in (gitlab_after - gitlab).items()}),
        )

    def gather(self, offset: float) -> float:
        """The seconds of one ``facts.gather()`` alone (no run lease, no decision, no action)."""
        reconciler = self.reconciler(offset)
        began = time.perf_counter()
        reconciler.facts.gather()
        return time.perf_counter() - began

    def case(self, runners: int, needing_action: int) -> Case:
        """Gather once, then run and list the baseline in turn (REPEATS times without actions, once with)."""
        began = time.perf_counter()
        known_live = len(self._healthy) + len(self._booting)
        baselines = [self.baseline()]
        expected = self.expected(baselines[0].live)
        problems = []
        if expected.records != runners:
            problems.append(f"the index holds {expected.records} runner records, not {runners}")
        offset = CLOCK_OFFSET if needing_action else 0.0
        gather_s = self.gather(offset)
        runs: list[RunSample] = []
        for repeat in range(1 if needing_action else REPEATS):
            if repeat:
                baselines.append(self.baseline())
            runs.append(self.run(offset))
            problems += self._report_problems(runs[-1].report, needing_action)
        self.stages[f"{runners} runners, {needing_action} needing action"] = time.perf_counter() - began
        return Case(
            runners=runners,
            needing_action=needing_action,
            expected=expected,
            runs=runs,
            gather_s=gather_s,
            baseline_s=[b.seconds for b in baselines],
            baseline_instances=baselines[-1].listed,
            baseline_calls=baselines[-1].calls,
            known_live=known_live,
            problems=problems,
        )

    @staticmethod
    def _report_problems(run_report: Any, needing_action: int) -> list[str]:
        wanted = {"OrphansReaped.LostInstance": LOST, "OrphansReaped.NeverContacted": BOOTING} if needing_action else {}
        problems = []
        if not run_report.ran or run_report.stopped:
            problems.append(f"the run did not finish: ran {run_report.ran}, stopped {run_report.stopped!r}")
        if dict(run_report.metrics) != wanted:
            problems.append(f"the run counted {dict(run_report.metrics)}, not {wanted}")
        if sum(run_report.skipped.values()):
            problems.append(f"the run skipped {dict(run_report.skipped)}")
        return problems

    def check_acted(self, lost: list[str], booting: list[str]) -> list[str]:
        """After the ten-action run: those runners' records left the index, their GitLab runners are gone, the
        never-contacted instances are terminated, and no other runner was touched."""
        from chalicelib.store import LIVE_ATTRIBUTE, runner_key

        problems = []
        for instance_id in lost + booting:
            record = self.store.get(runner_key(instance_id)) or {}
            if record.get("state") != "terminated" or LIVE_ATTRIBUTE in record:
                problems.append(f"{instance_id}: record {record.get('state')}, still live: {LIVE_ATTRIBUTE in record}")
        described = {str(runner.get("description", "")).rsplit(" ", 1)[-1] for runner in self.stack.gitlab.runners()}
        left = [i for i in lost + booting if i in described]
        if left:
            problems.append(f"GitLab runners left for {left}")
        missing = [i for i in self._healthy if i not in described]
        if missing:
            problems.append(f"{len(missing)} healthy runners lost their GitLab runner")
        states = {
            instance["InstanceId"]: instance["State"]["Name"]
            for page in self.own.ec2.get_paginator("describe_instances").paginate(InstanceIds=booting)
            for reservation in page["Reservations"]
            for instance in reservation["Instances"]
        }
        alive = [i for i, state in states.items() if state not in ("shutting-down", "terminated")]
        if alive:
            problems.append(f"never-contacted instances still {alive}")
        return problems


@dataclass
class SweepCost:
    """One run's sweep for lost Job Hooks with ``projects`` connected projects, against listing them all."""

    projects: int
    active: int
    calls: int
    pending_found: int
    sweep_s: float
    baseline_calls: int
    baseline_s: float

    @property
    def runs_to_cover(self) -> int:
        from chalicelib.lifecycle.facts import SWEEP_PROJECTS

        return max(1, math.ceil(self.active / SWEEP_PROJECTS))

    @property
    def ratio(self) -> float:
        return self.sweep_s / self.baseline_s if self.baseline_s else float("nan")

    def problems(self) -> list[str]:
        from chalicelib.lifecycle.facts import SWEEP_PROJECTS

        found = []
        if self.active != self.projects:
            found.append(f"{self.active} active projects, not the {self.projects} connected")
        if self.calls != min(self.projects, SWEEP_PROJECTS):
            found.append(f"the sweep made {self.calls} listings, not {min(self.projects, SWEEP_PROJECTS)}")
        if self.baseline_calls != self.active:
            found.append(f"the baseline made {self.baseline_calls} listings, not one per active project")
        return found


def sweep_costs(bench: Bench) -> list[SweepCost]:
    """The sweep's GitLab calls and wall time in one run, for SWEEP_PROJECT_COUNTS connected projects (each with a
    hook record, as ``fleetctl gitlab connect`` leaves it), against the baseline of listing every active project's
    pending jobs one after another, as the sweep did before it was bounded."""
    from chalicelib.gitlab_api import GitLabApi

    gitlab = bench.stack.gitlab
    connected = {int(item["project_id"]) for item in bench.store.live_records("hook")}
    route = ("GET", "/projects/:id/jobs")
    costs: list[SweepCost] = []
    for projects in SWEEP_PROJECT_COUNTS:
        while len(connected) < projects:
            project_id = gitlab.create_project(f"{bench.stack_group}/sweep-{len(connected)}")
            bench.store.record_hook(project_id, 100_000 + project_id, gitlab.url, "http://127.0.0.1:9/webhook")
            connected.add(project_id)
        bench.stack.aws.settle()
        reconciler = bench.reconciler(0.0)
        facts = reconciler.facts.gather()
        before = gitlab.calls[route]
        began = time.perf_counter()
        swept = reconciler.facts.sweep(facts, deadline=time.monotonic() + 110.0)
        sweep_s = time.perf_counter() - began
        calls = gitlab.calls[route] - before
        api: GitLabApi = bench.gitlab_api
        before = gitlab.calls[route]
        began = time.perf_counter()
        for project_id in facts.active_projects:
            api.pending_jobs(project_id)
        baseline_s = time.perf_counter() - began
        costs.append(
            SweepCost(
                projects=projects,
                active=len(facts.active_projects),
                calls=calls,
                pending_found=len(swept.pending_jobs or ()),
                sweep_s=sweep_s,
                baseline_calls=gitlab.calls[route] - before,
                baseline_s=baseline_s,
            )
        )
    return costs


def run_cases(workdir: Path) -> tuple[list[Case], dict[str, float], list[SweepCost]]:
    bench = Bench(workdir)
    try:
        bench.start()
        cases: list[Case] = []
        size = 0
        for runners in FLEETS:
            bench.grow(runners - size - BOOTING, BOOTING)
            cases.append(bench.case(runners, 0))
            lost = bench.lose_instances()
            booting = bench.booting
            acted = bench.case(runners, NEEDING_ACTION)
            acted.problems += bench.check_acted(lost, booting)
            bench.forget_booting()
            cases.append(acted)
            size = runners - NEEDING_ACTION
        began = time.perf_counter()
        sweeps = sweep_costs(bench)
        bench.stages["sweep"] = time.perf_counter() - began
        return cases, bench.stages, sweeps
    finally:
        bench.stop()


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def _calls(calls: Mapping[str, int]) -> str:
    return ", ".join(f"{name} x{count}" for name, count in sorted(calls.items())) or "none"


def main() -> None:
    started, load_before = time.perf_counter(), load_average()
    with tempfile.TemporaryDirectory(prefix="bench-reconcile-") as tmp, quiet_stdout():
        cases, stages, sweeps = run_cases(Path(tmp))

    lines = [
        f"reconcile: fleets of {' and '.join(str(n) for n in FLEETS)} runners over pools {list(POOLS)}, with 0 and"
        f" {NEEDING_ACTION} needing action ({LOST} lost instances, {BOOTING} never contacted past their boot"
        f" deadline, on a clock {CLOCK_OFFSET:.0f} s ahead)",
        "  target: calls grow with the pages of the fleet (fleet-records Query pages of 1 MB, DescribeInstances pages"
        f" of {INSTANCE_PAGE}, GitLab runner listing pages of {RUNNER_PAGE}) and with the runners needing action,"
        " never one call per runner:",
        f"    AWS calls <= pages + {FIXED_AWS_CALLS} + {AWS_PER_ACTION} per action;"
        f" GitLab calls <= pages + {GITLAB_PER_ACTION} per action",
    ]
    problems: list[str] = []
    baseline_problems: list[str] = []
    figures_cases = []
    for case in cases:
        expected = case.expected
        name = f"{case.runners} runners, {case.needing_action} needing action"
        case_baseline = case.baseline_problems()
        baseline_problems += [f"{name}: {p}" for p in case_baseline]
        problems += [f"{name}: {p}" for p in case.problems]
        lines += [
            f"  {name}: {expected.live_instances} live instances, {expected.gitlab_runners} GitLab runners;"
            f" acted: {_calls(case.metrics)}",
            f"    AWS calls {case.aws_calls} (limit {expected.aws_limit(case.actions)}: pages"
            f" {expected.aws_pages} = Query {expected.query_pages} + DescribeInstances {expected.instance_pages}):"
            f" {_verdict(case.aws_met)}; {case.aws_calls / case.runners:.3f} per runner",
            f"      {_calls(case.aws)}",
            f"    GitLab calls {case.gitlab_calls} (limit {expected.gitlab_limit(case.actions)}: pages"
            f" {expected.gitlab_pages} = runner listing {expected.runner_pages} + pending jobs"
            f" {expected.pending_pages} + hook reads {expected.hook_reads}): {_verdict(case.gitlab_met)}",
            f"      {_calls(case.gitlab)}",
            f"    wall time: run {ms(median(case.run_s))}"
            + (f" (median of {len(case.run_s)})" if len(case.run_s) > 1 else "")
            + f" ({ms(case.in_aws_s)} inside AWS calls: "
            + ", ".join(f"{op} {ms(seconds)}" for op, seconds in case.slowest_aws())
            + f"), facts.gather() alone {ms(case.gather_s)}; baseline DescribeInstances of"
            f" {case.baseline_instances} instances {ms(median(case.baseline_s))}; ratio run/baseline"
            f" {case.ratio:.2f} (no target)" + ("" if not case_baseline else " (baseline INVALID)"),
        ]
        figures_cases.append(
            {
                "runners": case.runners,
                "needing_action": case.needing_action,
                "acted": case.metrics,
                "live_instances": expected.live_instances,
                "gitlab_runners": expected.gitlab_runners,
                "aws_calls": case.aws_calls,
                "aws_calls_by_operation": dict(sorted(case.aws.items())),
                "aws_pages": expected.aws_pages,
                "query_pages": expected.query_pages,
                "describe_instances_pages": expected.instance_pages,
                "aws_limit": expected.aws_limit(case.actions),
                "aws_met": case.aws_met,
                "gitlab_calls": case.gitlab_calls,
                "gitlab_calls_by_route": dict(sorted(case.gitlab.items())),
                "gitlab_pages": expected.gitlab_pages,
                "gitlab_limit": expected.gitlab_limit(case.actions),
                "gitlab_met": case.gitlab_met,
                "run_s": round(median(case.run_s), 4),
                "runs": len(case.run_s),
                "gather_s": round(case.gather_s, 4),
                "in_aws_calls_s": round(case.in_aws_s, 4),
                "in_aws_calls_s_by_operation": {op: round(v, 4) for op, v in sorted(case.runs[-1].in_aws.items())},
                "baseline_describe_instances_s": round(median(case.baseline_s), 4),
                "baseline_instances": case.baseline_instances,
                "run_over_baseline_ratio": round(case.ratio, 3),
                "baseline_valid": not case_baseline,
                "valid": not case.problems and not case_baseline,
            }
        )
    from chalicelib.lifecycle.facts import SWEEP_PROJECTS

    lines.append(
        f"  the sweep for lost Job Hooks, one run (at most {SWEEP_PROJECTS} projects a run, one page each, in turn"
        " across runs), against listing every active project's pending jobs (the unbounded sweep):"
    )
    for sweep in sweeps:
        problems += [f"sweep over {sweep.projects} projects: {p}" for p in sweep.problems()]
        lines.append(
            f"    {sweep.projects} connected projects: {sweep.calls} GitLab calls in {ms(sweep.sweep_s)}, every project"
            f" within {sweep.runs_to_cover} runs; baseline {sweep.baseline_calls} calls in {ms(sweep.baseline_s)};"
            f" ratio {sweep.ratio:.2f}"
        )
    lines.append("  stages: " + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in stages.items()))
    valid = not problems and not baseline_problems
    if not valid:
        lines.append("  INVALID: " + "; ".join([*baseline_problems, *problems]))
    lines.append(footer(started, load_before))
    calls_met = all(case.aws_met and case.gitlab_met for case in cases)
    figures = {
        "benchmark": "reconcile",
        "fleets": list(FLEETS),
        "needing_action": NEEDING_ACTION,
        "target": "AWS calls <= fleet pages + fixed + per action; GitLab calls <= pages + per action",
        "fixed_aws_calls": FIXED_AWS_CALLS,
        "aws_per_action": AWS_PER_ACTION,
        "gitlab_per_action": GITLAB_PER_ACTION,
        "cases": figures_cases,
        "sweep": [
            {
                "projects": sweep.projects,
                "gitlab_calls_per_run": sweep.calls,
                "sweep_s": round(sweep.sweep_s, 4),
                "runs_to_cover_every_project": sweep.runs_to_cover,
                "baseline_calls": sweep.baseline_calls,
                "baseline_s": round(sweep.baseline_s, 4),
                "sweep_over_baseline_ratio": round(sweep.ratio, 3),
                "valid": not sweep.problems(),
            }
            for sweep in sweeps
        ],
        "calls_met": calls_met,
        "baseline_valid": not baseline_problems,
        "load_average": [load_before, load_average()],
        "valid": valid,
        "met": calls_met and valid,
    }
    report(lines, figures)


if __name__ == "__main__":
    sys.exit(run_benchmark("reconcile", main))
