"""The soak behind ``make soak``: the whole sandbox under load and faults for minutes, then everything accounted for.

The sandbox runs as it always does (Lambda functions side by side and stopped at their timeouts, EventBridge events
twice and out of order, AWS's reads lagging, GitLab as it behaves; see ``fleetctl.sandbox.stack``), with reconcile
on its schedule. On top of that, for ``minutes``, a seeded random stream of:

* pipelines of three stages over every pool (tagged and untagged jobs), a few of whose jobs fail on their own;
* spot interruptions (the two-minute warning cut to seconds) of runners in use;
* agent faults: a runner that crashes mid-job (GitLab's job stays running until StuckCiJobsWorker drops it an
  hour later), one whose job fails with ``runner_system_failure``, an instance that hangs at boot;
* GitLab 5xx bursts on the API the fleet calls (runners, jobs, retries), not on the runners' own endpoints;
* DynamoDB throttling bursts (``aws_rules.dynamodb_throttling``) and transaction conflicts
  (``aws_rules.dynamodb.TransactionConflicts``) on the pool, launch, runner and job items;
* users cancelling running or pending jobs, and retrying failed or cancelled ones.

Reconcile checks the fleet's invariants at the end of every run; the soak collects each violation it logs. When
the load stops, the fleet gets ``DRAIN_SECONDS`` to finish every job and let every runner idle out; then GitLab's
clock moves on an hour so that StuckCiJobsWorker drops the jobs crashed runners abandoned, as GitLab would.

It passes when every job succeeded, or failed or was cancelled as a user or an injected fault made it (a later
stage skipped after one such), or was dead-lettered with a reason; when no invariant was violated; and when
nothing is left behind: no live instance, lease, token or GitLab runner. It prints a report and ends with one
JSON line: ``ok``, the seed, jobs by outcome, faults by kind, violations and what was left.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import requests
from rich.console import Console

from fleetctl.sandbox.agents import AgentOptions, Fault, JobOutcome, Phase
from fleetctl.sandbox.stack import DEFAULT_WORKDIR, GITLAB_OPERATOR_TOKEN, Sandbox, without_warm_pools

STAGES = ("build", "test", "deploy")
# Tags of the jobs, drawn at random: the docker pool's (and untagged, which it takes), the build pool's.
TAG_CHOICES: tuple[tuple[str, ...], ...] = (("docker",), ("docker", "linux"), (), ("docker", "dind"))
# Runners boot in a second and idle out after six seconds without a job; reconcile runs every 15 seconds (a
# minute in AWS) so that its repairs land within the soak.
SOAK_AGENTS = AgentOptions(boot_delay_seconds=1.0, wait_timeout_seconds=6.0, check_interval_seconds=0.5)
RECONCILE_EVERY = 15.0
PIPELINE_EVERY = (5.0, 12.0)
FAULT_EVERY = (3.0, 8.0)
USER_FAILURE_SHARE = 0.06
INTERRUPTION_NOTICE_SECONDS = 2.0
# After the load: time for the last jobs (one relaunched after a runner hung at boot waits for the boot deadline
# and the launch window, about three minutes) to run, and for every runner to idle out.
DRAIN_SECONDS = 480.0
# The GitLab API paths the fleet calls, where GitLab's 5xx bursts land (not /jobs/request and the runners' own).
FLEET_API_PATHS = r"/(user/runners|runners/\d+(/jobs)?|runners|groups/\d+/runners|projects/\d+/jobs(/\d+(/retry)?)?)"
FAULT_KINDS = (
    "spot_interruption",
    "agent_crash_mid_job",
    "agent_runner_system_failure",
    "agent_hang_at_boot",
    "gitlab_5xx_burst",
    "dynamodb_throttling",
    "dynamodb_conflicts",
    "user_cancel",
    "user_retry",
)
FAULT_WEIGHTS = (3, 1, 1, 1, 2, 2, 2, 2, 2)
FINISHED = frozenset({"success", "failed", "canceled", "skipped"})


class GitLabClock:
    """GitLab's clock: the real time, plus what the soak moved it on by."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


