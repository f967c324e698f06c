"""The demo's CI image rotation: a push to the local ECR moves the pools to the new digest while a job on the old one
finishes, and a pushed image whose scan has a CRITICAL finding is refused by the pool that gates on scans.

Everything goes the way it goes in AWS: ``put_image`` on the local ECR (with an explicit digest: moto does not hash
manifests) makes the AWS shim put ECR's "ECR Image Action" on the default bus, EventBridge's rule routes it to the
images function through the event pump; the scan result is put on the bus as ``aws events put-events`` would put
it (basic scanning's "ECR Image Scan" shape). Reconcile, which runs every minute in AWS, is run here when the story
needs it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import yaml
from rich.console import Console

from chalicelib.naming import described_instance
from fleetctl.sandbox.stack import Sandbox

LONG_JOB_SCRIPT = ["echo building on the old image", "sleep 6"]
SHORT_JOB_SCRIPT = ["echo testing on the new image", "sleep 1"]


def digest(name: str) -> str:
    return "sha256:" + hashlib.sha256(f"runner-fleet demo {name}".encode()).hexdigest()


def _manifest(image: str) -> str:
    # moto tells images apart by manifest, whatever digest the push names: one manifest per image.
    annotations = {"org.opencontainers.image.revision": image}
    return json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", **annotations})


def short(image: str) -> str:
    return image[:19] + "…"


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    """Whether ``condition`` held within ``timeout`` seconds, polled four times a second."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.25)
    return condition()


class _Images:
    def __init__(self, stack: Sandbox) -> None:
        from chalicelib import runtime
        from chalicelib.images.store import ImageStore

        assert stack.config is not None
        self.stack = stack
        self.runtime = runtime
        self.config = stack.config
        self.ecr = runtime.aws().client("ecr")
        self.store = ImageStore(self.config.state.table, runtime.aws().dynamodb)
        self.repository = self.config.pool("docker").image.repository
        self.tag = self.config.pool("docker").image.tag

    def push(self, image: str) -> None:
        if not self.ecr.describe_repositories()["repositories"]:
            self.ecr.create_repository(repositoryName=self.repository)
        self.ecr.put_image(
            repositoryName=self.repository, imageManifest=_manifest(image), imageTag=self.tag, imageDigest=image
        )

    def scanned(self, image: str, counts: dict[str, int]) -> None:
        detail = {
            "scan-status": "COMPLETE",
            "repository-name": self.repository,
            "finding-severity-counts": counts,
            "image-digest": image,
            "image-tags": [self.tag],
        }
        self.runtime.aws().client("events").put_events(
            Entries=[{"Source": "aws.ecr", "DetailType": "ECR Image Scan", "Detail": json.dumps(detail)}]
        )

    def current(self, pool: str) -> str | None:
        record = self.store.read(pool)
        return record.current.digest if record.current else None

    def runner_image(self, instance_id: str) -> str:
        """The CI image the instance's config.toml names (from the user data it was launched with)."""
        ec2 = self.runtime.aws().ec2
        answer = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
        document = yaml.safe_load(base64.b64decode(answer["UserData"]["Value"]).decode())
        [toml] = [f["content"] for f in document["write_files"] if f["path"].endswith("config.toml")]
        [line] = [line for line in toml.splitlines() if line.strip().startswith("image")]
        return str(line.split("=", 1)[1].strip().strip('"'))


def run_image_rotation(stack: Sandbox, console: Console) -> dict[str, Any]:
    """The image story; returns its figures and expectations (name -> met)."""
    assert stack.config is not None
    images = _Images(stack)
    gitlab, project = stack.gitlab, stack.project_id
    first, second, bad = digest("base 1"), digest("base 2"), digest("base 3")

    console.print("[bold]CI image rotation[/bold]: ci image pushed to the local ECR")
    images.push(first)
    images.scanned(first, {"LOW": 2})
    on_first = wait_until(lambda: images.current("docker") == first and images.current("build") == first, 30)
    console.print(f"  pushed {short(first)}, scanned LOW 2: both pools on it ({on_first})")

    pipeline = gitlab.create_pipeline(
        project, [{"name": "long-build", "stage": "build", "tags": ["docker", "linux"], "script": LONG_JOB_SCRIPT}]
    )
    [long_job] = [int(j["id"]) for j in gitlab.jobs_of_pipeline(project, pipeline)]
    running = wait_until(lambda: gitlab.job(project, long_job)["status"] == "running", 60)
    old_instance = described_instance((gitlab.job(project, long_job).get("runner") or {}).get("description")) or ""
    old_image = images.runner_image(old_instance) if old_instance else ""
    console.print(f"  job {long_job} running on {old_instance}, image {short(old_image.rsplit('@', 1)[-1])}")

    started = time.monotonic()
    images.push(second)
    promoted = wait_until(lambda: images.current("docker") == second, 30)
    promote_seconds = round(time.monotonic() - started, 2)
    held = images.store.read("build").candidate
    console.print(
        f"  pushed {short(second)}: docker pool promoted it in {promote_seconds} s; build pool holds it for its "
        f"scan ({held.state.value if held else 'no candidate'})"
    )
    stack.aws.settle()
    report = images.runtime.reconciler().run()
    console.print(f"  reconcile: {dict(report.metrics)} (the busy runner on the old image is paused, not killed)")

    finished_first = wait_until(lambda: gitlab.job(project, long_job)["status"] == "success", 60)
    follow = gitlab.create_pipeline(
        project, [{"name": "after-push", "stage": "build", "tags": ["docker", "linux"], "script": SHORT_JOB_SCRIPT}]
    )
    [next_job] = [int(j["id"]) for j in gitlab.jobs_of_pipeline(project, follow)]
    next_done = wait_until(lambda: gitlab.job(project, next_job)["status"] == "success", 60)
    new_instance = described_instance((gitlab.job(project, next_job).get("runner") or {}).get("description")) or ""
    new_image = images.runner_image(new_instance) if new_instance else ""
    console.print(
        f"  job {long_job} finished on the old image ({finished_first}); job {next_job} ran on {new_instance}, "
        f"image {short(new_image.rsplit('@', 1)[-1])}"
    )

    images.push(bad)
    images.scanned(bad, {"CRITICAL": 1, "HIGH": 4})

    def rejected() -> bool:
        history = images.store.read("build").history
        return bool(history) and history[0].digest == bad and history[0].outcome.value == "rejected"

    refused = wait_until(rejected, 30)
    build = images.store.read("build")
    console.print(
        f"  pushed {short(bad)}, scan CRITICAL 1 HIGH 4: build pool {'refused it' if refused else 'did not refuse'}"
        f" ({build.history[0].reason if build.history else ''}); stays on "
        f"{short(build.current.digest) if build.current else '-'}"
    )
    expectations = {
        "a pushed image became each pool's pinned digest": on_first,
        "a job running on the old image finished first": running and finished_first and old_image.endswith(first),
        "runners launched after the push run the new digest": promoted and next_done and new_image.endswith(second),
        "a pushed image with a CRITICAL finding was refused by the scan-gated pool": refused,
    }
    return {
        "push_to_promotion_seconds": promote_seconds,
        "old_image_job": long_job,
        "new_image_job": next_job,
        "refused_digest": bad if refused else None,
        "expectations": expectations,
        "jobs": [long_job, next_job],
    }
