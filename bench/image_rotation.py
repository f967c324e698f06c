"""CI image rotation: a push event to its new launch template version, and the roll-out of 50 idle runners.

One sandbox (moto server in a child process, the GitLab emulator; no agents, no pump), the fleet made directly as
``bench/reconcile.py`` makes it (:class:`bench.reconcile.Bench`).

* **Promotion.** PROMOTIONS push events of new digests, each given to the images function's entry point
  (``chalicelib.images.handler.handle_image_event``, the event parsed, the pools it concerns found, the record read,
  a new launch template version made with the digest in its user data, the record and the pool's version written
  in one transaction, the version made the default), timed from the event to the return, when the template's
  default is the new version. Target: p95 under 1 s. Baseline, in the same process: the same AWS calls made on
  plain boto3 clients (DescribeLaunchTemplateVersions, CreateLaunchTemplateVersion with the same data, GetItem,
  TransactWriteItems, ModifyLaunchTemplate), one after another; the ratio is printed. Invalid when the handler did
  not move the default to a new version for every event, or its calls are not the baseline's.
* **Roll-out.** ROLLOUT_RUNNERS idle runners (both pools), then a push (and, for the pool with a scan gate, its
  passing scan), then one reconcile run: every runner launched from the old version must be paused in that run
  (``RunnersPaused``) with calls bounded as reconcile's are (the pages of the fleet plus a few calls per runner
  acted on, ``bench/reconcile.py``'s bound); a run after the retirement grace then retires them
  (``RunnersRetired``; what it left, and what it did instead, is printed). Target: all paused in one run, within
  the bound.

Reports, never fails. Run: ``.venv/bin/python bench/image_rotation.py`` (or ``make bench``).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(PROJECT_DIR), str(PROJECT_DIR / "bench")]

from _common import load_average, quiet_stdout  # noqa: E402
from reconcile import Bench  # noqa: E402

PROMOTIONS = 20
ROLLOUT_RUNNERS = 50
TARGET_P95_SECONDS = 1.0
# A push of ci/build-base:latest concerns both pools of the dev stage: docker promotes it (its record read, the
# version it starts from read, the new version made, record and pool version written, the default moved), build
# holds it for its scan (its record read and written).
BASELINE_OPERATIONS = [
    "dynamodb.GetItem",
    "ec2.DescribeLaunchTemplateVersions",
    "ec2.CreateLaunchTemplateVersion",
    "dynamodb.TransactWriteItems",
    "ec2.ModifyLaunchTemplate",
    "dynamodb.GetItem",
    "dynamodb.TransactWriteItems",
]


def digest(name: str) -> str:
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


def push_event(config: Any, image: str, at: str, region: str) -> dict[str, Any]:
    pool = config.pool("docker")
    return {
        "version": "0",
        "id": f"bench-{image[-12:]}",
        "detail-type": "ECR Image Action",
        "source": "aws.ecr",
        "account": "123456789012",
        "time": at,
        "region": region,
        "resources": [],
        "detail": {
            "result": "SUCCESS",
            "repository-name": pool.image.repository,
            "image-digest": image,
            "action-type": "PUSH",
            "image-tag": pool.image.tag,
        },
    }


def scan_event(config: Any, image: str, at: str, region: str) -> dict[str, Any]:
    event = push_event(config, image, at, region)
    event["detail-type"] = "ECR Image Scan"
    event["id"] = f"bench-scan-{image[-12:]}"
    event["detail"] = {
        "scan-status": "COMPLETE",
        "repository-name": config.pool("docker").image.repository,
        "finding-severity-counts": {"LOW": 1},
        "image-digest": image,
        "image-tags": [],
    }
    return event


def bare_transaction(dynamodb: Any, table: str, n: int) -> None:
    """A two-item transaction like the image record's and the pool version's, on items of the baseline's own."""
    dynamodb.transact_write_items(
        TransactItems=[
            {
                "Update": {
                    "TableName": table,
                    "Key": {"pk": {"S": key}},
                    "UpdateExpression": "SET v = :v",
                    "ExpressionAttributeValues": {":v": {"N": str(n)}},
                }
            }
            for key in ("BENCH#image", "BENCH#pool")
        ]
    )


def stamp(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(1_790_000_000 + seconds))


class Calls:
    """Operations made on the clients it is attached to, in order."""

    def __init__(self) -> None:
        self.made: list[str] = []

    def attach(self, client: Any) -> None:
        service = client.meta.service_model.service_name
        client.meta.events.register("before-call", lambda model, **_: self.made.append(f"{service}.{model.name}"))