@dataclass
class Observed:
    """What the soak did and saw while it ran."""

    faults: Counter[str] = field(default_factory=Counter)
    pipelines: list[int] = field(default_factory=list)
    user_failures: set[str] = field(default_factory=set)  # names of jobs whose script exits 1
    cancelled: set[int] = field(default_factory=set)
    retried: set[int] = field(default_factory=set)
    violations: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _ReconcileWatch(logging.Handler):
    """Collects each invariant violation a reconcile run logs (an error, whatever the log level)."""

    def __init__(self, observed: Observed) -> None:
        super().__init__(logging.INFO)
        self._observed = observed

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "fleet invariant violated":
            found = f"{getattr(record, 'invariant', '?')}: {getattr(record, 'subject', '?')}"
            with self._observed.lock:
                self._observed.violations.append(found)


def soak_config(workdir: Path) -> Path:
    """The shipped stage file with the shortest boot deadline and no warm pool (the soak ends with nothing
    running, whatever the day and hour)."""
    return without_warm_pools(workdir, "soak-stage.yaml", boot_deadline_seconds=60)


@contextlib.contextmanager
def _quiet_lambdas(log_path: Path) -> Iterator[None]:
    """The functions' JSON logs and EMF documents go to ``log_path``, as they would to CloudWatch, not the console."""
    fleet_logger = logging.getLogger("fleet")
    with log_path.open("a") as log, contextlib.redirect_stdout(log):
        streams = [h for h in fleet_logger.handlers if isinstance(h, logging.StreamHandler)]
        saved = [h.stream for h in streams]
        for handler in streams:
            handler.setStream(log)
        try:
            yield
        finally:
            for handler, stream in zip(streams, saved, strict=True):
                handler.setStream(stream)


