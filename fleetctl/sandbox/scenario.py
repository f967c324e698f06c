"""The demo scenario behind ``make demo``: a pipeline runs to completion on spot runners that leave when idle.

It starts the whole sandbox with its simulated runner instances (``fleetctl.sandbox.agents``) and lets everything
happen as it would in AWS: GitLab delivers Job Hooks over HTTP to the served webhook, which queues the pending
jobs; the event pump hands the queue to scale-up, which launches spot instances in the pools the jobs' tags ask
for, each with a GitLab runner and a token of its own; each instance boots from its pool's user data, reads and
deletes its token, registers and takes jobs; the next stage's jobs go to the runners left idle where there are
some (an ephemeral pool's instances run one job each); runners idle out, their instances power off, and their
GitLab runners and capacity go back. A job no pool can run is reported, not retried. Then a new CI image is pushed
while a job runs on the old one (``fleetctl.sandbox.image_demo``). The checks at the end are what a user would
check: every job succeeded where its tags say, the pools moved to the new image without killing a job and refused
an image with a CRITICAL finding, and nothing is left behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import sys
import time
from collections import Counter, defaultdict
from typing import Any

from rich.console import Console
from rich.table import Table

from chalicelib.config import FleetConfig
from chalicelib.naming import described_instance
from fleetctl.sandbox.agents import AgentOptions
from fleetctl.sandbox.image_demo import run_image_rotation, wait_until
from fleetctl.sandbox.stack import DEFAULT_WORKDIR, Sandbox, without_warm_pools

STAGES = ("build", "test")
# (stage, tags) of the pipeline's jobs, cycled: docker jobs in both stages, so the test stage finds runners the
# build stage left idle; docker-in-docker jobs run on the ephemeral, privileged build pool; untagged ones on docker.
JOB_PATTERN: list[tuple[str, list[str]]] = [
    ("build", ["docker", "linux"]),
    ("build", ["docker", "dind"]),
    ("build", ["docker"]),
    ("test", []),
    ("test", ["docker", "linux"]),
    ("test", ["docker", "dind"]),
]
UNMATCHED_TAGS = ["gpu"]
JOB_SCRIPT = ["echo building", "sleep 1"]
# Boot in a second; idle out after five seconds without a job: long enough for the build stage's runners to take
# the test stage's jobs, short enough to watch them leave.
DEMO_AGENTS = AgentOptions(boot_delay_seconds=1.0, wait_timeout_seconds=5.0)
FINISHED = ("success", "failed", "canceled", "skipped")


def _fleet_instances(ec2: Any, fleet: str) -> list[dict[str, Any]]:
    """Every instance of the fleet EC2 knows, terminated ones included."""
    found = []
    pages = ec2.get_paginator("describe_instances").paginate(
        Filters=[{"Name": "tag:runner-fleet:fleet", "Values": [fleet]}]
    )
    for page in pages:
        for reservation in page["Reservations"]:
            for instance in reservation["Instances"]:
                tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
                found.append(
                    {
                        "id": instance["InstanceId"],
                        "type": instance["InstanceType"],
                        "lifecycle": instance.get("InstanceLifecycle", "on-demand"),
                        "state": instance["State"]["Name"],
                        "pool": tags.get("runner-fleet:pool", ""),
                    }
                )
    return found


def _leftovers(stack: Sandbox) -> dict[str, int]:
    """What would cost money or grant access if it stayed: live instances, held leases, GitLab runners, tokens."""
    from chalicelib import runtime
    from chalicelib.store import pool_key

    assert stack.config is not None
    store = runtime.store()
    return {
        "live_instances": sum(
            1 for i in _fleet_instances(runtime.aws().ec2, stack.config.fleet) if i["state"] != "terminated"
        ),
        "leases": sum(int((store.get(pool_key(p.name)) or {}).get("leases", 0)) for p in stack.config.pools),
        "gitlab_runners": len(stack.gitlab.runners()),
        "tokens": sum(1 for _ in store.scan("token")),
    }


def _emf_seconds(text: str) -> dict[str, dict[str, list[float]]]:
    """``{metric: {pool: [values]}}`` of the ``*Seconds`` metrics among EMF documents, one JSON object a line."""
    found: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for line in text.splitlines():
        if not line.startswith('{"_aws"'):
            continue
        document = json.loads(line)
        for directive in document["_aws"]["CloudWatchMetrics"]:
            for metric in directive["Metrics"]:
                name = metric["Name"]
                if name.endswith("Seconds"):
                    value = document[name]
                    found[name][str(document.get("pool", ""))] += value if isinstance(value, list) else [value]
    return found


def run_demo(jobs: int = 6, console: Console | None = None) -> dict[str, Any]:
    """The scenario; the EMF metric documents the Lambdas print (to stdout, as in AWS) are kept out of the console
    and summarised at the end."""
    console = console or Console(file=sys.stdout, highlight=False, width=120)
    emitted = io.StringIO()
    with contextlib.redirect_stdout(emitted):
        summary = _run(jobs, console)
    latency = _emf_seconds(emitted.getvalue())
    for name in ("BootSeconds", "QueueWaitSeconds"):
        by_pool = {pool: round(statistics.median(values), 2) for pool, values in sorted(latency[name].items())}
        console.print(f"  {name} (EMF, median by pool): {by_pool}")
        summary[f"median_{name}"] = by_pool
    return summary


def _run(jobs: int, console: Console) -> dict[str, Any]:
    from chalicelib import runtime
    from chalicelib.store import job_key

    started = time.monotonic()
    with Sandbox(
        config_path=without_warm_pools(DEFAULT_WORKDIR / "demo", "demo-stage.yaml"),
        workdir=DEFAULT_WORKDIR / "demo",
        agent_options=DEMO_AGENTS,
    ) as stack:
        assert stack.server is not None and stack.config is not None and stack.agents is not None
        config = stack.config
        console.print(f"[bold]runner-fleet sandbox[/bold]  AWS {stack.aws.endpoint_url}  GitLab {stack.gitlab.url}")
        for line in stack.bootstrap():
            console.print(f"  bootstrap: {line}")
        console.print(f"  webhook:   {stack.server.webhook_url} (project {stack.project_id} hook connected)")

        specs = [
            {"name": f"job-{i + 1}", "stage": stage, "tags": tags, "script": JOB_SCRIPT}
            for i, (stage, tags) in enumerate(JOB_PATTERN[i % len(JOB_PATTERN)] for i in range(jobs))
        ]
        pipeline_id = stack.gitlab.create_pipeline(stack.project_id, specs, stages=STAGES)
        gpu_pipeline = stack.gitlab.create_pipeline(
            stack.project_id, [{"name": "gpu-job", "stage": "test", "tags": UNMATCHED_TAGS}], stages=STAGES
        )
        console.print(
            f"created pipeline {pipeline_id}: {jobs} jobs in stages {', '.join(STAGES)}; "
            f"pipeline {gpu_pipeline}: 1 job needing a gpu pool"
        )
        job_ids = [int(j["id"]) for j in stack.gitlab.jobs_of_pipeline(stack.project_id, pipeline_id)]
        [gpu_job] = [int(j["id"]) for j in stack.gitlab.jobs_of_pipeline(stack.project_id, gpu_pipeline)]

        def statuses() -> dict[int, str]:
            return {j: str(stack.gitlab.job(stack.project_id, j)["status"]) for j in job_ids}

        all_finished = wait_until(lambda: all(s in FINISHED for s in statuses().values()), timeout=180)
        store = runtime.store()
        gpu_outcome = ""
        if wait_until(lambda: bool((store.get(job_key(stack.project_id, gpu_job)) or {}).get("outcome")), 30):
            gpu_outcome = str((store.get(job_key(stack.project_id, gpu_job)) or {}).get("outcome"))
        console.print("pipeline finished; waiting for the runners to idle out ...")
        cleaned = wait_until(lambda: not any(_leftovers(stack).values()), timeout=90)
        stack.gitlab.wait_for_deliveries(timeout=30)

        final = statuses()
        details = [stack.gitlab.job(stack.project_id, j) for j in job_ids]
        instances = _fleet_instances(runtime.aws().ec2, config.fleet)
        pool_of = {i["id"]: i["pool"] for i in instances}
        jobs_table = Table("job", "stage", "tags", "status", "instance", "pool")
        ran_where: dict[int, str] = {}
        for spec, detail in zip(specs, details, strict=True):
            runner = detail.get("runner") or {}
            instance = described_instance(runner.get("description")) or "-"
            ran_where[int(detail["id"])] = pool_of.get(instance, "")
            jobs_table.add_row(
                str(detail["id"]),
                str(spec["stage"]),
                ",".join(spec["tags"]) or "(untagged)",
                str(detail["status"]),
                instance,
                pool_of.get(instance, "-"),
            )
        jobs_table.add_row(str(gpu_job), "test", ",".join(UNMATCHED_TAGS), "pending", "-", gpu_outcome or "-")
        console.print(jobs_table)
        instances_table = Table("instance", "pool", "type", "lifecycle", "state", "jobs run")
        runs = Counter(
            described_instance((d.get("runner") or {}).get("description")) for d in details if d.get("runner")
        )
        for launched in instances:
            instances_table.add_row(
                launched["id"],
                launched["pool"],
                launched["type"],
                launched["lifecycle"],
                launched["state"],
                str(runs.get(launched["id"], 0)),
            )
        console.print(instances_table)

        image = _image_phase(stack, console)

        leftovers = _leftovers(stack)
        violations = _settled_violations(stack, config, console)
        answers = Counter(d.status_code for d in stack.gitlab.deliveries)
        wanted_pool = {
            int(d["id"]): "build" if "dind" in spec["tags"] else "docker"
            for spec, d in zip(specs, details, strict=True)
        }
        build_jobs = sum(1 for pool in wanted_pool.values() if pool == "build")
        by_pool = Counter(i["pool"] for i in instances)
        expectations = {
            "every webhook answered 200": set(answers) == {200},
            "every job ran to success": all_finished and set(final.values()) == {"success"},
            "every job ran in the pool its tags ask for": ran_where == wanted_pool,
            "the ephemeral build pool ran one job per instance": by_pool.get("build", 0) == build_jobs
            and all(runs.get(i["id"], 0) == 1 for i in instances if i["pool"] == "build"),
            "idle docker runners took later jobs (fewer instances than jobs)": by_pool.get("docker", 0)
            < len(job_ids) - build_jobs,
            "the gpu job reported unmatched, not retried": gpu_outcome == "unmatched",
            "every runner idled out and left nothing behind": cleaned
            and image.pop("cleaned")
            and not any(leftovers.values()),
            **image.pop("expectations"),
            "the fleet's invariants hold": not violations,
        }
        console.print(
            f"  jobs succeeded {sum(1 for s in final.values() if s == 'success')}/{len(job_ids)}; "
            f"instances launched {len(instances)} ({dict(sorted(by_pool.items()))}), "
            f"terminated {sum(1 for i in instances if i['state'] == 'terminated')}; left: {leftovers}"
        )
        for name, met in expectations.items():
            console.print(f"  {'[green]ok[/green]' if met else '[red]FAILED[/red]'}  {name}")
        return {
            "scenario": "pipeline",
            "pipeline_jobs": len(job_ids) + 1,
            "webhooks_delivered": sum(answers.values()),
            "webhooks_by_status": {str(k): v for k, v in sorted(answers.items())},
            "jobs_succeeded": sum(1 for s in final.values() if s == "success"),
            "jobs_unmatched": 1 if gpu_outcome == "unmatched" else 0,
            "instances_launched": len(instances),
            "instances_terminated": sum(1 for i in instances if i["state"] == "terminated"),
            "instances_by_pool": dict(sorted(by_pool.items())),
            "instances_by_lifecycle": dict(sorted(Counter(i["lifecycle"] for i in instances).items())),
            "agents": stack.agents.stats().to_json(),
            "left_behind": leftovers,
            "image_rotation": image,
            "invariant_violations": violations,
            "seconds": round(time.monotonic() - started, 1),
            "ok": all(expectations.values()),
        }


def _image_phase(stack: Sandbox, console: Console) -> dict[str, Any]:
    """A new CI image, pushed while a job runs on the old one, then one refused by its scan; until the runners that
    took their jobs idled out too (``cleaned``)."""
    image = run_image_rotation(stack, console)
    stack.gitlab.wait_for_deliveries(timeout=30)
    image["cleaned"] = wait_until(lambda: not any(_leftovers(stack).values()), timeout=90)
    return image


def _settled_violations(stack: Sandbox, config: FleetConfig, console: Console, timeout: float = 15.0) -> list[str]:
    """The invariants once what is in flight has landed: EC2's state-change events come a moment after the state
    changed, and the table's index trails its writes, so a violation is one that outlasts them (``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        stack.aws.settle()
        stack.pump.drain(timeout=10)
        quiet = io.StringIO()
        violations = _invariant_violations(config, Console(file=quiet))
        if not violations or time.monotonic() > deadline:
            return _invariant_violations(config, console) if violations else []
        time.sleep(0.5)


def _invariant_violations(config: FleetConfig, console: Console) -> list[str]:
    """The fleet's invariants (chalicelib.lifecycle.invariants) against the sandbox's AWS and GitLab, each
    violation printed."""
    from chalicelib import runtime
    from chalicelib.lifecycle.facts import FactSource
    from chalicelib.lifecycle.invariants import check

    source = FactSource(config, runtime.store(), runtime.aws().ec2, runtime.gitlab_api())
    violations = [str(violation) for violation in check(source.gather(tokens=True), config)]
    for violation in violations:
        console.print(f"  invariant violated: {violation}", markup=False)
    return violations