def promotions(bench: Bench) -> dict[str, Any]:
    import boto3

    from chalicelib.aws import AwsClients
    from chalicelib.images.handler import handle_image_event
    from chalicelib.images.rotation import ImageRotation
    from chalicelib.images.store import ImageStore, image_key
    from chalicelib.naming import launch_template_name
    from fleetctl.sandbox.local_aws import SANDBOX_REGION

    config = bench.config
    clients = AwsClients(region=SANDBOX_REGION)
    calls = Calls()
    for service in ("ec2", "dynamodb"):
        calls.attach(clients.client(service))
    rotation = ImageRotation(
        config,
        ImageStore(config.state.table, clients.dynamodb),
        clients.ec2,
        account=lambda: "123456789012",
        region=SANDBOX_REGION,
        ecr=lambda: clients.client("ecr"),
    )
    template = launch_template_name(config.fleet, "docker")
    bare_ec2 = boto3.client("ec2", region_name=SANDBOX_REGION)
    bare_dynamodb = boto3.client("dynamodb", region_name=SANDBOX_REGION)
    app_s: list[float] = []
    bare_s: list[float] = []
    problems: list[str] = []
    handler_calls: Counter[str] = Counter()
    for n in range(PROMOTIONS):
        image = digest(f"bench promotion {n}")
        event = push_event(config, image, stamp(n), SANDBOX_REGION)
        before = len(calls.made)
        began = time.perf_counter()
        outcomes = handle_image_event(event, rotation)
        app_s.append(time.perf_counter() - began)
        made = calls.made[before:]
        handler_calls.update(made)
        docker = [o for o in outcomes if o.pool == "docker"]
        found = bare_ec2.describe_launch_templates(LaunchTemplateNames=[template])["LaunchTemplates"][0]
        if (
            not docker
            or docker[0].verdict.value != "promoted"
            or docker[0].template_version != int(found["DefaultVersionNumber"])
        ):
            problems.append(f"push {n}: not promoted to the default version ({docker})")
        if n and made != BASELINE_OPERATIONS:
            problems.append(f"push {n}: the handler called {made}, the baseline {BASELINE_OPERATIONS}")
        # The baseline: the same calls on plain clients.
        version = int(found["DefaultVersionNumber"])
        began = time.perf_counter()
        bare_dynamodb.get_item(
            TableName=config.state.table, Key={"pk": {"S": image_key("docker")}}, ConsistentRead=True
        )
        data = bare_ec2.describe_launch_template_versions(LaunchTemplateName=template, Versions=[str(version)])[
            "LaunchTemplateVersions"
        ][0]["LaunchTemplateData"]
        created = bare_ec2.create_launch_template_version(LaunchTemplateName=template, LaunchTemplateData=data)
        bare_transaction(bare_dynamodb, config.state.table, n)
        bare_ec2.modify_launch_template(
            LaunchTemplateName=template, DefaultVersion=str(created["LaunchTemplateVersion"]["VersionNumber"])
        )
        bare_dynamodb.get_item(TableName=config.state.table, Key={"pk": {"S": image_key("build")}}, ConsistentRead=True)
        bare_transaction(bare_dynamodb, config.state.table, n)
        bare_s.append(time.perf_counter() - began)
        # Put the fleet's own version back as the default, as the handler left it.
        bare_ec2.modify_launch_template(LaunchTemplateName=template, DefaultVersion=str(version))
    app_sorted = sorted(app_s)
    p95 = app_sorted[max(0, round(0.95 * len(app_sorted)) - 1)]
    ratio = statistics.median(app_s) / statistics.median(bare_s)
    return {
        "promotions": PROMOTIONS,
        "p50_s": round(statistics.median(app_s), 3),
        "p95_s": round(p95, 3),
        "bare_p50_s": round(statistics.median(bare_s), 3),
        "ratio": round(ratio, 3),
        "calls_per_promotion": {op: n / PROMOTIONS for op, n in sorted(handler_calls.items())},
        "target_p95_s": TARGET_P95_SECONDS,
        "met": p95 < TARGET_P95_SECONDS and not problems,
        "problems": problems,
    }