class Soak:
    def __init__(self, stack: Sandbox, rng: random.Random, observed: Observed, clock: GitLabClock) -> None:
        assert stack.config is not None and stack.agents is not None
        self.stack = stack
        self.rng = rng
        self.observed = observed
        self.clock = clock
        self._interruptions: list[threading.Thread] = []
        from chalicelib import runtime

        self._events = runtime.aws().client("events")
        self._ec2 = runtime.aws().ec2

    # -- load ----------------------------------------------------------------------------------------------------

    def pipeline(self) -> None:
        rng = self.rng
        specs = []
        for stage in STAGES:
            for n in range(rng.randint(1, 3)):
                name = f"{stage}-{n + 1}"
                script = ["echo working", f"sleep {rng.uniform(0.5, 3.0):.1f}"]
                if rng.random() < USER_FAILURE_SHARE:
                    name += "-fails"
                    script.append("exit 1")
                specs.append({"name": name, "stage": stage, "tags": list(rng.choice(TAG_CHOICES)), "script": script})
        pipeline_id = self.stack.gitlab.create_pipeline(self.stack.project_id, specs, stages=list(STAGES))
        with self.observed.lock:
            self.observed.pipelines.append(pipeline_id)

    def jobs(self) -> list[dict[str, Any]]:
        """Every job of the soak's pipelines, retried tries included."""
        found: list[dict[str, Any]] = []
        for pipeline_id in list(self.observed.pipelines):
            found += self.stack.gitlab.jobs_of_pipeline(self.stack.project_id, pipeline_id)
        return found

    # -- faults --------------------------------------------------------------------------------------------------

    def fault(self) -> None:
        kind = self.rng.choices(FAULT_KINDS, weights=FAULT_WEIGHTS)[0]
        if getattr(self, f"_{kind}")():
            self.observed.faults[kind] += 1

    def _spot_interruption(self) -> bool:
        from fleetctl.sandbox.ec2_events import interrupt_spot_instance

        agents = self.stack.agents
        assert agents is not None
        running = [r for r in agents.records() if r.phase is Phase.RUNNING and not r.terminated]
        if not running:
            return False
        victim = self.rng.choice(running).instance_id
        thread = threading.Thread(
            target=interrupt_spot_instance,
            args=(self._ec2, self._events, victim),
            kwargs={"notice_seconds": INTERRUPTION_NOTICE_SECONDS, "shut_down": agents.shut_down},
            name=f"interrupt-{victim}",
            daemon=True,
        )
        thread.start()
        self._interruptions.append(thread)
        return True

    def _agent_fault(self, fault: Fault) -> bool:
        assert self.stack.agents is not None and self.stack.config is not None
        pool = self.rng.choice([p.name for p in self.stack.config.pools])
        self.stack.agents.faults.for_next_agent(pool, fault)
        return True

    def _agent_crash_mid_job(self) -> bool:
        return self._agent_fault(Fault.CRASH_MID_JOB)

    def _agent_runner_system_failure(self) -> bool:
        return self._agent_fault(Fault.RUNNER_SYSTEM_FAILURE)

    def _agent_hang_at_boot(self) -> bool:
        return self._agent_fault(Fault.HANG_AT_BOOT)

    def _gitlab_5xx_burst(self) -> bool:
        status = self.rng.choice((500, 502, 503))
        self.stack.gitlab.fail_next("*", FLEET_API_PATHS, status=status, count=self.rng.randint(3, 15))
        return True

    def _dynamodb_throttling(self) -> bool:
        self.stack.aws.shim("dynamodb-throttling", "burst", calls=self.rng.randint(3, 25))
        return True

    def _dynamodb_conflicts(self) -> bool:
        prefix = self.rng.choice(("POOL#", "LAUNCH#", "RUNNER#", "JOB#"))
        self.stack.aws.shim(
            "transaction-conflicts",
            "inject",
            prefix=prefix,
            times=self.rng.randint(1, 4),
            operations=["TransactWriteItems", "UpdateItem"],
        )
        return True

    def _user(self, action: str, statuses: frozenset[str], into: set[int]) -> bool:
        candidates = [
            int(j["id"])
            for j in self.jobs()
            if j["status"] in statuses and not j.get("retried") and j["id"] not in into
        ]
        if not candidates:
            return False
        job_id = self.rng.choice(candidates)
        answer = requests.post(
            f"{self.stack.gitlab.url}/api/v4/projects/{self.stack.project_id}/jobs/{job_id}/{action}",
            headers={"PRIVATE-TOKEN": GITLAB_OPERATOR_TOKEN},
            timeout=10,
        )
        if answer.status_code not in (200, 201):
            return False
        with self.observed.lock:
            into.add(job_id)
        return True

    def _user_cancel(self) -> bool:
        return self._user("cancel", frozenset({"pending", "running"}), self.observed.cancelled)

    def _user_retry(self) -> bool:
        return self._user("retry", frozenset({"failed", "canceled"}), self.observed.retried)

    def load(self, minutes: float) -> None:
        """Pipelines and faults at random intervals for ``minutes``; then every fault still armed is disarmed."""
        load_ends = time.monotonic() + minutes * 60
        next_pipeline = next_fault = time.monotonic()
        while time.monotonic() < load_ends:
            now = time.monotonic()
            if now >= next_pipeline:
                self.pipeline()
                next_pipeline = now + self.rng.uniform(*PIPELINE_EVERY)
            if now >= next_fault:
                self.fault()
                next_fault = now + self.rng.uniform(*FAULT_EVERY)
            time.sleep(0.2)
        self.stop_faults()

    def drain(self) -> bool:
        """Until every job has finished (but those crashed runners abandoned, which only GitLab's hourly worker
        ends) and nothing but GitLab runners is left; False when that took longer than ``DRAIN_SECONDS``."""
        stack = self.stack

        def abandoned() -> set[int]:
            agents = stack.agents.records() if stack.agents else []
            return {j for r in agents for j, outcome in r.jobs if outcome is JobOutcome.ABANDONED}

        def settled() -> bool:
            jobs = self.jobs()
            left = abandoned()
            # A pipeline with an abandoned job waits for GitLab to drop it, its later stages (created) with it; the
            # other jobs of its stage still run and are waited for, or GitLab's hour would drop them too.
            held = {int(j["pipeline"]["id"]) for j in jobs if int(j["id"]) in left}
            waiting = [
                j
                for j in jobs
                if (j["status"] in ("pending", "running") and int(j["id"]) not in left)
                or (j["status"] == "created" and int(j["pipeline"]["id"]) not in held)
            ]
            return not waiting and not any(v for k, v in _leftovers(stack).items() if k != "gitlab_runners")

        return _wait_until(settled, DRAIN_SECONDS, every=2.0)

    def stop_faults(self) -> None:
        """The load is over: what is still armed is disarmed, and the interruptions under way end."""
        self.stack.gitlab.clear_faults()
        self.stack.aws.shim("dynamodb-throttling", "clear")
        for thread in self._interruptions:
            thread.join(timeout=30)

    # -- the end -------------------------------------------------------------------------------------------------

    def drop_abandoned_jobs(self) -> list[int]:
        """GitLab's StuckCiJobsWorker an hour on: a job whose runner crashed under it is failed
        (``stuck_or_timeout_failure``), as GitLab fails it when it has not heard of it for an hour."""
        self.clock.offset += timedelta(hours=1, minutes=1)
        dropped = self.stack.gitlab.drop_stuck_jobs()
        self.stack.gitlab.wait_for_deliveries(timeout=60)
        return dropped


