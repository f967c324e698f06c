"""Job start: how long a job waits for a runner, and how many instances the fleet launches per job.

One sandbox run (moto server, the GitLab emulator, the webhook served over HTTP, the event pump, and the simulated
runner agents of ``fleetctl.sandbox.agents``) on a copy of the dev stage file whose pools keep no warm runners.
The agents boot in BOOT_DELAY_SECONDS and power off after IDLE_WAIT_SECONDS without a job (``--wait-timeout``);
scale-up leaves a job to an idle runner of its pool for IDLE_GRACE_SECONDS (``RUNNER_FLEET_IDLE_GRACE_SECONDS``)
before it launches. Every job runs ``sleep JOB_SECONDS`` and is tagged [docker, linux]: the docker pool, with the
dev stage's max_runners (20) and max_builds (10). Three scenarios, each in a fresh project on a freshly
bootstrapped local AWS (``Sandbox.reset``), each waited for until every job has finished and then until every
instance of the pool is terminated (each wait with a timeout that is reported, not waited out):

1. cold: COLD_JOBS parallel jobs (one stage) on a pool with room for all of them;
2. sequential: SEQUENTIAL_JOBS stages of one job each;
3. parallel: PARALLEL_JOBS parallel jobs (one stage), ten times the pool's max_runners: the jobs beyond its
   capacity wait in scale-up's queue, while runners with builds left take jobs by themselves.

Measured, per job, from GitLab's job API as a user sees it: ``queued_duration`` (pending to running). A job is a
cold start when it is the first its runner ran (on an instance launched for it, or for another job of the
pipeline: whichever agent asks first gets the oldest pending job), a warm start otherwise (a runner that had
finished a job took it). Figures:

* cold start overhead: for every job of scenario 1, queued_duration - BOOT_DELAY_SECONDS, p50 and p95 (target p95
  under TARGET_OVERHEAD_P95_SECONDS): what the fleet adds to an instance's boot (Job Hook delivery, the webhook,
  the jobs queue, scale-up's GitLab reads, CreateFleet, the GitLab runner and its token), plus the sandbox's own
  polling: the agent manager notices a new instance within SCAN_INTERVAL_SECONDS, an agent asks for a job every
  CHECK_INTERVAL_SECONDS, the event pump polls its queues every 0.2 s. The ratio latency / boot delay is reported
  against the boot delay as baseline; that baseline is invalid (and said so) when a job of the scenario never
  started, or started sooner than the boot delay (then the boot delay was not what it waited for). Where the
  wait went is shown for the cold starts, from timestamps taken in this process at no cost to moto (an
  ``after-call`` handler on the app's EC2 client for CreateFleet, a ``before-parameter-build`` one on its
  DynamoDB client for the token's PutItem, the emulator's delivery log for the Job Hook): pending to the
  webhook's answer to the pending Job Hook, then to CreateFleet answering with the instance of the runner that
  took the job, CreateFleet to the runner token written, CreateFleet to running.
* the fleet's own part of each cold start: the webhook's answer to the pending Job Hook to the runner token
  written, p50 and p95 (target p95 under TARGET_FLEET_P95_SECONDS).
* instances launched per job: fleet instances of the pool in EC2 (DescribeInstances with the fleet's tag, every
  state), divided by the scenario's jobs. Baseline: one instance per job, what a fleet that never reuses a
  runner launches; the figure is therefore the ratio itself. The baseline is invalid (and said so) when not every
  job succeeded: the jobs that ran are then not the jobs counted. The agents' own count of instances they booted
  is shown beside it, and how each agent ended (max builds, wait timeout).
* warm start latency (queued_duration of warm starts), p50 and p95, for the sequential pipeline;
* wall time of each scenario: pipeline created to every job finished, and to every instance terminated.

Everything runs in this one process (moto's server threads, the emulator and its 8 delivery workers, the webhook
server, the pump, one thread per agent), so the more jobs and agents at once, the more they queue for its
interpreter lock: the parallel scenario's latencies say more about the sandbox than about AWS, and its instance
count varies from run to run with how soon runners take jobs compared to how soon scale-up reads them.

Reports, never fails: exit status 0 whatever the figures.

Run: ``.venv/bin/python bench/job_start.py`` (or ``make bench``).
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from _common import (
    PROJECT_DIR,
    footer,
    isolate_environment,
    load_average,
    quiet_stdout,
    report,
    run_benchmark,
    wait_until,
)

BOOT_DELAY_SECONDS = 2.0
IDLE_WAIT_SECONDS = 5.0
IDLE_GRACE_SECONDS = 5
JOB_SECONDS = 0.5
SCAN_INTERVAL_SECONDS = 0.1
CHECK_INTERVAL_SECONDS = 0.2
COLD_JOBS = 20
SEQUENTIAL_JOBS = 20
PARALLEL_JOBS = 200
POOL = "docker"
POOL_TAGS = ("docker", "linux")
# What the scenarios assume of the dev stage's docker pool.
EXPECTED_POOL = {"max_runners": 20, "max_builds": 10, "ephemeral": False}
TARGET_OVERHEAD_P95_SECONDS = 2.0
# The fleet's own part of a cold start: from the webhook answering the job's pending Job Hook to scale-up writing
# the runner token of the instance that took it (the rest is GitLab's delivery, EC2's boot and the runner's poll).
TARGET_FLEET_P95_SECONDS = 1.0
JOBS_TIMEOUT = {"cold": 120.0, "sequential": 240.0, "parallel": 300.0}
# Every instance has powered off within its idle wait once the last job finished; this is generous on top.
TERMINATED_TIMEOUT = IDLE_WAIT_SECONDS + 60.0
FINISHED = {"success", "failed", "canceled", "skipped"}


def stage_config(workdir: Path) -> Path:
    """A copy of the dev stage file with no warm runners in any pool (a scheduled warm launch would count)."""
    import yaml

    document = yaml.safe_load((PROJECT_DIR / "chalicelib" / "stages" / "dev.yaml").read_text())
    pools = {pool["name"]: pool for pool in document["pools"]}
    pool = pools.get(POOL, {})
    if tuple(pool.get("tags", ())) != POOL_TAGS:
        raise RuntimeError(f"dev.yaml has no pool {POOL} tagged {list(POOL_TAGS)}; the benchmark assumes it")
    found = {key: pool.get(key, False if key == "ephemeral" else None) for key in EXPECTED_POOL}
    if found != EXPECTED_POOL:
        raise RuntimeError(f"dev.yaml's {POOL} pool has {found}, the benchmark assumes {EXPECTED_POOL}")
    for each in document["pools"]:
        each["warm"] = {"size": 0, "windows": []}
    path = workdir / "job-start.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile (the smallest value with at least ``fraction`` of the values at or below it)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True)
class JobRun:
    """One job as GitLab's job API reports it once the scenario ended, with when (epoch seconds) its pending Job
    Hook was answered by the webhook and when CreateFleet answered with the instance of the runner that ran it."""

    job_id: int
    status: str
    queued_s: float | None
    queued_at: float | None
    started_at: float | None
    runner_id: int | None
    instance_id: str | None
    hook_at: float | None = None
    launched_at: float | None = None
    token_at: float | None = None
    warm: bool = False


def _epoch(value: str | None) -> float | None:
    return None if value is None else datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def classify(
    jobs: Sequence[dict[str, Any]], hooks: dict[int, float], launches: dict[str, float], tokens: dict[str, float]
) -> list[JobRun]:
    """Each job with its timeline, and whether it was a warm start: not the first job its runner started."""
    from chalicelib.naming import described_instance

    runs: list[JobRun] = []
    for job in jobs:
        started = _epoch(job.get("started_at"))
        queued_s = None if started is None else float(job.get("queued_duration") or 0.0)
        runner = job.get("runner") or {}
        instance = described_instance(runner.get("description")) if runner else None
        runs.append(
            JobRun(
                job_id=int(job["id"]),
                status=str(job["status"]),
                queued_s=queued_s,
                queued_at=None if started is None or queued_s is None else started - queued_s,
                started_at=started,
                runner_id=int(runner["id"]) if runner else None,
                instance_id=instance,
                hook_at=hooks.get(int(job["id"])),
                launched_at=launches.get(instance) if instance else None,
                token_at=tokens.get(instance) if instance else None,
            )
        )
    first: dict[int, int] = {}
    for run in sorted(runs, key=lambda r: r.started_at or 0.0):
        if run.runner_id is not None and run.started_at is not None:
            first.setdefault(run.runner_id, run.job_id)
    return [replace(r, warm=r.runner_id is not None and first.get(r.runner_id) != r.job_id) for r in runs]


@dataclass
class ScenarioResult:
    name: str
    jobs: list[JobRun]
    jobs_s: float | None
    terminated_s: float | None
    instances: int
    live_at_end: int
    agents_started: int
    agent_jobs: dict[str, int]
    agents_ended: dict[str, int]
    runners_at_end: int
    leases_at_end: int
    deferred: int
    # How long the webhook took to answer each Job Hook delivery of the scenario (seconds).
    hook_answers: list[float]
    problems: list[str] = field(default_factory=list)

    def started(self) -> list[JobRun]:
        return [j for j in self.jobs if j.queued_s is not None]

    def cold(self) -> list[float]:
        return [j.queued_s for j in self.jobs if j.queued_s is not None and not j.warm]

    def warm(self) -> list[float]:
        return [j.queued_s for j in self.jobs if j.queued_s is not None and j.warm]

    def all_queued(self) -> list[float]:
        return [j.queued_s for j in self.jobs if j.queued_s is not None]

    def segments(self) -> dict[str, list[float]]:
        """Where the cold starts' wait went: from pending to the webhook answering the job's pending Job Hook, to
        CreateFleet answering with the instance of the runner that took the job (launched for that job or for
        another of the pipeline), to scale-up writing that instance's runner token, and from CreateFleet to
        running (the boot delay included)."""
        found: dict[str, list[float]] = {
            "pending to hook answered": [],
            "hook to CreateFleet": [],
            "CreateFleet to token written": [],
            "CreateFleet to running": [],
            "hook answered to token written": [],
        }
        for job in self.jobs:
            if job.warm or None in (job.queued_at, job.hook_at, job.launched_at, job.token_at, job.started_at):
                continue
            assert job.queued_at and job.hook_at and job.launched_at and job.token_at and job.started_at
            found["pending to hook answered"].append(job.hook_at - job.queued_at)
            found["hook to CreateFleet"].append(job.launched_at - job.hook_at)
            found["CreateFleet to token written"].append(job.token_at - job.launched_at)
            found["CreateFleet to running"].append(job.started_at - job.launched_at)
            found["hook answered to token written"].append(job.token_at - job.hook_at)
        return found

    def succeeded(self) -> int:
        return sum(1 for j in self.jobs if j.status == "success")

    def per_job(self) -> float:
        return self.instances / len(self.jobs) if self.jobs else float("nan")


class Bench:
    def __init__(self, workdir: Path) -> None:
        from fleetctl.sandbox.agents import AgentOptions
        from fleetctl.sandbox.stack import Sandbox

        isolate_environment()
        os.environ["RUNNER_FLEET_IDLE_GRACE_SECONDS"] = str(IDLE_GRACE_SECONDS)
        options = AgentOptions(
            boot_delay_seconds=BOOT_DELAY_SECONDS,
            wait_timeout_seconds=IDLE_WAIT_SECONDS,
            check_interval_seconds=CHECK_INTERVAL_SECONDS,
            scan_interval_seconds=SCAN_INTERVAL_SECONDS,
            token_poll_seconds=CHECK_INTERVAL_SECONDS,
        )
        self.stack = Sandbox(config_path=stage_config(workdir), workdir=workdir, agent_options=options)
        self.deferred = 0
        self.launches: dict[str, float] = {}
        # When scale-up wrote each instance's runner token (the agent waits for it after its boot delay).
        self.tokens: dict[str, float] = {}

    def start(self) -> None:
        self.stack.start()
        self.attach()

    def attach(self) -> None:
        """Watch the app's own objects (rebuilt on every reset), at no cost to moto: the jobs scale-up's batch
        reports say it left to idle runners, and when CreateFleet answered with each instance."""
        from chalicelib import runtime
        from chalicelib.scaling.batch import Outcome

        scale_up = runtime.scale_up()
        handle = scale_up.handle

        def counted(jobs: Any) -> Any:
            batch = handle(jobs)
            self.deferred += batch.outcomes.get(Outcome.DEFERRED, 0)
            return batch

        scale_up.handle = counted  # type: ignore[method-assign]
        runtime.aws().ec2.meta.events.register("after-call.ec2.CreateFleet", self._fleet_created)
        runtime.aws().dynamodb.meta.events.register("before-parameter-build.dynamodb.PutItem", self._item_put)

    def _item_put(self, params: dict[str, Any], **kwargs: Any) -> None:
        item = params.get("Item") or {}
        if (item.get("kind") or {}).get("S") == "token":
            self.tokens.setdefault(str((item.get("instance_id") or {}).get("S", "")), time.time())

    def _fleet_created(self, parsed: dict[str, Any], **kwargs: Any) -> None:
        at = time.time()
        for entry in parsed.get("Instances") or ():
            for instance_id in entry.get("InstanceIds") or ():
                self.launches.setdefault(str(instance_id), at)

    def stop(self) -> None:
        self.stack.stop()

    def instances(self, states: tuple[str, ...] = ()) -> list[str]:
        """Instance ids of the pool in the fleet, in the given states (every state when empty)."""
        from chalicelib import runtime
        from chalicelib.naming import FLEET_TAG, POOL_TAG

        assert self.stack.config is not None
        filters = [
            {"Name": f"tag:{FLEET_TAG}", "Values": [self.stack.config.fleet]},
            {"Name": f"tag:{POOL_TAG}", "Values": [POOL]},
        ]
        if states:
            filters.append({"Name": "instance-state-name", "Values": list(states)})
        pages = runtime.aws().ec2.get_paginator("describe_instances").paginate(Filters=filters)
        return [i["InstanceId"] for page in pages for r in page["Reservations"] for i in r["Instances"]]

    def run(self, name: str, stages: list[list[str]]) -> ScenarioResult:
        """A pipeline of one stage per entry of ``stages`` (the entries are its jobs' names); wait for every job
        to finish and every instance of the pool to be terminated."""
        from chalicelib import runtime
        from chalicelib.store import pool_key

        stack = self.stack
        gitlab = stack.gitlab
        project = stack.project_id
        self.deferred = 0
        specs = [
            {"name": job, "stage": f"s{n:02d}", "tags": list(POOL_TAGS), "script": [f"sleep {JOB_SECONDS}"]}
            for n, jobs in enumerate(stages, start=1)
            for job in jobs
        ]
        deliveries_before = len(gitlab.deliveries)
        started = time.monotonic()
        pipeline = gitlab.create_pipeline(project, specs, stages=[f"s{n:02d}" for n in range(1, len(stages) + 1)])
        job_ids = [int(j["id"]) for j in gitlab.jobs_of_pipeline(project, pipeline)]
        problems: list[str] = []

        def statuses() -> list[str]:
            return [str(gitlab.job(project, j)["status"]) for j in job_ids]

        jobs_s: float | None = None
        if wait_until(lambda: all(s in FINISHED for s in statuses()), JOBS_TIMEOUT[name], every=0.25):
            jobs_s = time.monotonic() - started
        else:
            left = Counter(s for s in statuses() if s not in FINISHED)
            problems.append(f"not every job finished in {JOBS_TIMEOUT[name]:.0f} s: {dict(left)} left")
        terminated_s: float | None = None
        if wait_until(
            lambda: not self.instances(("pending", "running", "stopping", "shutting-down")),
            TERMINATED_TIMEOUT,
            every=0.5,
        ):
            terminated_s = time.monotonic() - started
        else:
            problems.append(f"instances still live {TERMINATED_TIMEOUT:.0f} s after the jobs' wait")
        # The last instance-state events (runner deletion, lease return) follow the terminations.
        wait_until(lambda: not gitlab.runners(), 15)
        store = runtime.store()
        wait_until(lambda: int((store.get(pool_key(POOL)) or {}).get("leases", 0)) == 0, 15)
        jobs = [gitlab.job(project, j) for j in job_ids]
        hooks: dict[int, float] = {}
        answers: list[float] = []
        for delivery in gitlab.deliveries[deliveries_before:]:
            payload = delivery.payload
            answers.append(delivery.duration)
            if payload.get("object_kind") == "build" and payload.get("build_status") == "pending":
                hooks.setdefault(int(payload["build_id"]), delivery.sent_at + delivery.duration)
        agents = stack.agents
        stats = agents.stats() if agents is not None else None
        records = agents.records() if agents is not None else []
        return ScenarioResult(
            name=name,
            jobs=classify(jobs, hooks, self.launches, self.tokens),
            jobs_s=jobs_s,
            terminated_s=terminated_s,
            instances=len(self.instances()),
            live_at_end=len(self.instances(("pending", "running"))),
            agents_started=stats.agents_started if stats else 0,
            agent_jobs=dict(stats.jobs) if stats else {},
            agents_ended=dict(Counter(r.ended or r.phase.value for r in records)),
            runners_at_end=len(gitlab.runners()),
            leases_at_end=int((store.get(pool_key(POOL)) or {}).get("leases", 0)),
            deferred=self.deferred,
            hook_answers=answers,
            problems=problems,
        )

    def reset(self) -> None:
        self.stack.reset()
        self.attach()


def run_all() -> list[ScenarioResult]:
    with tempfile.TemporaryDirectory(prefix="bench-job-start-") as tmp:
        bench = Bench(Path(tmp))
        bench.start()
        try:
            results = [bench.run("cold", [[f"cold-{i + 1}" for i in range(COLD_JOBS)]])]
            bench.reset()
            results.append(bench.run("sequential", [[f"step-{i + 1}"] for i in range(SEQUENTIAL_JOBS)]))
            bench.reset()
            results.append(bench.run("parallel", [[f"job-{i + 1}" for i in range(PARALLEL_JOBS)]]))
        finally:
            bench.stop()
    return results


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _describe(result: ScenarioResult) -> list[str]:
    started = result.started()
    cold, warm = result.cold(), result.warm()
    by_status = dict(sorted(Counter(j.status for j in result.jobs).items()))
    runners = len({j.runner_id for j in result.jobs if j.runner_id is not None})
    lines = [
        f"  {result.name}: {len(result.jobs)} jobs {by_status}; {len(started)} started, {len(cold)} cold,"
        f" {len(warm)} warm, on {runners} runners",
        f"    instances launched: {result.instances} ({result.agents_started} booted by agents), "
        f"{result.per_job():.3f} per job = ratio to one instance per job"
        + ("" if result.succeeded() == len(result.jobs) else " (baseline INVALID: not every job succeeded)"),
        f"    queued_duration cold p50 {_s(percentile(cold, 0.5))} p95 {_s(percentile(cold, 0.95))},"
        f" warm p50 {_s(percentile(warm, 0.5))} p95 {_s(percentile(warm, 0.95))};"
        f" jobs scale-up left to idle runners: {result.deferred}",
        "    cold starts, p50/p95: "
        + ", ".join(
            f"{name} {_s(percentile(values, 0.5))}/{_s(percentile(values, 0.95))}"
            for name, values in result.segments().items()
        ),
        f"    Job Hook deliveries: {len(result.hook_answers)}, webhook answered in p50"
        f" {_s(percentile(result.hook_answers, 0.5))}, p95 {_s(percentile(result.hook_answers, 0.95))}",
        f"    wall time: every job finished {_s(result.jobs_s)}, every instance terminated {_s(result.terminated_s)};"
        f" agents ended {dict(sorted(result.agents_ended.items()))}",
        f"    at the end: {result.live_at_end} live instances, {result.runners_at_end} GitLab runners,"
        f" {result.leases_at_end} leases",
    ]
    if result.problems:
        lines.append("    PROBLEMS: " + "; ".join(result.problems))
    return lines


def main() -> None:
    began, load_before = time.perf_counter(), load_average()
    with quiet_stdout():
        results = run_all()
    by_name = {r.name: r for r in results}
    cold, sequential, parallel = by_name["cold"], by_name["sequential"], by_name["parallel"]

    cold_latency = cold.all_queued()
    overhead = [v - BOOT_DELAY_SECONDS for v in cold_latency]
    p50, p95 = percentile(overhead, 0.5), percentile(overhead, 0.95)
    latency_p50, latency_p95 = percentile(cold_latency, 0.5), percentile(cold_latency, 0.95)
    baseline_problems = []
    if len(cold_latency) < len(cold.jobs) or not cold_latency:
        baseline_problems.append(f"{len(cold.jobs) - len(cold_latency)} of the cold pipeline's jobs never started")
    if cold_latency and min(cold_latency) < BOOT_DELAY_SECONDS:
        baseline_problems.append(
            f"a job started {min(cold_latency):.2f} s after pending, before the {BOOT_DELAY_SECONDS} s boot delay"
        )
    latency_valid = not baseline_problems
    overhead_met = p95 is not None and p95 < TARGET_OVERHEAD_P95_SECONDS and latency_valid
    ratio50 = latency_p50 / BOOT_DELAY_SECONDS if latency_p50 is not None else None
    ratio95 = latency_p95 / BOOT_DELAY_SECONDS if latency_p95 is not None else None
    valid = all(not r.problems for r in results) and latency_valid
    segments = cold.segments()
    fleet_part = segments["hook answered to token written"]
    fleet_p50, fleet_p95 = percentile(fleet_part, 0.5), percentile(fleet_part, 0.95)
    fleet_met = fleet_p95 is not None and fleet_p95 < TARGET_FLEET_P95_SECONDS and valid

    lines = [
        f"job start: agents boot in {BOOT_DELAY_SECONDS} s, idle out after {IDLE_WAIT_SECONDS} s; idle grace"
        f" {IDLE_GRACE_SECONDS} s; jobs 'sleep {JOB_SECONDS}' on the {POOL} pool"
        f" (max_runners {EXPECTED_POOL['max_runners']}, max_builds {EXPECTED_POOL['max_builds']})",
        f"  cold start overhead ({COLD_JOBS} parallel jobs, queued_duration - boot delay):"
        f" p50 {_s(p50)}, p95 {_s(p95)} (target p95 < {TARGET_OVERHEAD_P95_SECONDS} s):"
        f" {'met' if overhead_met else 'MISSED'}",
        f"  the fleet's own part (hook answered to token written, {len(fleet_part)} cold starts): p50 {_s(fleet_p50)},"
        f" p95 {_s(fleet_p95)} (target p95 < {TARGET_FLEET_P95_SECONDS} s): {'met' if fleet_met else 'MISSED'}",
        f"    latency / boot delay: p50 {_ratio(ratio50)}, p95 {_ratio(ratio95)}"
        + ("" if latency_valid else f" (baseline INVALID: {'; '.join(baseline_problems)})"),
        f"    the {len(cold.cold())} jobs that were their runner's first, p50/p95: "
        + ", ".join(
            f"{name} {_s(percentile(values, 0.5))}/{_s(percentile(values, 0.95))}" for name, values in segments.items()
        ),
        f"  instances per job (baseline: 1 per job): cold {cold.per_job():.3f}, sequential"
        f" {sequential.per_job():.3f}, parallel {parallel.per_job():.3f}",
        f"  warm start latency, sequential: p50 {_s(percentile(sequential.warm(), 0.5))},"
        f" p95 {_s(percentile(sequential.warm(), 0.95))} ({len(sequential.warm())} warm starts)",
    ]
    for result in results:
        lines += _describe(result)
    if not valid:
        lines.append("  INVALID: " + "; ".join([*baseline_problems, *(p for r in results for p in r.problems)]))
    lines.append(footer(began, load_before))

    def scenario_figures(result: ScenarioResult) -> dict[str, Any]:
        cold_s, warm_s = result.cold(), result.warm()
        return {
            "jobs": len(result.jobs),
            "jobs_by_status": dict(sorted(Counter(j.status for j in result.jobs).items())),
            "cold_starts": len(cold_s),
            "warm_starts": len(warm_s),
            "instances_launched": result.instances,
            "agents_started": result.agents_started,
            "instances_per_job": _round(result.per_job()),
            "instances_per_job_valid": result.succeeded() == len(result.jobs),
            "cold_queued_p50_s": _round(percentile(cold_s, 0.5)),
            "cold_queued_p95_s": _round(percentile(cold_s, 0.95)),
            "warm_queued_p50_s": _round(percentile(warm_s, 0.5)),
            "warm_queued_p95_s": _round(percentile(warm_s, 0.95)),
            "deferred_to_idle_runners": result.deferred,
            "jobs_finished_s": _round(result.jobs_s, 2),
            "instances_terminated_s": _round(result.terminated_s, 2),
            "agents_ended": dict(sorted(result.agents_ended.items())),
            "live_instances_at_end": result.live_at_end,
            "gitlab_runners_at_end": result.runners_at_end,
            "leases_at_end": result.leases_at_end,
            "problems": result.problems,
        }

    figures = {
        "benchmark": "job_start",
        "boot_delay_s": BOOT_DELAY_SECONDS,
        "idle_wait_s": IDLE_WAIT_SECONDS,
        "idle_grace_s": IDLE_GRACE_SECONDS,
        "cold_overhead_p50_s": _round(p50),
        "cold_overhead_p95_s": _round(p95),
        "target_overhead_p95_s": TARGET_OVERHEAD_P95_SECONDS,
        "overhead_met": overhead_met,
        "fleet_part_p50_s": _round(fleet_p50),
        "fleet_part_p95_s": _round(fleet_p95),
        "target_fleet_part_p95_s": TARGET_FLEET_P95_SECONDS,
        "fleet_part_met": fleet_met,
        "latency_over_boot_p50": _round(ratio50),
        "latency_over_boot_p95": _round(ratio95),
        "latency_baseline_valid": latency_valid,
        "cold_first_job_segments_p50_s": {name: _round(percentile(v, 0.5)) for name, v in segments.items()},
        "cold_first_job_segments_p95_s": {name: _round(percentile(v, 0.95)) for name, v in segments.items()},
        "scenarios": {r.name: scenario_figures(r) for r in results},
        "load_average": [load_before, load_average()],
        "valid": valid,
        "met": overhead_met and fleet_met and valid,
    }
    report(lines, figures)


if __name__ == "__main__":
    sys.exit(run_benchmark("job_start", main))
