"""The demo scenario behind ``make demo``: a pipeline's jobs become spot runners, exactly once each.

It starts the whole sandbox, creates a pipeline in the GitLab emulator, and lets everything happen as it would in
AWS: GitLab delivers Job Hooks over HTTP to the served webhook, which queues the pending jobs; the event pump
hands the queue to scale-up, which launches one spot instance per job in the right pool, with a GitLab runner and
a token of its own; a job no pool can run is reported, not retried. Then one runner finishes (its instance
terminates) and its capacity goes back to the pool. The checks at the end are what a user would check.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from rich.console import Console
from rich.table import Table

from chalicelib.naming import runner_description
from fleetctl.sandbox.stack import DEFAULT_WORKDIR, Sandbox

TAG_PATTERN: list[list[str]] = [["docker", "linux"], ["docker", "dind"], [], ["docker"]]
UNMATCHED_TAGS = ["gpu"]


def _settled(store: Any, project_id: int, job_ids: list[int]) -> dict[int, str]:
    """Each job's outcome so far: launched, unmatched, not_pending, ... or "" while scale-up is on it."""
    from chalicelib.store import job_key, launch_key

    outcomes: dict[int, str] = {}
    for job_id in job_ids:
        record = store.get(job_key(project_id, job_id)) or {}
        outcome = str(record.get("outcome", ""))
        if not outcome and record.get("launch_id"):
            launch = store.get(launch_key(str(record["launch_id"]))) or {}
            outcome = "launched" if launch.get("state") == "launched" else ""
        outcomes[job_id] = outcome
    return outcomes


def _wait_until(condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def _fleet_instances(ec2: Any, fleet: str) -> list[dict[str, Any]]:
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


def run_demo(jobs: int = 6, console: Console | None = None) -> dict[str, Any]:
    from chalicelib import runtime
    from chalicelib.store import pool_key
    from fleetctl.sandbox.ec2_events import terminate_instances

    console = console or Console(highlight=False, width=120)
    started = time.monotonic()
    # Without runner agents: the checks below look at every instance, runner and token as scale-up left them,
    # and the scenario powers one instance off itself.
    with Sandbox(workdir=DEFAULT_WORKDIR / "demo", agents=False) as stack:
        assert stack.server is not None and stack.config is not None
        console.print(f"[bold]runner-fleet sandbox[/bold]  AWS {stack.aws.endpoint_url}  GitLab {stack.gitlab.url}")
        for line in stack.bootstrap():
            console.print(f"  bootstrap: {line}")
        console.print(f"  webhook:   {stack.server.webhook_url} (project {stack.project_id} hook connected)")

        specs = [
            {"name": f"job-{i + 1}", "stage": "test", "tags": TAG_PATTERN[i % len(TAG_PATTERN)]} for i in range(jobs)
        ]
        specs.append({"name": "gpu-job", "stage": "test", "tags": UNMATCHED_TAGS})
        pipeline_id = stack.gitlab.create_pipeline(stack.project_id, specs)
        console.print(f"created pipeline {pipeline_id}: {len(specs)} jobs ({jobs} runnable, 1 needing a gpu pool)")
        stack.gitlab.wait_for_deliveries(timeout=30)
        job_ids = [j["id"] for j in stack.gitlab.jobs_of_pipeline(stack.project_id, pipeline_id)]

        store = runtime.store()
        settled = _wait_until(lambda: all(_settled(store, stack.project_id, job_ids).values()), timeout=60)
        outcomes = _settled(store, stack.project_id, job_ids)
        ec2 = runtime.aws().ec2
        instances = [i for i in _fleet_instances(ec2, stack.config.fleet) if i["state"] != "terminated"]
        runners = stack.gitlab.runners()
        # Each runner's token item (its key only: the value stays out of the demo's output).
        tokens = [item["pk"] for item in store.scan("token")]

        jobs_table = Table("job", "tags", "outcome")
        for spec, job_id in zip(specs, job_ids, strict=True):
            jobs_table.add_row(str(job_id), ",".join(spec["tags"]) or "(untagged)", outcomes[job_id] or "-")
        console.print(jobs_table)
        runners_table = Table("instance", "pool", "type", "lifecycle", "GitLab runner")
        by_description = {r["description"]: r["id"] for r in runners}
        for instance in instances:
            description = runner_description(stack.config.fleet, instance["pool"], instance["id"])
            runners_table.add_row(
                instance["id"],
                instance["pool"],
                instance["type"],
                instance["lifecycle"],
                str(by_description.get(description, "-")),
            )
        console.print(runners_table)

        leases_before = {p.name: int((store.get(pool_key(p.name)) or {}).get("leases", 0)) for p in stack.config.pools}
        finished = instances[0]
        console.print(f"runner on {finished['id']} finishes its builds and powers off ...")
        terminate_instances(ec2, runtime.aws().client("events"), [finished["id"]])
        released = _wait_until(
            lambda: int((store.get(pool_key(finished["pool"])) or {}).get("leases", 0))
            == leases_before[finished["pool"]] - 1,
            timeout=30,
        )
        runner_gone = _wait_until(lambda: len(stack.gitlab.runners()) == len(runners) - 1, timeout=30)
        console.print(
            f"  {finished['pool']} leases {leases_before[finished['pool']]} -> "
            f"{int((store.get(pool_key(finished['pool'])) or {}).get('leases', 0))}"
        )

        answers = Counter(d.status_code for d in stack.gitlab.deliveries)
        by_pool = Counter(i["pool"] for i in instances)
        runnable = [j for j, spec in zip(job_ids, specs, strict=True) if spec["tags"] != UNMATCHED_TAGS]
        expectations = {
            "every webhook answered 200": set(answers) == {200},
            "every job settled": settled,
            "one spot runner per runnable job": len(instances) == len(runnable)
            and all(outcomes[j] == "launched" for j in runnable),
            "every runner in the pool its tags ask for": by_pool
            == Counter(
                "build" if "dind" in spec["tags"] else "docker" for spec in specs if spec["tags"] != UNMATCHED_TAGS
            ),
            "a GitLab runner and a token per instance": len(runners) == len(instances) == len(tokens),
            "the gpu job reported unmatched": outcomes[job_ids[-1]] == "unmatched",
            "leases match running instances": leases_before
            == {p.name: by_pool.get(p.name, 0) for p in stack.config.pools},
            "a finished runner gives its capacity back": released and runner_gone,
        }
        for name, met in expectations.items():
            console.print(f"  {'[green]ok[/green]' if met else '[red]FAILED[/red]'}  {name}")
        return {
            "scenario": "scale-up",
            "pipeline_jobs": len(specs),
            "webhooks_delivered": sum(answers.values()),
            "webhooks_by_status": {str(k): v for k, v in sorted(answers.items())},
            "jobs_launched": sum(1 for o in outcomes.values() if o == "launched"),
            "jobs_unmatched": sum(1 for o in outcomes.values() if o == "unmatched"),
            "instances_launched": len(instances),
            "instances_by_pool": dict(sorted(by_pool.items())),
            "instances_by_lifecycle": dict(sorted(Counter(i["lifecycle"] for i in instances).items())),
            "gitlab_runners": len(runners),
            "seconds": round(time.monotonic() - started, 1),
            "ok": all(expectations.values()),
        }