def _leftovers(stack: Sandbox) -> dict[str, int]:
    from chalicelib import runtime
    from chalicelib.store import pool_key

    assert stack.config is not None
    ec2 = runtime.aws().ec2
    stack.aws.settle()
    live = 0
    pages = ec2.get_paginator("describe_instances").paginate(
        Filters=[
            {"Name": "tag:runner-fleet:fleet", "Values": [stack.config.fleet]},
            {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]},
        ]
    )
    for page in pages:
        live += sum(len(r["Instances"]) for r in page["Reservations"])
    store = runtime.store()
    return {
        "live_instances": live,
        "leases": sum(int((store.get(pool_key(p.name)) or {}).get("leases", 0)) for p in stack.config.pools),
        "launches_holding_leases": sum(1 for item in store.live_records("launch") if int(item.get("leases", 0)) > 0),
        "tokens": sum(1 for _ in store.scan("token")),
        "gitlab_runners": len(stack.gitlab.runners()),
    }


def _wait_until(condition: Callable[[], bool], timeout: float, every: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return condition()


def classify(soak: Soak) -> tuple[Counter[str], list[str]]:
    """Each job's outcome, and the jobs no user or injected fault explains."""
    from chalicelib import runtime
    from chalicelib.store import job_key

    stack, observed = soak.stack, soak.observed
    assert stack.agents is not None
    lost_by_agents: dict[int, JobOutcome] = {}
    for record in stack.agents.records():
        for job_id, outcome in record.jobs:
            lost_by_agents[job_id] = outcome
    store = runtime.store()
    outcomes: Counter[str] = Counter()
    unexplained: list[str] = []
    jobs = soak.jobs()
    failed_pipelines = {
        int(j["pipeline"]["id"]) for j in jobs if j["status"] in ("failed", "canceled") and not j.get("allow_failure")
    }
    for job in jobs:
        job_id, status, reason = int(job["id"]), str(job["status"]), str(job.get("failure_reason") or "")
        item = store.get(job_key(stack.project_id, job_id)) or {}
        dead_lettered = item.get("outcome") == "dead_lettered" and bool(item.get("reason"))
        if status == "success":
            kind = "succeeded"
        elif status == "failed" and reason == "script_failure" and str(job["name"]).endswith("-fails"):
            kind = "failed_by_user"
        elif status == "failed" and reason == "runner_system_failure" and job_id in lost_by_agents:
            kind = "failed_by_fault"  # an interruption's shutdown, or an agent's runner system failure
        elif (
            status == "failed"
            and reason == "stuck_or_timeout_failure"
            and (lost_by_agents.get(job_id) is JobOutcome.ABANDONED or dead_lettered)
        ):
            kind = "dead_lettered" if dead_lettered else "failed_by_fault"  # dropped by GitLab after the crash
        elif status == "canceled" and job_id in observed.cancelled:
            kind = "cancelled_by_user"
        elif status == "skipped" and int(job["pipeline"]["id"]) in failed_pipelines:
            kind = "skipped_after_failure"
        elif dead_lettered:
            kind = "dead_lettered"
        else:
            kind = "unexplained"
            unexplained.append(f"job {job_id} {job['name']}: {status} {reason}".strip())
        outcomes[kind] += 1
    return outcomes, unexplained


def run_soak(minutes: float, seed: int, console: Console | None = None, workdir: Path | None = None) -> dict[str, Any]:
    """The soak; returns its summary (the JSON line's content)."""
    console = console or Console(file=sys.stdout, highlight=False, width=120)
    workdir = workdir or DEFAULT_WORKDIR / "soak"
    rng = random.Random(seed)
    observed = Observed()
    clock = GitLabClock()
    started = time.monotonic()
    watch = _ReconcileWatch(observed)
    fleet_logger = logging.getLogger("fleet")
    log_path = workdir / "soak.log"
    workdir.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")
    console.print(f"[bold]runner-fleet soak[/bold]  {minutes:g} minutes, seed {seed}; the functions' logs: {log_path}")
    fleet_logger.addHandler(watch)
    try:
        with (
            _quiet_lambdas(log_path),
            Sandbox(
                config_path=soak_config(workdir),
                workdir=workdir,
                agent_options=SOAK_AGENTS,
                schedule_every=RECONCILE_EVERY,
                gitlab_clock=clock,
            ) as stack,
        ):
            soak = Soak(stack, rng, observed, clock)
            soak.load(minutes)
            console.print(
                f"load over after {minutes:g} minutes: {len(observed.pipelines)} pipelines, faults "
                f"{dict(sorted(observed.faults.items()))}; draining ..."
            )
            drained = soak.drain()
            dropped = soak.drop_abandoned_jobs()
            finished = _wait_until(
                lambda: all(j["status"] in FINISHED for j in soak.jobs()) and not any(_leftovers(stack).values()),
                60,
                every=2.0,
            )
            invocations = stack.pump.invocations.as_dict()
            outcomes, unexplained = classify(soak)
            left = _leftovers(stack)
            final = _final_violations(stack)
    finally:
        fleet_logger.removeHandler(watch)
    violations = sorted(set(observed.violations)) + [f"at the end: {v}" for v in final]
    summary = {
        "ok": drained
        and finished
        and not unexplained
        and not violations
        and not any(left.values())
        and outcomes["succeeded"] > 0,
        "seed": seed,
        "minutes": minutes,
        "pipelines": len(observed.pipelines),
        "jobs": dict(sorted(outcomes.items())),
        "unexplained_jobs": unexplained,
        "faults": dict(sorted(observed.faults.items())),
        "jobs_dropped_by_gitlab": len(dropped),
        "reconcile_runs": invocations["started"].get("reconcile", 0),
        "lambda_invocations": invocations,
        "invariant_violations": violations,
        "left_behind": left,
        "drained": drained and finished,
        "seconds": round(time.monotonic() - started, 1),
    }
    _print_summary(console, summary)
    return summary


def _print_summary(console: Console, summary: dict[str, Any]) -> None:
    console.print(f"  jobs by outcome: {summary['jobs']}")
    for line in summary["unexplained_jobs"]:
        console.print(f"  [red]unexplained[/red] {line}")
    console.print(f"  faults injected: {summary['faults']}")
    violations = summary["invariant_violations"]
    console.print(f"  reconcile runs: {summary['reconcile_runs']}; invariant violations: {len(violations)}")
    for violation in violations:
        console.print(f"  [red]violated[/red] {violation}", markup=True)
    console.print(f"  left behind: {summary['left_behind']}")
    console.print("[green]ok[/green]" if summary["ok"] else "[red]FAILED[/red]")


def _final_violations(stack: Sandbox) -> list[str]:
    from chalicelib import runtime
    from chalicelib.lifecycle.facts import FactSource
    from chalicelib.lifecycle.invariants import check

    assert stack.config is not None
    stack.aws.settle()
    source = FactSource(stack.config, runtime.store(), runtime.aws().ec2, runtime.gitlab_api())
    return [str(v) for v in check(source.gather(tokens=True), stack.config)]


def main(argv: list[str] | None = None) -> int:
    """``python -m fleetctl.sandbox.soak --minutes N --seed S``: run the soak, print its report and its JSON line;
    exit 1 unless it passed."""
    parser = argparse.ArgumentParser(prog="fleetctl.sandbox.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the load lasts (default 10)")
    parser.add_argument("--seed", type=int, default=None, help="the random stream's seed (default: from the clock)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time()) % 100_000
    summary = run_soak(args.minutes, seed)
    print(json.dumps(summary, sort_keys=True), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