def rollout(bench: Bench) -> dict[str, Any]:
    from chalicelib.images.handler import handle_image_event
    from chalicelib.lifecycle.rules import RETIRE_GRACE_SECONDS
    from fleetctl.sandbox.local_aws import SANDBOX_REGION

    bench.grow(ROLLOUT_RUNNERS, 0)
    image = digest("bench rollout")
    rotation = bench_rotation(bench)
    handle_image_event(push_event(bench.config, image, stamp(10_000), SANDBOX_REGION), rotation)
    handle_image_event(scan_event(bench.config, image, stamp(10_001), SANDBOX_REGION), rotation)
    bench.stack.aws.settle()
    expected = bench.expected(ROLLOUT_RUNNERS)
    paused = bench.run(0.0)
    retired = bench.run(RETIRE_GRACE_SECONDS + 1)
    aws_limit = expected.aws_limit(ROLLOUT_RUNNERS)
    gitlab_limit = expected.gitlab_limit(ROLLOUT_RUNNERS)
    left = [
        (r.instance_id, r.state.value, r.draining, r.busy)
        for r in (bench.store.runners.runner(i) for i in bench._healthy)
        if r is not None and not r.terminated
    ]
    paused_n = paused.report.metrics.get("RunnersPaused", 0)
    retired_n = retired.report.metrics.get("RunnersRetired", 0)
    return {
        "runners": ROLLOUT_RUNNERS,
        "paused_in_first_run": paused_n,
        "first_run_s": round(paused.seconds, 2),
        "first_run_aws_calls": sum(paused.aws.values()),
        "first_run_gitlab_calls": sum(paused.gitlab.values()),
        "aws_limit": aws_limit,
        "gitlab_limit": gitlab_limit,
        "retired_in_second_run": retired_n,
        "not_retired": left,
        "second_run": {
            "done": dict(retired.report.done),
            "skipped": dict(retired.report.skipped),
            "stopped": retired.report.stopped,
        },
        "second_run_s": round(retired.seconds, 2),
        "met": paused_n == ROLLOUT_RUNNERS
        and sum(paused.aws.values()) <= aws_limit
        and sum(paused.gitlab.values()) <= gitlab_limit,
    }


def bench_rotation(bench: Bench) -> Any:
    from chalicelib.images.rotation import ImageRotation
    from chalicelib.images.store import ImageStore
    from fleetctl.sandbox.local_aws import SANDBOX_REGION

    return ImageRotation(
        bench.config,
        ImageStore(bench.config.state.table, bench.own.dynamodb),
        bench.own.ec2,
        account=lambda: "123456789012",
        region=SANDBOX_REGION,
    )


def main() -> None:
    started, load_before = time.perf_counter(), load_average()
    with tempfile.TemporaryDirectory(prefix="bench-images-") as tmp, quiet_stdout():
        bench = Bench(Path(tmp))
        try:
            bench.start()
            promoted = promotions(bench)
            rolled = rollout(bench)
        finally:
            bench.stop()
    load_after = load_average()
    valid = not promoted["problems"]
    print(
        f"image promotion: {PROMOTIONS} push events, event to new default launch template version\n"
        f"  p50 {promoted['p50_s']} s, p95 {promoted['p95_s']} s (target p95 < {TARGET_P95_SECONDS} s): "
        f"{'met' if promoted['met'] else 'MISSED'}\n"
        f"  baseline (the same AWS calls on plain clients) p50 {promoted['bare_p50_s']} s; ratio {promoted['ratio']}\n"
        f"  calls per promotion: {promoted['calls_per_promotion']}"
    )
    for problem in promoted["problems"]:
        print(f"  INVALID: {problem}")
    print(
        f"roll-out: {ROLLOUT_RUNNERS} idle runners on the old version; one reconcile run paused "
        f"{rolled['paused_in_first_run']} in {rolled['first_run_s']} s with {rolled['first_run_aws_calls']} AWS calls "
        f"(limit {rolled['aws_limit']}) and {rolled['first_run_gitlab_calls']} GitLab calls (limit "
        f"{rolled['gitlab_limit']}); the run after the grace retired {rolled['retired_in_second_run']} in "
        f"{rolled['second_run_s']} s ({rolled['second_run']}; left {len(rolled['not_retired'])}): "
        f"{'met' if rolled['met'] else 'MISSED'}\n"
        f"  ({time.perf_counter() - started:.0f} s; load average {load_before:.2f} before, {load_after:.2f} after)"
    )
    print(
        json.dumps(
            {
                "benchmark": "image_rotation",
                "promotion": promoted,
                "rollout": rolled,
                "load_average": [load_before, load_after],
                "valid": valid,
                "met": promoted["met"] and rolled["met"],
            }
        )
    )


if __name__ == "__main__":
    main()
